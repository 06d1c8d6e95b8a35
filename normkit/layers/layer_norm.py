"""Layer norm: statistics per sample over a set of axes, element-wise affine, no running state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normkit import presets
from normkit.functional import _checks
from normkit.functional import layer as layer_ops
from normkit.layers._base import _Layer
from normkit.state import NormState

__all__ = ["LayerNorm"]

Array = Any


class LayerNorm(_Layer):
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

    _repr_first = "normalized_shape"
    _per_channel = False

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
        if normalized_shape is not None and axis is not None:
            raise ValueError("pass normalized_shape or axis, not both")
        self.normalized_shape = (
            None if normalized_shape is None else _checks.as_shape(normalized_shape, "normalized_shape")
        )
        self.axis = tuple(axis) if isinstance(axis, Sequence) else axis
        self.eps = presets.check_eps(self._preset.layer_norm_eps if eps is None else eps)
        self.affine = bool(affine)
        self.has_bias = bool(bias) and self.affine

    def _expected_arrays(self) -> tuple[str, ...]:
        return (("weight",) if self.affine else ()) + (("bias",) if self.has_bias else ())

    def _param_shape(self) -> tuple[int, ...] | None:
        if self._state is not None and self._state_backend is not None:
            first = next(iter(self._state.arrays().values()), None)
            if first is not None:
                return tuple(self._state_backend.info.shape(first))
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
            "affine": self.affine,
            "bias": self.has_bias,
            "preset": self.preset,
        }

    def __call__(self, x: Array) -> Array:
        """Normalize ``x`` (the same in training and eval)."""
        be = self._resolve(x, 1, "layer_norm")
        shape = _checks._check_input(be, x, 1, "layer_norm")
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
            state = NormState(
                weight=be.info.full(param_shape, 1.0, dtype, x) if self.affine else None,
                bias=be.info.full(param_shape, 0.0, dtype, x) if self.has_bias else None,
            )
        y = layer_ops._layer_norm(be, x, shape, axes, state.weight, state.bias, self.eps, self._preset)
        self._state, self._state_backend = state, self._state_backend or be
        return y
