r"""The data and the ``shard_map`` harness behind normkit-jax's Flax tests and
``bench/flax_statistics.py``, in one place so that the figures the docs quote and the tests
that check them are computed from the same inputs.

* :func:`offset_data`: :math:`10^4 + \mathcal N(0, 1)` in float32 (:math:`|\mu|/\sigma = 10^4`),
  where :math:`E[x^2] - E[x]^2` (Flax's default ``use_fast_variance=True``) loses every digit;
* :func:`device_data`, :func:`row_mask`: a batch of ``DEVICES * ROWS`` rows split over
  ``DEVICES`` devices, device :math:`i` drawing from :math:`\mathcal N(\text{offset} + 3i,
  (1 + i)^2)`, with masks that give the devices unequal counts (Flax's ``axis_name`` statistics
  are then a mean of means, google/flax#2417);
* :func:`device_mesh`, :func:`nnx_under_shard_map`, :func:`merged_under_shard_map`: one call
  of a ``flax.nnx`` layer, or of a merge of :mod:`normkit_jax.collectives`, on the ``DEVICES``
  devices under ``jax.jit(jax.shard_map(...))`` (the batch sharded along axis 0).

The device functions need ``DEVICES`` JAX devices: on a CPU, set
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import normkit
from normkit_jax.collectives import global_moments, moments_across

__all__ = [
    "CHANNELS",
    "COUNTED_ROWS",
    "DEVICES",
    "EMPTY_DEVICE_ROWS",
    "ROWS",
    "device_data",
    "device_mesh",
    "merged_under_shard_map",
    "nnx_under_shard_map",
    "offset_data",
    "row_mask",
]

DEVICES = 4
ROWS = 8
"""Rows per device."""
CHANNELS = 5
COUNTED_ROWS = (2, 8, 3, 5)
"""Rows counted (unmasked) on each device: unequal counts, none empty."""
EMPTY_DEVICE_ROWS = (2, 8, 0, 5)
"""Rows counted on each device, device 2 counting none."""


def offset_data(shape: tuple[int, ...], *, seed: int = 5, offset: float = 1e4) -> np.ndarray:
    """``offset + N(0, 1)`` of ``shape``, rounded to float32."""
    return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def row_mask(counted_rows: Sequence[int]) -> np.ndarray:
    """``(DEVICES * ROWS, 1)`` booleans: the first ``counted_rows[i]`` rows of device ``i``."""
    if len(counted_rows) != DEVICES:
        raise ValueError(f"counted_rows={tuple(counted_rows)!r}: expected one count per device ({DEVICES})")
    return np.concatenate([np.arange(ROWS) < c for c in counted_rows])[:, None]


def device_data(
    counted_rows: Sequence[int], *, offset: float = 0.0, std_grows: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(x, mask)`` of shape ``(DEVICES * ROWS, CHANNELS)``, float32 and bool: device :math:`i`
    (rows :math:`8i` to :math:`8i + 7`) draws from :math:`\mathcal N(\text{offset} + 3i,
    s_i^2)` with :math:`s_i = 1 + i` (``std_grows``) or 1, so the devices' means differ by 3 to 9
    of their standard deviations; ``mask`` keeps the first ``counted_rows[i]`` rows of device
    :math:`i` and, besides, drops one value in five at random (so each channel has its own
    count on each device; use :func:`row_mask` for whole rows)."""
    rng = np.random.default_rng(seed)
    device = np.repeat(np.arange(DEVICES), ROWS)[:, None]
    std = 1.0 + device if std_grows else np.ones_like(device, dtype=float)
    x = (offset + 3.0 * device + std * rng.standard_normal((DEVICES * ROWS, CHANNELS))).astype(np.float32)
    mask = row_mask(counted_rows) & (rng.random(x.shape) > 0.2)
    return x, mask


def device_mesh(axis: str = "d") -> Mesh:
    """A one-axis mesh of the first ``DEVICES`` JAX devices, named ``axis``.

    :raises RuntimeError: with fewer devices (and how to get them on a CPU).
    """
    devices = jax.devices()
    if len(devices) < DEVICES:
        raise RuntimeError(
            f"{len(devices)} JAX device(s); this needs {DEVICES}: set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={DEVICES} before jax is imported"
        )
    return Mesh(np.array(devices[:DEVICES]), (axis,))


def nnx_under_shard_map(
    layer: nnx.Module, mesh: Mesh, axis: str | None = None
) -> Callable[[Any, Any], tuple[jax.Array, nnx.State]]:
    """``run(x, mask) -> (y, state)``: one call ``layer(x, mask=mask)`` on every device of
    ``mesh`` under ``jax.jit(jax.shard_map(...))``, ``x`` and ``mask`` sharded along axis 0 over
    the mesh axis ``axis`` (default: the mesh's only axis), the layer's state replicated (Flax's
    split/merge pattern: the layer itself is not changed). ``y`` comes back whole, in batch
    order; ``state`` is the layer's state after the call (the same on every device)."""
    name = mesh.axis_names[0] if axis is None else axis
    graphdef, state = nnx.split(layer)

    def per_device(state: nnx.State, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, nnx.State]:
        module = nnx.merge(graphdef, state)
        return module(x, mask=mask), nnx.state(module)

    run = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(name), P(name)), out_specs=(P(name), P()))
    )
    return lambda x, mask: run(state, jnp.asarray(x), jnp.asarray(mask))


def merged_under_shard_map(
    mesh: Mesh, x: Any, mask: Any, *, from_data: bool, axis: str | None = None
) -> normkit.Moments:
    """The moments over axis 0 of ``x``'s unmasked values, ``x`` and ``mask`` sharded along axis 0
    over the mesh axis ``axis`` (default: the mesh's only axis) under
    ``jax.jit(jax.shard_map(...))``, merged across the devices by
    :func:`~normkit_jax.collectives.global_moments` (``from_data``: the two-pass across devices,
    what the layers use) or by :func:`~normkit_jax.collectives.moments_across` of each device's
    masked moments."""
    name = mesh.axis_names[0] if axis is None else axis

    def per_device(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        if from_data:
            return tuple(global_moments(x, 0, name, mask=mask))
        return tuple(moments_across(normkit.moments(x, axis=1, mask=mask), name))

    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(name), P(name)), out_specs=P()))
    return normkit.Moments(*run(jnp.asarray(x), jnp.asarray(mask)))
