r"""Flax's normalization semantics as pure functions of arrays, composed from normkit's public
operations; :mod:`normkit_jax.nnx` and :mod:`normkit_jax.linen` hold the state and call these.

Every function takes ``x`` already in the dtype the framework's promotion rule gives it and
returns ``y`` in that dtype. The statistics of a group of values :math:`x_i` with mask
:math:`m_i` (1 without a mask) are normkit's moments, two-pass (never
:math:`E[x^2] - E[x]^2`, whatever ``use_fast_variance`` says):

.. math::

   n = \sum_i m_i, \quad \mu = \frac1n \sum_i m_i x_i, \quad
   \sigma^2 = \frac1n \sum_i m_i (x_i - \mu)^2, \quad
   y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta ,

merged across devices exactly (:func:`normkit_jax.collectives.global_moments`: a two-pass
across devices) under an ``axis_name``. A group with nothing counted (:math:`n = 0`) normalizes with :math:`\mu = 0`,
:math:`\sigma^2 = 0` and moves no running statistic (Flax gives NaN).

Without a mask or an ``axis_name`` each layer is one fused normkit op (``batch_norm``,
``layer_norm``, ``group_norm``, ``instance_norm``, ``rms_norm``); otherwise it is
:func:`normkit.moments` (with the mask), the merge, and :func:`normkit.normalize`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax

import normkit
from normkit_jax.collectives import global_moments

__all__ = [
    "batch_norm",
    "canonical_axes",
    "channel_axis",
    "check_epsilon",
    "check_mask",
    "check_momentum",
    "check_positive_int",
    "group_count",
    "group_norm",
    "instance_axes",
    "instance_norm",
    "layer_norm",
    "running_update",
]

Array = Any
Axes = int | Sequence[int]
PRESET = "flax"  # decay momentum, biased running variance, one value per channel allowed


def canonical_axes(ndim: int, axes: Axes, name: str) -> tuple[int, ...]:
    """``axes`` as sorted, unique, non-negative axes of an input with ``ndim`` dimensions
    (Flax's ``_canonicalize_axes``, with errors naming ``name`` for an axis that is not an int or
    is out of range)."""
    raw = tuple(axes) if isinstance(axes, Iterable) and not isinstance(axes, str) else (axes,)
    result = set()
    for axis in raw:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(
                f"{name}={axes!r}: expected an int or a sequence of ints, got {type(axis).__name__} {axis!r}"
            )
        index = int(axis)
        if not -ndim <= index < ndim:
            raise ValueError(
                f"{name}={axes!r}: axis {index} is out of range for an input with {ndim} dimensions"
            )
        result.add(index % ndim)
    return tuple(sorted(result))


def channel_axis(x: Array, axis: object, layer: str) -> int:
    """The one channel axis ``axis`` of ``x`` (non-negative), for a layer (``layer``) that
    normalizes per channel over a batch: ``x`` needs at least 2 dimensions."""
    if x.ndim < 2:
        raise ValueError(
            f"x has shape {x.shape}; {layer} expects at least 2 dimensions (batch, ..., channels)"
        )
    axes = canonical_axes(x.ndim, axis, "axis")  # type: ignore[arg-type]
    if len(axes) != 1:
        raise ValueError(f"axis={axis!r}: {layer} takes one channel axis")
    return axes[0]


def check_positive_int(value: object, name: str) -> int:
    """``value`` as an int >= 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r}: expected a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return int(value)


def group_count(num_groups: object, group_size: object, channels: int, channels_are: str) -> int:
    """The number of groups of Flax's GroupNorm, from ``num_groups`` or ``group_size`` (exactly
    one of them not ``None``), which must divide the ``channels`` (described as
    ``channels_are`` in errors: ``"num_features=6"``)."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"num_groups={num_groups!r}, group_size={group_size!r}: give exactly one of them (pass "
            f"num_groups=None to use group_size; num_groups defaults to 32)"
        )
    name, value = ("num_groups", num_groups) if group_size is None else ("group_size", group_size)
    count = check_positive_int(value, name)
    if channels % count:
        raise ValueError(f"{name}={count} does not divide {channels_are}")
    return count if name == "num_groups" else channels // count


def check_epsilon(epsilon: object) -> float:
    """``epsilon`` as a float, finite and positive (it is added to the variance)."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, numbers.Real)
        or not (math.isfinite(float(epsilon)) and float(epsilon) > 0)
    ):
        raise ValueError(f"epsilon={epsilon!r}: expected a finite number > 0 (added to the variance)")
    return float(epsilon)


def check_momentum(momentum: object) -> float:
    """``momentum`` as a float in ``[0, 1]``: Flax's decay, the weight of the old running value."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= float(momentum) <= 1:
        raise ValueError(
            f"momentum={momentum!r}: expected a decay in [0, 1] (Flax's convention: the weight of the old value)"
        )
    return float(momentum)


def check_mask(mask: Array | None, shape: tuple[int, ...], *, cast: bool) -> Array | None:
    """``mask`` as a boolean JAX array of ``x``'s rank (leading size-1 axes added, as NumPy
    broadcasting would), each size ``x``'s or 1.

    :param cast: convert a non-boolean mask with ``!= 0`` (``flax.linen``); otherwise refuse it
        (``flax.nnx``, whose ``jnp.mean(where=...)`` refuses it too).
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        if not cast:
            raise TypeError(f"mask has dtype {mask.dtype}; expected bool (True where a value counts)")
        mask = mask.astype(jnp.bool_)
    if mask.ndim > len(shape):
        raise ValueError(f"mask has shape {mask.shape}, more dimensions than x with shape {shape}")
    mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
    if any(m not in (s, 1) for m, s in zip(mask.shape, shape, strict=True)):
        raise ValueError(f"mask has shape {mask.shape}; expected one that broadcasts to x's shape {shape}")
    return mask


def _compute_dtype(x: Array) -> Any:
    """float32 for half-precision (and integer) input, else ``x``'s dtype."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _statistics(
    x: Array,
    reduced: tuple[int, ...],
    mask: Array | None,
    axis_name: Hashable | None,
    axis_index_groups: Any,
) -> normkit.Moments:
    """The moments of ``x`` over ``reduced`` (masked), merged over ``axis_name`` when given."""
    if axis_name is None:
        return normkit.moments(x, axes=reduced, mask=mask)
    return global_moments(x, reduced, axis_name, mask=mask, axis_index_groups=axis_index_groups)


def _biased_var(stats: normkit.Moments) -> Array:
    """:math:`M_2/n`, and 0 where :math:`n = 0`."""
    n = stats.count.astype(stats.m2.dtype)
    return stats.m2 / jnp.where(stats.count > 0, n, 1.0)


def _normalize_over(x: Array, mean: Array, var: Array, reduced: tuple[int, ...], eps: float) -> Array:
    r""":math:`(x - \mu)/\sqrt{\sigma^2 + \epsilon}` with statistics that vary along the axes not in
    ``reduced`` (``mean`` and ``var`` have their shape), by :func:`normkit.normalize`: the kept
    axes are flattened into one channel axis."""
    ndim = x.ndim
    kept = tuple(a for a in range(ndim) if a not in reduced)
    order = kept + reduced
    moved = jnp.transpose(x, order) if order != tuple(range(ndim)) else x
    groups = math.prod(x.shape[a] for a in kept)
    rows = moved.reshape(groups, math.prod(x.shape[a] for a in reduced))
    y = normkit.normalize(rows, mean.reshape(groups), var.reshape(groups), eps=eps, axis=0)
    y = y.reshape(moved.shape)
    return jnp.transpose(y, tuple(order.index(a) for a in range(ndim))) if order != tuple(range(ndim)) else y


def _affine(y: Array, scale: Array | None, bias: Array | None, features: tuple[int, ...]) -> Array:
    """``y * scale + bias`` with the parameters spanning the axes ``features`` of ``y``."""
    shape = [1] * y.ndim
    for axis in features:
        shape[axis] = y.shape[axis]
    if scale is not None:
        y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _feature_shaped(param: Array | None, shape: tuple[int, ...]) -> Array | None:
    return None if param is None else param.reshape(shape)


def running_update(running: Array, batch: Array, count: Array, decay: float) -> Array:
    r"""Flax's update :math:`r \leftarrow d\,r + (1 - d)\,b` per channel where the channel counted
    a value (else :math:`r` unchanged), in the wider of the two dtypes, returned in ``running``'s
    dtype and cut from differentiation."""
    wide = jnp.promote_types(running.dtype, batch.dtype)
    weight = jnp.where(count > 0, 1.0 - decay, 0.0).astype(wide)
    new = running.astype(wide) * (1 - weight) + batch.astype(wide) * weight
    return lax.stop_gradient(new.astype(running.dtype))


def batch_norm(
    x: Array,
    running_mean: Array,
    running_var: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    axis: int,
    use_running_average: bool,
    update: bool,
    momentum: float,
    epsilon: float,
    mask: Array | None,
    axis_name: Hashable | None,
    axis_index_groups: Any,
) -> tuple[Array, Array, Array]:
    r"""Flax's BatchNorm: per channel ``axis``, batch statistics over every other axis.

    :param running_mean: in eval, the statistic to normalize with (in the promoted dtype); in
        training, the stored one to update (its dtype is kept).
    :param use_running_average: eval: normalize with the running statistics, ignore ``mask``.
    :param update: in training, return updated running statistics (``False`` while
        ``flax.linen`` initializes); otherwise they come back as given.
    :param momentum: Flax's decay :math:`d`: :math:`r \leftarrow d\,r + (1-d)\,b`.
    :returns: ``(y, running_mean, running_var)``.
    """
    if use_running_average:
        y = normkit.normalize(x, running_mean, running_var, scale, bias, eps=epsilon, axis=axis)
        return y, running_mean, running_var
    if axis_name is None:
        stats = (running_mean, running_var) if update else (None, None)
        y, new_mean, new_var = normkit.batch_norm(
            x, *stats, scale, bias, training=True, momentum=momentum, eps=epsilon, axis=axis,
            preset=PRESET, mask=mask,
        )  # fmt: skip
        if not update:
            return y, running_mean, running_var
        return y, lax.stop_gradient(new_mean), lax.stop_gradient(new_var)
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    stats = _statistics(x, reduced, mask, axis_name, axis_index_groups)
    var = _biased_var(stats)
    y = normkit.normalize(x, stats.mean, var, scale, bias, eps=epsilon, axis=axis)
    if not update:
        return y, running_mean, running_var
    return (
        y,
        running_update(running_mean, stats.mean, stats.count, momentum),
        running_update(running_var, var, stats.count, momentum),
    )


def layer_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    reduction_axes: Axes,
    feature_axes: Axes,
    epsilon: float,
    mask: Array | None,
    axis_name: Hashable | None,
    axis_index_groups: Any,
    use_mean: bool = True,
) -> Array:
    r"""Flax's LayerNorm (``use_mean=False``: RMSNorm, :math:`y = \gamma x/\sqrt{\overline{x^2}+\epsilon}`):
    statistics over ``reduction_axes``, ``scale`` and ``bias`` over ``feature_axes`` (any
    shape with their number of elements).

    With equal axes, no mask and no ``axis_name`` this is :func:`normkit.layer_norm` (or
    :func:`normkit.rms_norm`). Otherwise the mean square of RMSNorm is
    :math:`M_2/n + \mu^2`, a sum of non-negative terms.
    """
    reduced = canonical_axes(x.ndim, reduction_axes, "reduction_axes")
    features = canonical_axes(x.ndim, feature_axes, "feature_axes")
    feature_shape = tuple(x.shape[a] for a in features)
    if mask is None and axis_name is None and reduced == features:
        if use_mean:
            return normkit.layer_norm(
                x, weight=_feature_shaped(scale, feature_shape), bias=_feature_shaped(bias, feature_shape),
                axis=reduced, eps=epsilon, preset=PRESET,
            )  # fmt: skip
        return normkit.rms_norm(
            x, _feature_shaped(scale, feature_shape), axis=reduced, eps=epsilon, preset=PRESET
        )
    xc = x.astype(_compute_dtype(x))
    stats = _statistics(xc, reduced, mask, axis_name, axis_index_groups)
    var = _biased_var(stats)
    if use_mean:
        y = _normalize_over(xc, stats.mean, var, reduced, epsilon)
    else:
        mean_square = var + stats.mean * stats.mean
        y = _normalize_over(xc, jnp.zeros_like(mean_square), mean_square, reduced, epsilon)
    return _affine(y, scale, bias, features).astype(x.dtype)


def group_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    num_groups: int,
    reduction_axes: Axes | None,
    epsilon: float,
    mask: Array | None,
    axis_name: Hashable | None,
    axis_index_groups: Any,
) -> Array:
    """Flax's GroupNorm: channels last, in ``num_groups`` contiguous blocks; statistics per
    block over ``reduction_axes`` (default every axis but the first, which must include the
    last); per-channel ``scale`` and ``bias``."""
    last = channel_axis(x, -1, "GroupNorm")
    axes = tuple(range(1, x.ndim)) if reduction_axes is None else reduction_axes
    reduced = canonical_axes(x.ndim, axes, "reduction_axes")
    if last not in reduced:
        raise ValueError(
            f"reduction_axes={reduction_axes!r} must include the final dimension, the feature axis "
            f"(axis {last} of x with shape {x.shape})"
        )
    channels = x.shape[-1]  # num_groups divides it (the layers check)
    if mask is None and axis_name is None and reduced == tuple(range(1, x.ndim)):
        return normkit.group_norm(x, num_groups, scale, bias, eps=epsilon, axis=last, preset=PRESET)
    size = channels // num_groups
    xc = x.astype(_compute_dtype(x))
    grouped = xc.reshape((*x.shape[:-1], num_groups, size))
    if mask is not None:  # the channel axis splits as x's does (a broadcast one stays broadcast)
        mask = mask.reshape(mask.shape[:-1] + ((num_groups, size) if mask.shape[-1] == channels else (1, 1)))
    grouped_reduced = (*(a for a in reduced if a != last), x.ndim)
    stats = _statistics(grouped, grouped_reduced, mask, axis_name, axis_index_groups)
    y = _normalize_over(grouped, stats.mean, _biased_var(stats), grouped_reduced, epsilon).reshape(x.shape)
    return _affine(y, scale, bias, (last,)).astype(x.dtype)


def instance_axes(ndim: int, feature_axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(features, reduced)`` of Flax's InstanceNorm: every axis but the first (the batch) and
    the feature axes is reduced."""
    features = canonical_axes(ndim, feature_axes, "feature_axes")
    if 0 in features:
        raise ValueError(
            f"feature_axes={feature_axes!r} includes the leading dimension, which InstanceNorm takes as the batch axis"
        )
    reduced = tuple(a for a in range(1, ndim) if a not in features)
    if not reduced:
        raise ValueError(
            f"feature_axes={feature_axes!r} leaves no axis to reduce in an input with {ndim} dimensions; "
            f"InstanceNorm needs at least one axis besides the batch and features"
        )
    return features, reduced


def instance_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    *,
    feature_axes: Axes,
    use_running_average: bool,
    momentum: float,
    epsilon: float,
    mask: Array | None,
    axis_name: Hashable | None,
    axis_index_groups: Any,
) -> tuple[Array, Array | None, Array | None]:
    r"""Flax's InstanceNorm: statistics per sample and feature over the other axes; with
    running statistics (``running_mean`` given: PyTorch's ``track_running_stats``, not in Flax)
    they are updated in training with the mean over the samples of the per-sample statistics
    and used in eval (``use_running_average``), as :func:`normkit.instance_norm` defines.

    :returns: ``(y, running_mean, running_var)`` (``None`` without running statistics).
    """
    features, reduced = instance_axes(x.ndim, feature_axes)
    tracked = running_mean is not None
    if tracked and (len(features) != 1 or mask is not None or axis_name is not None):
        raise ValueError(
            "InstanceNorm with running statistics (track_running_stats=True) takes one feature axis, no "
            "mask and no axis_name"
        )
    if tracked or (mask is None and axis_name is None and len(features) == 1):
        y, new_mean, new_var = normkit.instance_norm(
            x, running_mean, running_var, scale, bias, use_input_stats=not (tracked and use_running_average),
            momentum=momentum, eps=epsilon, axis=features[0], preset=PRESET,
        )  # fmt: skip
        if not tracked or use_running_average:
            return y, running_mean, running_var
        return y, lax.stop_gradient(new_mean), lax.stop_gradient(new_var)
    xc = x.astype(_compute_dtype(x))
    stats = _statistics(xc, reduced, mask, axis_name, axis_index_groups)
    y = _normalize_over(xc, stats.mean, _biased_var(stats), reduced, epsilon)
    return _affine(y, scale, bias, features).astype(x.dtype), None, None
