r"""Glue between the NumPy backend and its compiled kernels (:mod:`normkit.numpy_backend.numba_loops`).

Each function here brings a validated, non-empty spec call to one of the kernels' two layouts, or
returns ``None`` for a call it leaves to the pure-NumPy path, which handles everything (layer and
RMS norm over axes that are not the trailing ones, moments over axes that alternate more than
the layouts below, empty input to group and RMS norm).

Layouts, for a C-contiguous ``x`` (other inputs are copied to one first) with channel axis ``axis``, ``A`` the product of the
dimensions before it (after the batch axis for instance norm) and ``B`` of those after it:

* ``B >= MIN_ROW`` (channels-first): rows ``(G, A, C, B)``; each group is normalized right
  after its statistics, while still in cache;
* otherwise (channels-last, and ``(N, C)``): columns ``(G, A, C·B)``; one parallel pass of
  per-part statistics, merged in float64 (compiled:
  :func:`~normkit.numpy_backend.numba_loops.merge_column_statistics`), then one parallel pass
  for ``y``, with non-temporal stores for an output of at least
  :data:`~normkit.numpy_backend.numba_loops.STREAM_BYTES` (:func:`_affine_columns`).

Spec version 2 uses the same two layouts: :func:`moments` brings any reduction whose axes
merge into kept, reduced, kept, reduced runs to ``(G, A, C, B)`` (statistics per ``(g, c)``),
:func:`group_norm` puts a group's ``C/G`` channels where batch norm puts one channel (rows for
channels-first, columns for channels-last), and :func:`rms_norm` normalizes the ``(R, K)`` rows
of its trailing axes. Partial statistics carry their mean as a reference plus an offset, and
:func:`merge_statistics` merges them on deviations from one part's mean, so that no merge
rounds at the scale of the mean.

float16 and bfloat16 input is upcast to a float32 copy, normalized in place there, and
rounded back; a non-contiguous input is likewise copied and normalized in its copy.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from normkit.numpy_backend import numba_loops as kernels
from normkit.numpy_backend.pure import finish_output

__all__ = [
    "MIN_ROW",
    "channel_eval",
    "channel_train",
    "group_norm",
    "layer_norm",
    "merge_statistics",
    "moments",
    "rms_norm",
]

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


def _affine_columns(
    x3: np.ndarray, shift: np.ndarray, scale: np.ndarray, offset: np.ndarray, y3: np.ndarray, parts: int
) -> None:
    """``y = (x - shift)·scale + offset`` on the columns layout ``(G, A, W)`` with ``(G, W)``
    coefficients in the compute dtype: with non-temporal stores
    (:func:`~normkit.numpy_backend.numba_loops.affine_columns_streaming`) when ``y`` is at least
    :data:`~normkit.numpy_backend.numba_loops.STREAM_BYTES` and is not ``x`` itself, else with
    ordinary ones. Both write the same values."""
    if y3.nbytes < kernels.STREAM_BYTES or np.may_share_memory(x3, y3):
        kernels.affine_columns(x3, shift, scale, offset, y3, parts)
        return
    width = x3.shape[2]
    periodic = np.arange(width + kernels.stream_lanes(x3.itemsize) - 1) % width
    kernels.affine_columns_streaming(
        x3, *(np.take(c, periodic, axis=1) for c in (shift, scale, offset)), y3, parts
    )


def merge_statistics(
    counts: np.ndarray, refs: np.ndarray, offsets: np.ndarray, m2: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Merge groups of values along ``axis`` from their counts, means :math:`r_p + o_p` (a
    reference and an offset, as the kernels return them) and sums of squared deviations, in
    float64, into ``(n, mean, m2)``: with :math:`d_p = (r_p - r_q) + (o_p - o_q)` the deviation of
    part :math:`p`'s mean from that of the largest part :math:`q`,
    :math:`n = \sum n_p`, :math:`\bar d = \sum n_p d_p / n`, :math:`\mu = r_q + (o_q + \bar d)`
    and :math:`M_2 = \sum M_{2,p} + n_p (d_p - \bar d)^2` (two passes over the parts, so nothing
    cancels; the deviations carry no rounding of the means' size). A group of parts that hold
    no values merges to ``(0, 0, 0)``."""
    n = counts.sum(axis=axis)
    largest = np.expand_dims(np.argmax(counts, axis=axis), axis)
    ref = np.take_along_axis(refs, largest, axis)
    offset = np.take_along_axis(offsets, largest, axis)
    d = (refs - ref) + (offsets - offset)
    mean_d = (counts * d).sum(axis=axis) / np.maximum(n, 1.0)  # no values: (0, 0, 0)
    deviation = d - np.expand_dims(mean_d, axis)
    mean = np.squeeze(ref, axis) + (np.squeeze(offset, axis) + mean_d)
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
    # merge the row ranges and the B columns of each channel
    n, mean, m2 = kernels.merge_column_statistics(partial, inner)
    var = np.maximum(m2 / n, 0.0)
    s, a, b = _coefficients(mean, var, eps, weight, bias, xc.dtype, batch_statistics=True)
    _affine_columns(
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
        _affine_columns(xc.reshape(shape3), *coefficients, y.reshape(shape3), _parts(rows, 1, block_rows))
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


# --- spec version 2: statistics as values, group norm, RMS norm ---------------------------------

MIN_PART = 16384
"""Fewest values per parallel range of one group's statistics (fewer ranges than threads when
the groups are small)."""


def _layout(shape: tuple[int, ...], reduced: set[int]) -> tuple[int, int, int, int] | None:
    """``(G, A, C, B)``: ``shape`` (C-contiguous) with its reduced axes ``reduced`` merged into the
    canonical four runs kept, reduced, kept, reduced (sizes of 1 dropped, missing runs 1: a
    reduction over trailing axes is ``(G, 1, 1, B)``, over leading ones ``(1, A, C, 1)``), or
    ``None`` when the axes alternate more often than that."""
    runs: list[list[int]] = []  # [reduced?, size]
    for a, size in enumerate(shape):
        if size == 1:
            continue
        kind = int(a in reduced)
        if runs and runs[-1][0] == kind:
            runs[-1][1] *= size
        else:
            runs.append([kind, size])
    if not runs or runs[0][0]:
        runs.insert(0, [0, 1])
    sizes = [size for _, size in runs]
    if len(sizes) > 4:
        return None
    if len(sizes) == 1:  # nothing reduced (every reduced axis has size 1)
        return sizes[0], 1, 1, 1
    if len(sizes) == 2:  # kept, reduced: one contiguous run per group
        return sizes[0], 1, 1, sizes[1]
    if len(sizes) == 3:  # kept, reduced, kept: columns
        return sizes[0], sizes[1], sizes[2], 1
    return sizes[0], sizes[1], sizes[2], sizes[3]


LONG_RUN = 256
"""Contiguous values per run from which statistics over many runs take the rows kernels (a
float64 merge per run) rather than the columns ones (sums per column over blocks of rows, merged
per block): measured on (8, 4096, 512) float32, group norm's columns path is faster up to runs of
256 and its rows path from 512 on."""


def _rows_layout(run: int, rows: int) -> bool:
    """Whether statistics over ``rows`` runs of ``run`` contiguous values each take the rows
    kernels (long runs, or at least as many values per run as runs) rather than the columns ones."""
    return run >= LONG_RUN or run >= rows


def _statistics(x4: np.ndarray, keep4: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 ``(count, mean, m2)`` of shape ``(G, C)`` of the rows layout ``x4`` ``(G, A, C, B)``
    (compute dtype, C-contiguous) over ``A`` and ``B``, counting the values where ``keep4`` (same
    layout, boolean) is true when it is given."""
    groups, rows, channels, inner = x4.shape
    if _rows_layout(inner, rows):
        wanted = -(-PARTS_PER_THREAD * numba.get_num_threads() // (groups * channels))
        parts = max(1, min(wanted, rows * inner // MIN_PART))
        if keep4 is None:
            partial = kernels.row_statistics(x4, parts)
        else:
            partial = kernels.row_statistics_masked(x4, keep4, parts)
        return merge_statistics(*(partial[..., k] for k in range(4)), axis=2)
    shape3 = (groups, rows, channels * inner)
    block_rows = kernels.column_block_rows(channels * inner, x4.itemsize)
    parts = _parts(rows, groups, block_rows)
    if keep4 is None:
        partial = kernels.column_statistics(x4.reshape(shape3), parts, block_rows)
    else:
        partial = kernels.column_statistics_masked(
            x4.reshape(shape3), keep4.reshape(shape3), parts, block_rows
        )
    return kernels.merge_column_statistics(partial, inner)  # the row ranges and each channel's B columns


def moments(
    x: np.ndarray,
    axes: tuple[int, ...],
    mask: np.ndarray | None,
    group_axis: int | None,
    num_groups: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    r"""``(count, mean, m2)`` of ``x`` over ``axes`` per :func:`normkit.hookspecs.normkit_moments`
    (``count`` int64, ``mean`` and :math:`M_2 = \sum (x - \mu)^2` in the compute dtype, shaped as
    the kept axes with ``G`` on ``group_axis``), or ``None`` when the kept and reduced axes
    alternate more than kept, reduced, kept, reduced (after merging neighbours and dropping
    sizes of 1; channel groups count as a kept axis followed by a reduced one).

    Computed in float64 from blocked two-pass sums (:func:`_statistics`); with a ``mask`` only
    the values where it is true are read into the sums (a NaN elsewhere does not count)."""
    shape = x.shape
    reduced = {a % x.ndim for a in axes}
    if group_axis is not None:
        group_axis %= x.ndim
        shape = (*shape[:group_axis], num_groups, shape[group_axis] // num_groups, *shape[group_axis + 1 :])
        reduced = {a + (a > group_axis) for a in reduced} | {group_axis + 1}
    kept = tuple(size for a, size in enumerate(shape) if a not in reduced)
    cdt = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    if x.size == 0:
        return np.zeros(kept, np.int64), np.zeros(kept, cdt), np.zeros(kept, cdt)
    layout = _layout(shape, reduced)
    if layout is None:
        return None
    xc, _ = _compute_view(x)
    keep = None
    if mask is not None:
        keep = np.ascontiguousarray(np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)).reshape(layout)
    n, mean, m2 = _statistics(xc.reshape(layout), keep)
    return (
        n.astype(np.int64).reshape(kept),
        mean.astype(cdt).reshape(kept),
        np.maximum(m2, 0.0).astype(cdt).reshape(kept),
    )


def group_norm(
    x: np.ndarray,
    num_groups: int,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    axis: int,
    out: np.ndarray | None,
) -> np.ndarray | None:
    r"""Group norm per :func:`normkit.hookspecs.normkit_group_norm`, or ``None`` for empty input.

    With ``A`` the product of the axes between the batch and the channel axis, ``B`` of those
    after it and ``K = (C/G)·B``, each group ``(n, g)`` is ``A`` contiguous runs of ``K`` values:

    * long runs (channels-first, ``A = 1``): :func:`~normkit.numpy_backend.numba_loops.group_norm_rows`,
      one parallel task per group that writes ``y`` while its values are still in cache; with
      fewer groups than threads (and channel runs of at least
      :data:`~normkit.numpy_backend.numba_loops.GROUP_INNER`), the statistics of ranges of each
      group in parallel, merged here, then one parallel pass for ``y``;
    * short runs (channels-last: ``K = C/G`` adjacent channels in each of ``A = H·W`` rows): the
      columns layout ``(N, A, C·B)``, per-column statistics of row ranges merged in float64 over
      the ranges and the group's ``K`` columns, then one parallel pass for ``y``.
    """
    if x.size == 0:
        return None
    axis %= x.ndim
    samples, rows, channels, inner = x.shape[0], *_split(x.shape, axis, 1)
    per_group = channels // num_groups
    run = per_group * inner
    xc, copied = _compute_view(x)
    y = _output(x, xc, copied, out)
    rows_layout = _rows_layout(run, rows)
    if rows_layout and (samples * num_groups >= numba.get_num_threads() or inner < kernels.GROUP_INNER):
        shape4 = (samples, rows, num_groups, run)
        kernels.group_norm_rows(
            xc.reshape(shape4),
            _per_channel64(weight, channels, 1.0),
            _per_channel64(bias, channels, 0.0),
            eps,
            inner,
            y.reshape(shape4),
        )
        return finish_output(y, x, out)
    n, mean, m2 = _statistics(xc.reshape(samples, rows, num_groups, run), None)
    var = np.maximum(m2 / n, 0.0)
    s, a, b = _coefficients(
        np.repeat(mean, per_group, axis=1),
        np.repeat(var, per_group, axis=1),
        eps,
        weight,
        bias,
        xc.dtype,
        batch_statistics=True,
    )
    if rows_layout:
        shape4 = (samples, rows, channels, inner)
        kernels.affine_grouped_rows(xc.reshape(shape4), s, a, b, y.reshape(shape4))
        return finish_output(y, x, out)
    shape3 = (samples, rows, channels * inner)
    block_rows = kernels.column_block_rows(channels * inner, xc.itemsize)
    _affine_columns(
        xc.reshape(shape3),
        *(np.repeat(c, inner, axis=1) for c in (s, a, b)),
        y.reshape(shape3),
        _parts(rows, samples, block_rows),
    )
    return finish_output(y, x, out)


def rms_norm(
    x: np.ndarray,
    weight: np.ndarray | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
    out: np.ndarray | None,
) -> np.ndarray | None:
    r"""RMS norm per :func:`normkit.hookspecs.normkit_rms_norm` over trailing ``axes``, or ``None``
    (other axes, or empty input).

    :func:`~normkit.numpy_backend.numba_loops.rms_norm_rows` on the ``(R, K)`` rows: the mean
    square in float64, :math:`\hat x = x\,r` with :math:`r = 1/\sqrt{\overline{x^2}+\epsilon}`
    in the compute dtype, times :math:`w + o` in the compute dtype. float16/bfloat16 input is
    normalized in a float32 copy; with ``cast_before_weight`` (and a weight) :math:`\hat x` is
    rounded to the input dtype before the product, which is rounded again."""
    if x.size == 0 or tuple(axes) != tuple(range(x.ndim - len(axes), x.ndim)):
        return None
    xc, copied = _compute_view(x)
    y = _output(x, xc, copied, out)
    size = math.prod(x.shape[x.ndim - len(axes) :])
    before = weight is not None and cast_before_weight and xc.dtype != x.dtype
    scale = np.ones(size, xc.dtype)
    if weight is not None:
        scale = (np.asarray(weight, dtype=np.float64).reshape(size) + weight_offset).astype(xc.dtype)
    shape2 = (x.size // size, size)
    kernels.rms_norm_rows(
        xc.reshape(shape2), np.ones(size, xc.dtype) if before else scale, eps, y.reshape(shape2)
    )
    if before:  # y is the private float32 copy: round x̂ to the input dtype, then apply w + o
        np.copyto(y, y.astype(x.dtype), casting="unsafe")
        np.multiply(y.reshape(shape2), scale, out=y.reshape(shape2))
    return finish_output(y, x, out)
