"""Layer norm: statistics per sample over a set of axes, element-wise affine."""

from __future__ import annotations

from collections.abc import Sequence
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
    _same_shape,
    _size,
    as_shape,
)

__all__ = ["layer_norm", "normalized_axes"]

Array = Any


def normalized_axes(
    shape: tuple[int, ...], normalized_shape: int | Sequence[int] | None, axis: int | Sequence[int] | None
) -> tuple[int, ...]:
    """The sorted non-negative axes layer norm normalizes over.

    ``normalized_shape`` (PyTorch) names the trailing dimensions by their sizes; ``axis``
    (Keras/Flax) names axes directly; with neither, the last axis.
    """
    ndim = len(shape)
    if normalized_shape is not None and axis is not None:
        raise ValueError("pass normalized_shape or axis, not both")
    if normalized_shape is not None:
        dims = as_shape(normalized_shape, "normalized_shape")
        if len(dims) > ndim or not _same_shape(tuple(shape[ndim - len(dims) :]), dims):
            raise ValueError(
                f"normalized_shape={dims} does not match the trailing dimensions of x with shape {shape}"
            )
        return tuple(range(ndim - len(dims), ndim))
    if axis is None:
        return (ndim - 1,)
    raw = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    if not raw:
        raise ValueError("axis=() names no axis to normalize over")
    axes = sorted(_check_axis(a, ndim) for a in raw)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis={axis!r} names an axis twice")
    return tuple(axes)


def layer_norm(
    x: Array,
    normalized_shape: int | Sequence[int] | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int | Sequence[int] | None = None,
    eps: float | None = None,
    preset: str | presets.Preset = "torch",
    backend: str | None = None,
    out: Array | None = None,
) -> Array:
    r"""Layer normalization (see :func:`normkit.hookspecs.normkit_layer_norm`).

    :param x: input of any rank >= 1.
    :param normalized_shape: PyTorch style: the sizes of the trailing dimensions to normalize.
    :param weight: γ with the shape of the normalized dimensions, or ``None``.
    :param bias: β with the same shape, or ``None``.
    :param axis: Keras style: an axis or a list of axes to normalize over (default: the last).
    :param eps: default the preset's (1e-5 torch/onnx, 1e-3 keras, 1e-6 flax).
    :param out: where to write ``y``, as in :func:`batch_norm`.
    :returns: ``y``, same shape and dtype as ``x``. The same in training and eval.
    """
    p = presets.get_preset(preset)
    be = _backend(x, backend, 1, "layer_norm")
    shape = _check_input(be, x, 1, "layer_norm")
    axes = normalized_axes(shape, normalized_shape, axis)
    return _layer_norm(be, x, shape, axes, weight, bias, eps, p, out)


def _layer_norm(
    be: Backend,
    x: Array,
    shape: tuple[int, ...],
    axes: tuple[int, ...],
    weight: Array | None,
    bias: Array | None,
    eps: float | None,
    p: presets.Preset,
    out: Array | None = None,
) -> Array:
    """Layer norm once the backend, shape and axes are known (the entry point for layers)."""
    param_shape = tuple(shape[a] for a in axes)
    _check_param(be, "weight", weight, param_shape, x)
    _check_param(be, "bias", bias, param_shape, x)
    eps = presets.check_eps(p.layer_norm_eps if eps is None else eps)
    _check_out(be, be.layer_norm, "layer_norm", out, x, shape)
    if _size(shape) == 0:
        return _empty_like(be, x, shape) if out is None else out
    if out is not None:
        return be.layer_norm(x, weight, bias, axes, eps, out=out)
    return be.layer_norm(x, weight, bias, axes, eps)
