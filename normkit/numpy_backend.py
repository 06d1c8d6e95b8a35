"""The NumPy backend: normkit's embedded default, registered like any other plugin.

It turns each spec call into "reduce over these axes, then scale and shift" on views of the
input (no transposes, no copies of float32/float64 input beyond the output buffer) and
leaves the numerical work to :mod:`normkit._numpy_kernels`. bfloat16 arrays (from
``ml_dtypes``) are handled when that package is installed; normkit never imports it itself
unless asked to create a bfloat16 array.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from normkit import _numpy_kernels as kernels
from normkit._registry import hookimpl
from normkit.hookspecs import BackendInfo

__all__ = [
    "normkit_backend_info",
    "normkit_batch_norm",
    "normkit_instance_norm",
    "normkit_layer_norm",
    "numpy_dtype",
]


def numpy_dtype(name: str) -> np.dtype:
    """A NumPy dtype by name; bfloat16 comes from ``ml_dtypes`` (imported only here)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _asarray(array: np.ndarray, dtype: str, device: str | None) -> np.ndarray:
    if device not in (None, "cpu"):
        raise ValueError(f"device={device!r}: the numpy backend only has 'cpu'")
    return np.array(array, dtype=numpy_dtype(dtype), copy=True)


def _full(shape: tuple[int, ...], fill_value: float, dtype: str, like: np.ndarray) -> np.ndarray:
    return np.full(shape, fill_value, dtype=numpy_dtype(dtype))


def _dtypes() -> tuple[str, ...]:
    has_bfloat16 = importlib.util.find_spec("ml_dtypes") is not None
    return (
        ("float16", "bfloat16", "float32", "float64")
        if has_bfloat16
        else (
            "float16",
            "float32",
            "float64",
        )
    )


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(a: np.ndarray) -> str:
    """``a.dtype.name``, cached: NumPy computes the name anew on every access (about 2 µs)."""
    try:
        return _DTYPE_NAMES[a.dtype]
    except KeyError:
        return _DTYPE_NAMES.setdefault(a.dtype, a.dtype.name)


_INFO: BackendInfo | None = None


@hookimpl
def normkit_backend_info() -> BackendInfo:
    global _INFO
    if _INFO is None:
        _INFO = BackendInfo(
            name="numpy",
            distribution="normkit",
            array_types=("numpy:ndarray",),
            dtypes=_dtypes(),
            devices=("cpu",),
            asarray=_asarray,
            to_numpy=lambda a: np.array(a, copy=True),
            dtype_name=_dtype_name,
            device=lambda a: "cpu",
            shape=lambda a: a.shape,
            full=_full,
        )
    return _INFO


def _per_channel(param: np.ndarray | None, shape: list[int]) -> np.ndarray | None:
    """A ``(C,)`` parameter as float64, shaped to broadcast along the channel axis."""
    return None if param is None else np.asarray(param, dtype=np.float64).reshape(shape)


def _updated(old: np.ndarray, batch: np.ndarray, momentum: float) -> np.ndarray:
    """``(1 - m) * old + m * batch`` in float64, stored back in ``old``'s dtype."""
    new = (1.0 - momentum) * old.astype(np.float64) + momentum * batch
    return new.astype(old.dtype)


def _batch_statistics(
    x: np.ndarray, axes: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Upcast, collapse and centre ``x``; see :func:`normkit._numpy_kernels.centered_moments`.

    :returns: ``(view_shape, view_axes, positions, d, shift, mean, var)``.
    """
    cdt = kernels.compute_dtype(x.dtype)
    upcast = x.dtype != cdt
    xc = x.astype(cdt) if upcast else x
    view, view_axes, position = kernels.collapse_axes(xc, axes)
    d, shift, mean, var = kernels.centered_moments(view, view_axes, overwrite=upcast)
    return view.shape, view_axes, position, d, shift, mean, var


def _channel_shape(ndim: int, axis: int, channels: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = channels
    return shape


def _normalize_with_batch_stats(
    x: np.ndarray,
    axes: tuple[int, ...],
    axis: int,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Batch or instance norm with the statistics of ``x`` over ``axes``.

    :returns: ``(y, mean, var, n)`` with ``mean``/``var`` float64 in the collapsed view's
        keepdims shape and ``n`` the size of each reduction group.
    """
    channels = x.shape[axis]
    shape, _, position, d, shift, mean, var = _batch_statistics(x, axes)
    param_shape = _channel_shape(len(shape), position[axis], channels)
    y = kernels.normalize_centered(
        d, shift, mean, var, eps, _per_channel(weight, param_shape), _per_channel(bias, param_shape)
    )
    n = x.size // (mean.size if mean.size else 1)
    return y.reshape(x.shape).astype(x.dtype, copy=False), mean, var, n


def _normalize_with_running_stats(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axis: int,
) -> np.ndarray:
    shape = _channel_shape(x.ndim, axis, x.shape[axis])
    cdt = kernels.compute_dtype(x.dtype)
    out = np.empty(x.shape, dtype=cdt)
    kernels.eval_scale_shift(
        x,
        _per_channel(running_mean, shape),
        _per_channel(running_var, shape),
        eps,
        _per_channel(weight, shape),
        _per_channel(bias, shape),
        out,
    )
    return out.astype(x.dtype, copy=False)


def _channel_norm(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
    per_instance: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Batch norm (statistics per channel) or instance norm (per sample and channel; the
    running statistics then take the mean over the batch of the per-instance ones)."""
    if not use_batch_stats:
        y = _normalize_with_running_stats(x, running_mean, running_var, weight, bias, eps, axis)
        return y, running_mean, running_var
    first = 1 if per_instance else 0
    axes = tuple(a for a in range(first, x.ndim) if a != axis)
    y, mean, var, n = _normalize_with_batch_stats(x, axes, axis, weight, bias, eps)
    if running_mean is None or running_var is None:
        return y, None, None
    if unbiased_running_var:
        var = var * (n / (n - 1))
    if per_instance:
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    return (
        y,
        _updated(running_mean, mean.reshape(-1), momentum),
        _updated(running_var, var.reshape(-1), momentum),
    )


@hookimpl
def normkit_batch_norm(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    return _channel_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var, False
    )


@hookimpl
def normkit_instance_norm(
    x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var
):
    return _channel_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        use_input_stats,
        momentum,
        eps,
        axis,
        unbiased_running_var,
        True,
    )


@hookimpl
def normkit_layer_norm(x, weight, bias, axes, eps):
    shape, view_axes, _, d, shift, mean, var = _batch_statistics(x, tuple(axes))
    param_shape = [shape[a] if a in view_axes else 1 for a in range(len(shape))]
    cdt = d.dtype
    w = None if weight is None else np.asarray(weight, dtype=cdt).reshape(param_shape)
    b = None if bias is None else np.asarray(bias, dtype=cdt).reshape(param_shape)
    y = kernels.normalize_elementwise(d, shift, mean, var, eps, w, b)
    return y.reshape(x.shape).astype(x.dtype, copy=False)
