"""RMS norm: divide by the root mean square over the normalized axes, element-wise weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normkit import presets
from normkit.functional import _checks
from normkit.functional import layer as layer_ops
from normkit.functional import rms as rms_ops
from normkit.layers._base import _Layer
from normkit.state import NormState

__all__ = ["RMSNorm"]

Array = Any


class RMSNorm(_Layer):
    r"""RMS normalization over the trailing ``normalized_shape`` (PyTorch) or ``axis`` (Keras):

    .. math::

       y = \frac{x}{\sqrt{\frac1n\sum x^2 + \epsilon}}\,(w + o) ,

    computed in float32 for float16/bfloat16 input, rounded to the input dtype after the weight
    (``cast="after_weight"``) or before and after it (``"before_weight"``). Identical in
    training and eval. The weight is created so that :math:`w + o = 1` (0 under ``gemma``).

    :param normalized_shape: sizes of the trailing dimensions to normalize (PyTorch style).
    :param axis: an axis or axes to normalize over (Keras style); default the last axis.
    :param eps: default the preset's (torch ``None``: the compute dtype's machine epsilon).
    :param elementwise_affine: keep a weight ``w``.
    :param weight_offset: ``o`` (default the preset's: 0; ``gemma`` 1).
    :param cast: ``"after_weight"`` or ``"before_weight"`` (default the preset's).
    :param preset: ``"torch"``, ``"keras"``, ``"flax"``, ``"onnx"``, ``"llama"`` or ``"gemma"``.
    :param backend: force a backend by name.
    """

    _repr_first = "normalized_shape"
    _per_channel = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | None = None,
        *,
        axis: int | Sequence[int] | None = None,
        eps: float | None = None,
        elementwise_affine: bool = True,
        weight_offset: float | None = None,
        cast: presets.RmsCast | None = None,
        preset: str | presets.Preset = "torch",
        backend: str | None = None,
    ) -> None:
        super().__init__(preset, backend)
        if normalized_shape is not None and axis is not None:
            raise ValueError("pass normalized_shape or axis, not both")
        self.normalized_shape = (
            None if normalized_shape is None else _checks.as_shape(normalized_shape, "normalized_shape")
        )
        self.axis = tuple(axis) if isinstance(axis, Sequence) else axis
        eps = self._preset.rms_norm_eps if eps is None else eps
        self.eps = None if eps is None else presets.check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.weight_offset = rms_ops.check_weight_offset(
            self._preset.rms_weight_offset if weight_offset is None else weight_offset
        )
        self.cast = presets.check_rms_cast(self._preset.rms_cast if cast is None else cast)

    def _expected_arrays(self) -> tuple[str, ...]:
        return ("weight",) if self.elementwise_affine else ()

    def _param_shape(self) -> tuple[int, ...] | None:
        if self._state is not None and self._state_backend is not None and self._state.weight is not None:
            return tuple(self._state_backend.info.shape(self._state.weight))
        return self.normalized_shape

    def _param_shapes(self) -> dict[str, tuple[int, ...]] | None:
        shape = self._param_shape()
        return None if shape is None else {key: shape for key in self._expected_arrays()}

    def _config(self) -> dict[str, Any]:
        shape = self.normalized_shape
        return {
            "normalized_shape": None if shape is None else list(shape),
            "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis,
            "eps": self.eps,
            "elementwise_affine": self.elementwise_affine,
            "weight_offset": self.weight_offset,
            "cast": self.cast,
            "preset": self.preset,
        }

    def __call__(self, x: Array) -> Array:
        """Normalize ``x`` (the same in training and eval)."""
        be = self._resolve(x, 1, "rms_norm")
        shape = _checks._check_input(be, x, 1, "rms_norm")
        axes = layer_ops.normalized_axes(shape, self.normalized_shape, self.axis)
        param_shape = tuple(shape[a] for a in axes)
        if 0 in param_shape:
            raise ValueError(f"x has shape {shape}: the normalized dimensions {param_shape} hold no values")
        expected = self._param_shape()
        if expected is not None and param_shape != expected:
            raise ValueError(
                f"x has shape {shape}: normalized dimensions {param_shape}, but this layer's are {expected}"
            )
        state = self._state
        if state is None:
            dtype = "float64" if be.info.dtype_name(x) == "float64" else "float32"
            initial = 1.0 - self.weight_offset
            state = NormState(
                weight=be.info.full(param_shape, initial, dtype, x) if self.elementwise_affine else None
            )
        y = rms_ops._rms_norm(
            be, x, shape, axes, state.weight, self.eps, self.weight_offset, self.cast, self._preset
        )
        self._state, self._state_backend = state, self._state_backend or be
        return y
