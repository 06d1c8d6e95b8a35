r"""The CuPy kernels: reductions and one fused elementwise pass per call, with no transposes.

For every normalization, with ``s`` one value of each group (its first) and everything after the
reading of ``x`` in the compute dtype (float32 for float16 input, float64 for float64):

.. math::

   \bar d = \frac1n\sum (x - s), \qquad \sigma^2 = \frac1n\sum (x - s - \bar d)^2, \qquad
   y = (x - s - \bar d)\,r\,\gamma + \beta, \quad r = 1/\sqrt{\sigma^2 + \epsilon} .

The shift keeps every sum of values the size of σ, whatever the mean (a constant channel, or a
group of one value, gives ``x - s = 0`` and so exactly β), and the centred output is exact where
the fused ``x a + (\beta - \mu a)`` would round ``\mu a``. In eval the same pass runs with
``s`` the running mean, :math:`\bar d = 0` and ``r`` from the running variance.

Spec version 2 adds, on the same passes:

* **moments** ``(count, mean, m2)``: the shifted two-pass as sums, :math:`\mu = s + \bar d` and
  :math:`M_2 = \sum (x - s - \bar d)^2`, each term selected by the mask (``keep ? term : 0``, so a
  masked value never enters a sum, whatever it holds). With a mask the shift is the group's
  first value where that value counts, else 0 (the plain two-pass); an empty group is
  :math:`(0, 0, 0)`.
* **groups of channels** (group norm, grouped moments and statistics): the channel axis of size
  ``C`` is viewed as ``(G, C/G)``, a reshape that splits one axis and so never copies, and the
  block axis joins the reduced axes.
* **normalize** with given statistics: the elementwise pass above with :math:`\bar d` replaced by
  the low part of a float64 mean (``mean - s`` with ``s`` the mean rounded to the compute dtype),
  so float64 statistics keep their precision on float32 or float16 input.
* **RMS norm**: :math:`r = 1/\sqrt{\frac1n\sum x^2 + \epsilon}` (the M2 reduction about 0) and
  :math:`y = x\,r\,(w + o)` rounded once (the normalize pass with ``s = 0``), or for float16
  input with ``cast_before_weight`` :math:`y = \mathrm{T}(\mathrm{T}(x r)\,(w + o))`, rounded to
  the input dtype ``T`` before and after the weight (one more elementwise kernel).

On CuPy arrays the passes are ``ReductionKernel``\ s (reducing over any set of axes in place,
channels-first or channels-last alike) and ``ElementwiseKernel``\ s that broadcast the
per-group values. On NumPy arrays the same glue runs with NumPy expressions written term for
term like the CUDA ones: that is how the kernels are tested on machines without a GPU. Pure:
inputs and running statistics are never written.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

__all__ = [
    "astype",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "rms_norm",
]

Array = Any


class _NumPyOps:
    """The passes in NumPy (the stand-in for CuPy on a machine without a GPU), each written as the
    CUDA expression of :class:`_CuPyOps` it stands for."""

    xp = np

    @staticmethod
    def shifted_mean(x: Array, s: Array, axes: tuple[int, ...]) -> Array:
        return (x.astype(s.dtype) - s).mean(axis=axes, keepdims=True)

    @staticmethod
    def shifted_var(x: Array, s: Array, m: Array, axes: tuple[int, ...]) -> Array:
        d = x.astype(s.dtype) - s - m
        return (d * d).mean(axis=axes, keepdims=True)

    # NumPy evaluates both branches of ``keep ? term : 0`` and then drops the masked terms, which
    # may overflow on whatever a masked position holds; the CUDA kernel never evaluates them.
    @staticmethod
    def masked_sum(x: Array, keep: Array, s: Array, axes: tuple[int, ...]) -> Array:
        with np.errstate(over="ignore", invalid="ignore"):
            terms = np.where(keep, x.astype(s.dtype) - s, s.dtype.type(0))
        return terms.sum(axis=axes, keepdims=True)

    @staticmethod
    def masked_square_sum(x: Array, keep: Array, s: Array, m: Array, axes: tuple[int, ...]) -> Array:
        with np.errstate(over="ignore", invalid="ignore"):
            d = x.astype(s.dtype) - s - m
            terms = np.where(keep, d * d, s.dtype.type(0))
        return terms.sum(axis=axes, keepdims=True)

    @staticmethod
    def normalize(x: Array, s: Array, m: Array, r: Array, g: Array, b: Array) -> Array:
        return ((x.astype(s.dtype) - s - m) * r * g + b).astype(x.dtype)

    @staticmethod
    def scale_cast_first(x: Array, r: Array, w: Array) -> Array:
        return ((x.astype(r.dtype) * r).astype(x.dtype).astype(r.dtype) * w).astype(x.dtype)


class _CuPyOps:
    """The passes as CuPy kernels (compiled by CuPy on first use, on the GPU)."""

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        mean = "y = a / (_in_ind.size() / _out_ind.size())"
        self._mean = cupy.ReductionKernel(
            "T x, S s", "S y", "S(x) - s", "a + b", mean, "0", "normkit_shifted_mean"
        )
        self._var = cupy.ReductionKernel(
            "T x, S s, S m",
            "S y",
            "(S(x) - s - m) * (S(x) - s - m)",
            "a + b",
            mean,
            "0",
            "normkit_shifted_var",
        )
        self._masked_sum = cupy.ReductionKernel(
            "T x, bool keep, S s",
            "S y",
            "keep ? S(x) - s : S(0)",
            "a + b",
            "y = a",
            "0",
            "normkit_masked_sum",
        )
        self._masked_square_sum = cupy.ReductionKernel(
            "T x, bool keep, S s, S m",
            "S y",
            "keep ? (S(x) - s - m) * (S(x) - s - m) : S(0)",
            "a + b",
            "y = a",
            "0",
            "normkit_masked_square_sum",
        )
        self._normalize = cupy.ElementwiseKernel(
            "T x, S s, S m, S r, S g, S b", "T y", "y = T((S(x) - s - m) * r * g + b)", "normkit_normalize"
        )
        self._scale_cast_first = cupy.ElementwiseKernel(
            "T x, S r, S w", "T y", "y = T(S(T(S(x) * r)) * w)", "normkit_scale_cast_first"
        )

    def shifted_mean(self, x: Array, s: Array, axes: tuple[int, ...]) -> Array:
        return self._mean(x, s, axis=axes, keepdims=True)

    def shifted_var(self, x: Array, s: Array, m: Array, axes: tuple[int, ...]) -> Array:
        return self._var(x, s, m, axis=axes, keepdims=True)

    def masked_sum(self, x: Array, keep: Array, s: Array, axes: tuple[int, ...]) -> Array:
        return self._masked_sum(x, keep, s, axis=axes, keepdims=True)

    def masked_square_sum(self, x: Array, keep: Array, s: Array, m: Array, axes: tuple[int, ...]) -> Array:
        return self._masked_square_sum(x, keep, s, m, axis=axes, keepdims=True)

    def normalize(self, x: Array, s: Array, m: Array, r: Array, g: Array, b: Array) -> Array:
        return self._normalize(x, s, m, r, g, b)

    def scale_cast_first(self, x: Array, r: Array, w: Array) -> Array:
        return self._scale_cast_first(x, r, w)


_CUPY_OPS: _CuPyOps | None = None


def _ops(x: Array) -> _NumPyOps | _CuPyOps:
    """CuPy's kernels for a CuPy array, NumPy's expressions for a NumPy array."""
    global _CUPY_OPS
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        if _CUPY_OPS is None:
            _CUPY_OPS = _CuPyOps()
        return _CUPY_OPS
    return _NumPyOps()


def _compute_dtype(x: Array) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _param(xp: Any, value: Array | None, shape: list[int], dtype: np.dtype, fill: float) -> Array:
    if value is None:
        return xp.asarray(fill, dtype=dtype)
    return value.astype(dtype, copy=False).reshape(shape)


def _updated(xp: Any, old: Array, batch: Array, momentum: float) -> Array:
    """``(1 - m) * old + m * batch`` in float64 (``C`` values), in ``old``'s dtype."""
    new = (1.0 - momentum) * old.astype(xp.float64) + momentum * batch.astype(xp.float64)
    return new.astype(old.dtype)


def _first(ndim: int, axes: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of each group's first value, keeping the reduced axes (as size 1)."""
    return tuple(slice(0, 1) if a in axes else slice(None) for a in range(ndim))


def _split(shape: tuple[int, ...], axis: int, groups: int) -> tuple[int, ...]:
    """``shape`` with axis ``axis`` of size ``C`` split into ``(groups, C // groups)``: block ``g``
    holds the ``C // groups`` consecutive indices from ``g * C // groups`` (a view for any strides)."""
    return (*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])


def _after_split(axis: int, split_axis: int) -> int:
    """Where axis ``axis`` lands once axis ``split_axis`` is split in two."""
    return axis if axis <= split_axis else axis + 1


def _channel_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
    per_instance: bool,
) -> tuple[Array, Array | None, Array | None]:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    g, b = _param(xp, weight, shape, cdt, 1.0), _param(xp, bias, shape, cdt, 0.0)
    zero = xp.asarray(0.0, dtype=cdt)
    if not use_batch_stats:
        s = _param(xp, running_mean, shape, cdt, 0.0)
        r = 1.0 / xp.sqrt(_param(xp, running_var, shape, cdt, 1.0) + eps)
        return ops.normalize(x, s, zero, r, g, b), running_mean, running_var
    axes = tuple(a for a in range(1 if per_instance else 0, x.ndim) if a != axis)
    s = x[_first(x.ndim, axes)].astype(cdt)
    m = ops.shifted_mean(x, s, axes)
    var = ops.shifted_var(x, s, m, axes)
    y = ops.normalize(x, s, m, 1.0 / xp.sqrt(var + eps), g, b)
    if running_mean is None or running_var is None:
        return y, None, None
    mean = s + m
    if unbiased_running_var:
        n = x.size // mean.size
        var = var * (n / (n - 1))
    if per_instance:
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    return (
        y,
        _updated(xp, running_mean, mean.reshape(-1), momentum),
        _updated(xp, running_var, var.reshape(-1), momentum),
    )


def _on_device_of(function: Any) -> Any:
    """Run ``function`` with ``x``'s GPU current, so that every temporary and kernel launch is on
    the array's own device (not whichever device happens to be current)."""

    def on_device(x: Array, *args: Any) -> Any:
        if isinstance(x, np.ndarray):
            return function(x, *args)
        with x.device:
            return function(x, *args)

    return on_device


_channel_norm = _on_device_of(_channel_norm)


def batch_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Array, Array | None, Array | None]:
    """The spec's batch norm (:func:`normkit.hookspecs.normkit_batch_norm`)."""
    return _channel_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var, False
    )


def instance_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Array, Array | None, Array | None]:
    """The spec's instance norm (:func:`normkit.hookspecs.normkit_instance_norm`)."""
    return _channel_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis,
        unbiased_running_var, True,
    )  # fmt: skip


def layer_norm(
    x: Array, weight: Array | None, bias: Array | None, axes: tuple[int, ...], eps: float
) -> Array:
    """The spec's layer norm (:func:`normkit.hookspecs.normkit_layer_norm`)."""
    return _layer_norm(x, weight, bias, axes, eps)


@_on_device_of
def _layer_norm(
    x: Array, weight: Array | None, bias: Array | None, axes: tuple[int, ...], eps: float
) -> Array:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    axes = tuple(axes)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    s = x[_first(x.ndim, axes)].astype(cdt)
    m = ops.shifted_mean(x, s, axes)
    var = ops.shifted_var(x, s, m, axes)
    g, b = _param(xp, weight, shape, cdt, 1.0), _param(xp, bias, shape, cdt, 0.0)
    return ops.normalize(x, s, m, 1.0 / xp.sqrt(var + eps), g, b)


def group_norm(
    x: Array, num_groups: int, weight: Array | None, bias: Array | None, eps: float, axis: int
) -> Array:
    r"""The spec's group norm (:func:`normkit.hookspecs.normkit_group_norm`): ``x`` viewed with
    its channel axis split into ``(G, C/G)``, the shifted two-pass over the block axis and every
    axis but the batch axis, :math:`y = (x - s - \bar d)\,r\,\gamma_c + \beta_c` with γ and β
    viewed as ``(G, C/G)`` too."""
    return _group_norm(x, num_groups, weight, bias, eps, axis)


@_on_device_of
def _group_norm(
    x: Array, num_groups: int, weight: Array | None, bias: Array | None, eps: float, axis: int
) -> Array:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    xs = x.reshape(_split(x.shape, axis, num_groups))
    axes = tuple(a for a in range(1, xs.ndim) if a != axis)  # the block axis axis + 1 among them
    s = xs[_first(xs.ndim, axes)].astype(cdt)
    m = ops.shifted_mean(xs, s, axes)
    var = ops.shifted_var(xs, s, m, axes)
    shape = [1] * xs.ndim
    shape[axis], shape[axis + 1] = xs.shape[axis], xs.shape[axis + 1]
    g, b = _param(xp, weight, shape, cdt, 1.0), _param(xp, bias, shape, cdt, 0.0)
    return ops.normalize(xs, s, m, 1.0 / xp.sqrt(var + eps), g, b).reshape(x.shape)


def moments(
    x: Array, axes: tuple[int, ...], mask: Array | None, group_axis: int | None, num_groups: int | None
) -> tuple[Array, Array, Array]:
    r"""The spec's moments (:func:`normkit.hookspecs.normkit_moments`): per group
    ``(count, mean, m2)`` with count in int64 and the others in the compute dtype,

    .. math::

       \mu = s + \bar d, \quad \bar d = \frac1n\sum_{kept} (x - s), \qquad
       M_2 = \sum_{kept} (x - s - \bar d)^2 ,

    with ``s`` the group's first value (with a mask: where it counts, else 0); :math:`n = 0`
    gives ``(0, 0, 0)``."""
    return _moments(x, axes, mask, group_axis, num_groups)


@_on_device_of
def _moments(
    x: Array, axes: tuple[int, ...], mask: Array | None, group_axis: int | None, num_groups: int | None
) -> tuple[Array, Array, Array]:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    axes = tuple(axes)
    if group_axis is not None and num_groups is not None:
        x = x.reshape(_split(x.shape, group_axis, num_groups))
        if mask is not None:
            # a mask broadcast along the channels (size 1) stays broadcast along both halves
            mask_groups = 1 if mask.shape[group_axis] == 1 else num_groups
            mask = mask.reshape(_split(mask.shape, group_axis, mask_groups))
        axes = tuple(sorted((*(_after_split(a, group_axis) for a in axes), group_axis + 1)))
    kept_shape = tuple(size for a, size in enumerate(x.shape) if a not in axes)
    n = math.prod(x.shape[a] for a in axes)
    if x.size == 0:  # every group is empty (n = 0), or there are none
        zeros = xp.zeros(kept_shape, dtype=cdt)
        return xp.zeros(kept_shape, dtype=xp.int64), zeros, zeros.copy()
    first = _first(x.ndim, axes)
    if mask is None:
        keep = xp.ones((1,) * x.ndim, dtype=bool)
        count = xp.full(kept_shape, n, dtype=xp.int64)
        divisor = xp.asarray(n, dtype=cdt)
        s = x[first].astype(cdt)
    else:
        keep = xp.broadcast_to(mask, x.shape)
        counts = keep.sum(axis=axes, keepdims=True, dtype=xp.int64)
        count = counts.reshape(kept_shape)
        divisor = xp.maximum(counts, 1).astype(cdt)  # an empty group's sums are 0: its mean is 0
        # the first value where it counts, else 0 (then the plain two-pass): a masked value is
        # selected away, never computed with
        s = xp.where(keep[first], x[first].astype(cdt), xp.zeros((), dtype=cdt))
    d = ops.masked_sum(x, keep, s, axes) / divisor
    m2 = ops.masked_square_sum(x, keep, s, d, axes)
    return count, (s + d).reshape(kept_shape), m2.reshape(kept_shape)


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...],
) -> Array:
    r"""The spec's normalize (:func:`normkit.hookspecs.normkit_normalize`):
    :math:`y = (x - s - m)\,r\,\gamma + \beta` in the compute dtype, with ``s`` the mean rounded to
    the compute dtype, ``m`` what that rounding dropped (0 unless the mean is wider than the
    compute dtype) and :math:`r = 1/\sqrt{\sigma^2 + \epsilon}` evaluated in the wider of the
    variance's dtype and the compute dtype. A kept axis where the statistics have ``G`` values for
    ``x``'s ``C`` is viewed as ``(G, C/G)``."""
    return _normalize(x, mean, var, weight, bias, eps, axes, param_axes)


@_on_device_of
def _normalize(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...],
) -> Array:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    kept = [a for a in range(x.ndim) if a not in axes]
    grouped = [a for i, a in enumerate(kept) if mean.shape[i] != x.shape[a]]
    xs, place, split = x, list(range(x.ndim)), None
    if grouped:  # view the grouped axis as (G, C/G): statistic g for block g
        split = grouped[0]
        xs = x.reshape(_split(x.shape, split, mean.shape[kept.index(split)]))
        place = [_after_split(a, split) for a in range(x.ndim)]
    stat_shape = [1] * xs.ndim
    for i, a in enumerate(kept):
        stat_shape[place[a]] = mean.shape[i]
    param_shape = [1] * xs.ndim
    for a in param_axes:
        param_shape[place[a]] = xs.shape[place[a]]
        if a == split:
            param_shape[a + 1] = xs.shape[a + 1]
    wide = np.promote_types(mean.dtype, cdt)
    s = mean.astype(cdt).reshape(stat_shape)
    if wide == cdt:
        m = xp.zeros((), dtype=cdt)
    else:  # the part of a float64 mean that float32 drops, subtracted after x - s
        m = (mean.astype(wide).reshape(stat_shape) - s.astype(wide)).astype(cdt)
    var_wide = var.astype(np.promote_types(var.dtype, cdt))
    r = (1.0 / xp.sqrt(var_wide + eps)).astype(cdt).reshape(stat_shape)
    g, b = _param(xp, weight, param_shape, cdt, 1.0), _param(xp, bias, param_shape, cdt, 0.0)
    return ops.normalize(xs, s, m, r, g, b).reshape(x.shape)


def rms_norm(
    x: Array,
    weight: Array | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> Array:
    r"""The spec's RMS norm (:func:`normkit.hookspecs.normkit_rms_norm`):
    :math:`r = 1/\sqrt{\frac1n\sum x^2 + \epsilon}` from the M2 reduction about 0 and
    :math:`y = \mathrm{T}(x\,r\,(w + o))` with ``w + o`` in the compute dtype; for float16 input
    with ``cast_before_weight``, :math:`y = \mathrm{T}(\mathrm{T}(x\,r)\,(w + o))`."""
    return _rms_norm(x, weight, axes, eps, weight_offset, cast_before_weight)


@_on_device_of
def _rms_norm(
    x: Array,
    weight: Array | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> Array:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    axes = tuple(axes)
    zero = xp.zeros((1,) * x.ndim, dtype=cdt)
    keep = xp.ones((1,) * x.ndim, dtype=bool)
    n = math.prod(x.shape[a] for a in axes)
    mean_square = ops.masked_square_sum(x, keep, zero, zero, axes) / xp.asarray(n, dtype=cdt)
    r = 1.0 / xp.sqrt(mean_square + eps)
    if weight is None:  # no weight: the offset is ignored, and there is one rounding
        return ops.normalize(x, zero, zero, r, xp.ones((), dtype=cdt), zero)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    w = weight.astype(cdt).reshape(shape) + weight_offset
    if cast_before_weight and x.dtype != cdt:
        return ops.scale_cast_first(x, r, w)
    return ops.normalize(x, zero, zero, r, w, zero)


def astype(array: Array, dtype: str) -> Array:
    """``array`` converted to the named dtype on its own device (``BackendInfo.astype``)."""
    return _astype(array, dtype)


@_on_device_of
def _astype(array: Array, dtype: str) -> Array:
    return array.astype(dtype)
