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

from normkit_cupy.plans import plan_reduction

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


def _bound_by_an_array(kernel: str, *typed: Array) -> None:
    """Refuse a call whose compute-dtype arguments are all scalars: CuPy binds a kernel's type
    ``S`` from its array arguments only, and raises ``KeyError: 'S'`` on the GPU otherwise. The
    stand-in checks it so that the CPU tests catch it."""
    if not any(isinstance(t, np.ndarray) for t in typed):
        raise TypeError(f"{kernel}: no array argument binds the compute dtype S (only scalars)")


class _NumPyOps:
    """The passes in NumPy (the stand-in for CuPy on a machine without a GPU), each written as the
    CUDA expression of :class:`_CuPyOps` it stands for. Scalars are NumPy scalars of the compute
    dtype, as the CUDA kernels receive them."""

    xp = np

    @staticmethod
    def sum_dev(x: Array, s: Array, n: Array, axes: tuple[int, ...]) -> Array:
        """``sum(x - s) / n`` over ``axes`` (not kept)."""
        _bound_by_an_array("sum_dev", s, n)
        return (x.astype(s.dtype) - s).sum(axis=axes) / n

    @staticmethod
    def sum_sq(x: Array, s: Array, m: Array, n: Array, axes: tuple[int, ...]) -> Array:
        """``sum((x - s - m)^2) / n`` over ``axes`` (not kept)."""
        _bound_by_an_array("sum_sq", s, m, n)
        d = x.astype(s.dtype) - s - m
        return (d * d).sum(axis=axes) / n

    @staticmethod
    def sum(p: Array, n: Array, axes: tuple[int, ...]) -> Array:
        """``sum(p) / n`` over ``axes``: the second stage."""
        _bound_by_an_array("sum", p, n)
        return p.sum(axis=axes) / n

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
    def standardize(x: Array, s: Array, m: Array, v: Array, eps: Array, g: Array, b: Array) -> Array:
        """:meth:`normalize` with ``r = 1 / sqrt(v + eps)`` computed in the same kernel."""
        _bound_by_an_array("standardize", s, m, v, eps, g, b)
        r = s.dtype.type(1) / np.sqrt(v + eps)
        return ((x.astype(s.dtype) - s - m) * r * g + b).astype(x.dtype)

    @staticmethod
    def running_update(
        s: Array, m: Array, v: Array, unbias: Array, momentum: float, rm: Array, rv: Array
    ) -> tuple[Array, Array]:
        """``(1 - momentum) r + momentum b`` in float64 for the mean ``s + m`` and the variance
        ``v * unbias``, rounded to the running statistics' dtype."""
        keep = 1.0 - momentum
        new_mean = keep * rm.astype(np.float64) + momentum * (s + m).astype(np.float64)
        new_var = keep * rv.astype(np.float64) + momentum * (v * unbias).astype(np.float64)
        return new_mean.astype(rm.dtype), new_var.astype(rv.dtype)

    @staticmethod
    def scale_cast_first(x: Array, r: Array, w: Array) -> Array:
        return ((x.astype(r.dtype) * r).astype(x.dtype).astype(r.dtype) * w).astype(x.dtype)


class _CuPyOps:
    """The passes as CuPy kernels (compiled by CuPy on first use, on the GPU)."""

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._sum_dev = cupy.ReductionKernel(
            "T x, S s, S n", "S y", "S(x) - s", "a + b", "y = a / n", "0", "normkit_sum_dev"
        )
        self._sum_sq = cupy.ReductionKernel(
            "T x, S s, S m, S n",
            "S y",
            "(S(x) - s - m) * (S(x) - s - m)",
            "a + b",
            "y = a / n",
            "0",
            "normkit_sum_sq",
        )
        self._sum = cupy.ReductionKernel("S p, S n", "S y", "p", "a + b", "y = a / n", "0", "normkit_sum")
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
        self._standardize = cupy.ElementwiseKernel(
            "T x, S s, S m, S v, S eps, S g, S b",
            "T y",
            "y = T((S(x) - s - m) * (S(1) / sqrt(v + eps)) * g + b)",
            "normkit_standardize",
        )
        self._running_update = cupy.ElementwiseKernel(
            "S s, S m, S v, S unbias, float64 momentum, R rm, R rv",
            "R new_mean, R new_var",
            """
            new_mean = R((1.0 - momentum) * double(rm) + momentum * double(S(s + m)));
            new_var = R((1.0 - momentum) * double(rv) + momentum * double(S(v * unbias)));
            """,
            "normkit_running_update",
        )
        self._scale_cast_first = cupy.ElementwiseKernel(
            "T x, S r, S w", "T y", "y = T(S(T(S(x) * r)) * w)", "normkit_scale_cast_first"
        )

    def sum_dev(self, x: Array, s: Array, n: Array, axes: tuple[int, ...]) -> Array:
        return self._sum_dev(x, s, n, axis=axes)

    def sum_sq(self, x: Array, s: Array, m: Array, n: Array, axes: tuple[int, ...]) -> Array:
        return self._sum_sq(x, s, m, n, axis=axes)

    def sum(self, p: Array, n: Array, axes: tuple[int, ...]) -> Array:
        return self._sum(p, n, axis=axes)

    def masked_sum(self, x: Array, keep: Array, s: Array, axes: tuple[int, ...]) -> Array:
        return self._masked_sum(x, keep, s, axis=axes, keepdims=True)

    def masked_square_sum(self, x: Array, keep: Array, s: Array, m: Array, axes: tuple[int, ...]) -> Array:
        return self._masked_square_sum(x, keep, s, m, axis=axes, keepdims=True)

    def normalize(self, x: Array, s: Array, m: Array, r: Array, g: Array, b: Array) -> Array:
        return self._normalize(x, s, m, r, g, b)

    def standardize(self, x: Array, s: Array, m: Array, v: Array, eps: Array, g: Array, b: Array) -> Array:
        return self._standardize(x, s, m, v, eps, g, b)

    def running_update(
        self, s: Array, m: Array, v: Array, unbias: Array, momentum: float, rm: Array, rv: Array
    ) -> tuple[Array, Array]:
        return self._running_update(s, m, v, unbias, momentum, rm, rv)

    def scale_cast_first(self, x: Array, r: Array, w: Array) -> Array:
        return self._scale_cast_first(x, r, w)


_CUPY_OPS: _CuPyOps | None = None
_NUMPY_OPS = _NumPyOps()


def _ops(x: Array) -> _NumPyOps | _CuPyOps:
    """CuPy's kernels for a CuPy array, NumPy's expressions for a NumPy array."""
    global _CUPY_OPS
    if isinstance(x, np.ndarray):
        return _NUMPY_OPS
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        if _CUPY_OPS is None:
            _CUPY_OPS = _CuPyOps()
        return _CUPY_OPS
    return _NUMPY_OPS


def _compute_dtype(x: Array) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _param(value: Array | None, shape: list[int], dtype: np.dtype, fill: float) -> Array:
    """A weight, bias or running statistic in the compute dtype, shaped to broadcast (a view where
    it has that dtype already), or ``fill`` as a scalar of that dtype (no transfer to the GPU)."""
    if value is None:
        return dtype.type(fill)
    return value.astype(dtype, copy=False).reshape(shape)


def _first(ndim: int, axes: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of each group's first value, keeping the reduced axes (as size 1)."""
    return tuple(slice(0, 1) if a in axes else slice(None) for a in range(ndim))


def _shift(x: Array, axes: tuple[int, ...], cdt: np.dtype) -> Array:
    """Each group's first value in the compute dtype, C-contiguous (reduced axes of size 1)."""
    return x[_first(x.ndim, axes)].astype(cdt, order="C")


def _split(shape: tuple[int, ...], axis: int, groups: int) -> tuple[int, ...]:
    """``shape`` with axis ``axis`` of size ``C`` split into ``(groups, C // groups)``: block ``g``
    holds the ``C // groups`` consecutive indices from ``g * C // groups`` (a view for any strides)."""
    return (*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])


def _after_split(axis: int, split_axis: int) -> int:
    """Where axis ``axis`` lands once axis ``split_axis`` is split in two."""
    return axis if axis <= split_axis else axis + 1


def _reduce(
    ops: _NumPyOps | _CuPyOps,
    x: Array,
    axes: tuple[int, ...],
    cdt: np.dtype,
    s: Array,
    m: Array | None = None,
) -> Array:
    r"""Per group, :math:`rac1n\sum (x - s)` (``m`` is ``None``) or
    :math:`rac1n\sum (x - s - m)^2`, with ``s`` and ``m`` per group (reduced axes of size 1) or
    scalars; the result keeps the reduced axes as size 1. Split into two stages where
    :func:`normkit_cupy.plans.plan_reduction` finds the layout for it."""
    keep_shape = tuple(1 if a in axes else size for a, size in enumerate(x.shape))
    n = cdt.type(math.prod(x.shape[a] for a in axes))
    plan = plan_reduction(x.shape, x.strides, x.itemsize, axes)
    if plan is None or plan.stages == "single":
        terms = (s,) if m is None else (s, m)
        result = ops.sum_dev(x, s, n, axes) if m is None else ops.sum_sq(x, *terms, n, axes)
        return result.reshape(keep_shape)
    g, _, c, b = plan.view
    view = x.transpose(plan.order).reshape(plan.view)

    def terms(shape: tuple[int, ...]) -> tuple[Array, ...]:
        per_group = (s,) if m is None else (s, m)
        return tuple(t if np.ndim(t) == 0 else t.reshape(shape) for t in per_group)

    def partial(data: Array, shape: tuple[int, ...], over: tuple[int, ...], divisor: Array) -> Array:
        if m is None:
            return ops.sum_dev(data, *terms(shape), divisor, over)
        return ops.sum_sq(data, *terms(shape), divisor, over)

    one = cdt.type(1)
    if plan.stages == "runs":  # each run of B, then over a
        total = ops.sum(partial(view, (g, 1, c, 1), (3,), one), n, (1,))
    else:  # blocks of rows, then the blocks (and b); the rows after the last block apart
        rows, blocks = plan.rows, plan.blocks
        whole = view[:, : blocks * rows].reshape(g, blocks, rows, c, b)
        parts = partial(whole, (g, 1, 1, c, 1), (2,), one)
        if plan.tail:
            tail = partial(view[:, blocks * rows :], (g, 1, c, 1), (1, 3), one)
            total = (ops.sum(parts, one, (1, 3)) + tail) / n
        else:
            total = ops.sum(parts, n, (1, 3))
    return total.reshape(keep_shape)


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
    cdt = _compute_dtype(x)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    g, b = _param(weight, shape, cdt, 1.0), _param(bias, shape, cdt, 0.0)
    zero, epsilon = cdt.type(0), cdt.type(eps)
    if not use_batch_stats:
        s = _param(running_mean, shape, cdt, 0.0)
        v = _param(running_var, shape, cdt, 1.0)
        return ops.standardize(x, s, zero, v, epsilon, g, b), running_mean, running_var
    axes = tuple(a for a in range(1 if per_instance else 0, x.ndim) if a != axis)
    s = _shift(x, axes, cdt)
    m = _reduce(ops, x, axes, cdt, s)
    var = _reduce(ops, x, axes, cdt, s, m)
    y = ops.standardize(x, s, m, var, epsilon, g, b)
    if running_mean is None or running_var is None:
        return y, None, None
    n = x.size // m.size
    unbias = cdt.type(n / (n - 1)) if unbiased_running_var else cdt.type(1)
    if per_instance:  # the instances' statistics averaged, in the compute dtype
        mean = (s + m).mean(axis=0).reshape(-1)
        new_mean, new_var = ops.running_update(
            mean,
            zero,
            (var * unbias).mean(axis=0).reshape(-1),
            cdt.type(1),
            momentum,
            running_mean,
            running_var,
        )
        return y, new_mean, new_var
    new_mean, new_var = ops.running_update(
        s.reshape(-1), m.reshape(-1), var.reshape(-1), unbias, momentum, running_mean, running_var
    )
    return y, new_mean, new_var


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
    cdt = _compute_dtype(x)
    axes = tuple(axes)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    s = _shift(x, axes, cdt)
    m = _reduce(ops, x, axes, cdt, s)
    var = _reduce(ops, x, axes, cdt, s, m)
    g, b = _param(weight, shape, cdt, 1.0), _param(bias, shape, cdt, 0.0)
    return ops.standardize(x, s, m, var, cdt.type(eps), g, b)


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
    cdt = _compute_dtype(x)
    xs = x.reshape(_split(x.shape, axis, num_groups))
    axes = tuple(a for a in range(1, xs.ndim) if a != axis)  # the block axis axis + 1 among them
    s = _shift(xs, axes, cdt)
    m = _reduce(ops, xs, axes, cdt, s)
    var = _reduce(ops, xs, axes, cdt, s, m)
    shape = [1] * xs.ndim
    shape[axis], shape[axis + 1] = xs.shape[axis], xs.shape[axis + 1]
    g, b = _param(weight, shape, cdt, 1.0), _param(bias, shape, cdt, 0.0)
    return ops.standardize(xs, s, m, var, cdt.type(eps), g, b).reshape(x.shape)


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
    if mask is None:
        s = _shift(x, axes, cdt)
        d = _reduce(ops, x, axes, cdt, s)
        m2 = _reduce(ops, x, axes, cdt, s, d) * cdt.type(n)
        count = xp.full(kept_shape, n, dtype=xp.int64)
        return count, (s + d).reshape(kept_shape), m2.reshape(kept_shape)
    first = _first(x.ndim, axes)
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
    g, b = _param(weight, param_shape, cdt, 1.0), _param(bias, param_shape, cdt, 0.0)
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
    # a 0-d array, not a scalar: a CUDA kernel's type S is bound by its array arguments, and
    # the mean square's kernel has no other (the first GPU run of this path: KeyError 'S')
    zero = xp.zeros((), dtype=cdt)
    mean_square = _reduce(ops, x, axes, cdt, zero, zero)
    if weight is None:  # no weight: the offset is ignored, and there is one rounding
        return ops.standardize(x, zero, zero, mean_square, cdt.type(eps), cdt.type(1), zero)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    w = weight.astype(cdt).reshape(shape) + cdt.type(weight_offset)
    if cast_before_weight and x.dtype != cdt:
        r = cdt.type(1) / xp.sqrt(mean_square + cdt.type(eps))
        return ops.scale_cast_first(x, r, w)
    return ops.standardize(x, zero, zero, mean_square, cdt.type(eps), w, zero)


def astype(array: Array, dtype: str) -> Array:
    """``array`` converted to the named dtype on its own device (``BackendInfo.astype``)."""
    return _astype(array, dtype)


@_on_device_of
def _astype(array: Array, dtype: str) -> Array:
    return array.astype(dtype)
