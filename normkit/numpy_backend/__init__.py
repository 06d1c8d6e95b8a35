"""The NumPy backend: normkit's embedded default, registered like any other plugin.

Two implementations of the same numerics sit behind it:

* **compiled** (:mod:`normkit.numpy_backend.compiled`, numba kernels, installed by the ``fast``
  extra): one parallel fused pass for the statistics and one for the output, at the
  memory-bandwidth floor;
* **pure NumPy** (this module and :mod:`normkit.numpy_backend.pure`): "reduce over these axes,
  then scale and shift" on views of the input. It handles every call, and takes the ones the
  compiled path does not (non-contiguous input, layer norm over non-trailing axes).

The environment variable ``NORMKIT_NUMPY_KERNELS`` chooses, read on the first NumPy op:
``auto`` (the default: compiled when numba is installed), ``compiled`` (an error without
numba) or ``pure``; :func:`use_kernels` switches at run time. Neither numba nor the compiled
kernels are imported before the first op.

bfloat16 arrays (from ``ml_dtypes``) are handled when that package is installed; normkit never
imports it itself unless asked to create a bfloat16 array.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import numpy as np

from normkit._registry import hookimpl
from normkit.hookspecs import BackendInfo
from normkit.numpy_backend import pure as kernels
from normkit.numpy_backend import statistics

__all__ = [
    "KERNELS_ENV",
    "kernels_in_use",
    "normkit_backend_info",
    "normkit_batch_norm",
    "normkit_group_norm",
    "normkit_instance_norm",
    "normkit_layer_norm",
    "normkit_moments",
    "normkit_normalize",
    "normkit_rms_norm",
    "numpy_dtype",
    "planned_kernels",
    "use_kernels",
]

KERNELS_ENV = "NORMKIT_NUMPY_KERNELS"
"""Environment variable choosing the NumPy backend's kernels: ``auto``, ``compiled`` or ``pure``."""

_KERNEL_CHOICES = ("auto", "compiled", "pure")
_compiled: ModuleType | None = None
_resolved = False


def use_kernels(choice: str) -> str:
    """Use the ``"compiled"`` kernels, the ``"pure"`` NumPy ones, or ``"auto"`` (compiled when
    numba is installed); returns the kernels now in use. The first NumPy op calls this with
    ``$NORMKIT_NUMPY_KERNELS`` (default ``auto``).

    :raises ValueError: for another choice.
    :raises ModuleNotFoundError: for ``"compiled"`` without numba.
    """
    global _compiled, _resolved
    if choice not in _KERNEL_CHOICES:
        raise ValueError(
            f"kernels={choice!r} (from ${KERNELS_ENV} or use_kernels): expected one of {_KERNEL_CHOICES}"
        )
    compiled = None
    if choice != "pure":
        try:
            from normkit.numpy_backend import compiled
        except ImportError as error:
            if choice == "compiled":
                raise ModuleNotFoundError(
                    f"the compiled NumPy kernels need numba ({error}); install normkit[fast], or set "
                    f"{KERNELS_ENV}=pure"
                ) from error
    _compiled, _resolved = compiled, True
    return kernels_in_use()


def kernels_in_use() -> str:
    """``"compiled"`` or ``"pure"``: the kernels the NumPy backend runs (resolving
    ``$NORMKIT_NUMPY_KERNELS`` if no op has yet)."""
    _glue()
    return "pure" if _compiled is None else "compiled"


def planned_kernels() -> str:
    """What the first NumPy op will use, found without importing numba: ``"compiled (numba X)"``,
    or ``"pure (...)"`` with the reason (for ``normkit info``)."""
    if _resolved:
        return kernels_in_use()
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice == "pure":
        return "pure (as chosen)"
    if importlib.util.find_spec("numba") is None:
        return "pure (numba is not installed: pip install normkit[fast])"
    from importlib.metadata import version

    return f"compiled (numba {version('numba')})"


def _glue() -> ModuleType | None:
    """The compiled path's glue module, or ``None`` for the pure path."""
    if not _resolved:
        use_kernels(os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto")
    return _compiled


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


def _astype(array: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(array).astype(numpy_dtype(dtype))


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
            astype=_astype,
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
    """Upcast, collapse and centre ``x``; see :func:`normkit.numpy_backend.pure.centered_moments`.

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
    out: np.ndarray | None,
) -> np.ndarray:
    shape = _channel_shape(x.ndim, axis, x.shape[axis])
    cdt = kernels.compute_dtype(x.dtype)
    y = out if out is not None and out.dtype == cdt else np.empty(x.shape, dtype=cdt)
    kernels.eval_scale_shift(
        x,
        _per_channel(running_mean, shape),
        _per_channel(running_var, shape),
        eps,
        _per_channel(weight, shape),
        _per_channel(bias, shape),
        y,
    )
    return kernels.finish_output(y, x, out)


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
    out: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Batch norm (statistics per channel) or instance norm (per sample and channel; the
    running statistics then take the mean over the batch of the per-instance ones)."""
    glue = _glue()
    axis %= x.ndim
    if not use_batch_stats:
        y = None
        if glue is not None:
            y = glue.channel_eval(x, running_mean, running_var, weight, bias, eps, axis, out)
        if y is None:
            y = _normalize_with_running_stats(x, running_mean, running_var, weight, bias, eps, axis, out)
        return y, running_mean, running_var
    result = None if glue is None else glue.channel_train(x, weight, bias, eps, axis, per_instance, out)
    if result is None:
        first = 1 if per_instance else 0
        axes = tuple(a for a in range(first, x.ndim) if a != axis)
        y, mean, var, n = _normalize_with_batch_stats(x, axes, axis, weight, bias, eps)
        if out is not None:
            y = kernels.finish_output(y, x, out)
    else:
        y, mean, var, n = result
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
    x,
    weight,
    bias,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    axis,
    unbiased_running_var,
    *,
    out=None,
):
    return _channel_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var,
        False, out,
    )  # fmt: skip


@hookimpl
def normkit_instance_norm(
    x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var,
    *, out=None,
):  # fmt: skip
    return _channel_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis,
        unbiased_running_var, True, out,
    )  # fmt: skip


@hookimpl
def normkit_layer_norm(x, weight, bias, axes, eps, *, out=None):
    glue = _glue()
    if glue is not None:
        y = glue.layer_norm(x, weight, bias, tuple(axes), eps, out)
        if y is not None:
            return y
    shape, view_axes, _, d, shift, mean, var = _batch_statistics(x, tuple(axes))
    param_shape = [shape[a] if a in view_axes else 1 for a in range(len(shape))]
    cdt = d.dtype
    w = None if weight is None else np.asarray(weight, dtype=cdt).reshape(param_shape)
    b = None if bias is None else np.asarray(bias, dtype=cdt).reshape(param_shape)
    y = kernels.normalize_elementwise(d, shift, mean, var, eps, w, b)
    return kernels.finish_output(y.reshape(x.shape), x, out)


@hookimpl
def normkit_moments(x, axes, mask, group_axis, num_groups):
    glue = _glue()
    if glue is not None:
        result = glue.moments(x, tuple(axes), mask, group_axis, num_groups)
        if result is not None:
            return result
    return statistics.moments(x, tuple(axes), mask, group_axis, num_groups)


@hookimpl
def normkit_normalize(x, mean, var, weight, bias, eps, axes, param_axes, *, out=None):
    glue = _glue()
    per_channel = (
        len(param_axes) == 1
        and np.size(mean) == x.shape[param_axes[0]]
        and len(axes) + 1 == x.ndim
        and x.size > 0
    )
    if glue is not None and per_channel:  # the compiled eval kernel: the same map, fused
        y = glue.channel_eval(x, mean, var, weight, bias, eps, param_axes[0] % x.ndim, out)
        if y is not None:
            return y
    return statistics.normalize(x, mean, var, weight, bias, eps, tuple(axes), tuple(param_axes), out)


@hookimpl
def normkit_group_norm(x, num_groups, weight, bias, eps, axis, *, out=None):
    glue = _glue()
    if glue is not None:
        y = glue.group_norm(x, num_groups, weight, bias, eps, axis, out)
        if y is not None:
            return y
    return statistics.group_norm(x, num_groups, weight, bias, eps, axis, out)


@hookimpl
def normkit_rms_norm(x, weight, axes, eps, weight_offset, cast_before_weight, *, out=None):
    glue = _glue()
    if glue is not None:
        y = glue.rms_norm(x, weight, tuple(axes), eps, weight_offset, cast_before_weight, out)
        if y is not None:
            return y
    return statistics.rms_norm(x, weight, tuple(axes), eps, weight_offset, cast_before_weight, out)
