r"""Pure-NumPy kernels behind the NumPy backend.

This is the kernel boundary: :mod:`normkit.numpy_backend` (its package glue) turns a spec call into "reduce ``x``
over these axes, then scale and shift", and the functions here do the numerical work on
already-validated arrays. A compiled implementation replaces these functions, not the glue.

Numerical method (the same for every op):

1. Upcast float16/bfloat16 to float32 (the compute dtype); float32 and float64 stay as they
   are.
2. First pass: a provisional mean :math:`s` per group. Sums along a contiguous last axis use
   NumPy's pairwise summation in the compute dtype, and every remaining axis is accumulated
   in float64.
3. Second pass on the centred data :math:`d = x - s`:
   :math:`\mu = s + \bar d` and
   :math:`\sigma^2 = \overline{d^2} - \bar d^2` (the corrected two-pass algorithm; :math:`\bar d`
   is a rounding-sized correction, so nothing cancels). :math:`E[x^2] - E[x]^2` is never used.
4. Output :math:`y = d\,a + b'` with :math:`a = \gamma/\sqrt{\sigma^2+\epsilon}` and
   :math:`b' = \beta - (\mu - s)\,a`, reusing ``d`` as the output buffer. Groups whose
   variance is exactly zero (constant groups) get :math:`a = 0`, so they normalize to
   :math:`\beta` exactly.

Eval uses the fused form :math:`y = x\,a + b` with :math:`b = \beta - \hat\mu a` when
:math:`|\hat\mu a| \le 4` for every channel (its rounding error is then a few units in the
last place of ``y``), and the centred form :math:`(x - \hat\mu) a + \beta` otherwise.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FUSED_EVAL_LIMIT",
    "centered_moments",
    "collapse_axes",
    "compute_dtype",
    "eval_scale_shift",
    "finish_output",
    "normalize_centered",
    "normalize_elementwise",
    "sum64",
    "sum_squares64",
]

FUSED_EVAL_LIMIT = 4.0
"""Eval uses ``y = x*a + b`` only while ``|running_mean * a| <= FUSED_EVAL_LIMIT``."""


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 for float64 input, float32 for everything narrower."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def collapse_axes(
    x: np.ndarray, axes: tuple[int, ...]
) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """Merge runs of adjacent reduced axes (a free reshape for C-contiguous ``x``) so that
    reductions run over long contiguous rows. Kept axes are never merged.

    ``(32, 64, 56, 56)`` reduced over ``(0, 2, 3)`` becomes ``(32, 64, 3136)`` reduced over
    ``(0, 2)``.

    :returns: ``(view, new_axes, position)`` where ``position[a]`` is the axis of the view that
        holds old axis ``a``.
    """
    if not x.flags.c_contiguous:
        return x, axes, tuple(range(x.ndim))
    shape: list[int] = []
    new_axes: list[int] = []
    position: list[int] = []
    for a, size in enumerate(x.shape):
        if a in axes and a - 1 in axes:
            shape[-1] *= size
        else:
            shape.append(size)
            if a in axes:
                new_axes.append(len(shape) - 1)
        position.append(len(shape) - 1)
    return x.reshape(shape), tuple(new_axes), tuple(position)


BLOCK = 32
"""Rows summed sequentially in the compute dtype before float64 takes over (off the last axis)."""


def _blocks(v: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None, int] | None:
    """Split the longest reduced axis ``k`` of ``v`` into ``(n // BLOCK, BLOCK)`` (always a view)
    and return ``(split, tail, k)``, the tail holding the ``n % BLOCK`` leftover rows."""
    k = max(axes, key=lambda a: v.shape[a])
    n = v.shape[k]
    if n < 2 * BLOCK:
        return None
    m = n // BLOCK * BLOCK
    head = (slice(None),) * k
    split = v[(*head, slice(0, m))].reshape((*v.shape[:k], m // BLOCK, BLOCK, *v.shape[k + 1 :]))
    tail = v[(*head, slice(m, None))] if m < n else None
    return split, tail, k


def _contiguous_last(v: np.ndarray, axes: tuple[int, ...]) -> bool:
    last = v.ndim - 1
    return last in axes and v.shape[last] > 1 and v.strides[last] == v.itemsize


def _finish64(partial: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return (
        np.add.reduce(partial, axis=axes, dtype=np.float64, keepdims=True)
        if axes
        else partial.astype(np.float64)
    )


def sum64(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Sum over ``axes`` (keepdims) in float64.

    Partial sums are taken in ``v``'s dtype over short runs (a contiguous last axis with NumPy's
    pairwise summation, O(log n) ulps; otherwise blocks of :data:`BLOCK` rows, at most
    ``BLOCK`` ulps) and accumulated in float64 from there on.
    """
    if v.dtype == np.float64:
        return np.add.reduce(v, axis=axes, keepdims=True)
    if _contiguous_last(v, axes):
        last = v.ndim - 1
        return _finish64(np.add.reduce(v, axis=last, keepdims=True), tuple(a for a in axes if a != last))
    blocked = _blocks(v, axes)
    if blocked is None:
        return np.add.reduce(v, axis=axes, dtype=np.float64, keepdims=True)
    split, tail, k = blocked
    total = _finish64(np.add.reduce(split, axis=k + 1), axes)
    return total if tail is None else total + np.add.reduce(tail, axis=axes, dtype=np.float64, keepdims=True)


DOT_ROW = 1024
"""Longest run a dot product accumulates in the compute dtype before float64 takes over."""


def sum_squares64(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``sum(v**2)`` over ``axes`` (keepdims) in float64, without a squared temporary: dot
    products over runs of at most :data:`DOT_ROW` along a contiguous last axis, or blocks of
    :data:`BLOCK` rows, each accumulated on in float64. If float32 squares overflow (|v| beyond
    about 1e19) the sum is redone in float64."""
    with np.errstate(over="ignore"):  # an overflow is detected and handled below
        total = _sum_squares_in_runs(v, axes)
    if v.dtype != np.float64 and not np.all(np.isfinite(total)):
        total = np.add.reduce(np.square(v, dtype=np.float64), axis=axes, keepdims=True)
    return total


def _sum_squares_in_runs(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    if _contiguous_last(v, axes):
        rest = tuple(a for a in axes if a != v.ndim - 1)
        n = v.shape[-1]
        m = n // DOT_ROW * DOT_ROW if n > DOT_ROW else 0
        rows = np.zeros((*v.shape[:-1], 1))
        if m:
            runs = v[..., :m].reshape((*v.shape[:-1], m // DOT_ROW, DOT_ROW))
            rows += np.add.reduce(np.vecdot(runs, runs), axis=-1, dtype=np.float64, keepdims=True)
        if m < n:
            tail = v[..., m:]
            rows += np.vecdot(tail, tail)[..., None]
        return np.add.reduce(rows, axis=rest, keepdims=True) if rest else rows
    blocked = _blocks(v, axes)
    if blocked is None:
        return np.add.reduce(np.square(v, dtype=np.float64), axis=axes, keepdims=True)
    split, tail, k = blocked
    letters = "abcdefghijklmnopqrstuvwxyz"[: split.ndim]
    output = letters[: k + 1] + letters[k + 2 :]
    total = _finish64(np.einsum(f"{letters},{letters}->{output}", split, split), axes)
    if tail is None:
        return total
    return total + np.add.reduce(np.square(tail, dtype=np.float64), axis=axes, keepdims=True)


def centered_moments(
    xc: np.ndarray, axes: tuple[int, ...], *, overwrite: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-pass statistics of ``xc`` (compute dtype) over ``axes``.

    :param overwrite: centre ``xc`` in place (it is a private upcast copy).
    :returns: ``(d, shift, mean, var)``: the centred data ``d = xc - shift`` (compute dtype,
        shape of ``xc``), the provisional mean ``shift`` (compute dtype), and the mean and
        biased variance in float64; all but ``d`` have keepdims shapes.
    """
    n = 1
    for a in axes:
        n *= xc.shape[a]
    shift = (sum64(xc, axes) / n).astype(xc.dtype)
    d = np.subtract(xc, shift, out=xc if overwrite else None)
    correction = sum64(d, axes) / n
    mean_square = sum_squares64(d, axes) / n
    mean = shift + correction
    var = np.maximum(mean_square - correction * correction, 0.0)
    return d, shift, mean, var


def _scale(var: np.ndarray, eps: float, weight: np.ndarray | None) -> np.ndarray:
    """``gamma / sqrt(var + eps)`` in float64 (``gamma`` = 1 when ``weight`` is None)."""
    a = 1.0 / np.sqrt(var + eps)
    return a if weight is None else a * weight


def normalize_centered(
    d: np.ndarray,
    shift: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
) -> np.ndarray:
    """``y = gamma * (x - mean) / sqrt(var + eps) + beta`` from the centred data, in place in ``d``.

    ``weight`` and ``bias`` are float64 and broadcast against ``mean`` (per-group affine: batch
    and instance norm).
    """
    a = np.where(var == 0.0, 0.0, _scale(var, eps, weight))
    b = -(mean - shift) * a
    if bias is not None:
        b = b + bias
    np.multiply(d, a.astype(d.dtype), out=d)
    np.add(d, b.astype(d.dtype), out=d)
    return d


def eval_scale_shift(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    out: np.ndarray,
) -> np.ndarray:
    """``out = gamma * (x - mean) / sqrt(var + eps) + beta`` with fixed (running) statistics.

    All statistics are float64 and broadcast against ``x``; ``out`` has the compute dtype.
    """
    a = _scale(var, eps, weight)
    beta = bias if bias is not None else 0.0
    if np.all(np.abs(mean * a) <= FUSED_EVAL_LIMIT):
        np.multiply(x, a.astype(out.dtype), out=out)
        np.add(out, (beta - mean * a).astype(out.dtype), out=out)
    else:
        rounded_mean = mean.astype(out.dtype)
        np.subtract(x, rounded_mean, out=out)
        np.multiply(out, a.astype(out.dtype), out=out)
        np.add(out, (beta - (mean - rounded_mean) * a).astype(out.dtype), out=out)
    return out


def normalize_elementwise(
    d: np.ndarray,
    shift: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
) -> np.ndarray:
    """Layer norm's output from the centred data, in place in ``d``:
    ``y = gamma * ((d - (mean - shift)) / sqrt(var + eps)) + beta`` with element-wise
    ``gamma``/``beta`` (compute dtype, broadcast over the normalized axes).
    """
    inv_std = np.where(var == 0.0, 0.0, 1.0 / np.sqrt(var + eps))
    correction = mean - shift
    if np.any(np.abs(correction * inv_std) > np.finfo(d.dtype).eps):  # else below one ulp of a unit output
        np.subtract(d, correction.astype(d.dtype), out=d)
    np.multiply(d, inv_std.astype(d.dtype), out=d)
    if weight is not None:
        np.multiply(d, weight, out=d)
    if bias is not None:
        np.add(d, bias, out=d)
    return d


def finish_output(y: np.ndarray, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``y`` (compute dtype) as the op's result: in ``x``'s dtype, written into ``out`` when given
    (unless it already is ``out``)."""
    if out is None:
        return y.astype(x.dtype, copy=False)
    if y is not out:
        np.copyto(out, y, casting="unsafe")
    return out
