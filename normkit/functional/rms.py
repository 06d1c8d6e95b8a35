r"""RMS norm: divide by the root mean square over a set of axes (no mean is subtracted), then
multiply by an element-wise weight, with the cast order and weight offset explicit."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from normkit import presets
from normkit._registry import Backend
from normkit.functional._checks import (
    _backend,
    _check_input,
    _check_out,
    _check_param,
    _empty_like,
    _size,
)
from normkit.functional.layer import normalized_axes

__all__ = ["rms_norm"]

Array = Any


def check_weight_offset(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"weight_offset={value!r}: expected a finite number (Gemma's 1 + w is 1)")
    return float(value)


def resolve_eps(eps: float | presets._Default | None, p: presets.Preset, dtype: str) -> float:
    """``eps``; ``DEFAULT``: the preset's; ``None`` (PyTorch's, under any preset): the compute
    dtype's machine epsilon."""
    if eps is presets.DEFAULT:
        eps = p.rms_norm_eps
    return presets.check_eps(presets.machine_eps(dtype) if eps is None else eps)


def rms_norm(
    x: Array,
    weight: Array | None = None,
    *,
    normalized_shape: int | Sequence[int] | None = None,
    axis: int | Sequence[int] | None = None,
    eps: float | presets._Default | None = presets.DEFAULT,
    weight_offset: float | None = None,
    cast: presets.RmsCast | None = None,
    preset: str | presets.Preset = "torch",
    backend: str | None = None,
    out: Array | None = None,
) -> Array:
    r"""RMS normalization (see :func:`normkit.hookspecs.normkit_rms_norm`):

    .. math::

       y = \frac{x}{\sqrt{\frac1n\sum x^2 + \epsilon}}\,(w + o) .

    :param x: input of any rank >= 1.
    :param weight: ``w`` with the normalized dimensions' shape, or ``None``.
    :param normalized_shape: PyTorch style: the sizes of the trailing dimensions to normalize.
    :param axis: Keras style: an axis or axes to normalize over (default: the last).
    :param eps: default the preset's: torch ``None``, keras/flax/llama/gemma 1e-6, onnx 1e-5.
        ``None`` (under any preset) is PyTorch's: the compute dtype's machine epsilon, 1.19e-7 for
        float32 and narrower input, 2.2e-16 for float64.
    :param weight_offset: ``o`` (default the preset's: 0; gemma 1 for :math:`1 + w`).
    :param cast: ``"after_weight"`` (torch, Keras, Flax, Gemma: round once after the weight) or
        ``"before_weight"`` (Llama, ONNX: round the normalized value to the input dtype, then
        multiply and round again); matters only for float16/bfloat16 input.
    :param out: where to write ``y``, as in :func:`normkit.batch_norm`.
    :returns: ``y`` with ``x``'s shape and dtype.
    """
    p = presets.get_preset(preset)
    be = _backend(x, backend, 1, "rms_norm")
    shape = _check_input(be, x, 1, "rms_norm")
    axes = normalized_axes(shape, normalized_shape, axis)
    return _rms_norm(be, x, shape, axes, weight, eps, weight_offset, cast, p, out)


def _rms_norm(
    be: Backend,
    x: Array,
    shape: tuple[int, ...],
    axes: tuple[int, ...],
    weight: Array | None,
    eps: float | presets._Default | None,
    weight_offset: float | None,
    cast: str | None,
    p: presets.Preset,
    out: Array | None = None,
) -> Array:
    """RMS norm once the backend, shape and axes are known (the entry point for layers)."""
    _check_param(be, "weight", weight, tuple(shape[a] for a in axes), x)
    eps = resolve_eps(eps, p, be.info.dtype_name(x))
    offset = check_weight_offset(p.rms_weight_offset if weight_offset is None else weight_offset)
    before = presets.check_rms_cast(p.rms_cast if cast is None else cast) == "before_weight"
    _check_out(be, be.rms_norm, "rms_norm", out, x, shape)
    if _size(shape) == 0:
        return _empty_like(be, x, shape) if out is None else out
    if out is not None:
        return be.rms_norm(x, weight, axes, eps, offset, before, out=out)
    return be.rms_norm(x, weight, axes, eps, offset, before)
