r"""``flax.nnx`` normalization layers computed by normkit: :class:`BatchNorm`, :class:`LayerNorm`,
:class:`GroupNorm`, :class:`RMSNorm` and :class:`InstanceNorm`.

Each takes ``flax.nnx``'s constructor arguments with its defaults, keeps its variables
(``nnx.Param`` ``scale``/``bias``, ``nnx.BatchStat`` ``mean``/``var``), modes
(``use_running_average`` at construction or call, ``.train()``/``.eval()``, ``nnx.view``),
masks, ``axis_name`` and dtype rules (``dtype``, ``param_dtype``, ``promote_dtype``), so a model
swaps ``nnx.BatchNorm`` for ``normkit_jax.nnx.BatchNorm`` and keeps its checkpoints. What differs:

* **The variance is always two-pass**, :math:`\sigma^2 = \frac1n\sum(x-\mu)^2` in at least float32:
  Flax's default ``use_fast_variance=True`` computes :math:`E[x^2]-E[x]^2`, which loses every digit
  when :math:`|\mu| \gg \sigma` (at mean 1e4, std 1 in float32 it stores variances of 0 and 32 for
  true ones near 1: ``bench/results/cpu-flax-statistics.json``).
  ``use_fast_variance`` is accepted, for signature compatibility, and ignored: whatever its value
  the result is what the fast formula approximates, so code written for Flax runs unchanged and
  only loses a fused reduction.
* **``axis_name`` merges exactly**: the statistics of every device's unmasked values, by
  :func:`normkit_jax.collectives.global_moments` (sums of counts and of count × mean, then of
  the squared deviations from the global mean), correct with masks and unequal per-device
  counts; Flax averages the devices' masked means (a mean of means, google/flax#2417).
* **A group with nothing unmasked** keeps its running statistics and normalizes with mean 0 and
  variance 0 (:math:`y = \gamma x/\sqrt\epsilon + \beta`); Flax stores and returns NaN.
* Errors name the argument: a non-boolean mask, a feature count that differs from
  ``num_features``, an unbound ``axis_name``.

:class:`InstanceNorm` also takes ``track_running_stats`` (PyTorch's running statistics; off by
default, as Flax has none), so that a PyTorch model converts with identical eval outputs
(:mod:`normkit_jax.convert`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from normkit_jax import _flax

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()

Array = Any

_NO_MODE = (
    "No `use_running_average` argument was provided to {layer}. Pass it to the constructor "
    "({layer}(..., use_running_average=True/False)), to the call (layer(x, use_running_average=...)), "
    "or set it with model.train() / model.eval() or nnx.view(model, use_running_average=...)"
)


def _param(
    use: bool,
    init: Initializer,
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    dtype: Dtype,
    metadata: Mapping[str, Any],
) -> Any:
    return nnx.Param(init(rngs.params(), shape, dtype), **metadata) if use else nnx.data(None)


def _set_up(
    layer: nnx.Module,
    num_features: object,
    *,
    epsilon: object,
    dtype: Dtype | None,
    param_dtype: Dtype,
    use_scale: bool,
    scale_init: Initializer,
    scale_metadata: Mapping[str, Any],
    use_bias: bool | None,
    bias_init: Initializer | None,
    bias_metadata: Mapping[str, Any] | None,
    axis_name: Hashable | None,
    axis_index_groups: Any,
    promote_dtype: PromoteDtypeFn,
    rngs: nnx.Rngs,
) -> int:
    """The constructor arguments every layer shares, checked and stored on ``layer`` as Flax's
    layers store them: ``scale`` and ``bias`` (``use_bias=None``: the layer has no bias, as
    RMSNorm) of ``num_features`` elements, and ``use_fast_variance = False`` (always two-pass,
    whatever was asked). Returns ``num_features``."""
    num_features = _flax.check_positive_int(num_features, "num_features")
    shape = (num_features,)
    layer.scale = _param(use_scale, scale_init, rngs, shape, param_dtype, scale_metadata)
    if use_bias is not None:
        assert bias_init is not None and bias_metadata is not None
        layer.bias = _param(use_bias, bias_init, rngs, shape, param_dtype, bias_metadata)
        layer.use_bias = use_bias
    layer.num_features = num_features
    layer.epsilon = _flax.check_epsilon(epsilon)
    layer.dtype = dtype
    layer.param_dtype = param_dtype
    layer.use_scale = use_scale
    layer.axis_name = axis_name
    layer.axis_index_groups = axis_index_groups
    layer.use_fast_variance = False
    layer.promote_dtype = promote_dtype
    return num_features


def _value(variable: Any) -> Array | None:
    return None if variable is None else variable[...]


def _check_feature_count(layer: str, num_features: int, x: Array, axes: tuple[int, ...], name: str) -> None:
    count = math.prod(x.shape[a] for a in axes)
    if count != num_features:
        raise ValueError(
            f"x has shape {x.shape}: its {name} {axes} hold {count} features, but this {layer} was built "
            f"with num_features={num_features}"
        )


class BatchNorm(nnx.Module):
    r"""Batch normalization, ``flax.nnx.BatchNorm``'s interface with normkit's statistics.

    In training (``use_running_average=False``) each channel of ``axis`` is normalized with the
    biased statistics of its unmasked values over every other axis,
    :math:`y = \gamma\,(x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`, and the ``batch_stats``
    move by Flax's decay ``momentum`` :math:`d`: :math:`\hat\mu \leftarrow d\,\hat\mu + (1-d)\,\mu`,
    :math:`\hat\sigma^2 \leftarrow d\,\hat\sigma^2 + (1-d)\,\sigma^2` (a channel with nothing
    unmasked keeps them). In eval (``use_running_average=True``) it normalizes with
    :math:`\hat\mu, \hat\sigma^2` and ignores the mask. With ``axis_name`` the statistics are those
    of the union of every device's unmasked values (exact merge).

    Arguments are ``flax.nnx.BatchNorm``'s; ``use_fast_variance`` is accepted and ignored (the
    variance is always two-pass). ``x``, the statistics and the parameters are promoted together
    by ``promote_dtype`` (to ``dtype`` when given), which is ``y``'s dtype; the statistics are
    computed in at least float32 and stored in float32.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        self.momentum = _flax.check_momentum(momentum)
        num_features = _set_up(
            self, num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_scale=use_scale,
            scale_init=scale_init, scale_metadata=scale_metadata, use_bias=use_bias, bias_init=bias_init,
            bias_metadata=bias_metadata, axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs,
        )  # fmt: skip
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.use_running_average = use_running_average
        self.axis = axis

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalize ``x`` (see the class docstring); in training, update ``mean`` and ``var``.

        :param x: input with the features on ``self.axis``.
        :param use_running_average: overrides the layer's mode for this call.
        :param mask: boolean, broadcastable to ``x``: ``True`` where a value enters the statistics
            (every value is normalized); ignored in eval.
        :returns: ``y`` with ``x``'s shape, in the promoted dtype.
        """
        use_running_average = first_from(
            use_running_average, self.use_running_average, error_msg=_NO_MODE.format(layer="BatchNorm")
        )
        x = jnp.asarray(x)
        axis = _flax.channel_axis(x, self.axis, "BatchNorm")
        _check_feature_count("BatchNorm", self.num_features, x, (axis,), "feature axis")
        mask = _flax.check_mask(mask, x.shape, cast=False)
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        if not use_running_average:  # the stored statistics are updated in their own dtype
            mean, var = self.mean[...], self.var[...]
        y, new_mean, new_var = _flax.batch_norm(
            x, mean, var, scale, bias, axis=axis, use_running_average=use_running_average,
            update=not use_running_average, momentum=self.momentum, epsilon=self.epsilon, mask=mask,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        )  # fmt: skip
        if not use_running_average:
            self.mean[...] = new_mean
            self.var[...] = new_var
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """For ``nnx.view``.

        Args:
          use_running_average: if True, normalize with the stored statistics.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
    r"""Layer normalization, ``flax.nnx.LayerNorm``'s interface with normkit's statistics.

    For each index of the axes not in ``reduction_axes``, the unmasked values over
    ``reduction_axes`` give :math:`\mu, \sigma^2` (two-pass, biased), and
    :math:`y = \gamma\,(x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta` with ``scale`` :math:`\gamma`
    and ``bias`` :math:`\beta` of ``num_features`` elements spanning ``feature_axes`` (which may
    differ from ``reduction_axes``). With ``axis_name`` the statistics merge exactly across
    devices. Arguments are ``flax.nnx.LayerNorm``'s; ``use_fast_variance`` is ignored.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        _set_up(
            self, num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_scale=use_scale,
            scale_init=scale_init, scale_metadata=scale_metadata, use_bias=use_bias, bias_init=bias_init,
            bias_metadata=bias_metadata, axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs,
        )  # fmt: skip
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalize ``x`` over ``reduction_axes``; ``mask`` (boolean, broadcastable to ``x``)
        selects the values that enter the statistics."""
        x = jnp.asarray(x)
        if self.use_scale or self.use_bias:
            features = _flax.canonical_axes(x.ndim, self.feature_axes, "feature_axes")
            _check_feature_count("LayerNorm", self.num_features, x, features, "feature_axes")
        mask = _flax.check_mask(mask, x.shape, cast=False)
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return _flax.layer_norm(
            x, scale, bias, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        )  # fmt: skip


class RMSNorm(nnx.Module):
    r"""RMS normalization, ``flax.nnx.RMSNorm``'s interface with normkit's statistics:
    :math:`y = \gamma\,x/\sqrt{\overline{x^2} + \epsilon}`, the mean square over the unmasked values
    of ``reduction_axes`` (merged exactly across devices with ``axis_name``), ``scale``
    :math:`\gamma` spanning ``feature_axes``. Arguments are ``flax.nnx.RMSNorm``'s;
    ``use_fast_variance`` is ignored (it changes nothing here: no mean is subtracted).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_scale: bool = True,
        scale_init: Initializer = initializers.ones,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        _set_up(
            self, num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_scale=use_scale,
            scale_init=scale_init, scale_metadata=scale_metadata, use_bias=None, bias_init=None,
            bias_metadata=None, axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs,
        )  # fmt: skip
        self.reduction_axes = reduction_axes
        self.feature_axes = feature_axes

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """RMS-normalize ``x`` over ``reduction_axes``; ``mask`` as for :class:`LayerNorm`."""
        x = jnp.asarray(x)
        if self.use_scale:
            features = _flax.canonical_axes(x.ndim, self.feature_axes, "feature_axes")
            _check_feature_count("RMSNorm", self.num_features, x, features, "feature_axes")
        mask = _flax.check_mask(mask, x.shape, cast=False)
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        return _flax.layer_norm(
            x, scale, None, reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups, use_mean=False,
        )  # fmt: skip


class GroupNorm(nnx.Module):
    r"""Group normalization, ``flax.nnx.GroupNorm``'s interface with normkit's statistics.

    The ``num_features`` channels (the last axis) fall into ``num_groups`` contiguous blocks of
    ``group_size``; for each sample and block, the unmasked values over ``reduction_axes``
    (default every axis but the first) give :math:`\mu, \sigma^2`, and
    :math:`y = \gamma_c\,(x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta_c` per channel ``c``. Give
    ``num_groups`` or ``group_size`` (``num_groups=None`` to use ``group_size``).
    ``use_fast_variance`` is ignored.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = _ZEROS,
        scale_init: Initializer = _ONES,
        reduction_axes: Axes | None = None,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        features = _flax.check_positive_int(num_features, "num_features")
        self.num_groups = _flax.group_count(num_groups, group_size, features, f"num_features={features}")
        self.group_size = features // self.num_groups
        self.feature_axis = -1
        _set_up(
            self, features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_scale=use_scale,
            scale_init=scale_init, scale_metadata=scale_metadata, use_bias=use_bias, bias_init=bias_init,
            bias_metadata=bias_metadata, axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs,
        )  # fmt: skip
        self.reduction_axes = reduction_axes

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Group-normalize ``x`` (channels last); ``mask`` as for :class:`LayerNorm`."""
        x = jnp.asarray(x)
        channels = _flax.channel_axis(x, -1, "GroupNorm")
        _check_feature_count("GroupNorm", self.num_features, x, (channels,), "channel axis")
        mask = _flax.check_mask(mask, x.shape, cast=False)
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        return _flax.group_norm(
            x, scale, bias, num_groups=self.num_groups, reduction_axes=self.reduction_axes,
            epsilon=self.epsilon, mask=mask, axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        )  # fmt: skip


class InstanceNorm(nnx.Module):
    r"""Instance normalization, ``flax.nnx.InstanceNorm``'s interface with normkit's statistics.

    For each sample (axis 0) and feature (``feature_axes``), the unmasked values over the other
    axes give :math:`\mu, \sigma^2`, and :math:`y = \gamma\,(x - \mu)/\sqrt{\sigma^2+\epsilon} + \beta`.
    ``use_fast_variance`` is ignored.

    Beyond Flax, ``track_running_stats=True`` keeps ``nnx.BatchStat`` ``mean``/``var`` (one
    feature axis): in training they move by the decay ``momentum`` toward the mean over the
    samples of the per-sample statistics; in eval (``use_running_average=True``, ``.eval()``)
    they normalize, as PyTorch's ``InstanceNorm*d(track_running_stats=True)`` does (with
    Flax's biased variance for the update). Masks and ``axis_name`` are then not supported.
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        feature_axes: Axes = -1,
        axis_name: Hashable | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = False,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        track_running_stats: bool = False,
        use_running_average: bool | None = False,
        momentum: float = 0.99,
    ) -> None:
        self.momentum = _flax.check_momentum(momentum)
        num_features = _set_up(
            self, num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_scale=use_scale,
            scale_init=scale_init, scale_metadata=scale_metadata, use_bias=use_bias, bias_init=bias_init,
            bias_metadata=bias_metadata, axis_name=axis_name, axis_index_groups=axis_index_groups,
            promote_dtype=promote_dtype, rngs=rngs,
        )  # fmt: skip
        if track_running_stats:
            self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
            self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.feature_axes = feature_axes
        self.track_running_stats = bool(track_running_stats)
        self.use_running_average = use_running_average

    def __call__(
        self, x: Array, *, mask: Array | None = None, use_running_average: bool | None = None
    ) -> Array:
        """Instance-normalize ``x``; ``mask`` as for :class:`LayerNorm`; ``use_running_average``
        (with ``track_running_stats``) overrides the layer's mode for this call."""
        x = jnp.asarray(x)
        features, _ = _flax.instance_axes(x.ndim, self.feature_axes)
        if self.use_scale or self.use_bias or self.track_running_stats:
            _check_feature_count("InstanceNorm", self.num_features, x, features, "feature_axes")
        mask = _flax.check_mask(mask, x.shape, cast=False)
        if not self.track_running_stats:
            x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
            y, _, _ = _flax.instance_norm(
                x, scale, bias, None, None, feature_axes=self.feature_axes, use_running_average=False,
                momentum=self.momentum, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )  # fmt: skip
            return y
        use_running_average = first_from(
            use_running_average, self.use_running_average, error_msg=_NO_MODE.format(layer="InstanceNorm")
        )
        x, mean, var, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)), dtype=self.dtype
        )
        if not use_running_average:
            mean, var = self.mean[...], self.var[...]
        y, new_mean, new_var = _flax.instance_norm(
            x, scale, bias, mean, var, feature_axes=self.feature_axes, use_running_average=use_running_average,
            momentum=self.momentum, epsilon=self.epsilon, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )  # fmt: skip
        if not use_running_average:
            self.mean[...] = new_mean
            self.var[...] = new_var
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """For ``nnx.view``.

        Args:
          use_running_average: with ``track_running_stats``, normalize with the stored statistics.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average
