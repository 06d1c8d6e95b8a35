r"""Frozen batch norm for Keras: a ``BatchNormalization`` turned into a fixed per-channel affine
map, the same in training and inference (torchvision's ``FrozenBatchNorm2d`` semantics),

.. math::

   s = \gamma\,(\sigma^2_{\text{moving}} + \epsilon)^{-1/2}, \qquad
   t = \beta - \mu_{\text{moving}}\,s, \qquad y = x\,s + t

along the layer's ``axis``, in ``keras.ops`` (any Keras backend). Keras's own way to freeze a
``BatchNormalization`` (``trainable = False``, which also runs it in inference mode) freezes γ
and β with it; :class:`FrozenBatchNormalization` can keep them trainable.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["FrozenBatchNormalization", "freeze_model"]


@keras.saving.register_keras_serializable(package="normkit")
class FrozenBatchNormalization(keras.layers.Layer):
    """:math:`y = x\\,s + t` per channel on ``axis`` (module docstring).

    :param axis: the channel axis (``-1`` channels-last, as Keras's default).
    :param epsilon: ε, added to the moving variance.
    :param trainable_affine: γ and β trainable (the statistics are never trained).
    """

    def __init__(
        self, axis: int = -1, epsilon: float = 1e-3, trainable_affine: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis={axis!r}: expected an int")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
            raise ValueError(f"epsilon={epsilon!r}: expected a number >= 0")
        self.axis, self.epsilon, self.trainable_affine = axis, float(epsilon), bool(trainable_affine)
        self.supports_masking = True

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(f"input_shape={tuple(input_shape)}: the channel axis {self.axis} must be known")
        shape = (int(channels),)
        self.gamma = self.add_weight(
            shape=shape, initializer="ones", trainable=self.trainable_affine, name="gamma"
        )
        self.beta = self.add_weight(
            shape=shape, initializer="zeros", trainable=self.trainable_affine, name="beta"
        )
        self.moving_mean = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=shape, initializer="ones", trainable=False, name="moving_variance"
        )

    def call(self, inputs: Any, mask: Any = None) -> Any:
        """``inputs`` mapped elementwise; a mask (as Keras's ``BatchNormalization`` takes one)
        changes nothing and passes on."""
        ops = keras.ops
        rank = len(inputs.shape)
        shape = [1] * rank
        shape[self.axis % rank] = -1
        scale = self.gamma * ops.rsqrt(self.moving_variance + self.epsilon)
        shift = self.beta - self.moving_mean * scale
        outputs = inputs * ops.cast(ops.reshape(scale, shape), inputs.dtype)
        return outputs + ops.cast(ops.reshape(shift, shape), inputs.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "axis": self.axis,
            "epsilon": self.epsilon,
            "trainable_affine": self.trainable_affine,
        }


def _axis(layer: keras.layers.BatchNormalization) -> int:
    axis = layer.axis
    return int(axis[0] if isinstance(axis, (list, tuple)) else axis)


def freeze_model(model: keras.Model, *, trainable: bool = False) -> keras.Model:
    """A copy of ``model`` (Sequential or functional, nested models included) in which every
    ``keras.layers.BatchNormalization`` is a :class:`FrozenBatchNormalization` holding its
    statistics, γ and β (1 and 0 where ``scale``/``center`` is off) and epsilon; every other
    layer is a copy with the same weights. ``model`` is unchanged.

    :raises ValueError: for a model without ``BatchNormalization``, or one not built yet.
    :raises TypeError: for a subclassed model (its graph of layers is not known).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model is a {type(model).__name__}; expected a keras.Model (Sequential or functional)"
        )
    if not isinstance(model, (keras.Sequential, keras.Function)):
        raise TypeError(
            f"model {model.name!r} is a subclassed {type(model).__name__}: freeze rebuilds the model, which "
            f"needs a Sequential or functional model, whose graph of layers is known (for a subclassed "
            f"model, set trainable = False on its BatchNormalization layers: Keras then runs them in "
            f"inference mode, with gamma and beta frozen too)"
        )
    batch_norms = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not batch_norms:
        raise ValueError(f"model {model.name!r} has no BatchNormalization; nothing to freeze")
    unbuilt = [layer.name for layer in batch_norms if not layer.built]
    if unbuilt:
        raise ValueError(f"BatchNormalization layer(s) {unbuilt} are not built: call the model on data first")
    copies: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.BatchNormalization):
            new: keras.layers.Layer = FrozenBatchNormalization(
                axis=_axis(layer),
                epsilon=float(layer.epsilon),
                trainable_affine=trainable,
                name=layer.name,
                dtype=layer.dtype_policy,
            )
        else:
            new = layer.__class__.from_config(layer.get_config())
        copies.append((layer, new))
        return new

    frozen = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new in copies:
        if isinstance(old, keras.layers.BatchNormalization):
            ones, zeros = np.ones(old.moving_mean.shape), np.zeros(old.moving_mean.shape)
            values = [
                np.asarray(old.gamma) if old.scale else ones,
                np.asarray(old.beta) if old.center else zeros,
                np.asarray(old.moving_mean),
                np.asarray(old.moving_variance),
            ]
            for variable, value in zip(
                (new.gamma, new.beta, new.moving_mean, new.moving_variance), values, strict=True
            ):
                variable.assign(np.asarray(value).astype(variable.dtype))
        else:
            new.set_weights(old.get_weights())
    return frozen
