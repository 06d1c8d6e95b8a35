r"""Statistics as values: moments of part of the data, their exact merge, and normalizing with
given statistics.

For a group of values :math:`x_i` with mask :math:`m_i \in \{0, 1\}`,

.. math::

   n = \sum_i m_i, \qquad \mu = \frac1n\sum_i m_i x_i, \qquad M_2 = \sum_i m_i (x_i - \mu)^2 .

Two parts :math:`a, b` of one group merge exactly (Chan, Golub and LeVeque, 1979):

.. math::

   n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad
   \mu = \mu_a + \delta\,\frac{n_b}{n}, \quad
   M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n} ,

so the statistics of a whole are those of its parts, whatever their sizes; an empty part
:math:`(0, 0, 0)` is the identity. Every term is a sum of non-negative quantities or a
difference of means: nothing cancels at large offsets, unlike :math:`\sum x^2 - n\mu^2`.

>>> import numpy as np, normkit
>>> x = np.random.default_rng(0).normal(1e4, 1.0, size=(64, 3)).astype(np.float32)
>>> whole = normkit.moments(x, axis=1)
>>> parts = [normkit.moments(part, axis=1) for part in (x[:5], x[5:5], x[5:])]
>>> merged = normkit.merge_moments(*parts)
>>> merged.count
array([64, 64, 64])
>>> np.round(merged.var(), 3), np.round(whole.var(), 3)    # float64 merge of float32 parts
(array([1.13 , 0.742, 0.85 ]), array([1.13 , 0.742, 0.85 ], dtype=float32))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from normkit import presets
from normkit._registry import Backend, backend_for, type_name
from normkit.functional._arrays import cast, widest_float
from normkit.functional._checks import (
    FLOAT_DTYPES,
    _backend,
    _check_axis,
    _check_input,
    _check_out,
    _check_param,
    _empty_like,
    _same_shape,
    _size,
)

__all__ = ["Moments", "merge_moments", "moments", "normalize"]

Array = Any


class Moments(NamedTuple):
    r"""Partial statistics of each group: ``count`` :math:`n` (integers), ``mean`` :math:`\mu`
    and ``m2`` :math:`M_2 = \sum (x - \mu)^2`, arrays of one backend with the groups' shape."""

    count: Array
    mean: Array
    m2: Array

    def var(self, unbiased: bool = False) -> Array:
        r"""The variance, :math:`M_2/n` (biased) or :math:`M_2/(n-1)` (``unbiased=True``), in the
        dtype of ``m2``; NaN where :math:`n` is 0 (or 1, unbiased)."""
        info = backend_for(self.m2).info
        dtype = info.dtype_name(self.m2)
        count = cast(info, self.count, dtype)
        with np.errstate(divide="ignore", invalid="ignore"):  # NumPy's 0/0 is the documented NaN
            if not unbiased:
                return self.m2 / count
            # n - 1, and 0 (so 0/0: NaN, not -0.0) where n = 0
            return self.m2 / (count - 1.0 + cast(info, self.count == 0, dtype))


def _reduced_axes(
    shape: tuple[int, ...], axis: int | Sequence[int] | None, axes: int | Sequence[int] | None
) -> tuple[int, ...]:
    """The sorted axes to reduce: ``axes`` as given, or every axis but the kept ``axis``."""
    ndim = len(shape)

    def normalized(value: int | Sequence[int], name: str) -> tuple[int, ...]:
        raw = tuple(value) if isinstance(value, Sequence) else (value,)
        result = sorted(_check_axis(a, ndim, name) for a in raw)
        if len(set(result)) != len(result):
            raise ValueError(f"{name}={value!r} names an axis twice")
        return tuple(result)

    if axes is not None:
        reduced = normalized(axes, "axes")
        if not reduced:
            raise ValueError("axes=() names no axis to reduce over")
        return reduced
    kept = normalized(axis, "axis") if axis is not None else ()
    reduced = tuple(a for a in range(ndim) if a not in kept)
    if not reduced:
        raise ValueError(f"axis={axis!r} keeps every axis of x (shape {shape}); nothing is left to reduce")
    return reduced


def check_mask(be: Backend, mask: Array, shape: tuple[int, ...]) -> None:
    """``mask`` must be a boolean array of ``x``'s backend with ``x``'s rank and, on each axis,
    ``x``'s size or 1."""
    if not be.handles(type(mask)):
        raise TypeError(
            f"mask is a {type_name(type(mask))}; expected a boolean array of x's backend ({be.name!r})"
        )
    dtype = be.info.dtype_name(mask)
    if dtype != "bool":
        raise TypeError(f"mask has dtype {dtype}; expected bool (True where a value counts)")
    got = tuple(be.info.shape(mask))
    if len(got) != len(shape) or any(
        g is not None and s is not None and g not in (s, 1) for g, s in zip(got, shape, strict=True)
    ):
        raise ValueError(
            f"mask has shape {got}; expected x's shape {shape} or one that broadcasts to it with the same "
            f"rank (size 1 on broadcast axes)"
        )


def moments(
    x: Array,
    *,
    axis: int | Sequence[int] | presets._Default | None = presets.DEFAULT,
    axes: int | Sequence[int] | None = None,
    mask: Array | None = None,
    backend: str | None = None,
) -> Moments:
    r"""The moments ``(count, mean, m2)`` of ``x`` for each index of the kept axes.

    :param x: input of any rank >= 1.
    :param axis: the kept axis or axes (default 1, the channel axis of channels-first data:
        per-channel statistics as batch norm computes them); every other axis is reduced.
    :param axes: instead of ``axis``, the axes to reduce (layer norm style).
    :param mask: a boolean array (``True`` counts) with ``x``'s rank and, on each axis, ``x``'s
        size or 1.
    :param backend: force a backend by name.
    :returns: :class:`Moments` with the kept axes' shape: ``count`` in an integer dtype (int64
        where the backend has it; JAX without x64: int32), ``mean`` and ``m2`` in the compute dtype (float32 for float16/bfloat16/float32 input).
    """
    be = _backend(x, backend, 1, "moments")
    shape = _check_input(be, x, 1, "moments")
    if axes is not None and axis is not presets.DEFAULT:
        raise ValueError("pass axis (the kept axes) or axes (the reduced axes), not both")
    kept = 1 if axis is presets.DEFAULT else axis
    reduced = _reduced_axes(shape, None if axes is not None else kept, axes)
    if mask is not None:
        check_mask(be, mask, shape)
    return Moments(*be.moments(x, reduced, mask, None, None))


def merge_moments(*parts: Moments | tuple[Array, Array, Array]) -> Moments:
    r"""Chan's exact merge of the moments of disjoint parts of the same groups (see the module
    docstring), in the order given, in float64 where the backend has it (else float32).

    Exact for unequal counts; an empty part is the identity. Differentiable where the backend's
    arithmetic is (the merge is array arithmetic on the parts' backend and device).

    :param parts: :class:`Moments` (or ``(count, mean, m2)`` tuples) of one backend, with one shape.
    :returns: the merged :class:`Moments`: ``count`` int64, ``mean`` and ``m2`` float64 (on a
        backend without them, such as JAX without x64: its widest integer, and float32).
    :raises ValueError: for no parts, or parts of different shapes.
    """
    if not parts:
        raise ValueError("merge_moments needs at least one part")
    first = Moments(*parts[0])
    be = backend_for(first.mean)
    info = be.info
    wide = widest_float(info)
    shape = tuple(info.shape(first.mean))
    merged: Moments | None = None
    for index, part in enumerate(parts):
        if len(part) != 3:
            raise ValueError(f"parts[{index}] has {len(part)} fields; expected (count, mean, m2)")
        part = Moments(*part)
        for name, value in zip(Moments._fields, part, strict=True):
            if not be.handles(type(value)):
                raise TypeError(
                    f"parts[{index}].{name} is a {type_name(type(value))}; every part must belong to "
                    f"backend {be.name!r}"
                )
            if not _same_shape(tuple(info.shape(value)), shape):
                raise ValueError(
                    f"parts[{index}].{name} has shape {tuple(info.shape(value))}; expected {shape} (parts[0]'s)"
                )
            dtype = info.dtype_name(value)
            kind_ok = dtype.startswith(("int", "uint")) if name == "count" else dtype in FLOAT_DTYPES
            if not kind_ok:
                expected = (
                    "an integer dtype" if name == "count" else f"a floating dtype, one of {FLOAT_DTYPES}"
                )
                raise TypeError(f"parts[{index}].{name} has dtype {dtype}; expected {expected}")
        count = part.count if info.dtype_name(part.count) == "int64" else cast(info, part.count, "int64")
        current = Moments(count, cast(info, part.mean, wide), cast(info, part.m2, wide))
        merged = current if merged is None else _chan(info, merged, current, wide)
    assert merged is not None
    # NumPy turns arithmetic on 0-d arrays into scalars, which are no backend's arrays
    return Moments(*(np.asarray(v) if isinstance(v, np.generic) else v for v in merged))


def _chan(info: Any, a: Moments, b: Moments, wide: str) -> Moments:
    count = a.count + b.count
    na, nb, n = (cast(info, c, wide) for c in (a.count, b.count, count))
    safe = n + cast(info, count == 0, wide)  # 1 where both parts are empty: then delta * 0 / 1
    delta = b.mean - a.mean
    mean = a.mean + delta * (nb / safe)
    m2 = a.m2 + b.m2 + delta * delta * (na * nb / safe)
    return Moments(count, mean, m2)


def normalize(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    eps: float,
    axis: int = 1,
    backend: str | None = None,
    out: Array | None = None,
) -> Array:
    r"""Normalize ``x`` with given per-channel statistics:
    :math:`y = \gamma_c\,(x - \mu_c)/\sqrt{\sigma^2_c + \epsilon} + \beta_c`.

    :param x: input with channels on ``axis``.
    :param mean: μ, shape ``(C,)``, any floating dtype (a :class:`Moments` ``mean``).
    :param var: σ², shape ``(C,)`` (``Moments.var()``).
    :param weight: γ, shape ``(C,)``, or ``None``.
    :param bias: β, shape ``(C,)``, or ``None``.
    :param eps: ε > 0, inside the square root.
    :param axis: the channel axis.
    :param out: where to write ``y``, as in :func:`normkit.batch_norm`.
    :returns: ``y`` with ``x``'s shape and dtype.
    """
    be = _backend(x, backend, 1, "normalize")
    shape = _check_input(be, x, 1, "normalize")
    axis = _check_axis(axis, len(shape))
    channels = (shape[axis],)
    for name, value in (("mean", mean), ("var", var)):
        if value is None:
            raise TypeError(f"{name} is None; expected an array of shape {channels}")
    for name, value in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        _check_param(be, name, value, channels, x)
    eps = presets.check_eps(eps)
    _check_out(be, be.normalize, "normalize", out, x, shape)
    if _size(shape) == 0:
        return _empty_like(be, x, shape) if out is None else out
    reduced = tuple(a for a in range(len(shape)) if a != axis)
    if out is not None:
        return be.normalize(x, mean, var, weight, bias, eps, reduced, (axis,), out=out)
    return be.normalize(x, mean, var, weight, bias, eps, reduced, (axis,))
