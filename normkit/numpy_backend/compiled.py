r"""Glue between the NumPy backend and its compiled kernels (:mod:`normkit.numpy_backend.numba_loops`).

Each function here brings a validated, non-empty spec call to one of the kernels' two layouts.
Layer norm over axes that are not the trailing ones returns ``None``; the caller then uses the
pure-NumPy path, which handles everything.

Layouts, for a C-contiguous ``x`` (other inputs are copied to one first) with channel axis ``axis``, ``A`` the product of the
dimensions before it (after the batch axis for instance norm) and ``B`` of those after it:

* ``B >= MIN_ROW`` (channels-first): rows ``(G, A, C, B)``; each group is normalized right
  after its statistics, while still in cache;
* otherwise (channels-last, and ``(N, C)``): columns ``(G, A, C·B)``; one parallel pass of
  per-part statistics, merged here in float64, then one parallel pass for ``y``.

float16 and bfloat16 input is upcast to a float32 copy, normalized in place there, and
rounded back; a non-contiguous input is likewise copied and normalized in its copy.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from normkit.numpy_backend import numba_loops as kernels
from normkit.numpy_backend.pure import finish_output

__all__ = ["MIN_ROW", "channel_eval", "channel_train", "layer_norm", "merge_statistics"]

MIN_ROW = 32
"""Shortest contiguous run per channel for the rows layout; shorter runs use columns."""

PARTS_PER_THREAD = 4
"""Row ranges per thread in the columns layout (balances uneven progress of the threads)."""


def _compute_view(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """``x`` C-contiguous in the compute dtype: itself when it already is, else a copy (``True``;
    float16/bfloat16 become float32)."""
    native = x.dtype == np.float32 or x.dtype == np.float64
    if native and x.flags.c_contiguous:
        return x, False
    return np.ascontiguousarray(x, dtype=x.dtype if native else np.float32), True


def _output(x: np.ndarray, xc: np.ndarray, copied: bool, out: np.ndarray | None) -> np.ndarray:
    """Where the kernel writes ``y`` in the compute dtype: the private copy of ``x`` (normalized in
    place), ``out`` when it can take the kernel's writes directly, or a new array."""
    if copied:
        return xc
    if out is not None and out.flags.c_contiguous and out.dtype == x.dtype and not _overlaps(out, x):
        return out
    return np.empty(x.shape, dtype=x.dtype)


def _overlaps(out: np.ndarray, x: np.ndarray) -> bool:
    """True if ``out`` shares memory with ``x`` other than as the very same elements (writing
    ``y`` element by element in place is safe; a shifted overlap is not)."""
    same = out.ctypes.data == x.ctypes.data and out.strides == x.strides
    return not same and np.may_share_memory(out, x)


def _split(shape: tuple[int, ...], axis: int, first: int) -> tuple[int, int, int]:
    """``(A, C, B)``: the products of ``shape[first:axis]``, ``shape[axis]``, ``shape[axis+1:]``."""
    return math.prod(shape[first:axis]), shape[axis], math.prod(shape[axis + 1 :])


def _parts(rows: int, groups: int, block_rows: int) -> int:
    threads = numba.get_num_threads()
    wanted = max(1, -(-PARTS_PER_THREAD * threads // groups))
    return max(1, min(wanted, -(-rows // block_rows)))


def merge_statistics(
    counts: np.ndarray, means: np.ndarray, m2: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Merge groups of values along ``axis`` from their counts, means and sums of squared
    deviations (float64): :math:`n = \sum n_p`, :math:`\mu = \sum n_p\mu_p / n`,
    :math:`M_2 = \sum M_{2,p} + n_p(\mu_p - \mu)^2` (two passes over the parts, so nothing
    cancels)."""
    n = counts.sum(axis=axis)
    mean = (counts * means).sum(axis=axis) / n
    deviation = means - np.expand_dims(mean, axis)
    return n, mean, (m2 + counts * deviation * deviation).sum(axis=axis)


def _coefficients(
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    dtype: np.dtype,
    batch_statistics: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(s, a, b)`` in ``dtype`` for ``y = (x - s)·a + b``: ``s`` the mean rounded to ``dtype``,
    ``a = γ/√(σ²+ε)``, ``b = β - (μ - s)·a``. With ``batch_statistics``, a group whose variance
    is exactly 0 (a constant group) gets ``a = 0`` and so ``y = β`` exactly."""
    a = 1.0 / np.sqrt(var + eps)
    if batch_statistics:
        a = np.where(var == 0.0, 0.0, a)
    if weight is not None:
        a = a * np.asarray(weight, dtype=np.float64)
    s = mean.astype(dtype)
    b = -(mean - s) * a
    if bias is not None:
        b = b + np.asarray(bias, dtype=np.float64)
    return s, a.astype(dtype), b.astype(dtype)


def _per_channel64(param: np.ndarray | None, channels: int, fill: float) -> np.ndarray:
    if param is None:
        return np.full(channels, fill)
    return np.asarray(param, dtype=np.float64).reshape(channels)


def channel_train(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axis: int,
    per_instance: bool,
    out: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Batch norm (``per_instance=False``) or instance norm with batch statistics.

    :returns: ``(y, mean, var, n)``: ``mean`` and biased ``var`` float64 of shape ``(G, C)``
        (``G = 1`` for batch norm, ``N`` for instance norm), ``n`` values per group; or ``None``.
    """
    xc, copied = _compute_view(x)
    y = _output(x, xc, copied, out)
    groups = x.shape[0] if per_instance else 1
    rows, channels, inner = _split(x.shape, axis, 1 if per_instance else 0)
    if inner >= MIN_ROW:
        shape4 = (groups, rows, channels, inner)
        mean = np.empty((groups, channels))
        var = np.empty((groups, channels))
        kernels.normalize_rows(
            xc.reshape(shape4),
            _per_channel64(weight, channels, 1.0),
            _per_channel64(bias, channels, 0.0),
            eps,
            y.reshape(shape4),
            mean,
            var,
        )
        return finish_output(y, x, out), mean, var, rows * inner
    shape3 = (groups, rows, channels * inner)
    block_rows = kernels.column_block_rows(channels * inner, xc.itemsize)
    parts = _parts(rows, groups, block_rows)
    partial = kernels.column_statistics(xc.reshape(shape3), parts, block_rows)

    # (G, parts, C·B) -> (G, parts·B, C): merge the row ranges and the B columns of a channel
    def regroup(a: np.ndarray) -> np.ndarray:
        return a.reshape(groups, parts, channels, inner).transpose(0, 1, 3, 2).reshape(groups, -1, channels)

    n, mean, m2 = merge_statistics(*(regroup(partial[:, :, k]) for k in range(3)), axis=1)
    var = np.maximum(m2 / n, 0.0)
    s, a, b = _coefficients(mean, var, eps, weight, bias, xc.dtype, batch_statistics=True)
    kernels.affine_columns(
        xc.reshape(shape3), *(np.repeat(c, inner, axis=1) for c in (s, a, b)), y.reshape(shape3), parts
    )
    return finish_output(y, x, out), mean, var, rows * inner


def channel_eval(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axis: int,
    out: np.ndarray | None,
) -> np.ndarray | None:
    """``y = γ(x - μ̂)/√(σ̂²+ε) + β`` per channel with the running statistics, or ``None``."""
    xc, copied = _compute_view(x)
    y = _output(x, xc, copied, out)
    rows, channels, inner = _split(x.shape, axis, 0)
    mean = np.asarray(running_mean, dtype=np.float64).reshape(channels)
    var = np.asarray(running_var, dtype=np.float64).reshape(channels)
    s, a, b = _coefficients(mean, var, eps, weight, bias, xc.dtype, batch_statistics=False)
    if inner >= MIN_ROW:
        shape3 = (rows, channels, inner)
        kernels.affine_rows(xc.reshape(shape3), s, a, b, y.reshape(shape3))
    else:
        shape3 = (1, rows, channels * inner)
        block_rows = kernels.column_block_rows(channels * inner, xc.itemsize)
        coefficients = (np.repeat(c, inner)[None] for c in (s, a, b))
        kernels.affine_columns(
            xc.reshape(shape3), *coefficients, y.reshape(shape3), _parts(rows, 1, block_rows)
        )
    return finish_output(y, x, out)


def layer_norm(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    axes: tuple[int, ...],
    eps: float,
    out: np.ndarray | None,
) -> np.ndarray | None:
    """Layer norm over trailing ``axes`` of a contiguous ``x``, or ``None``."""
    if tuple(axes) != tuple(range(x.ndim - len(axes), x.ndim)):
        return None
    xc, copied = _compute_view(x)
    y = _output(x, xc, copied, out)
    size = math.prod(x.shape[x.ndim - len(axes) :])
    w = np.ones(size, xc.dtype) if weight is None else np.asarray(weight, dtype=xc.dtype).reshape(size)
    b = np.zeros(size, xc.dtype) if bias is None else np.asarray(bias, dtype=xc.dtype).reshape(size)
    shape2 = (x.size // size, size)
    kernels.layer_norm_rows(xc.reshape(shape2), w, b, eps, y.reshape(shape2))
    return finish_output(y, x, out)
