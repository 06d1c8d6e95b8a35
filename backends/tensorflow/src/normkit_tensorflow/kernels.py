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
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["batch_norm", "compute_dtype", "instance_norm", "layer_norm"]

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
