"""The normkit plugin: registered through the ``normkit.backends`` entry point named ``jax``,
loaded by normkit only once ``jax`` has been imported. It describes the backend and registers
the kernels of :mod:`normkit_jax.kernels` as its hooks.

It claims ``jax.Array`` (concrete arrays, ``jaxlib._jax.ArrayImpl``) and ``jax.core.Tracer``
(what a function sees under ``jit``, ``grad``, ``jvp``, ``vmap`` or ``shard_map``): tracers are
no nominal subclasses of ``jax.Array`` (``isinstance`` says yes only through a metaclass hook),
and normkit's registry matches by subclass. Nothing here asks a tracer for its devices or
values, which it cannot give.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import normkit
from normkit_jax import kernels

__all__ = [
    "ARRAY_TYPES",
    "normkit_backend_info",
    "normkit_batch_norm",
    "normkit_group_norm",
    "normkit_instance_norm",
    "normkit_layer_norm",
    "normkit_moments",
    "normkit_normalize",
    "normkit_rms_norm",
]

ARRAY_TYPES = ("jax:Array", "jax.core:Tracer")
"""The classes this backend handles, as normkit's registry names them."""

PLATFORMS = ("gpu", "tpu", "cpu")
"""JAX's platform names, in the order a default is preferred."""


def dtypes() -> tuple[str, ...]:
    """The floating dtypes the kernels take: float64 only with ``jax_enable_x64`` (without it
    JAX makes float32 arrays instead, with a warning)."""
    narrow = ("float16", "bfloat16", "float32")
    return (*narrow, "float64") if kernels.x64_enabled() else narrow


def _devices() -> tuple[str, ...]:
    """The platforms with devices, JAX's default first."""
    found = []
    for platform in PLATFORMS:
        try:
            if jax.devices(platform):
                found.append(platform)
        except RuntimeError:  # no such platform in this jaxlib
            continue
    default = jax.default_backend()
    return (default, *(p for p in found if p != default))


def _device_of(name: str | None) -> Any:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` (the platform's first device) or ``"<platform>:<N>"``
    (its ``N``-th), as a JAX device; ``None``: JAX's default device."""
    if name is None:
        return None
    platform, _, index = name.partition(":")
    if platform not in PLATFORMS or (index and not index.isdigit()):
        raise ValueError(f"device={name!r}: the jax backend takes 'cpu', 'gpu', 'tpu' or '<platform>:<N>'")
    try:
        devices = jax.devices(platform)
    except RuntimeError as error:
        raise ValueError(f"device={name!r}: JAX has no {platform} devices here ({error})") from None
    position = int(index or 0)
    if position >= len(devices):
        raise ValueError(f"device={name!r}: JAX has {len(devices)} {platform} device(s)")
    return devices[position]


def _asarray(array: np.ndarray, dtype: str, device: str | None) -> jax.Array:
    """A JAX array of the named dtype holding ``array``'s values, rounded once by NumPy
    (bfloat16 through ``ml_dtypes``, JAX's own bfloat16), on ``device``."""
    target = jax.dtypes.canonicalize_dtype(jnp.dtype(dtype))
    values = np.asarray(array).astype(target)
    return jax.device_put(values, _device_of(device))


def _device(array: Any) -> str:
    """The platform of a concrete array (``"cpu"``), ``"<platform>:<N>"`` for its ``N``-th device
    after the first; for a tracer, JAX's default platform: a tracer has no devices to ask."""
    if isinstance(array, jax.core.Tracer):
        return jax.default_backend()
    devices = array.devices()
    device = next(iter(devices))
    if len(devices) > 1:
        return device.platform
    position = jax.devices(device.platform).index(device)
    return device.platform if position == 0 else f"{device.platform}:{position}"


def _shape(array: Any) -> tuple[int | None, ...]:
    """The shape, with ``None`` for a symbolic dimension (``jax.export`` shape polymorphism)."""
    return tuple(d if isinstance(d, int) else None for d in array.shape)


def _full(shape: tuple[int, ...], fill_value: float, dtype: str, like: Any) -> jax.Array:
    """``jnp.full`` of the named dtype, on ``like``'s device: the same device for a
    single-device array, replicated over its mesh for one sharded by a ``NamedSharding``, and
    inside the trace (wherever the traced computation runs) for a tracer."""
    target = jax.dtypes.canonicalize_dtype(jnp.dtype(dtype))
    array = jnp.full(shape, fill_value, dtype=target)
    if isinstance(like, jax.core.Tracer):
        return array
    sharding = like.sharding
    if len(like.devices()) == 1:
        return jax.device_put(array, next(iter(like.devices())))
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(array, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return array


def _to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy (bfloat16 as ``ml_dtypes.bfloat16``); a tracer raises JAX's own error."""
    return np.array(array, copy=True)


def backend_info(name: str = "jax") -> normkit.BackendInfo:
    """This backend's description under ``name`` (the testing backends reuse it)."""
    return normkit.BackendInfo(
        name=name,
        distribution="normkit-jax",
        array_types=ARRAY_TYPES,
        dtypes=dtypes(),
        devices=_devices(),
        asarray=_asarray,
        to_numpy=_to_numpy,
        dtype_name=lambda a: a.dtype.name,
        device=_device,
        shape=_shape,
        full=_full,
        astype=kernels.astype,
    )


_INFO: dict[bool, normkit.BackendInfo] = {}


@normkit.hookimpl
def normkit_backend_info() -> normkit.BackendInfo:
    """The description, built once per state of ``jax_enable_x64`` (which decides float64)."""
    x64 = kernels.x64_enabled()
    if x64 not in _INFO:
        _INFO[x64] = backend_info()
    return _INFO[x64]


# The kernels take exactly the spec's parameters, so they are the hook implementations
# themselves (pluggy registers them under these names).
normkit_batch_norm = normkit.hookimpl(kernels.batch_norm)
normkit_instance_norm = normkit.hookimpl(kernels.instance_norm)
normkit_layer_norm = normkit.hookimpl(kernels.layer_norm)
normkit_group_norm = normkit.hookimpl(kernels.group_norm)
normkit_rms_norm = normkit.hookimpl(kernels.rms_norm)
normkit_moments = normkit.hookimpl(kernels.moments)
normkit_normalize = normkit.hookimpl(kernels.normalize)
