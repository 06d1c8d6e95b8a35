r"""``flax.linen`` normalization layers computed by normkit: :class:`BatchNorm`, :class:`LayerNorm`,
:class:`GroupNorm`, :class:`RMSNorm` and :class:`InstanceNorm`.

Each has ``flax.linen``'s attributes and defaults and creates the same variables
(``params/{scale, bias}``, ``batch_stats/{mean, var}``), so ``Module.init`` gives a tree of the
same structure and existing checkpoints load. As in Flax, ``use_running_average`` is given at
construction or call (``nn.merge_param``: exactly one of the two), training needs
``apply(..., mutable=['batch_stats'])``, ``init`` does not update the statistics
(``is_initializing()``) nor reduce over ``axis_name`` (BatchNorm), and masks are cast to bool.
The output dtype is Flax's: that of ``x``, ``scale`` and ``bias`` together (``dtype`` overrides);
a bfloat16 input with float32 parameters gives float32.

What differs (see :mod:`normkit_jax.nnx` for the reasons): the variance is always two-pass
(``use_fast_variance`` is accepted and ignored); ``axis_name`` merges the devices' moments
exactly; a group with nothing unmasked keeps its running statistics instead of turning them to
NaN; ``force_float32_reductions=False`` keeps the statistics variables in ``param_dtype`` but the
reductions still run in at least float32. :class:`LayerNorm`, :class:`RMSNorm` and
:class:`InstanceNorm` take keyword arguments only: ``flax.linen.LayerNorm(12)`` silently sets
``epsilon=12`` (its first field); here it is a ``TypeError``. :class:`BatchNorm` and
:class:`GroupNorm` keep Flax's positional order (``GroupNorm(8)`` is eight groups).
:class:`InstanceNorm` also takes ``track_running_stats`` (PyTorch's running statistics).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from normkit_jax import _flax

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

Array = Any


def _inputs(x: Array, dtype: Dtype | None, *params: Array | None) -> tuple[Array, Any]:
    """``x`` in the dtype normkit should compute from, and the output dtype of Flax's rule
    (``canonicalize_dtype`` of ``x`` and the parameters, or ``dtype``): ``x`` is widened to the
    output dtype when that is wider (bfloat16 ``x``, float32 parameters), never narrowed
    before the statistics (``dtype=bfloat16`` with float32 ``x`` rounds once, at the end)."""
    out = dtypes.canonicalize_dtype(x, *params, dtype=dtype)
    return x.astype(jnp.promote_types(x.dtype, out)), out


def _stat_dtype(force_float32_reductions: bool, param_dtype: Dtype) -> Any:
    return jnp.float32 if force_float32_reductions else param_dtype


class BatchNorm(nn.Module):
    r"""Batch normalization, ``flax.linen.BatchNorm``'s attributes with normkit's statistics.

    Training: each channel of ``axis`` is normalized with the biased statistics of its unmasked
    values over every other axis, :math:`y = \gamma\,(x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta`, and
    (outside ``init``) ``batch_stats`` move by the decay ``momentum`` :math:`d`:
    :math:`\hat\mu \leftarrow d\,\hat\mu + (1-d)\,\mu`, likewise :math:`\hat\sigma^2`; a channel
    with nothing unmasked keeps them. Eval: normalize with :math:`\hat\mu, \hat\sigma^2`, mask
    ignored. ``axis_name``: the statistics of every device's unmasked values, merged exactly.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalize ``x``; in training outside ``init``, update ``batch_stats`` (which must be
        mutable). ``mask``: broadcastable to ``x``, ``True`` where a value enters the statistics."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        epsilon, momentum = _flax.check_epsilon(self.epsilon), _flax.check_momentum(self.momentum)
        x = jnp.asarray(x)
        axis = _flax.channel_axis(x, self.axis, "BatchNorm")
        shape = (x.shape[axis],)
        stat_dtype = _stat_dtype(self.force_float32_reductions, self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), shape)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        x, out_dtype = _inputs(x, self.dtype, scale, bias)
        mask = _flax.check_mask(mask, x.shape, cast=True)
        initializing = self.is_initializing()
        update = not use_running_average and not initializing
        y, new_mean, new_var = _flax.batch_norm(
            x, ra_mean.value, ra_var.value, scale, bias, axis=axis, use_running_average=use_running_average,
            update=update, momentum=momentum, epsilon=epsilon, mask=mask,
            axis_name=None if initializing else self.axis_name, axis_index_groups=self.axis_index_groups,
        )  # fmt: skip
        if update:
            ra_mean.value = new_mean
            ra_var.value = new_var
        return y.astype(out_dtype)


class LayerNorm(nn.Module, kw_only=True):
    r"""Layer normalization, ``flax.linen.LayerNorm``'s attributes (keyword-only) with normkit's
    statistics: :math:`\mu, \sigma^2` of the unmasked values over ``reduction_axes`` (merged exactly
    over ``axis_name``), :math:`y = \gamma\,(x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta` with ``scale``
    and ``bias`` shaped as ``feature_axes``."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalize ``x`` over ``reduction_axes``; ``mask`` selects the values that count."""
        return _over_axes(self, x, mask, use_mean=True)


class RMSNorm(nn.Module, kw_only=True):
    r"""RMS normalization, ``flax.linen.RMSNorm``'s attributes (keyword-only) with normkit's
    statistics: :math:`y = \gamma\,x/\sqrt{\overline{x^2}+\epsilon}`, the mean square over the
    unmasked values of ``reduction_axes`` (merged exactly over ``axis_name``)."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_scale: bool = True
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes = -1
    feature_axes: Axes = -1
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """RMS-normalize ``x`` over ``reduction_axes``; ``mask`` selects the values that count."""
        return _over_axes(self, x, mask, use_mean=False)


def _over_axes(module: LayerNorm | RMSNorm, x: Array, mask: Array | None, *, use_mean: bool) -> Array:
    r"""The body of :class:`LayerNorm` (``use_mean``) and :class:`RMSNorm`, called from their
    compact ``__call__``: ``scale`` (and LayerNorm's ``bias``) shaped as ``feature_axes``, the
    statistics over ``reduction_axes`` (:func:`normkit_jax._flax.layer_norm`)."""
    epsilon = _flax.check_epsilon(module.epsilon)
    x = jnp.asarray(x)
    features = _flax.canonical_axes(x.ndim, module.feature_axes, "feature_axes")
    shape = tuple(x.shape[a] for a in features)
    scale = module.param("scale", module.scale_init, shape, module.param_dtype) if module.use_scale else None
    bias = None
    if use_mean and module.use_bias:
        bias = module.param("bias", module.bias_init, shape, module.param_dtype)  # type: ignore[union-attr]
    x, out_dtype = _inputs(x, module.dtype, scale, bias)
    y = _flax.layer_norm(
        x, scale, bias, reduction_axes=module.reduction_axes, feature_axes=features, epsilon=epsilon,
        mask=_flax.check_mask(mask, x.shape, cast=True), axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups, use_mean=use_mean,
    )  # fmt: skip
    return y.astype(out_dtype)


class GroupNorm(nn.Module):
    r"""Group normalization, ``flax.linen.GroupNorm``'s attributes with normkit's statistics:
    channels last in ``num_groups`` contiguous blocks (or blocks of ``group_size``, with
    ``num_groups=None``); per sample and block, :math:`\mu, \sigma^2` of the unmasked values over
    ``reduction_axes`` (default every axis but the first; it must include the last), then a
    per-channel ``scale`` and ``bias``."""

    num_groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    reduction_axes: Axes | None = None
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Group-normalize ``x`` (channels last); ``mask`` selects the values that count."""
        epsilon = _flax.check_epsilon(self.epsilon)
        x = jnp.asarray(x)
        channels = x.shape[_flax.channel_axis(x, -1, "GroupNorm")]
        num_groups = _flax.group_count(
            self.num_groups, self.group_size, channels, f"the {channels} channels of x with shape {x.shape}"
        )
        scale = (
            self.param("scale", self.scale_init, (channels,), self.param_dtype) if self.use_scale else None
        )
        bias = self.param("bias", self.bias_init, (channels,), self.param_dtype) if self.use_bias else None
        x, out_dtype = _inputs(x, self.dtype, scale, bias)
        y = _flax.group_norm(
            x, scale, bias, num_groups=num_groups, reduction_axes=self.reduction_axes, epsilon=epsilon,
            mask=_flax.check_mask(mask, x.shape, cast=True), axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )  # fmt: skip
        return y.astype(out_dtype)


class InstanceNorm(nn.Module, kw_only=True):
    r"""Instance normalization, ``flax.linen.InstanceNorm``'s attributes (keyword-only) with
    normkit's statistics: per sample (axis 0) and feature (``feature_axes``),
    :math:`\mu, \sigma^2` of the unmasked values over the other axes.

    ``track_running_stats=True`` (beyond Flax; one feature axis, no mask, no ``axis_name``) adds
    ``batch_stats/{mean, var}``: updated outside ``init`` in training by the decay ``momentum``
    toward the mean over samples of the per-sample statistics, used in eval;
    ``use_running_average`` then works as for :class:`BatchNorm`.
    """

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    feature_axes: Axes = -1
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = False
    force_float32_reductions: bool = True
    track_running_stats: bool = False
    use_running_average: bool | None = None
    momentum: float = 0.99

    @nn.compact
    def __call__(
        self, x: Array, *, mask: Array | None = None, use_running_average: bool | None = None
    ) -> Array:
        """Instance-normalize ``x``; ``mask`` selects the values that count;
        ``use_running_average`` (with ``track_running_stats``) as for :class:`BatchNorm`."""
        epsilon, momentum = _flax.check_epsilon(self.epsilon), _flax.check_momentum(self.momentum)
        x = jnp.asarray(x)
        features, _ = _flax.instance_axes(x.ndim, self.feature_axes)
        shape = tuple(x.shape[a] for a in features)
        ra_mean = ra_var = None
        update = False
        if self.track_running_stats:
            use_running_average = nn.merge_param(
                "use_running_average", self.use_running_average, use_running_average
            )
            stat_dtype = _stat_dtype(self.force_float32_reductions, self.param_dtype)
            ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), shape)
            ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), shape)
            update = not use_running_average and not self.is_initializing()
        scale = self.param("scale", self.scale_init, shape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        x, out_dtype = _inputs(x, self.dtype, scale, bias)
        y, new_mean, new_var = _flax.instance_norm(
            x, scale, bias, None if ra_mean is None else ra_mean.value, None if ra_var is None else ra_var.value,
            feature_axes=features, use_running_average=bool(use_running_average), momentum=momentum,
            epsilon=epsilon, mask=_flax.check_mask(mask, x.shape, cast=True), axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )  # fmt: skip
        if update:
            assert ra_mean is not None and ra_var is not None
            ra_mean.value = new_mean
            ra_var.value = new_var
        return y.astype(out_dtype)
