r"""The NumPy backend's spec-v2 kernels in pure NumPy: the primitives (moments, normalize) and
the two composites built on the same passes (group norm, RMS norm).

Numerics as in :mod:`normkit.numpy_backend.pure`: float16/bfloat16 are upcast to float32, sums
accumulate in float64 from short runs, and the variance is the corrected two-pass
:math:`M_2 = \sum d^2 - n\,\bar d^2` on data centred at a provisional mean (:math:`\bar d` is a
rounding-sized correction, so nothing cancels). A mask enters as weights in ``{0, 1}``: masked
values are replaced by 0 before any arithmetic, so a NaN under the mask cannot leak.

Group norm reshapes the channel axis into ``(G, C/G)`` (a view for C-contiguous input) and
pools the ``C/G`` sub-axis with the other reduced axes.
"""

from __future__ import annotations

import math

import numpy as np

from normkit.numpy_backend import pure

__all__ = ["group_norm", "moments", "normalize", "rms_norm"]


def _split_groups(
    a: np.ndarray, axes: tuple[int, ...], group_axis: int, num_groups: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """``a`` with axis ``group_axis`` split into ``(G, C/G)`` and the reduced axes renumbered,
    the ``C/G`` sub-axis among them. A size-1 axis (a broadcast mask) splits into ``(1, 1)``."""
    size = a.shape[group_axis]
    parts = (num_groups, size // num_groups) if size > 1 else (1, 1)
    shape = (*a.shape[:group_axis], *parts, *a.shape[group_axis + 1 :])
    renumbered = tuple(x + 1 if x > group_axis else x for x in axes)
    return a.reshape(shape), tuple(sorted((*renumbered, group_axis + 1)))


def _squeeze(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return a.reshape([s for i, s in enumerate(a.shape) if i not in axes])


def moments(
    x: np.ndarray,
    axes: tuple[int, ...],
    mask: np.ndarray | None,
    group_axis: int | None,
    num_groups: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, m2)`` over ``axes`` (spec :func:`~normkit.hookspecs.normkit_moments`),
    the mean and M2 rounded to the compute dtype."""
    cdt = pure.compute_dtype(x.dtype)
    count, mean, m2 = moments64(x, axes, mask, group_axis, num_groups)
    return count, mean.astype(cdt), m2.astype(cdt)


def moments64(
    x: np.ndarray,
    axes: tuple[int, ...],
    mask: np.ndarray | None,
    group_axis: int | None,
    num_groups: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`moments` with the mean and M2 left in float64 (what the sums were accumulated in)."""
    cdt = pure.compute_dtype(x.dtype)
    xc = x.astype(cdt)
    if group_axis is not None and num_groups is not None:
        xc, reduced = _split_groups(xc, axes, group_axis, num_groups)
        if mask is not None:
            mask, _ = _split_groups(mask, axes, group_axis, num_groups)
    else:
        reduced = tuple(axes)
    if mask is None:
        n = math.prod(xc.shape[a] for a in reduced)
        if xc.size == 0:
            kept = tuple(s for i, s in enumerate(xc.shape) if i not in reduced)
            return np.full(kept, n, dtype=np.int64), np.zeros(kept), np.zeros(kept)
        view, view_axes, _ = pure.collapse_axes(xc, reduced)
        _, _, mean, var = pure.centered_moments(view, view_axes, overwrite=view is not x)
        kept_shape = tuple(s for i, s in enumerate(xc.shape) if i not in reduced)
        mean = mean.reshape(kept_shape)
        m2 = (var * n).reshape(kept_shape)
        return np.full(kept_shape, n, dtype=np.int64), mean, m2
    weights = np.broadcast_to(np.asarray(mask, dtype=bool), xc.shape)
    values = np.where(weights, xc, 0.0).astype(cdt)
    count = np.add.reduce(weights, axis=reduced, dtype=np.int64, keepdims=True)
    safe = np.maximum(count, 1).astype(np.float64)
    shift = (pure.sum64(values, reduced) / safe).astype(cdt)
    d = np.where(weights, values - shift, 0.0).astype(cdt)
    correction = pure.sum64(d, reduced) / safe
    m2 = np.maximum(pure.sum_squares64(d, reduced) - safe * correction * correction, 0.0)
    mean = np.where(count > 0, shift + correction, 0.0)
    m2 = np.where(count > 0, m2, 0.0)
    return _squeeze(count, reduced), _squeeze(mean, reduced), _squeeze(m2, reduced)


def _statistic_shape(stat: np.ndarray, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """A statistic of the kept axes as a float64 array of ``x``'s rank (1 on reduced axes), with
    a grouped axis (a size below ``x``'s) repeated over its blocks of consecutive indices."""
    stat = np.asarray(stat, dtype=np.float64)
    kept = [a for a in range(len(x_shape)) if a not in axes]
    stat = stat.reshape([stat.shape[i] if i < stat.ndim else 1 for i in range(len(kept))])
    for position, a in enumerate(kept):
        size = stat.shape[position]
        if size not in (x_shape[a], 1):
            stat = np.repeat(stat, x_shape[a] // size, axis=position)
    shape = [1] * len(x_shape)
    for position, a in enumerate(kept):
        shape[a] = stat.shape[position]
    return stat.reshape(shape)


def _param_shape(param: np.ndarray, x_shape: tuple[int, ...], param_axes: tuple[int, ...]) -> np.ndarray:
    shape = [1] * len(x_shape)
    for a in param_axes:
        shape[a] = x_shape[a]
    return np.asarray(param).reshape(shape)


def _centred_scaled(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    axes: tuple[int, ...],
    *,
    constant_to_zero: bool,
) -> np.ndarray:
    r""":math:`(x - \mu)/\sqrt{\sigma^2 + \epsilon}` in the compute dtype: the scale is formed
    in float64, the data pass is centred at the mean rounded to the compute dtype, and that
    rounding is put back through the shift. With ``constant_to_zero``, groups whose σ² is exactly
    0 (constant groups, whose centred values are rounding noise) give exactly 0."""
    cdt = pure.compute_dtype(x.dtype)
    mu = _statistic_shape(mean, x.shape, axes)
    variance = _statistic_shape(var, x.shape, axes)
    scale = 1.0 / np.sqrt(variance + eps)
    if constant_to_zero:
        scale = np.where(variance == 0.0, 0.0, scale)
    rounded = mu.astype(cdt)
    shift = -(mu - rounded) * scale
    y = np.subtract(x, rounded, dtype=cdt)
    np.multiply(y, scale.astype(cdt), out=y)
    np.add(y, shift.astype(cdt), out=y)
    return y


def _affine(
    y: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    x_shape: tuple[int, ...],
    param_axes: tuple[int, ...],
) -> np.ndarray:
    if weight is not None:
        np.multiply(y, _param_shape(weight, x_shape, param_axes).astype(y.dtype), out=y)
    if bias is not None:
        np.add(y, _param_shape(bias, x_shape, param_axes).astype(y.dtype), out=y)
    return y


def normalize(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...],
    out: np.ndarray | None = None,
) -> np.ndarray:
    r""":math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}\,\gamma + \beta` with given statistics
    (spec :func:`~normkit.hookspecs.normkit_normalize`)."""
    y = _centred_scaled(x, mean, var, eps, axes, constant_to_zero=False)
    return pure.finish_output(_affine(y, weight, bias, x.shape, param_axes), x, out)


def group_norm(
    x: np.ndarray,
    num_groups: int,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axis: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Group norm from the two-pass statistics of each ``(sample, group)``; a constant group
    (variance exactly 0) normalizes to β exactly."""
    axes = tuple(a for a in range(1, x.ndim) if a != axis)
    count, mean, m2 = moments64(x, axes, None, axis, num_groups)
    var = m2 / np.maximum(count, 1)
    y = _centred_scaled(x, mean, var, eps, axes, constant_to_zero=True)
    return pure.finish_output(_affine(y, weight, bias, x.shape, (axis,)), x, out)


def rms_norm(
    x: np.ndarray,
    weight: np.ndarray | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
    out: np.ndarray | None = None,
) -> np.ndarray:
    r""":math:`\hat x = x/\sqrt{\overline{x^2} + \epsilon}` with the mean square summed in float64
    from compute-dtype runs, then :math:`\hat x (w + o)`, rounded to ``x``'s dtype after the
    weight, or before and after it (``cast_before_weight``, half-precision input)."""
    cdt = pure.compute_dtype(x.dtype)
    xc = x.astype(cdt)
    n = math.prod(x.shape[a] for a in axes)
    view, view_axes, _ = pure.collapse_axes(xc, tuple(axes))
    mean_square = pure.sum_squares64(view, view_axes) / n
    inv = (1.0 / np.sqrt(mean_square + eps)).astype(cdt)
    keep = [1 if a in axes else s for a, s in enumerate(x.shape)]
    y = np.multiply(xc, inv.reshape(keep), out=xc)
    if weight is not None:
        scale = (_param_shape(weight, x.shape, tuple(axes)).astype(cdt) + cdt.type(weight_offset)).astype(cdt)
        if cast_before_weight and x.dtype.itemsize < 4:
            y = y.astype(x.dtype).astype(cdt)
        np.multiply(y, scale, out=y)
    return pure.finish_output(y, x, out)
