"""The normkit plugin: registered through the ``normkit.backends`` entry point named ``cupy``,
loaded by normkit only once ``cupy`` has been imported. Building its description needs no GPU;
running a kernel does.
"""

from __future__ import annotations

import cupy
import numpy as np

import normkit
from normkit_cupy import kernels

__all__ = [
    "normkit_backend_info",
    "normkit_batch_norm",
    "normkit_group_norm",
    "normkit_instance_norm",
    "normkit_layer_norm",
    "normkit_moments",
    "normkit_normalize",
    "normkit_rms_norm",
]

DTYPES = ("float16", "float32", "float64")  # CuPy has no bfloat16


def _device_id(device: str | None) -> int | None:
    """``"cuda"`` or ``"cuda:N"`` as a device number (``None``: the current device)."""
    if device in (None, "cuda"):
        return None
    name, _, index = device.partition(":")
    if name != "cuda" or not index.isdigit():
        raise ValueError(f"device={device!r}: the cupy backend has 'cuda' or 'cuda:N'")
    return int(index)


def _asarray(array: np.ndarray, dtype: str, device: str | None) -> cupy.ndarray:
    values = np.asarray(array).astype(dtype)
    device_id = _device_id(device)
    if device_id is None:
        return cupy.asarray(values)
    with cupy.cuda.Device(device_id):
        return cupy.asarray(values)


def _full(shape: tuple[int, ...], fill_value: float, dtype: str, like: cupy.ndarray) -> cupy.ndarray:
    with like.device:
        return cupy.full(shape, fill_value, dtype=dtype)


def _devices() -> tuple[str, ...]:
    """``("cuda",)`` with a CUDA device, else nothing: the suite then has nothing to run."""
    try:
        return ("cuda",) if cupy.is_available() else ()
    except Exception:  # a CUDA driver that cannot even be asked
        return ()


_INFO: normkit.BackendInfo | None = None


@normkit.hookimpl
def normkit_backend_info() -> normkit.BackendInfo:
    global _INFO
    if _INFO is None:
        _INFO = normkit.BackendInfo(
            name="cupy",
            distribution="normkit-cupy",
            array_types=("cupy:ndarray",),
            dtypes=DTYPES,
            devices=_devices(),
            asarray=_asarray,
            to_numpy=cupy.asnumpy,
            dtype_name=lambda a: a.dtype.name,
            device=lambda a: f"cuda:{a.device.id}",
            shape=lambda a: a.shape,
            full=_full,
            astype=kernels.astype,
        )
    return _INFO


# The kernels take exactly the spec's parameters, so they are the hook implementations
# themselves (pluggy registers them under these names).
normkit_batch_norm = normkit.hookimpl(kernels.batch_norm)
normkit_instance_norm = normkit.hookimpl(kernels.instance_norm)
normkit_layer_norm = normkit.hookimpl(kernels.layer_norm)
normkit_group_norm = normkit.hookimpl(kernels.group_norm)
normkit_rms_norm = normkit.hookimpl(kernels.rms_norm)
normkit_moments = normkit.hookimpl(kernels.moments)
normkit_normalize = normkit.hookimpl(kernels.normalize)
