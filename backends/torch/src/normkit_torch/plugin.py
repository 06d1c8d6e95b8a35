"""The normkit plugin: registered through the ``normkit.backends`` entry point named ``torch``.

normkit loads this module only after ``torch`` has been imported, so importing torch here costs
nothing. It describes the backend (:func:`normkit_backend_info`) and registers the kernels as
its hooks: batch, instance and layer norm from :mod:`normkit_torch.kernels`, the primitives
from :mod:`normkit_torch.statistics`, group norm from :mod:`normkit_torch.group_norm` and RMS
norm from :mod:`normkit_torch.rms_norm`.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

import normkit
from normkit_torch import group_norm, kernels, rms_norm, statistics

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

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_ASTYPE_DTYPES = {**DTYPES, "int64": torch.int64, "bool": torch.bool}
_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(t: torch.Tensor) -> str:
    """``"float32"`` for ``torch.float32`` (cached: one dict lookup per call)."""
    try:
        return _DTYPE_NAMES[t.dtype]
    except KeyError:
        return _DTYPE_NAMES.setdefault(t.dtype, str(t.dtype).removeprefix("torch."))


def _asarray(array: np.ndarray, dtype: str, device: str | None) -> torch.Tensor:
    """A tensor of the named dtype holding ``array``'s values (rounded once, by NumPy, when the
    array is wider: bfloat16 goes through ``ml_dtypes`` and float32, both exact)."""
    if dtype == "bfloat16":
        from normkit.numpy_backend import numpy_dtype

        exact = np.asarray(array).astype(numpy_dtype("bfloat16")).astype(np.float32)
        return torch.tensor(exact, device=device).to(torch.bfloat16)
    return torch.tensor(np.asarray(array, dtype=dtype), device=device)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        values = t.float().numpy()
        if importlib.util.find_spec("ml_dtypes") is None:
            return values
        from normkit.numpy_backend import numpy_dtype

        return values.astype(numpy_dtype("bfloat16"))
    return t.numpy().copy()


def _astype(t: torch.Tensor, dtype: str | torch.dtype) -> torch.Tensor:
    """``t`` in the named dtype (``"float64"``, ``"int64"``, ``"bool"``, ...; a ``torch.dtype``
    is taken as is), on its device; ``t`` itself when it has it already. Differentiable between
    floating dtypes, as ``Tensor.to`` is."""
    return t.to(dtype if isinstance(dtype, torch.dtype) else _ASTYPE_DTYPES[dtype])


def _full(shape: tuple[int, ...], fill_value: float, dtype: str, like: torch.Tensor) -> torch.Tensor:
    return torch.full(shape, fill_value, dtype=DTYPES[dtype], device=like.device)


def _devices() -> tuple[str, ...]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return tuple(devices)


_INFO: normkit.BackendInfo | None = None


@normkit.hookimpl
def normkit_backend_info() -> normkit.BackendInfo:
    global _INFO
    if _INFO is None:
        _INFO = normkit.BackendInfo(
            name="torch",
            distribution="normkit-torch",
            array_types=("torch:Tensor",),
            dtypes=tuple(DTYPES),
            devices=_devices(),
            asarray=_asarray,
            to_numpy=_to_numpy,
            dtype_name=dtype_name,
            device=lambda t: t.device.type,
            shape=lambda t: tuple(t.shape),
            full=_full,
            astype=_astype,
        )
    return _INFO


# The kernels take exactly the spec's parameters, so they are the hook implementations
# themselves (pluggy registers them under these names).
normkit_batch_norm = normkit.hookimpl(kernels.batch_norm)
normkit_instance_norm = normkit.hookimpl(kernels.instance_norm)
normkit_layer_norm = normkit.hookimpl(kernels.layer_norm)
normkit_group_norm = normkit.hookimpl(group_norm.group_norm)
normkit_rms_norm = normkit.hookimpl(rms_norm.rms_norm)
normkit_moments = normkit.hookimpl(statistics.moments)
normkit_normalize = normkit.hookimpl(statistics.normalize)
