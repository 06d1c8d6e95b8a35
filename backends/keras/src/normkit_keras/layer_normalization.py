r"""``LayerNormalization``: Keras's layer on normkit's ops, under every Keras backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

import normkit
from normkit import presets
from normkit_keras._base import (
    PACKAGE,
    PresetOptions,
    check_axis,
    check_epsilon,
    check_flag,
    metadata,
    to_numpy,
    unsupported,
    value,
)

__all__ = ["LayerNormalization"]


def increasing_axes(axis: int | list[int], rank: int) -> tuple[int, ...]:
    """Keras's ``axis`` (an axis or a list of them) as non-negative, increasing axes."""
    return tuple(sorted(a % rank for a in (axis if isinstance(axis, list | tuple) else [axis])))


def laid_out(weight: Any, inputs: Any, axes: tuple[int, ...]) -> Any:
    """A weight Keras lays out along its sorted axes as given (``[-1, 1]``: the last axis
    first) reshaped onto the increasing ``axes``, so that stock weights mean the same here."""
    if weight is None:
        return None
    shape = tuple(inputs.shape[a] for a in axes)
    return weight if tuple(weight.shape) == shape else keras.ops.reshape(weight, shape)


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNormalization(PresetOptions, keras.layers.LayerNormalization):
    r"""``keras.layers.LayerNormalization`` on normkit's ops, with ``preset=`` (which sets the
    default ``epsilon``): :math:`y = \gamma \odot (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`,
    the statistics over ``axis`` (two-pass, in at least float32). Keras's arguments, defaults,
    weights (``gamma, beta``) and serialization; ``rms_scaling=True`` (deprecated in Keras; it is
    not RMS norm) raises :class:`NotImplementedError`: use :class:`RMSNormalization`."""

    def __init__(
        self,
        axis: int | list[int] = -1,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        unsupported(rms_scaling=kwargs.pop("rms_scaling", False))
        p = presets.get_preset(preset)
        super().__init__(
            axis=check_axis(axis, several=True),
            epsilon=check_epsilon(epsilon, p.layer_norm_eps),
            center=check_flag("center", center),
            scale=check_flag("scale", scale),
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            **kwargs,
        )
        self._set_preset(p)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], *, axis: int | list[int] | None = None, **kwargs: Any
    ) -> LayerNormalization:
        """A layer holding a normkit layer-norm state (``normkit.LayerNorm.state_dict()``), e.g.
        one trained in PyTorch: ``eps`` is carried over; γ and β are set when it is built.
        ``axis`` defaults to the trailing axes the state normalized (PyTorch's
        ``normalized_shape``), else the last."""
        found = metadata(state_dict, ("LayerNorm",))
        if axis is None:
            normalized_shape = found.get("normalized_shape")
            if isinstance(normalized_shape, int):
                normalized_shape = [normalized_shape]
            axis = list(range(-len(normalized_shape), 0)) if normalized_shape else -1
        affine = "weight" in state_dict
        layer = cls(
            axis=axis, epsilon=found["eps"], scale=affine, center="bias" in state_dict,
            preset=found.get("preset", "keras"), **kwargs,
        )  # fmt: skip
        names = {"gamma": "weight", "beta": "bias"}
        layer._pending_weights = {k: to_numpy(state_dict[v]) for k, v in names.items() if v in state_dict}
        return layer

    def _weight_shape(self, input_shape: Any) -> tuple[int, ...]:
        """Keras's: γ and β span ``axis`` sorted as given (``[-1, 1]``: the last axis first)."""
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        return tuple(input_shape[a] for a in sorted(axes))

    def call(self, inputs: Any) -> Any:
        axes = increasing_axes(self.axis, len(inputs.shape))
        y = normkit.layer_norm(
            inputs,
            weight=laid_out(value(self.gamma), inputs, axes),
            bias=laid_out(value(self.beta), inputs, axes),
            axis=axes,
            eps=self.epsilon,
        )
        return self._output(y)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("rms_scaling", None)
        return {**config, "preset": self.preset}
