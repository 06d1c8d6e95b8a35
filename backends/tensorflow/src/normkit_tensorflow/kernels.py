r"""The TensorFlow kernels: plain TF ops that run eagerly, in ``tf.function`` and under XLA.

Each kernel implements one hook of :mod:`normkit.hookspecs` on ``tf.Tensor``/``tf.Variable``
input and is differentiable (``tf.GradientTape``) with respect to ``x``, ``weight`` and ``bias``.

Statistics are a *shifted two-pass*: each group is first shifted by one of its own values
``s`` (the first), then

.. math::

   d = x - s, \qquad \bar d = \frac1n\sum d, \qquad \sigma^2 = \frac1n\sum (d - \bar d)^2,
   \qquad y = d\,a + (\beta - \bar d\,a), \quad a = \gamma/\sqrt{\sigma^2+\epsilon} .

The shift changes nothing in exact arithmetic and keeps every sum small in floating point.
That matters because TensorFlow's CPU reductions over any axis but the innermost add the values
one after another: summing ``x`` itself, the mean of a channel with 65 536 values at
:math:`|\mu| = 100\sigma` comes out hundreds of :math:`\epsilon|\mu|` off (and so does Keras's
``BatchNormalization``, which sums ``x``), outside the spec's bound; summing ``d``, whose values
are of the size of σ, it stays inside. Each mean is also taken one axis at a time (so each
sequential sum is as long as one axis, not the whole group). A constant channel, or a group of one value, has
``d = 0`` exactly and normalizes to β exactly. The shift costs one elementwise pass, about 9 %
of Keras's training time in ``tf.function`` (see docs/performance.md); groups that run along
the innermost axes (layer norm, channels-first instance norm) are summed accurately by
TensorFlow as they are and skip it.
``tf.nn.fused_batch_norm`` is not used: it clamps eps to at least 1.001e-5 and returns the
Bessel-corrected variance.
float16 and bfloat16 input is cast to float32 first (``tf.nn.moments`` would keep bfloat16);
float64 stays float64. Running statistics are returned, never assigned.

Spec version 2 adds the two primitives and two composites, on the same shifted two-pass:

* :func:`moments` returns ``(count, mean, m2)`` per group, :math:`M_2 = \sum m_i (x_i - \mu)^2`,
  with :math:`\mu = s + \bar d` and :math:`M_2 = \sum (d - \bar d)^2`. Without a mask the shift
  is the group's first value whatever the axes (so a constant group has :math:`M_2 = 0` exactly
  and group norm gives it β exactly). With a mask :math:`m_i` it is a first, rough masked mean
  (skipped along the innermost axes) and :math:`d = m\,(x - s)`: a masked value is replaced by
  0 before any arithmetic (``tf.where``), so a NaN or infinity under the mask reaches neither
  the statistics nor their gradients. An empty group is ``(0, 0, 0)``. Groups of channels
  reshape the channel axis into ``(G, C/G)`` and pool the ``C/G`` sub-axis with the reduced axes.
* :func:`normalize` computes :math:`(x - \mu)\,\gamma/\sqrt{\sigma^2 + \epsilon} + \beta`;
  an axis whose statistics have ``G`` entries for ``C`` values is reshaped into ``(G, C/G)``.
  float64 statistics for float32 computation are applied as the float32-rounded mean plus a
  correction, so they keep their extra precision.
* :func:`group_norm` is :func:`moments` and :func:`normalize` fused on the reshaped input: the
  output is :math:`(d - \bar d)\,a + \beta`, with no rounding of a large mean in it.
* Keras's masks in ``normkit_tensorflow.BatchNormalization`` go through normkit's one
  composition, :func:`normkit.functional.masked.masked_batch_norm`, on :func:`moments` and
  :func:`normalize`.
* :func:`rms_norm` is :math:`x / \sqrt{\overline{x^2} + \epsilon}\,(w + o)`, the mean square
  taken one axis at a time (one ``tf.reduce_mean`` over the last axis, as Keras's
  ``RMSNormalization``); for half-precision input the cast to the input dtype comes after the
  weight or, with ``cast_before_weight``, before it (and once more after).

Every kernel handles dimensions that are unknown while tracing (``None`` in ``x.shape``): sizes
it needs are read with ``tf.shape`` at run time.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "batch_norm",
    "compute_dtype",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "rms_norm",
]

Tensor = tf.Tensor


def compute_dtype(x: Tensor) -> tf.DType:
    """float64 for float64 input, float32 for everything else (the spec's precision rule)."""
    return tf.float64 if x.dtype == tf.float64 else tf.float32


def _cast(t: Tensor | None, dtype: tf.DType) -> Tensor | None:
    if t is None:
        return None
    t = tf.convert_to_tensor(t)
    return t if t.dtype == dtype else tf.cast(t, dtype)


def _broadcast(param: Tensor | None, rank: int, axes: list[int], dtype: tf.DType) -> Tensor | None:
    """A parameter in the compute dtype, reshaped to broadcast against ``x``: its dimensions go
    to ``axes`` (static, from the parameter itself, so ``x`` may have unknown dimensions)."""
    if param is None:
        return None
    param = _cast(param, dtype)
    shape = [1] * rank
    for a, size in zip(axes, param.shape, strict=True):
        shape[a] = size
    return tf.reshape(param, shape)


def _mean(t: Tensor, axes: list[int]) -> Tensor:
    """The mean over ``axes`` (kept), one axis at a time from the innermost: each sum then runs
    along a single axis, so TensorFlow's one-after-another CPU reduction over an outer axis adds
    at most that axis's length of terms instead of the whole group's. The first stage reads the
    tensor once; the later ones read its already-reduced copies."""
    for a in sorted(axes, reverse=True):
        t = tf.reduce_mean(t, axis=a, keepdims=True)
    return t


def _moments(xc: Tensor, axes: list[int]) -> tuple[Tensor, Tensor | float, Tensor, Tensor]:
    """``(d, shift, mean_d, var)``, kept-dims over ``axes``: the group mean is ``shift + mean_d``
    and ``d = xc - shift``.

    The shift is the group's first value when the groups run along outer axes (whose CPU sums
    are sequential) or hold one value each (then ``d`` is exactly 0); groups over the innermost
    axes are summed accurately as they are, and skip the extra pass (``shift = 0``)."""
    rank = len(xc.shape)
    trailing = sorted(axes) == list(range(rank - len(axes), rank))
    if trailing and not all(xc.shape[a] == 1 for a in axes):
        shift, d = 0.0, xc
    else:
        first = tuple(slice(0, 1) if a in axes else slice(None) for a in range(rank))
        shift = tf.stop_gradient(xc[first])
        d = xc - shift
    mean_d = _mean(d, axes)
    var = _mean(tf.math.squared_difference(d, tf.stop_gradient(mean_d)), axes)
    return d, shift, mean_d, var


def _normalize_centered(
    d: Tensor, mean_d: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> Tensor:
    """``(d - mean_d) * a + beta``, computed as ``d*a + (beta - mean_d*a)`` with
    ``a = gamma/sqrt(var+eps)``."""
    a = tf.math.rsqrt(var + tf.constant(eps, dtype=var.dtype))
    if gamma is not None:
        a = a * gamma
    shift = -mean_d * a
    if beta is not None:
        shift = shift + beta
    return d * a + shift


def _group_count(x: Tensor, groups: Tensor, dtype: tf.DType) -> Tensor:
    """Values per group, ``size(x) / groups``, as a scalar of ``dtype`` (dynamic shapes allowed;
    0 for an empty input)."""
    return tf.cast(tf.size(x, out_type=tf.int64) // tf.maximum(tf.cast(groups, tf.int64), 1), dtype)


def _updated(old: Tensor, batch: Tensor, momentum: float) -> Tensor:
    """``(1 - m) * old + m * batch`` in the wider dtype, returned in ``old``'s dtype."""
    old = tf.convert_to_tensor(old)
    wide = tf.float64 if tf.float64 in (old.dtype, batch.dtype) else tf.float32
    new = (1.0 - momentum) * tf.cast(old, wide) + momentum * tf.cast(batch, wide)
    return tf.cast(new, old.dtype)


def _channel_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
    per_instance: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Batch norm (statistics per channel) or instance norm (per sample and channel; the
    running statistics then take the mean over the batch of the per-instance ones)."""
    x = tf.convert_to_tensor(x)
    rank = len(x.shape)
    cdt = compute_dtype(x)
    gamma, beta = _broadcast(weight, rank, [axis], cdt), _broadcast(bias, rank, [axis], cdt)
    xc = _cast(x, cdt)
    if not use_batch_stats:
        mean = _broadcast(running_mean, rank, [axis], cdt)
        var = _broadcast(running_var, rank, [axis], cdt)
        a = tf.math.rsqrt(var + tf.constant(eps, dtype=cdt))
        if gamma is not None:
            a = a * gamma
        shift = -mean * a if beta is None else beta - mean * a
        return tf.cast(xc * a + shift, x.dtype), running_mean, running_var
    first = 1 if per_instance else 0
    axes = [a for a in range(first, rank) if a != axis]
    d, shift, mean_d, var = _moments(xc, axes)
    y = tf.cast(_normalize_centered(d, mean_d, var, gamma, beta, eps), x.dtype)
    if running_mean is None or running_var is None:
        return y, None, None
    # the shift is one value per group; reduce it (an identity) so that an empty batch still
    # yields one (NaN) mean per group, which the guard below discards
    if not isinstance(shift, float):
        mean_d = mean_d + tf.reduce_mean(shift, axis=axes, keepdims=True)
    mean = tf.stop_gradient(mean_d)
    var = tf.stop_gradient(var)
    n = _group_count(x, tf.size(mean, out_type=tf.int64), cdt)
    if unbiased_running_var:
        var = var * (n / tf.maximum(n - 1.0, 1.0))
    if per_instance:
        mean, var = tf.reduce_mean(mean, axis=0), tf.reduce_mean(var, axis=0)
    mean, var = tf.reshape(mean, [-1]), tf.reshape(var, [-1])
    new_mean, new_var = _updated(running_mean, mean, momentum), _updated(running_var, var, momentum)
    # normkit validates the sizes before a kernel runs, but a traced graph may meet a size it could
    # not see: an empty batch, or one value per group with the unbiased estimator (n/(n-1)), leaves
    # the running statistics as they were instead of making them NaN
    keep = n < (2.0 if unbiased_running_var else 1.0)
    return (
        y,
        tf.where(keep, tf.convert_to_tensor(running_mean), new_mean),
        tf.where(keep, tf.convert_to_tensor(running_var), new_var),
    )


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The spec's batch norm (:func:`normkit.hookspecs.normkit_batch_norm`) in TF ops."""
    return _channel_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var, False
    )


def instance_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The spec's instance norm (:func:`normkit.hookspecs.normkit_instance_norm`) in TF ops."""
    return _channel_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis,
        unbiased_running_var, True,
    )  # fmt: skip


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    axes: tuple[int, ...],
    eps: float,
) -> Tensor:
    """The spec's layer norm (:func:`normkit.hookspecs.normkit_layer_norm`) in TF ops."""
    x = tf.convert_to_tensor(x)
    cdt = compute_dtype(x)
    axes, rank = list(axes), len(x.shape)
    d, _, mean_d, var = _moments(_cast(x, cdt), axes)
    gamma, beta = _broadcast(weight, rank, axes, cdt), _broadcast(bias, rank, axes, cdt)
    y = _normalize_centered(d, mean_d, var, gamma, beta, eps)
    return tf.cast(y, x.dtype)


# -- spec version 2: moments, normalize, group norm, RMS norm -------------------------------

Size = int | Tensor
"""A dimension: an ``int`` where the static shape knows it, else a scalar tensor read at run time."""


def _dims(t: Tensor) -> list[Size]:
    """``t``'s shape as static ints where known and ``tf.shape`` entries where not (a tensor
    traced with unknown dimensions), for ``tf.reshape``."""
    static = t.shape.as_list()
    if all(size is not None for size in static):
        return static
    dynamic = tf.shape(t)
    return [dynamic[i] if size is None else size for i, size in enumerate(static)]


def _sum(t: Tensor, axes: list[int]) -> Tensor:
    """The sum over ``axes`` (kept), one axis at a time from the innermost (see :func:`_mean`)."""
    for a in sorted(axes, reverse=True):
        t = tf.reduce_sum(t, axis=a, keepdims=True)
    return t


def _reduced_size(t: Tensor, axes: list[int]) -> Tensor:
    """The number of values of ``t`` in one group of ``axes``, an int64 scalar (0 for an empty one)."""
    shape = tf.shape(t, out_type=tf.int64)
    return tf.reduce_prod(tf.gather(shape, axes))


def _trailing(rank: int, axes: list[int]) -> bool:
    """Whether ``axes`` are the innermost axes, which TensorFlow sums accurately as they are."""
    return sorted(axes) == list(range(rank - len(axes), rank))


def _split_axis(t: Tensor, axis: int, groups: int) -> Tensor:
    """``t`` with axis ``axis`` (``C``) reshaped into ``(groups, C // groups)``: contiguous blocks."""
    dims = _dims(t)
    return tf.reshape(t, [*dims[:axis], groups, dims[axis] // groups, *dims[axis + 1 :]])


def _centered(xc: Tensor, axes: list[int], mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(count, mean, e)`` of ``xc`` (in the compute dtype) over ``axes``, the first two kept-dims:
    ``count`` (int64) and ``mean`` per group, and the deviations :math:`e = x - \mu` (0 where
    ``mask``, a boolean tensor of ``xc``'s shape, is false), so that :math:`M_2 = \sum e^2`.

    Shifted two-pass (module docstring). Without a mask the shift is each group's first value,
    whatever the axes: then :math:`e` is exact for a constant group (which normalizes to β
    exactly) and carries no rounding of a large mean (:math:`\epsilon|\mu|`), for one extra
    elementwise pass. With a mask it is a rough masked mean (an extra reduction), which groups
    along the innermost axes, summed accurately as they are, skip. An empty group has count 0
    and mean 0."""
    rank = len(xc.shape)
    if mask is None:
        n = _reduced_size(xc, axes)
        # the first value of each group (a sum over one position: 0 for an empty group)
        first = tuple(slice(0, 1) if a in axes else slice(None) for a in range(rank))
        shift = tf.stop_gradient(_sum(xc[first], axes))
        d = xc - shift
        mean_d = _sum(d, axes) / tf.cast(tf.maximum(n, 1), xc.dtype)
        count = tf.broadcast_to(n, tf.shape(mean_d))
        e = d - mean_d
    else:
        zero = tf.zeros_like(xc)
        count = _sum(tf.cast(mask, tf.int64), axes)
        n = tf.cast(tf.maximum(count, 1), xc.dtype)
        if _trailing(rank, axes):
            d, shift = tf.where(mask, xc, zero), None
        else:
            shift = tf.stop_gradient(_sum(tf.where(mask, xc, zero), axes) / n)
            d = tf.where(mask, xc - shift, zero)
        mean_d = _sum(d, axes) / n
        e = tf.where(mask, d - mean_d, zero)
    return count, mean_d if shift is None else mean_d + shift, e


def moments(
    x: Tensor,
    axes: tuple[int, ...],
    mask: Tensor | None,
    group_axis: int | None,
    num_groups: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The spec's moments (:func:`normkit.hookspecs.normkit_moments`) in TF ops:
    ``(count, mean, m2)`` per group, ``count`` int64, ``mean`` and
    :math:`M_2 = \sum m_i (x_i - \mu)^2` in the compute dtype, differentiable in ``x``."""
    x = tf.convert_to_tensor(x)
    xc = _cast(x, compute_dtype(x))
    reduced = sorted(axes)
    if mask is not None:
        mask = tf.broadcast_to(tf.convert_to_tensor(mask), tf.shape(x))
    if group_axis is not None and num_groups is not None:
        xc = _split_axis(xc, group_axis, num_groups)
        if mask is not None:
            mask = _split_axis(mask, group_axis, num_groups)
        reduced = sorted([a + 1 if a > group_axis else a for a in reduced] + [group_axis + 1])
    count, mean, e = _centered(xc, reduced, mask)
    m2 = _sum(tf.square(e), reduced)
    return tuple(tf.squeeze(t, axis=reduced) for t in (count, mean, m2))  # type: ignore[return-value]


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...],
) -> Tensor:
    r"""The spec's normalize (:func:`normkit.hookspecs.normkit_normalize`) in TF ops:
    :math:`y = (x - \mu)\,\gamma/\sqrt{\sigma^2 + \epsilon} + \beta` in the compute dtype.

    ``mean`` and ``var`` span the kept axes; a kept axis where they have ``G`` entries for ``x``'s
    ``C`` (or where either size is unknown while tracing) is reshaped into ``(G, C/G)``, so block
    ``g`` of ``C/G`` consecutive indices takes statistic ``g`` (``G = C`` is the plain case)."""
    x = tf.convert_to_tensor(x)
    cdt = compute_dtype(x)
    rank = len(x.shape)
    mean = tf.convert_to_tensor(mean)
    # float64 statistics for float32 computation: centre at the mean rounded to float32 (x minus
    # a nearby float32 is exact) and put the rounding back through the shift
    residual = None
    if mean.dtype == tf.float64 and cdt == tf.float32:
        residual = tf.cast(mean - tf.cast(tf.cast(mean, cdt), tf.float64), cdt)
    mean, var = _cast(mean, cdt), _cast(var, cdt)
    kept = [a for a in range(rank) if a not in axes]
    position = {a: k for k, a in enumerate(kept)}
    split = {a for a in kept if mean.shape[position[a]] is None or mean.shape[position[a]] != x.shape[a]}
    x_dims, stat_dims = _dims(x), _dims(mean)
    x_shape: list[Size] = []
    stat_shape: list[Size] = []
    param_shape: list[Size] = []
    for a in range(rank):
        if a in split:
            groups = stat_dims[position[a]]
            x_shape += [groups, x_dims[a] // groups]
            stat_shape += [groups, 1]
            param_shape += [groups, x_dims[a] // groups] if a in param_axes else [1, 1]
        else:
            x_shape.append(x_dims[a])
            stat_shape.append(stat_dims[position[a]] if a in position else 1)
            param_shape.append(x_dims[a] if a in param_axes else 1)
    xc = _cast(x, cdt)
    if split:
        xc = tf.reshape(xc, x_shape)
    scale = tf.math.rsqrt(tf.reshape(var, stat_shape) + tf.constant(eps, dtype=cdt))
    if weight is not None:
        scale = scale * tf.reshape(_cast(weight, cdt), param_shape)
    y = (xc - tf.reshape(mean, stat_shape)) * scale
    if residual is not None:
        y = y - tf.reshape(residual, stat_shape) * scale
    if bias is not None:
        y = y + tf.reshape(_cast(bias, cdt), param_shape)
    if split:
        y = tf.reshape(y, x_dims)
    return tf.cast(y, x.dtype)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    r"""The spec's group norm (:func:`normkit.hookspecs.normkit_group_norm`) in TF ops: the channel
    axis reshaped into ``(G, C/G)``, each sample's block centred by the shifted two-pass, then
    :math:`y = e\,\gamma_c/\sqrt{M_2/n + \epsilon} + \beta_c` with :math:`e = x - \mu`."""
    x = tf.convert_to_tensor(x)
    cdt = compute_dtype(x)
    rank = len(x.shape)
    xs = _split_axis(_cast(x, cdt), axis, num_groups)
    axes = [a for a in range(1, rank + 1) if a != axis]  # the block's channels and every other axis
    count, _, e = _centered(xs, axes, None)
    var = _sum(tf.square(e), axes) / tf.cast(tf.maximum(count, 1), cdt)
    scale = tf.math.rsqrt(var + tf.constant(eps, dtype=cdt))
    param_shape = [1] * (rank + 1)
    param_shape[axis], param_shape[axis + 1] = num_groups, -1
    if weight is not None:
        scale = scale * tf.reshape(_cast(weight, cdt), param_shape)
    y = e * scale
    if bias is not None:
        y = y + tf.reshape(_cast(bias, cdt), param_shape)
    return tf.cast(tf.reshape(y, _dims(x)), x.dtype)


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> Tensor:
    r"""The spec's RMS norm (:func:`normkit.hookspecs.normkit_rms_norm`) in TF ops:
    :math:`\hat x = x/\sqrt{\overline{x^2} + \epsilon}` in the compute dtype, then
    :math:`y = \hat x\,(w + o)` rounded to ``x``'s dtype once, or, for float16/bfloat16 input with
    ``cast_before_weight``, :math:`\hat x` rounded first and the product rounded again."""
    x = tf.convert_to_tensor(x)
    cdt = compute_dtype(x)
    xc = _cast(x, cdt)
    z = xc * tf.math.rsqrt(_mean(tf.square(xc), list(axes)) + tf.constant(eps, dtype=cdt))
    if weight is None:
        return tf.cast(z, x.dtype)
    w = _broadcast(weight, len(x.shape), list(axes), cdt)
    if weight_offset:
        w = w + tf.constant(weight_offset, dtype=cdt)
    if cast_before_weight and x.dtype in (tf.float16, tf.bfloat16):
        z = tf.cast(tf.cast(z, x.dtype), cdt)
    return tf.cast(z * w, x.dtype)
