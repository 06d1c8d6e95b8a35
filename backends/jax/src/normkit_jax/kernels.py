r"""The JAX kernels: plain :mod:`jax.numpy`, so they run eagerly and under ``jit``, ``grad``,
``jvp``, ``vmap`` and ``shard_map`` alike.

For every normalization, with ``s`` one value of each group (its first, held out of
differentiation by :func:`jax.lax.stop_gradient`; see "Sharding" below) and everything after the
reading of ``x`` in the compute dtype (float32 for float16, bfloat16 and float32 input; float64
for float64 input, which exists only with ``jax_enable_x64``):

.. math::

   \mu = s + \frac1n\sum (x - s), \qquad c = x - \mu, \qquad
   \sigma^2 = \frac1n\sum c^2, \qquad y = c\,r\,\gamma + \beta, \quad r = 1/\sqrt{\sigma^2 + \epsilon} .

This is the two-pass algorithm with a shifted first pass: the first sum holds values the size of
σ whatever the mean, so :math:`\mu` is exact up to its one rounding (a constant group, or a group
of one value, gives :math:`\mu = x`, ``c = 0`` and so exactly β), and the second sums squared
deviations, never :math:`\sum x^2`. The shift changes no result, only its rounding, so stopping
its gradient leaves every derivative exact (:math:`\partial\mu/\partial x_i = 1/n` either way)
and saves the backward pass through it.

In eval the running statistics take the place of :math:`\mu` and :math:`\sigma^2`. ``moments``
returns ``(count, mean, m2)`` with :math:`M_2 = \sum c^2`; a mask selects the values that count
(``jnp.where`` before any arithmetic, so whatever a masked position holds, even inf or NaN, never
reaches a sum or a gradient), and a group with nothing selected is ``(0, 0, 0)``. Groups of
channels view the channel axis of size ``C`` as ``(G, C/G)``.

**Sharding.** Under ``jit`` on an input sharded along a reduced axis, XLA's SPMD partitioner
makes every reduction global: the statistics are those of the whole batch, with no
``axis_name``. With JAX's *explicit* sharding (the default axis type of :func:`jax.make_mesh`
in JAX 0.10) the type of ``x`` names the sharded axes, and one value cannot be sliced out of
such an axis; there ``s`` is instead the group's mean from a first pass (the corrected two-pass
algorithm: one more reduction, the same accuracy). Inside ``shard_map`` every kernel sees its
own shard and computes that shard's statistics.

Rules that make one kernel serve every transformation:

* Branches depend only on Python values (flags, axes, ``None``-ness, static shapes, dtypes),
  never on array values: no ``float(x)`` or ``bool(x)``, which a tracer refuses.
* Python floats (``eps``, ``momentum``) stay Python floats: JAX treats them as weakly typed, so
  ``float32 + 1e-5`` stays float32 even with ``jax_enable_x64``.
* Updated running statistics are computed in the widest float JAX has (float64 with
  ``jax_enable_x64``, else float32), stored in the running statistics' dtype and wrapped in
  :func:`jax.lax.stop_gradient`: they are state, not part of the loss.
* Pure: nothing is written (JAX arrays are immutable); in eval the running statistics given are
  returned themselves.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "astype",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "rms_norm",
    "x64_enabled",
]

Array = Any


def x64_enabled() -> bool:
    """Whether ``jax_enable_x64`` is on (read when a kernel is traced or run)."""
    return bool(jax.config.jax_enable_x64)


def _compute_dtype(x: Array) -> Any:
    """float64 for float64 input, float32 otherwise (spec rule 7)."""
    return jnp.dtype(jnp.float64) if x.dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _widest() -> Any:
    return jnp.dtype(jnp.float64) if x64_enabled() else jnp.dtype(jnp.float32)


def _count_dtype() -> Any:
    """int64 with ``jax_enable_x64``, else int32 (JAX's widest integer then)."""
    return jnp.dtype(jnp.int64) if x64_enabled() else jnp.dtype(jnp.int32)


def _is_empty(shape: tuple[Any, ...]) -> bool:
    """True if a dimension is 0 (a symbolic dimension is never 0: JAX assumes it is >= 1)."""
    return any(isinstance(d, int) and d == 0 for d in shape)


def _param(value: Array | None, shape: list[Any], dtype: Any, fill: float) -> Array:
    """``value`` in ``dtype``, reshaped to broadcast against the input; ``fill`` if ``None``."""
    if value is None:
        return jnp.asarray(fill, dtype=dtype)
    return value.astype(dtype).reshape(shape)


def _first(ndim: int, axes: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of each group's first value, keeping the reduced axes (as size 1)."""
    return tuple(slice(0, 1) if a in axes else slice(None) for a in range(ndim))


def _split(shape: tuple[Any, ...], axis: int, groups: int) -> tuple[Any, ...]:
    """``shape`` with axis ``axis`` of size ``C`` split into ``(groups, C // groups)``: block ``g``
    holds the ``C // groups`` consecutive indices from ``g * C // groups``."""
    return (*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])


def _after_split(axis: int, split_axis: int) -> int:
    """Where axis ``axis`` lands once axis ``split_axis`` is split in two."""
    return axis if axis <= split_axis else axis + 1


def _sharded_along(x: Array, axes: tuple[int, ...]) -> bool:
    """True if the type of ``x`` shards one of ``axes`` over a mesh axis: JAX's explicit sharding
    (the default axis type of :func:`jax.make_mesh`), where slicing one value out of such an axis
    is refused. Under automatic sharding and inside ``shard_map`` the spec names no axis."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) or ()
    return any(a < len(spec) and spec[a] is not None for a in axes)


def _shift(xc: Array, axes: tuple[int, ...], keep: Array | None = None, count: Array | None = None) -> Array:
    """The shift ``s`` of each group, without gradient: its first value (with a mask: where it
    counts, else 0); on a reduced axis sharded explicitly, where one value cannot be sliced out,
    the group's mean from a first pass (then the statistics are the corrected two-pass)."""
    if not _sharded_along(xc, axes):
        first = _first(xc.ndim, axes)
        s = xc[first] if keep is None else jnp.where(keep[first], xc[first], jnp.zeros((), xc.dtype))
    elif keep is None:
        s = jnp.mean(xc, axis=axes, keepdims=True)
    else:
        total = jnp.sum(jnp.where(keep, xc, jnp.zeros((), xc.dtype)), axis=axes, keepdims=True)
        s = total / jnp.maximum(count, 1).astype(xc.dtype)
    return lax.stop_gradient(s)


def _centred(x: Array, axes: tuple[int, ...], cdt: Any) -> tuple[Array, Array, Array]:
    r"""``(xc, mean, dev)``: ``x`` in ``cdt``; :math:`\mu = s + \bar d` with the shift ``s`` of
    :func:`_shift`, in ``cdt`` with the reduced axes kept as size 1; and :math:`x - \mu`, **for
    the variance's reduction only** (``jnp.mean(dev * dev)`` or ``jnp.sum``): the caller
    normalizes with ``xc - mean`` itself.

    :math:`\mu` is rounded once, and every centred value is :math:`x - \mu` (not
    :math:`(x - s) - \bar d`), at the cost of the rounding of :math:`\mu`,
    :math:`\epsilon_c|\mu|/2` in every ``c`` (within the spec's allowance for the subtracted mean).

    ``dev`` subtracts :math:`\mu` through :func:`jax.lax.optimization_barrier`, an identity XLA
    cannot see through: the variance's ``x - mean`` and the output's are then two computations,
    not one shared value, so XLA fuses each into its own pass over ``x`` (the reduction reads
    ``x`` once; the output pass reads it once and writes ``y``). Shared, the centred tensor has
    two consumers and XLA:CPU writes it out in full and reads it back for the reduction: one
    more write and one more read of the input's size, which made training batch and instance
    norm 1.1–1.25x Flax's two-pass layers in issue 17's bench. The values are the same (the
    barrier is an identity, and its derivative too); ``tests/test_accuracy.py`` checks the plan."""
    xc = x.astype(cdt)
    s = _shift(xc, axes)
    mean = s + jnp.mean(xc - s, axis=axes, keepdims=True)
    return xc, mean, xc - lax.optimization_barrier(mean)


def _updated(old: Array, batch: Array, momentum: float) -> Array:
    """``(1 - m) * old + m * batch`` in the widest float, in ``old``'s dtype, without gradient."""
    wide = _widest()
    new = (1.0 - momentum) * old.astype(wide) + momentum * batch.astype(wide)
    return lax.stop_gradient(new.astype(old.dtype))


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
    cdt = _compute_dtype(x)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    g, b = _param(weight, shape, cdt, 1.0), _param(bias, shape, cdt, 0.0)
    if not use_batch_stats:  # eval: the running statistics, returned as given
        y = _apply(x, running_mean.reshape(shape), running_var.reshape(shape), g, b, eps, cdt)
        return y, running_mean, running_var
    if _is_empty(x.shape):  # nothing to normalize, and no statistic moves
        return x, running_mean, running_var
    axes = tuple(a for a in range(1 if per_instance else 0, x.ndim) if a != axis)
    xc, mean, dev = _centred(x, axes, cdt)
    var = jnp.mean(dev * dev, axis=axes, keepdims=True)
    y = ((xc - mean) * (1.0 / jnp.sqrt(var + eps)) * g + b).astype(x.dtype)
    if running_mean is None or running_var is None:
        return y, None, None
    if unbiased_running_var:
        n = math.prod(x.shape[a] for a in axes)
        var = var * (n / (n - 1))
    if per_instance:  # PyTorch's rule: the mean over instances of the per-instance statistics
        mean, var = jnp.mean(mean, axis=0), jnp.mean(var, axis=0)
    return (
        y,
        _updated(running_mean, mean.reshape(-1), momentum),
        _updated(running_var, var.reshape(-1), momentum),
    )


def _apply(x: Array, mean: Array, var: Array, g: Array, b: Array, eps: float, cdt: Any) -> Array:
    r""":math:`y = (x - s - m)\,r\,\gamma + \beta` in ``cdt`` with given statistics (broadcast
    against ``x``): ``s`` the mean rounded to ``cdt`` and ``m`` what that rounding dropped (0
    unless the mean is wider than ``cdt``, a float64 mean on float32 input with
    ``jax_enable_x64``); ``r`` is evaluated in the wider of the variance's dtype and ``cdt``."""
    wide = jnp.promote_types(mean.dtype, cdt)
    s = mean.astype(cdt)
    xc = x.astype(cdt) - s
    if wide != cdt:  # the part of a wide mean that cdt drops, subtracted after x - s
        xc = xc - (mean.astype(wide) - s.astype(wide)).astype(cdt)
    var_wide = var.astype(jnp.promote_types(var.dtype, cdt))
    r = (1.0 / jnp.sqrt(var_wide + eps)).astype(cdt)
    return (xc * r * g + b).astype(x.dtype)


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
    r"""The spec's batch norm (:func:`normkit.hookspecs.normkit_batch_norm`): statistics over every
    axis but ``axis``; ``y = c\,r\,\gamma + \beta`` with the shifted two-pass of the module
    docstring in training, the running statistics in eval."""
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
    """The spec's instance norm (:func:`normkit.hookspecs.normkit_instance_norm`): statistics over
    the spatial axes of each instance; running statistics move by their mean over instances."""
    return _channel_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis,
        unbiased_running_var, True,
    )  # fmt: skip


def layer_norm(
    x: Array, weight: Array | None, bias: Array | None, axes: tuple[int, ...], eps: float
) -> Array:
    """The spec's layer norm (:func:`normkit.hookspecs.normkit_layer_norm`): the shifted two-pass
    over ``axes``, γ and β element-wise over them."""
    cdt = _compute_dtype(x)
    axes = tuple(axes)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    xc, mean, dev = _centred(x, axes, cdt)
    var = jnp.mean(dev * dev, axis=axes, keepdims=True)
    g, b = _param(weight, shape, cdt, 1.0), _param(bias, shape, cdt, 0.0)
    return ((xc - mean) * (1.0 / jnp.sqrt(var + eps)) * g + b).astype(x.dtype)


def group_norm(
    x: Array, num_groups: int, weight: Array | None, bias: Array | None, eps: float, axis: int
) -> Array:
    r"""The spec's group norm (:func:`normkit.hookspecs.normkit_group_norm`): ``x`` viewed with its
    channel axis split into ``(G, C/G)``, the shifted two-pass over the block axis and every axis
    but the batch axis, :math:`y = c\,r\,\gamma_c + \beta_c` with γ and β viewed as ``(G, C/G)``."""
    cdt = _compute_dtype(x)
    xs = x.reshape(_split(x.shape, axis, num_groups))
    axes = tuple(a for a in range(1, xs.ndim) if a != axis)  # the block axis axis + 1 among them
    xc, mean, dev = _centred(xs, axes, cdt)
    var = jnp.mean(dev * dev, axis=axes, keepdims=True)
    shape = [1] * xs.ndim
    shape[axis], shape[axis + 1] = xs.shape[axis], xs.shape[axis + 1]
    g, b = _param(weight, shape, cdt, 1.0), _param(bias, shape, cdt, 0.0)
    return ((xc - mean) * (1.0 / jnp.sqrt(var + eps)) * g + b).astype(x.dtype).reshape(x.shape)


def moments(
    x: Array, axes: tuple[int, ...], mask: Array | None, group_axis: int | None, num_groups: int | None
) -> tuple[Array, Array, Array]:
    r"""The spec's moments (:func:`normkit.hookspecs.normkit_moments`): per group
    ``(count, mean, m2)``,

    .. math::

       n = \sum_i m_i, \quad \mu = s + \bar d, \quad \bar d = \frac1n\sum_i m_i (x_i - s), \qquad
       M_2 = \sum_i m_i (x_i - \mu)^2 ,

    with ``s`` the group's first value (with a mask: where it counts, else 0, the plain
    two-pass) and :math:`\mu` rounded once before :math:`x_i - \mu` (see :func:`_centred`). ``count`` is int64 with ``jax_enable_x64`` and int32 without (JAX has no int64
    then); ``mean`` and ``m2`` are in the compute dtype; :math:`n = 0` gives ``(0, 0, 0)``."""
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
    count_dtype = _count_dtype()
    if _is_empty(x.shape):  # every group is empty (n = 0), or there are none
        zeros = jnp.zeros(kept_shape, dtype=cdt)
        return jnp.zeros(kept_shape, dtype=count_dtype), zeros, zeros
    if mask is None:
        n = math.prod(x.shape[a] for a in axes)
        _, mean, dev = _centred(x, axes, cdt)
        count = jnp.full(kept_shape, n, dtype=count_dtype)
        return count, mean.reshape(kept_shape), jnp.sum(dev * dev, axis=axes)
    keep = jnp.broadcast_to(mask, x.shape)
    xc = x.astype(cdt)
    zero = jnp.zeros((), dtype=cdt)
    counts = jnp.sum(keep, axis=axes, keepdims=True, dtype=count_dtype)
    # a masked value is selected away, never computed with
    s = _shift(xc, axes, keep, counts)
    d = jnp.where(keep, xc - s, zero)
    mean = s + jnp.sum(d, axis=axes, keepdims=True) / jnp.maximum(counts, 1).astype(cdt)
    c = jnp.where(keep, xc - mean, zero)
    return counts.reshape(kept_shape), mean.reshape(kept_shape), jnp.sum(c * c, axis=axes)


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
    compute dtype) and :math:`r = 1/\sqrt{\sigma^2 + \epsilon}` in the wider of the variance's
    dtype and the compute dtype. A kept axis where the statistics have ``G`` values for ``x``'s
    ``C`` is viewed as ``(G, C/G)``."""
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
    g, b = _param(weight, param_shape, cdt, 1.0), _param(bias, param_shape, cdt, 0.0)
    y = _apply(xs, mean.reshape(stat_shape), var.reshape(stat_shape), g, b, eps, cdt)
    return y.reshape(x.shape)


def rms_norm(
    x: Array,
    weight: Array | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> Array:
    r"""The spec's RMS norm (:func:`normkit.hookspecs.normkit_rms_norm`):
    :math:`r = 1/\sqrt{\frac1n\sum x^2 + \epsilon}` and :math:`y = \mathrm{T}(x\,r\,(w + o))` with
    ``w + o`` in the compute dtype; for float16/bfloat16 input with ``cast_before_weight``,
    :math:`y = \mathrm{T}(\mathrm{T}(x\,r)\,(w + o))`, rounded to the input dtype ``T`` before and
    after the weight."""
    cdt = _compute_dtype(x)
    axes = tuple(axes)
    xc = x.astype(cdt)
    r = 1.0 / jnp.sqrt(jnp.mean(xc * xc, axis=axes, keepdims=True) + eps)
    if weight is None:  # no weight: the offset is ignored, and there is one rounding
        return (xc * r).astype(x.dtype)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    w = weight.astype(cdt).reshape(shape) + weight_offset
    if cast_before_weight and x.dtype != cdt:
        return ((xc * r).astype(x.dtype).astype(cdt) * w).astype(x.dtype)
    return (xc * r * w).astype(x.dtype)


def astype(array: Array, dtype: str) -> Array:
    """``array`` converted to the named dtype (``BackendInfo.astype``), differentiable between
    floating dtypes; ``"int64"`` and ``"float64"`` mean JAX's canonical type (int32 and float32
    without ``jax_enable_x64``, as :func:`jax.numpy.asarray` would make them, without its
    warning); ``array`` itself if it has that dtype already."""
    target = jax.dtypes.canonicalize_dtype(jnp.dtype(dtype))
    return array if array.dtype == target else array.astype(target)
