r"""``RMSNormalization``: Keras's layer (Keras 3.9+) on normkit's ops, under every backend."""

from __future__ import annotations

from typing import Any

import keras

import normkit
from normkit import presets
from normkit_keras._base import PACKAGE, PresetOptions, check_axis, check_epsilon, value
from normkit_keras.layer_normalization import increasing_axes, laid_out

__all__ = ["RMSNormalization"]


@keras.saving.register_keras_serializable(package=PACKAGE)
class RMSNormalization(PresetOptions, keras.layers.RMSNormalization):
    r"""``keras.layers.RMSNormalization`` on normkit's ops, with ``preset=``.

    Keras's arguments, weight (``scale``, over the normalized axes) and serialization:
    :math:`y = x/\sqrt{\overline{x^2} + \epsilon}\,(w + o)`, the mean square over ``axis``,
    computed in float32 for float16/bfloat16 input. The preset chooses

    * the default ``epsilon`` (``keras``: 1e-6; ``torch``: ``None``, the machine epsilon of the
      compute dtype, 1.19e-7 for float32, found when the layer is called);
    * the cast order for half-precision input (``keras``, ``torch``, ``gemma``: once, after the
      weight, as Keras; ``llama``, ``onnx``: to the input dtype before the weight, then again);
    * the weight offset :math:`o` (``gemma``: 1, and ``scale`` then starts at 0 so that
      :math:`w + o` starts at 1; otherwise 0 and ``scale`` starts at 1, as Keras's).

    ``scale`` multiplies the normalized axes in increasing order (Keras lays it out along the
    sorted axes as given, e.g. ``[-1, 1]``, and relies on broadcasting, which lines it up with
    the trailing axes only: ``axis=1`` on 3-D input is scaled along axis 1 here). Unlike Keras's
    layer it does not autocast: under a mixed-precision policy a float32 input is normalized in
    float32 and the output cast to the policy's compute dtype.
    """

    def __init__(
        self,
        axis: int | list[int] = -1,
        epsilon: float | None = None,
        *,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        p = presets.get_preset(preset)
        epsilon = p.rms_norm_eps if epsilon is None else check_epsilon(epsilon, 0.0)
        super().__init__(axis=check_axis(axis, several=True), epsilon=epsilon, **kwargs)
        self._set_preset(p)
        self.cast_before_weight = p.rms_cast == "before_weight"
        self.weight_offset = float(p.rms_weight_offset)

    def build(self, input_shape: Any) -> None:
        """Keras's build (``axis`` becomes a sorted list, ``scale`` spans its sizes in that order),
        with ``scale`` starting at :math:`1 - o`."""
        rank = len(input_shape)
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        if not all(-rank <= a < rank for a in axes):
            raise ValueError(f"axis={self.axis!r}: expected axes of inputs of rank {rank}")
        self._check_pending_weights(input_shape)
        self.axis = sorted(axes)
        initializer = keras.initializers.Constant(1.0 - self.weight_offset) if self.weight_offset else "ones"
        self.scale = self.add_weight(
            name="scale", shape=tuple(input_shape[a] for a in self.axis), initializer=initializer
        )
        self.built = True
        self._assign_pending_weights()

    def _weight_shape(self, input_shape: Any) -> tuple[int, ...]:
        """Keras's: ``scale`` spans ``axis`` in increasing order."""
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        return tuple(input_shape[a] for a in sorted(axes))

    def call(self, x: Any) -> Any:
        axes = increasing_axes(self.axis, len(x.shape))
        y = normkit.rms_norm(
            x,
            laid_out(value(self.scale), x, axes),
            axis=axes,
            eps=self.epsilon,  # None: the compute dtype's machine epsilon
            weight_offset=self.weight_offset,
            cast="before_weight" if self.cast_before_weight else "after_weight",
        )
        return self._output(y)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "preset": self.preset}
