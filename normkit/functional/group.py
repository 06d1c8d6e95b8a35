r"""Group norm: per sample, statistics over blocks of ``C/G`` consecutive channels and every
other non-batch axis; per-channel affine. No running state (training and eval agree)."""

from __future__ import annotations

from typing import Any

from normkit import presets
from normkit._registry import Backend
from normkit.functional._checks import (
    _backend,
    _check_axis,
    _check_input,
    _check_out,
    _check_param,
    _empty_like,
    _index,
    _size,
)

__all__ = ["group_norm"]

Array = Any


def check_groups(num_groups: object, channels: int | None) -> int:
    """``num_groups`` as a positive int dividing ``channels`` (when known)."""
    groups = _index(num_groups, "num_groups")
    if groups < 1:
        raise ValueError(f"num_groups={groups}: expected a positive int")
    if channels is not None and channels % groups:
        raise ValueError(
            f"num_groups={groups} does not divide the {channels} channels; expected a divisor of {channels}"
        )
    return groups


def check_group_axis(axis: object, ndim: int) -> int:
    axis = _check_axis(axis, ndim)
    if axis == 0:
        raise ValueError("axis=0 is the batch axis; group_norm needs a channel axis >= 1")
    return axis


def group_norm(
    x: Array,
    num_groups: int,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    eps: float | None = None,
    axis: int | None = None,
    preset: str | presets.Preset = "torch",
    backend: str | None = None,
    out: Array | None = None,
) -> Array:
    r"""Group normalization (see :func:`normkit.hookspecs.normkit_group_norm`):

    .. math::

       y = \gamma_c\,\frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} + \beta_c,
       \qquad g = \lfloor c\,G / C \rfloor .

    :param x: input with the batch on axis 0 and channels on ``axis``, at least 2-D.
    :param num_groups: ``G``, a positive divisor of the number of channels ``C``.
    :param weight: γ, shape ``(C,)`` (per channel, as PyTorch, Keras and ONNX opset 21; ONNX
        opset 18's per-group scale ``s`` is ``numpy.repeat(s, C // G)``), or ``None``.
    :param bias: β, shape ``(C,)``, or ``None``.
    :param eps: default the preset's (1e-5 torch/onnx, 1e-3 keras, 1e-6 flax).
    :param axis: channel axis; default the preset's (1 torch/onnx, -1 keras/flax).
    :param out: where to write ``y``, as in :func:`normkit.batch_norm`.
    :returns: ``y`` with ``x``'s shape and dtype.
    """
    p = presets.get_preset(preset)
    be = _backend(x, backend, 2, "group_norm")
    shape = _check_input(be, x, 2, "group_norm")
    axis = check_group_axis(p.axis if axis is None else axis, len(shape))
    return _group_norm(be, x, shape, num_groups, axis, weight, bias, eps, p, out)


def _group_norm(
    be: Backend,
    x: Array,
    shape: tuple[int, ...],
    num_groups: object,
    axis: int,
    weight: Array | None,
    bias: Array | None,
    eps: float | None,
    p: presets.Preset,
    out: Array | None = None,
) -> Array:
    """Group norm once the backend, shape and axis are known (the entry point for layers)."""
    groups = check_groups(num_groups, shape[axis])
    _check_param(be, "weight", weight, (shape[axis],), x)
    _check_param(be, "bias", bias, (shape[axis],), x)
    eps = presets.check_eps(p.group_norm_eps if eps is None else eps)
    _check_out(be, be.group_norm, "group_norm", out, x, shape)
    if _size(shape) == 0:
        return _empty_like(be, x, shape) if out is None else out
    if out is not None:
        return be.group_norm(x, groups, weight, bias, eps, axis, out=out)
    return be.group_norm(x, groups, weight, bias, eps, axis)
