"""Group norm: per sample, statistics over blocks of channels; per-channel affine; no running state."""

from __future__ import annotations

from typing import Any

from normkit import presets
from normkit.functional import _checks
from normkit.functional import group as group_ops
from normkit.layers._base import _Layer
from normkit.state import NormState

__all__ = ["GroupNorm"]

Array = Any


class GroupNorm(_Layer):
    r"""Group normalization: the ``C`` channels fall into ``num_groups`` contiguous blocks, and
    each sample's block is normalized with its own statistics over the block's channels and
    every spatial axis:

    .. math::

       y = \gamma_c\,\frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} + \beta_c .

    Identical in training and eval (no running state); independent of the batch size, which is
    why detection, segmentation and diffusion U-Nets use it with small batches. One group is
    layer norm over ``(C, *spatial)`` with a per-channel affine; ``C`` groups are instance norm.

    :param num_groups: ``G``, a positive divisor of the number of channels.
    :param num_channels: ``C``, or ``None`` to take it from the first input.
    :param eps: default the preset's (1e-5 torch/onnx, 1e-3 keras, 1e-6 flax).
    :param affine: per-channel γ and β (created as 1 and 0).
    :param axis: channel axis (default the preset's: 1 torch/onnx, -1 keras/flax).
    :param preset: ``"torch"``, ``"keras"``, ``"flax"`` or ``"onnx"``.
    :param backend: force a backend by name.
    """

    _repr_first = "num_groups"
    _per_channel = True

    def __init__(
        self,
        num_groups: int,
        num_channels: int | None = None,
        *,
        eps: float | None = None,
        affine: bool = True,
        axis: int | None = None,
        preset: str | presets.Preset = "torch",
        backend: str | None = None,
    ) -> None:
        super().__init__(preset, backend)
        if num_channels is not None:
            num_channels = _checks._index(num_channels, "num_channels")
            if num_channels < 1:
                raise ValueError(f"num_channels={num_channels}: expected a positive int or None")
        self.num_groups = group_ops.check_groups(num_groups, num_channels)
        self.num_channels = num_channels
        self.eps = presets.check_eps(self._preset.group_norm_eps if eps is None else eps)
        self.affine = bool(affine)
        self.axis = self._preset.axis if axis is None else _checks._index(axis, "axis")

    def _expected_arrays(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.affine else ()

    def _channels(self) -> int | None:
        if self._state is not None and self._state_backend is not None and self._state.weight is not None:
            return int(self._state_backend.info.shape(self._state.weight)[0])
        return self.num_channels

    def _param_shapes(self) -> dict[str, tuple[int, ...]] | None:
        channels = self._channels()
        return None if channels is None else {key: (channels,) for key in self._expected_arrays()}

    def _config(self) -> dict[str, Any]:
        return {
            "num_groups": self.num_groups,
            "num_channels": self._channels(),
            "eps": self.eps,
            "affine": self.affine,
            "axis": self.axis,
            "preset": self.preset,
        }

    def __call__(self, x: Array) -> Array:
        """Normalize ``x`` (the same in training and eval)."""
        be = self._resolve(x, 2, "group_norm")
        shape = _checks._check_input(be, x, 2, "group_norm")
        axis = group_ops.check_group_axis(self.axis, len(shape))
        channels = self._channels()
        if channels is not None and shape[axis] != channels:
            raise ValueError(
                f"x has shape {shape}: {shape[axis]} channels on axis {self.axis}, but this layer has "
                f"{channels} (num_channels)"
            )
        group_ops.check_groups(self.num_groups, shape[axis])
        state = self._state
        if state is None:
            dtype = "float64" if be.info.dtype_name(x) == "float64" else "float32"
            state = NormState(
                weight=be.info.full((shape[axis],), 1.0, dtype, x) if self.affine else None,
                bias=be.info.full((shape[axis],), 0.0, dtype, x) if self.affine else None,
            )
        y = group_ops._group_norm(
            be, x, shape, self.num_groups, axis, state.weight, state.bias, self.eps, self._preset
        )
        # a layer without arrays holds no backend's state: it takes any backend's input
        self._state, self._state_backend = state, self._state_backend or (be if state.arrays() else None)
        return y
