"""Layer norm: statistics per sample over a set of axes, element-wise affine, no running state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normkit import presets
from normkit.functional import layer as layer_ops
from normkit.layers._base import _AxesNorm
from normkit.state import NormState

__all__ = ["LayerNorm"]

Array = Any


class LayerNorm(_AxesNorm):
    r"""Layer normalization over the trailing ``normalized_shape`` (PyTorch) or ``axis`` (Keras).

    .. math::

       y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with statistics per sample over the normalized axes and element-wise γ, β of their shape.
    Identical in training and eval; it has no running state.

    :param normalized_shape: sizes of the trailing dimensions to normalize (PyTorch style).
    :param axis: an axis or axes to normalize over (Keras style); default the last axis.
    :param eps: default the preset's (1e-5 torch/onnx, 1e-3 keras, 1e-6 flax).
    :param affine: element-wise γ (PyTorch ``elementwise_affine``).
    :param bias: element-wise β (only with ``affine``).
    :param preset: ``"torch"``, ``"keras"``, ``"flax"`` or ``"onnx"``.
    :param backend: force a backend by name.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | None = None,
        *,
        axis: int | Sequence[int] | None = None,
        eps: float | None = None,
        affine: bool = True,
        bias: bool = True,
        preset: str | presets.Preset = "torch",
        backend: str | None = None,
    ) -> None:
        super().__init__(preset, backend)
        self._set_axes(normalized_shape, axis)
        self.eps = presets.check_eps(self._preset.layer_norm_eps if eps is None else eps)
        self.affine = bool(affine)
        self.has_bias = bool(bias) and self.affine

    def _expected_arrays(self) -> tuple[str, ...]:
        return (("weight",) if self.affine else ()) + (("bias",) if self.has_bias else ())

    def _config(self) -> dict[str, Any]:
        return {
            **self._axes_config(),
            "eps": self.eps,
            "affine": self.affine,
            "bias": self.has_bias,
            "preset": self.preset,
        }

    def __call__(self, x: Array) -> Array:
        """Normalize ``x`` (the same in training and eval)."""
        be, shape, axes, param_shape, dtype = self._prepare(x, "layer_norm")
        state = self._state
        if state is None:
            state = NormState(
                weight=be.info.full(param_shape, 1.0, dtype, x) if self.affine else None,
                bias=be.info.full(param_shape, 0.0, dtype, x) if self.has_bias else None,
            )
        y = layer_ops._layer_norm(be, x, shape, axes, state.weight, state.bias, self.eps, self._preset)
        # a layer without arrays holds no backend's state: it takes any backend's input
        self._state, self._state_backend = state, self._state_backend or (be if state.arrays() else None)
        return y
