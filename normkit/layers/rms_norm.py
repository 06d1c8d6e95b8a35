"""RMS norm: divide by the root mean square over the normalized axes, element-wise weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normkit import presets
from normkit.functional import rms as rms_ops
from normkit.layers._base import _AxesNorm
from normkit.state import NormState

__all__ = ["RMSNorm"]

Array = Any


class RMSNorm(_AxesNorm):
    r"""RMS normalization over the trailing ``normalized_shape`` (PyTorch) or ``axis`` (Keras):

    .. math::

       y = \frac{x}{\sqrt{\frac1n\sum x^2 + \epsilon}}\,(w + o) ,

    computed in float32 for float16/bfloat16 input, rounded to the input dtype after the weight
    (``cast="after_weight"``) or before and after it (``"before_weight"``). Identical in
    training and eval. The weight is created so that :math:`w + o = 1` (0 under ``gemma``).

    :param normalized_shape: sizes of the trailing dimensions to normalize (PyTorch style).
    :param axis: an axis or axes to normalize over (Keras style); default the last axis.
    :param eps: default the preset's (torch ``None``, keras 1e-6, ...); ``None`` under any preset
        is PyTorch's: the compute dtype's machine epsilon, resolved per call (so a state converted
        to another preset keeps it).
    :param elementwise_affine: keep a weight ``w``.
    :param weight_offset: ``o`` (default the preset's: 0; ``gemma`` 1).
    :param cast: ``"after_weight"`` or ``"before_weight"`` (default the preset's).
    :param preset: ``"torch"``, ``"keras"``, ``"flax"``, ``"onnx"``, ``"llama"`` or ``"gemma"``.
    :param backend: force a backend by name.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | None = None,
        *,
        axis: int | Sequence[int] | None = None,
        eps: float | presets._Default | None = presets.DEFAULT,
        elementwise_affine: bool = True,
        weight_offset: float | None = None,
        cast: presets.RmsCast | None = None,
        preset: str | presets.Preset = "torch",
        backend: str | None = None,
    ) -> None:
        super().__init__(preset, backend)
        self._set_axes(normalized_shape, axis)
        eps = self._preset.rms_norm_eps if eps is presets.DEFAULT else eps
        self.eps = None if eps is None else presets.check_eps(eps)  # None: PyTorch's machine epsilon
        self.elementwise_affine = bool(elementwise_affine)
        self.weight_offset = rms_ops.check_weight_offset(
            self._preset.rms_weight_offset if weight_offset is None else weight_offset
        )
        self.cast = presets.check_rms_cast(self._preset.rms_cast if cast is None else cast)

    def _expected_arrays(self) -> tuple[str, ...]:
        return ("weight",) if self.elementwise_affine else ()

    def _config(self) -> dict[str, Any]:
        return {
            **self._axes_config(),
            "eps": self.eps,
            "elementwise_affine": self.elementwise_affine,
            "weight_offset": self.weight_offset,
            "cast": self.cast,
            "preset": self.preset,
        }

    def __call__(self, x: Array) -> Array:
        """Normalize ``x`` (the same in training and eval)."""
        be, shape, axes, param_shape, dtype = self._prepare(x, "rms_norm")
        state = self._state
        if state is None:
            initial = 1.0 - self.weight_offset
            state = NormState(
                weight=be.info.full(param_shape, initial, dtype, x) if self.elementwise_affine else None
            )
        y = rms_ops._rms_norm(
            be, x, shape, axes, state.weight, self.eps, self.weight_offset, self.cast, self._preset
        )
        # a layer without arrays holds no backend's state: it takes any backend's input
        self._state, self._state_backend = state, self._state_backend or (be if state.arrays() else None)
        return y
