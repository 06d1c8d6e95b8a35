r"""``InstanceNormalization``: new in Keras (it has none), with Keras's conventions."""

from __future__ import annotations

from typing import Any

import keras

import normkit
from normkit import presets
from normkit_keras import _eager
from normkit_keras._base import PACKAGE, PresetOptions, check_axis, check_epsilon, check_flag, keras_momentum

__all__ = ["InstanceNormalization"]


@keras.saving.register_keras_serializable(package=PACKAGE)
class InstanceNormalization(PresetOptions, keras.layers.Layer):
    r"""Instance normalization for Keras: each sample's channels normalized over its spatial
    axes, :math:`y = \gamma_c (x - \mu_{n,c})/\sqrt{\sigma^2_{n,c} + \epsilon} + \beta_c`, with
    per-channel γ and β; optionally moving statistics for inference
    (``track_running_stats=True``, PyTorch's option), updated like batch norm's in training
    (:math:`r \leftarrow m\,r + (1 - m)\,b`, the mean over the batch of the instances'
    statistics) and used when ``training`` is false or the layer is frozen.

    :param axis: the channel axis (default -1, channels-last).
    :param momentum: Keras's convention (weight of the old value); default the preset's.
    :param epsilon: default the preset's (1e-3 for keras).
    """

    def __init__(
        self,
        axis: int = -1,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        track_running_stats: bool = False,
        momentum: float | None = None,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        p = presets.get_preset(preset)
        self._set_preset(p)
        self.axis = check_axis(axis)
        self.epsilon = check_epsilon(epsilon, p.instance_norm_eps)
        self.center, self.scale = check_flag("center", center), check_flag("scale", scale)
        self.track_running_stats = check_flag("track_running_stats", track_running_stats)
        self.momentum = keras_momentum(momentum, p)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None

    def build(self, input_shape: Any) -> None:
        if len(input_shape) < 3:
            raise ValueError(
                f"input_shape={tuple(input_shape)}: instance normalization needs (batch, *spatial, "
                f"channels) with at least one spatial axis"
            )
        axis = self.axis % len(input_shape)
        if axis == 0:
            raise ValueError("axis=0 is the batch axis; instance normalization needs a channel axis")
        shape = (input_shape[axis],)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint, autocast=False,
            )  # fmt: skip
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint, autocast=False,
            )  # fmt: skip
        if self.track_running_stats:
            self.moving_mean = self.add_weight(
                shape=shape, name="moving_mean", initializer="zeros", trainable=False, autocast=False
            )
            self.moving_variance = self.add_weight(
                shape=shape, name="moving_variance", initializer="ones", trainable=False, autocast=False
            )
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: input_shape[axis]})

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        rank = len(inputs.shape)
        axis = self.axis % rank
        use_input_stats = (bool(training) and self.trainable) or not self.track_running_stats
        y = _eager.run(
            self, "_normalize", (axis, use_input_stats), inputs, fixed_axes=(axis,),
            reduced_axes=tuple(a for a in range(1, rank) if a != axis) if use_input_stats else None,
            weights=(self.moving_mean, self.moving_variance, self.gamma, self.beta),
            options=(
                self.momentum, self.epsilon, self.unbiased_running_var, self.track_running_stats, self.preset,
                self.compute_dtype,
            ),
        )  # fmt: skip
        if y is not None:  # eager on TensorFlow: the same ops as one traced call
            return y
        return self._normalize(inputs, axis, use_input_stats)

    def _normalize(self, inputs: Any, axis: int, use_input_stats: bool) -> Any:
        """normkit's instance norm, the new moving statistics assigned when they are tracked and
        updated, the output in the compute dtype (eagerly on TensorFlow: one traced call)."""
        if use_input_stats:
            self._check_values_per_group(inputs, [a for a in range(1, len(inputs.shape)) if a != axis])
        y, mean, var = normkit.instance_norm(
            inputs, *self._channel_state(), use_input_stats=use_input_stats, axis=axis,
            **self._moving_options(),
        )  # fmt: skip
        if use_input_stats and self.track_running_stats:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(var)
        return self._output(y)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "track_running_stats": self.track_running_stats,
            "momentum": self.momentum,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            "preset": self.preset,
        }
