r"""Compiled (numba) kernels behind the NumPy backend: the fast path of ``normkit[fast]``.

Imported on the first NumPy op that can use them, never by ``import normkit``. The glue in
:mod:`normkit.numpy_backend` brings every supported call to one of two layouts of a
C-contiguous array in the compute dtype (float32 or float64; float16 is upcast first):

* **rows** ``(G, A, C, B)``: a statistics group ``(g, c)`` is ``A`` contiguous rows of
  length ``B`` (batch norm channels-first has ``G = 1``, ``A = N``, ``B = H·W``; instance
  norm channels-first has ``G = N``, ``A = 1``; layer norm is ``(R, 1, 1, K)``).
* **columns** ``(G, A, C)``: a group ``(g, c)`` is column ``c`` of the ``A × C`` matrix of
  sample ``g`` (channels-last batch norm ``G = 1``, ``A = N·H·W``).

Spec version 2 adds statistics as values over either layout (:func:`row_statistics`,
:func:`column_statistics` and their masked twins, cut into parallel ranges whose partial
``(count, reference, offset, M2)`` the glue merges), group norm in the rows layout with a
per-channel affine (:func:`group_norm_rows`; channels-last group norm takes the columns
kernels, a group being ``C/G`` adjacent columns) and RMS norm over rows
(:func:`rms_norm_rows`, the mean square accumulated in float64).

Statistics (the same numerics in both layouts):

1. The group is cut into blocks (:data:`ROW_BLOCK` consecutive values of a row, or
   :func:`column_block_rows` rows of the matrix). A block is small enough to stay in the L1
   cache, so reading it twice costs no memory traffic.
2. Per block, in the compute dtype: a provisional mean :math:`s` (one pass), then the
   corrected two-pass sums :math:`\sum d` and :math:`\sum d^2` of :math:`d = x - s`. The
   block's mean is :math:`s + \bar d` and its sum of squared deviations
   :math:`M_2 = \sum d^2 - (\sum d)^2/k` (:math:`\bar d` is a rounding-sized correction, so
   nothing cancels; :math:`E[x^2]-E[x]^2` is never formed).
3. Blocks merge in float64 by Chan et al.'s pairwise update:
   :math:`\delta = \mu_b - \mu`, :math:`\mu \mathrel{+}= \delta\,k/(n+k)`,
   :math:`M_2 \mathrel{+}= M_{2,b} + \delta^2\,n k/(n+k)`, :math:`n \mathrel{+}= k`, on means
   taken relative to the group's first provisional mean :math:`r` (:math:`\mu = r + o`), so that
   δ carries no rounding of :math:`|\mu|` (a float64 mean of 1e4 is only known to 2e-12, which
   δ² would carry into :math:`M_2`).

The output is :math:`y = (x - s)\,a + b` per group, with :math:`s` the mean rounded to the
compute dtype, :math:`a = \gamma/\sqrt{\sigma^2+\epsilon}` (0 for a constant group, which so
gives exactly :math:`\beta`) and :math:`b = \beta - (\mu - s)\,a`. In the rows layout the
group is normalized right after its statistics, while it is still in the L2 cache, so a
channels-first batch norm reads ``x`` from memory once and writes ``y`` once.

In the columns layout a channel spans the whole tensor, so ``x`` is read twice (statistics, then
``y``). To keep the statistics pass at the speed of reading memory, :func:`_column_block` adds
:data:`COLUMN_UNROLL` rows together in registers before each load and store of a column's sums,
the per-block merge has no branch in its loop, and the parts merge in compiled code
(:func:`merge_column_statistics`). An output of at least :data:`STREAM_BYTES` is written with
non-temporal vector stores (:func:`affine_columns_streaming`), which skip reading each line of
``y`` from memory before writing it; the values are the same as with ordinary stores.

Only the block sums (:func:`_block_sums`, :func:`_column_block` and their masked twins, the
float64 sum of squares) are compiled with ``fastmath``, limited to reassociation so that they
vectorize; the merges and the output loops round as written (the vector intrinsic of the
streaming stores too: a subtraction, a product and a sum, no FMA). NaN and infinity propagate as in
the pure-NumPy path. The
compiled functions are cached on disk (numba's ``cache=True``), so a new process loads
rather than recompiles them.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = [
    "COLUMN_BLOCK_BYTES",
    "COLUMN_UNROLL",
    "GROUP_INNER",
    "ROW_BLOCK",
    "STREAM_BYTES",
    "VECTOR_BYTES",
    "affine_columns",
    "affine_columns_streaming",
    "affine_grouped_rows",
    "affine_rows",
    "column_block_rows",
    "column_statistics",
    "column_statistics_masked",
    "group_norm_rows",
    "layer_norm_rows",
    "merge_column_statistics",
    "normalize_rows",
    "rms_norm_rows",
    "row_statistics",
    "row_statistics_masked",
    "stream_lanes",
]

FASTMATH = {"reassoc", "nsz"}
"""For the sums only (so that they vectorize): no ``nnan``/``ninf``, so NaN and infinity
propagate. The output loops are compiled without fastmath, so ``y = (x - s)·a + b`` rounds the
same in every layout and loop remainder."""

ROW_BLOCK = 512
"""Values of a row summed in the compute dtype (in vector lanes) before a float64 merge."""

COLUMN_BLOCK_BYTES = 131072
"""Bytes of rows a columns-layout block spans (it is read twice, from the L2 cache)."""


def column_block_rows(columns: int, itemsize: int) -> int:
    """Rows per block in the columns layout: about :data:`COLUMN_BLOCK_BYTES`, from 16 to 256."""
    return max(16, min(256, COLUMN_BLOCK_BYTES // max(1, columns * itemsize)))


_reduction = numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
_jit = numba.njit(cache=True, nogil=True)
_parallel = numba.njit(cache=True, nogil=True, parallel=True)


@_jit
def _moments64(values):
    """Two-pass mean and sum of squared deviations of the 1-D ``values``, in float64: the
    fallback for a block whose float32 squares overflow."""
    total = 0.0
    for i in range(values.shape[0]):
        total += np.float64(values[i])
    mean = total / values.shape[0]
    m2 = 0.0
    for i in range(values.shape[0]):
        d = np.float64(values[i]) - mean
        m2 += d * d
    return mean, m2


@_reduction
def _block_sums(block):
    """``(shift, s1, s2)`` of the 1-D ``block`` in its dtype: the provisional mean ``shift`` and
    the sums of ``d`` and ``d²`` for ``d = x - shift``, vectorized (the only code compiled with
    reassociation: the merges that follow must round as written)."""
    cast = block.dtype.type
    zero = cast(0.0)
    k = block.shape[0]
    total = zero
    for i in range(k):
        total += block[i]
    shift = total / cast(k)  # compute dtype (k <= ROW_BLOCK is exact)
    s1 = zero
    s2 = zero
    for i in range(k):
        d = block[i] - shift
        s1 += d
        s2 += d * d
    return shift, s1, s2


@_jit
def _merge_row(row, n, offset, m2, ref):
    """Merge the statistics of the contiguous 1-D ``row`` into the float64 ``(n, offset, m2)`` of
    values whose mean is ``ref + offset``; returns ``(n, offset, m2, ref)``. ``ref`` is the first
    block's provisional mean (set when ``n`` is 0): the merges work on deviations from it, so
    their rounding scales with the spread of the values, not with their mean (a float64 mean of
    1e4 is only known to 2e-12, which Chan's δ² term would carry into M2)."""
    for start in range(0, row.shape[0], ROW_BLOCK):
        block = row[start : start + ROW_BLOCK]  # a slice: loops over range(k) vectorize
        k = block.shape[0]
        shift, s1, s2 = _block_sums(block)
        if n == 0.0:
            ref = np.float64(shift)
        if math.isfinite(s2):
            block_offset = (np.float64(shift) - ref) + np.float64(s1) / k
            block_m2 = np.float64(s2) - np.float64(s1) * np.float64(s1) / k
        else:  # float32 squares overflowed (|x| beyond about 1e19), or x holds inf/NaN
            block_mean, block_m2 = _moments64(block)
            block_offset = block_mean - ref
        merged = n + k
        delta = block_offset - offset
        offset += delta * (k / merged)
        m2 += block_m2 + delta * delta * (n * k / merged)
        n = merged
    return n, offset, m2, ref


@_jit
def _scale_shift(ref, offset, var, eps, gamma, beta, rounded):
    """``(a, b)`` in float64 for ``y = (x - rounded) * a + b`` where ``rounded`` is the mean
    ``ref + offset`` in the compute dtype (``(ref - rounded) + offset`` keeps the mean's low part);
    ``a = 0`` for a constant group."""
    a = 0.0 if var == 0.0 else gamma / math.sqrt(var + eps)
    return a, beta - ((ref - np.float64(rounded)) + offset) * a


@_parallel
def normalize_rows(x, weight, bias, eps, y, mean, var):
    """Batch or instance norm with batch statistics in the rows layout ``(G, A, C, B)``.

    Writes ``y`` (same layout and dtype; may be ``x`` itself) and the float64 ``mean`` and biased
    ``var`` of shape ``(G, C)``. ``weight``/``bias`` are float64 ``(C,)``.
    """
    cast = x.dtype.type
    groups, rows, channels, _ = x.shape
    for task in numba.prange(groups * channels):
        g = task // channels
        c = task % channels
        n = 0.0
        offset = 0.0
        m2 = 0.0
        ref = 0.0
        for r in range(rows):
            n, offset, m2, ref = _merge_row(x[g, r, c], n, offset, m2, ref)
        sigma2 = max(m2 / n, 0.0)
        mu = ref + offset
        mean[g, c] = mu
        var[g, c] = sigma2
        s = cast(mu)
        a, b = _scale_shift(ref, offset, sigma2, eps, weight[c], bias[c], s)
        a_c = cast(a)
        b_c = cast(b)
        for r in range(rows):
            src = x[g, r, c]
            dst = y[g, r, c]
            for i in range(src.shape[0]):
                dst[i] = (src[i] - s) * a_c + b_c


@_parallel
def affine_rows(x, shift, scale, offset, y):
    """``y = (x - shift[c]) * scale[c] + offset[c]`` on the rows layout ``(M, C, B)`` (eval);
    ``shift``/``scale``/``offset`` have the compute dtype. ``y`` may be ``x``."""
    outer, channels, _ = x.shape
    for task in numba.prange(outer * channels):
        m = task // channels
        c = task % channels
        src = x[m, c]
        dst = y[m, c]
        s = shift[c]
        a = scale[c]
        b = offset[c]
        for i in range(src.shape[0]):
            dst[i] = (src[i] - s) * a + b


COLUMN_UNROLL = 4
"""Rows that :func:`_column_block` adds together (in registers) before it updates the per-column
sums in memory: the sums are loaded and stored once per this many rows, not once per value."""


@_reduction
def _column_block(block, shift, s1, s2):
    """Two-pass sums of the rows of ``block`` (a slice of the ``(A, C)`` matrix): the provisional
    means into ``shift`` and the sums of ``d`` and ``d²`` into ``s1``, ``s2`` (compute dtype).

    Register-blocked over rows: each sweep over the columns takes :data:`COLUMN_UNROLL` rows at
    once and adds their terms pairwise before the one load and store of each column's sum, so the
    sums cost a memory access per four values instead of per value (the column loop vectorizes
    over adjacent columns; the rows left over take a sweep of their own)."""
    cast = block.dtype.type
    zero = cast(0.0)
    rows, channels = block.shape
    full = rows - rows % COLUMN_UNROLL
    for c in range(channels):
        shift[c] = zero
    for r in range(0, full, COLUMN_UNROLL):
        r0 = block[r]
        r1 = block[r + 1]
        r2 = block[r + 2]
        r3 = block[r + 3]
        for c in range(channels):
            shift[c] += (r0[c] + r1[c]) + (r2[c] + r3[c])
    for r in range(full, rows):
        row = block[r]
        for c in range(channels):
            shift[c] += row[c]
    inverse = cast(1.0) / cast(rows)
    for c in range(channels):
        shift[c] *= inverse
        s1[c] = zero
        s2[c] = zero
    for r in range(0, full, COLUMN_UNROLL):
        r0 = block[r]
        r1 = block[r + 1]
        r2 = block[r + 2]
        r3 = block[r + 3]
        for c in range(channels):
            mid = shift[c]
            d0 = r0[c] - mid
            d1 = r1[c] - mid
            d2 = r2[c] - mid
            d3 = r3[c] - mid
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(full, rows):
        row = block[r]
        for c in range(channels):
            d = row[c] - shift[c]
            s1[c] += d
            s2[c] += d * d


@_jit
def _merge_column_block(block, shift, s1, s2, n, ref, offset, m2):
    """Merge the block sums of :func:`_column_block` (``block`` has ``k`` rows) into the per-column
    float64 ``ref``/``offset``/``m2`` of ``n`` rows (Chan's update, as :func:`_merge_row`; ``ref``
    is set from the first block, ``n == 0``). The merge loop vectorizes: the test for a block whose
    float32 squares overflowed (or that holds inf/NaN), merged with :func:`_moments64` in the
    columns where its sums are not finite, is made once per block."""
    channels = shift.shape[0]
    k = block.shape[0]
    if n == 0.0:
        for c in range(channels):
            ref[c] = np.float64(shift[c])
    merged = n + k
    inv_k = 1.0 / k
    w_mean = k / merged
    w_m2 = n * k / merged
    finite = True
    for c in range(channels):
        finite &= math.isfinite(s2[c])
    if finite:
        for c in range(channels):
            d1 = np.float64(s1[c])
            block_offset = (np.float64(shift[c]) - ref[c]) + d1 * inv_k
            block_m2 = np.float64(s2[c]) - d1 * d1 * inv_k
            delta = block_offset - offset[c]
            offset[c] += delta * w_mean
            m2[c] += block_m2 + delta * delta * w_m2
        return
    for c in range(channels):
        d1 = np.float64(s1[c])
        block_offset = (np.float64(shift[c]) - ref[c]) + d1 * inv_k
        block_m2 = np.float64(s2[c]) - d1 * d1 * inv_k
        if not math.isfinite(block_m2):  # float32 squares overflowed, or inf/NaN
            block_mean, block_m2 = _moments64(block[:, c])
            block_offset = block_mean - ref[c]
        delta = block_offset - offset[c]
        offset[c] += delta * w_mean
        m2[c] += block_m2 + delta * delta * w_m2


@_parallel
def column_statistics(x, parts, block_rows):
    """Per-part statistics of the columns layout ``(G, A, C)``: each sample's rows are cut
    into ``parts`` ranges; returns float64 ``(G, parts, 4, C)`` holding, per range and column,
    the count, a reference ``r`` (the first block's provisional mean), the mean's offset ``o``
    from it (the mean is ``r + o``, kept apart so that a merge loses nothing to the rounding of
    the mean) and the sum of squared deviations (merge them with
    :func:`merge_column_statistics`)."""
    groups, rows, channels = x.shape
    result = np.zeros((groups, parts, 4, channels))
    for task in numba.prange(groups * parts):
        g = task // parts
        p = task % parts
        first = p * rows // parts
        last = (p + 1) * rows // parts
        shift = np.empty(channels, x.dtype)
        s1 = np.empty(channels, x.dtype)
        s2 = np.empty(channels, x.dtype)
        ref = result[g, p, 1]  # per column, as in _merge_row: the first block's shift
        offset = result[g, p, 2]  # the mean is ref + offset
        m2 = result[g, p, 3]
        n = 0.0
        for start in range(first, last, block_rows):
            block = x[g, start : min(start + block_rows, last)]
            _column_block(block, shift, s1, s2)
            _merge_column_block(block, shift, s1, s2, n, ref, offset, m2)
            n += block.shape[0]
        result[g, p, 0, :] = n
    return result


@_jit
def merge_column_statistics(partial, run):
    r"""Merge the per-part, per-column statistics of :func:`column_statistics` (or its masked
    twin), float64 ``(G, P, 4, W)``, over the ``P`` parts and each run of ``run`` adjacent columns
    (a channel's ``B`` columns, or a channel group's), into float64 ``(count, mean, m2)`` of
    shape ``(G, W // run)``.

    The two-pass merge of :func:`normkit.numpy_backend.compiled.merge_statistics`, compiled (in
    NumPy it is some twenty small calls): with :math:`q` the part with the most values (the first
    of equals, parts before columns), :math:`d_p = (r_p - r_q) + (o_p - o_q)`,
    :math:`\bar d = \sum n_p d_p / n`, the mean :math:`r_q + (o_q + \bar d)` and
    :math:`M_2 = \sum M_{2,p} + n_p (d_p - \bar d)^2`. A run with no values merges to
    ``(0, 0, 0)``."""
    groups, parts, _, width = partial.shape
    runs = width // run
    count = np.zeros((groups, runs))
    mean = np.zeros((groups, runs))
    m2 = np.zeros((groups, runs))
    for g in range(groups):
        for j in range(runs):
            first = j * run
            n = 0.0
            most = -1.0
            ref = 0.0
            offset = 0.0
            for p in range(parts):
                for i in range(first, first + run):
                    k = partial[g, p, 0, i]
                    n += k
                    if k > most:
                        most = k
                        ref = partial[g, p, 1, i]
                        offset = partial[g, p, 2, i]
            total = 0.0
            for p in range(parts):
                for i in range(first, first + run):
                    d = (partial[g, p, 1, i] - ref) + (partial[g, p, 2, i] - offset)
                    total += partial[g, p, 0, i] * d
            mean_d = total / max(n, 1.0)
            sum_m2 = 0.0
            for p in range(parts):
                for i in range(first, first + run):
                    d = ((partial[g, p, 1, i] - ref) + (partial[g, p, 2, i] - offset)) - mean_d
                    sum_m2 += partial[g, p, 3, i] + partial[g, p, 0, i] * d * d
            count[g, j] = n
            mean[g, j] = ref + (offset + mean_d)
            m2[g, j] = sum_m2
    return count, mean, m2


@_parallel
def affine_columns(x, shift, scale, offset, y, parts):
    """``y = (x - shift) * scale + offset`` on the columns layout ``(G, A, C)`` with per-sample,
    per-column coefficients ``(G, C)`` in the compute dtype, in ``parts`` row ranges per
    sample. ``y`` may be ``x``."""
    groups, rows, channels = x.shape
    for task in numba.prange(groups * parts):
        g = task // parts
        p = task % parts
        s = shift[g]
        a = scale[g]
        b = offset[g]
        for r in range(p * rows // parts, (p + 1) * rows // parts):
            src = x[g, r]
            dst = y[g, r]
            for c in range(channels):
                dst[c] = (src[c] - s[c]) * a[c] + b[c]


# --- streaming (non-temporal) stores for outputs larger than the caches ---------------------------

VECTOR_BYTES = 32
"""Bytes of one vector of :func:`_stream_affine` (an AVX register: 8 float32 or 4 float64 values);
its non-temporal store needs an address aligned to it."""

STREAM_BYTES = 8 * 2**20
"""Output size from which the glue writes ``y`` with :func:`affine_columns_streaming`: an output
this large leaves the caches anyway, and a non-temporal store writes it without first reading
each of its cache lines from memory (the read for ownership that an ordinary store makes), one
stream of the three the affine pass would otherwise cost. Smaller outputs keep ordinary stores, so
that ``y`` stays in cache for whatever reads it next."""


@intrinsic
def _address(typingctx, array):
    """The address of ``array``'s first element, as an unsigned integer."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(types.uintp))

    return types.uintp(array), codegen


@intrinsic
def _stream_affine(typingctx, src, dst, shift, scale, offset, i, c):
    """``dst[i:i+L] = (src[i:i+L] - shift[c:c+L]) * scale[c:c+L] + offset[c:c+L]`` on one vector of
    ``L`` = :data:`VECTOR_BYTES` / itemsize values, stored non-temporally (``&dst[i]`` must be
    aligned to :data:`VECTOR_BYTES`; the loads need no alignment). The subtraction, product and
    sum are separate instructions without fast-math flags (no FMA contraction), so every lane
    rounds as the strictly compiled scalar loops do."""

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        itemsize = context.get_abi_sizeof(context.get_data_type(dtype))
        vector = ir.VectorType(context.get_data_type(dtype), VECTOR_BYTES // itemsize)

        def pointer(k, index):
            data = context.make_array(signature.args[k])(context, builder, args[k]).data
            return builder.bitcast(builder.gep(data, [index]), vector.as_pointer())

        x = builder.load(pointer(0, args[5]), align=itemsize)
        s = builder.load(pointer(2, args[6]), align=itemsize)
        a = builder.load(pointer(3, args[6]), align=itemsize)
        b = builder.load(pointer(4, args[6]), align=itemsize)
        y = builder.fadd(builder.fmul(builder.fsub(x, s), a), b)
        store = builder.store(y, pointer(1, args[5]), align=VECTOR_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(src, dst, shift, scale, offset, i, c), codegen


@intrinsic
def _store_fence(typingctx):
    """A full memory fence: the non-temporal stores before it are visible to every thread after it
    (they are weakly ordered)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def stream_lanes(itemsize: int) -> int:
    """Values per vector of :func:`affine_columns_streaming` for values of ``itemsize`` bytes: the
    coefficient arrays it takes are that many values minus one longer than a row."""
    return VECTOR_BYTES // itemsize


@_parallel
def affine_columns_streaming(x, shift, scale, offset, y, parts):
    """:func:`affine_columns` for a large output, written with non-temporal vector stores.

    ``x`` and ``y`` ``(G, A, W)`` are C-contiguous and do not overlap; the coefficients are
    ``(G, W + L - 1)`` with ``L`` = :func:`stream_lanes`, periodic (column ``k`` holds the
    coefficient of column ``k mod W``), so that a vector may run over the end of a row. Each task
    walks its row range as one flat run: ordinary stores up to the first address aligned to
    :data:`VECTOR_BYTES`, whole vectors through :func:`_stream_affine`, ordinary stores for the
    rest (so only the ends of a range mix the two kinds of store on one cache line). ``y``
    holds exactly what :func:`affine_columns` writes."""
    groups, rows, width = x.shape
    lanes = VECTOR_BYTES // x.itemsize
    for task in numba.prange(groups * parts):
        g = task // parts
        p = task % parts
        src = x[g].reshape(rows * width)
        dst = y[g].reshape(rows * width)
        s = shift[g]
        a = scale[g]
        b = offset[g]
        i = (p * rows // parts) * width
        last = ((p + 1) * rows // parts) * width
        misaligned = (_address(dst) + i * dst.itemsize) % VECTOR_BYTES
        head = (VECTOR_BYTES - misaligned) % VECTOR_BYTES // dst.itemsize
        if misaligned % dst.itemsize:  # never aligned: ordinary stores throughout
            head = last - i
        c = 0
        for _ in range(min(head, last - i)):
            dst[i] = (src[i] - s[c]) * a[c] + b[c]
            i += 1
            c = 0 if c + 1 == width else c + 1
        while i + lanes <= last:
            _stream_affine(src, dst, s, a, b, i, c)
            i += lanes
            c += lanes
            while c >= width:
                c -= width
        while i < last:
            dst[i] = (src[i] - s[c]) * a[c] + b[c]
            i += 1
            c = 0 if c + 1 == width else c + 1
        _store_fence()


@_parallel
def layer_norm_rows(x, weight, bias, eps, y):
    """Layer norm over each row of the ``(R, K)`` matrix ``x``: ``y = (x - μ)/√(σ²+ε)·γ + β`` with
    element-wise ``weight``/``bias`` ``(K,)`` in the compute dtype. ``y`` may be ``x``."""
    cast = x.dtype.type
    rows, size = x.shape
    for r in numba.prange(rows):
        src = x[r]
        dst = y[r]
        n, offset, m2, ref = _merge_row(src, 0.0, 0.0, 0.0, 0.0)
        sigma2 = max(m2 / n, 0.0)
        inverse = 0.0 if sigma2 == 0.0 else 1.0 / math.sqrt(sigma2 + eps)
        s = cast(ref + offset)
        correction = cast(((ref - np.float64(s)) + offset) * inverse)
        inv = cast(inverse)
        for i in range(size):
            dst[i] = ((src[i] - s) * inv - correction) * weight[i] + bias[i]


# --- spec version 2: statistics as values, group norm, RMS norm ---------------------------------


@_jit
def _moments64_masked(values, keep):
    """Two-pass count, mean and sum of squared deviations of the kept ``values`` (1-D), in float64:
    the fallback for a masked block whose float32 squares overflow."""
    count = 0
    total = 0.0
    for i in range(values.shape[0]):
        if keep[i]:
            total += np.float64(values[i])
            count += 1
    mean = total / count
    m2 = 0.0
    for i in range(values.shape[0]):
        if keep[i]:
            d = np.float64(values[i]) - mean
            m2 += d * d
    return mean, m2


@_reduction
def _block_sums_masked(block, kept):
    """``(k, shift, s1, s2)``: :func:`_block_sums` over the values of ``block`` where ``kept`` is
    true (``k`` of them; the sums are 0 when ``k`` is 0)."""
    cast = block.dtype.type
    zero = cast(0.0)
    k = 0
    total = zero
    for i in range(block.shape[0]):
        if kept[i]:
            total += block[i]
            k += 1
    shift = total / cast(max(k, 1))
    s1 = zero
    s2 = zero
    for i in range(block.shape[0]):
        d = block[i] - shift if kept[i] else zero
        s1 += d
        s2 += d * d
    return k, shift, s1, s2


@_jit
def _merge_row_masked(row, keep, n, offset, m2, ref):
    """:func:`_merge_row` over the values of ``row`` where ``keep`` (same length) is true; the
    others are never read into a sum (a NaN there does not count)."""
    for start in range(0, row.shape[0], ROW_BLOCK):
        block = row[start : start + ROW_BLOCK]
        kept = keep[start : start + ROW_BLOCK]
        k, shift, s1, s2 = _block_sums_masked(block, kept)
        if k == 0:
            continue
        if n == 0.0:
            ref = np.float64(shift)
        if math.isfinite(s2):
            block_offset = (np.float64(shift) - ref) + np.float64(s1) / k
            block_m2 = np.float64(s2) - np.float64(s1) * np.float64(s1) / k
        else:
            block_mean, block_m2 = _moments64_masked(block, kept)
            block_offset = block_mean - ref
        merged = n + k
        delta = block_offset - offset
        offset += delta * (k / merged)
        m2 += block_m2 + delta * delta * (n * k / merged)
        n = merged
    return n, offset, m2, ref


@_jit
def _part_bounds(total, parts, p):
    return p * total // parts, (p + 1) * total // parts


@_parallel
def row_statistics(x, parts):
    """Statistics of the rows layout ``(G, A, C, B)`` without a mask: group ``(g, c)`` is the
    ``A·B`` values ``x[g, :, c, :]``, cut into ``parts`` consecutive ranges (one parallel task
    each, so that few groups still use every thread). Returns float64 ``(G, C, parts, 4)``:
    per range the count, the reference ``r`` and offset ``o`` of the mean ``r + o`` (see
    :func:`column_statistics`) and the sum of squared deviations (merge them with
    :func:`normkit.numpy_backend.compiled.merge_statistics`)."""
    groups, rows, channels, inner = x.shape
    total = rows * inner
    result = np.zeros((groups, channels, parts, 4))
    for task in numba.prange(groups * channels * parts):
        p = task % parts
        c = (task // parts) % channels
        g = task // (parts * channels)
        first, last = _part_bounds(total, parts, p)
        n = 0.0
        offset = 0.0
        m2 = 0.0
        ref = 0.0
        i = first
        while i < last:
            r = i // inner
            start = i - r * inner
            stop = min(inner, start + (last - i))
            n, offset, m2, ref = _merge_row(x[g, r, c, start:stop], n, offset, m2, ref)
            i += stop - start
        result[g, c, p, 0] = n
        result[g, c, p, 1] = ref
        result[g, c, p, 2] = offset
        result[g, c, p, 3] = m2
    return result


@_parallel
def row_statistics_masked(x, keep, parts):
    """:func:`row_statistics` over the values where the boolean ``keep`` (``x``'s layout) is
    true; a range with nothing kept is all 0."""
    groups, rows, channels, inner = x.shape
    total = rows * inner
    result = np.zeros((groups, channels, parts, 4))
    for task in numba.prange(groups * channels * parts):
        p = task % parts
        c = (task // parts) % channels
        g = task // (parts * channels)
        first, last = _part_bounds(total, parts, p)
        n = 0.0
        offset = 0.0
        m2 = 0.0
        ref = 0.0
        i = first
        while i < last:
            r = i // inner
            start = i - r * inner
            stop = min(inner, start + (last - i))
            n, offset, m2, ref = _merge_row_masked(
                x[g, r, c, start:stop], keep[g, r, c, start:stop], n, offset, m2, ref
            )
            i += stop - start
        result[g, c, p, 0] = n
        result[g, c, p, 1] = ref
        result[g, c, p, 2] = offset
        result[g, c, p, 3] = m2
    return result


@_reduction
def _column_block_masked(block, keep, count, shift, s1, s2):
    """:func:`_column_block` over the kept values of ``block``: per column the count of kept
    rows into ``count`` (int64) and, where it is not 0, the provisional mean and the two-pass
    sums of the kept values."""
    cast = block.dtype.type
    zero = cast(0.0)
    rows, channels = block.shape
    for c in range(channels):
        shift[c] = zero
        count[c] = 0
    for r in range(rows):
        row = block[r]
        kept = keep[r]
        for c in range(channels):
            if kept[c]:
                shift[c] += row[c]
                count[c] += 1
    for c in range(channels):
        if count[c] > 0:
            shift[c] /= cast(count[c])
        s1[c] = zero
        s2[c] = zero
    for r in range(rows):
        row = block[r]
        kept = keep[r]
        for c in range(channels):
            d = row[c] - shift[c] if kept[c] else zero
            s1[c] += d
            s2[c] += d * d


@_parallel
def column_statistics_masked(x, keep, parts, block_rows):
    """:func:`column_statistics` over the values where the boolean ``keep`` (``x``'s layout
    ``(G, A, C)``) is true: float64 ``(G, parts, 4, C)`` with a count per column; a column of a
    range with nothing kept is all 0."""
    groups, rows, channels = x.shape
    result = np.zeros((groups, parts, 4, channels))
    for task in numba.prange(groups * parts):
        g = task // parts
        p = task % parts
        first, last = _part_bounds(rows, parts, p)
        count = np.empty(channels, np.int64)
        shift = np.empty(channels, x.dtype)
        s1 = np.empty(channels, x.dtype)
        s2 = np.empty(channels, x.dtype)
        n = result[g, p, 0]
        ref = result[g, p, 1]  # per column: the first kept block's shift (see _merge_row)
        offset = result[g, p, 2]  # the mean is ref + offset
        m2 = result[g, p, 3]
        for start in range(first, last, block_rows):
            stop = min(start + block_rows, last)
            block = x[g, start:stop]
            kept = keep[g, start:stop]
            _column_block_masked(block, kept, count, shift, s1, s2)
            for c in range(channels):
                k = count[c]
                if k == 0:
                    continue
                if n[c] == 0.0:
                    ref[c] = np.float64(shift[c])
                d1 = np.float64(s1[c])
                block_offset = (np.float64(shift[c]) - ref[c]) + d1 / k
                block_m2 = np.float64(s2[c]) - d1 * d1 / k
                if not math.isfinite(block_m2):
                    block_mean, block_m2 = _moments64_masked(block[:, c], kept[:, c])
                    block_offset = block_mean - ref[c]
                merged = n[c] + k
                delta = block_offset - offset[c]
                offset[c] += delta * (k / merged)
                m2[c] += block_m2 + delta * delta * (n[c] * k / merged)
                n[c] = merged
    return result


GROUP_INNER = 16
"""Shortest run of one channel for which :func:`group_norm_rows` writes ``y`` channel by channel;
shorter runs take per-value coefficient vectors (so that the output loop still vectorizes)."""


@_parallel
def group_norm_rows(x, weight, bias, eps, inner, y):
    """Group norm in the rows layout ``(N, A, G, K)``: group ``(n, g)`` is the ``A`` contiguous
    runs ``x[n, :, g]`` of ``K = (C/G)·inner`` values, ``inner`` consecutive values per channel
    (channels-first ``(N, C, H, W)`` is ``A = 1``, ``inner = H·W``). One parallel task per group
    computes its statistics (:func:`_merge_row`) and at once writes ``y = (x - s)·a_c + b_c``
    with ``s`` the mean rounded to the compute dtype, ``a_c = γ_c/√(σ²+ε)`` (0 for a constant
    group: ``y = β`` exactly) and ``b_c = β_c - (μ - s)·a_c``. ``weight``/``bias`` are float64
    ``(C,)``; ``y`` may be ``x``."""
    cast = x.dtype.type
    samples, rows, groups, size = x.shape
    per_group = size // inner
    for task in numba.prange(samples * groups):
        sample = task // groups
        g = task % groups
        n = 0.0
        offset = 0.0
        m2 = 0.0
        ref = 0.0
        for r in range(rows):
            n, offset, m2, ref = _merge_row(x[sample, r, g], n, offset, m2, ref)
        sigma2 = max(m2 / n, 0.0)
        inverse = 0.0 if sigma2 == 0.0 else 1.0 / math.sqrt(sigma2 + eps)
        s = cast(ref + offset)
        residual = (ref - np.float64(s)) + offset  # the mean minus s, with the mean's low part
        first = g * per_group
        if inner >= GROUP_INNER:
            for r in range(rows):
                src = x[sample, r, g]
                dst = y[sample, r, g]
                for ci in range(per_group):
                    a = inverse * weight[first + ci]
                    a_c = cast(a)
                    b_c = cast(bias[first + ci] - residual * a)
                    run = src[ci * inner : (ci + 1) * inner]
                    out = dst[ci * inner : (ci + 1) * inner]
                    for i in range(inner):
                        out[i] = (run[i] - s) * a_c + b_c
        else:
            scale = np.empty(size, x.dtype)
            shift = np.empty(size, x.dtype)
            for ci in range(per_group):
                a = inverse * weight[first + ci]
                a_c = cast(a)
                b_c = cast(bias[first + ci] - residual * a)
                for i in range(ci * inner, (ci + 1) * inner):
                    scale[i] = a_c
                    shift[i] = b_c
            for r in range(rows):
                src = x[sample, r, g]
                dst = y[sample, r, g]
                for i in range(size):
                    dst[i] = (src[i] - s) * scale[i] + shift[i]


@_parallel
def affine_grouped_rows(x, shift, scale, offset, y):
    """``y = (x - shift[g, c]) * scale[g, c] + offset[g, c]`` on the rows layout ``(G, A, C, B)``
    with per-sample, per-channel coefficients ``(G, C)`` in the compute dtype. ``y`` may be
    ``x``."""
    groups, rows, channels, _ = x.shape
    for task in numba.prange(groups * rows * channels):
        c = task % channels
        r = (task // channels) % rows
        g = task // (channels * rows)
        src = x[g, r, c]
        dst = y[g, r, c]
        s = shift[g, c]
        a = scale[g, c]
        b = offset[g, c]
        for i in range(src.shape[0]):
            dst[i] = (src[i] - s) * a + b


@_reduction
def _sum_squares64(row):
    """``Σ x²`` of the 1-D ``row`` accumulated in float64 (each square formed in float64, so
    float32 input can neither overflow nor underflow)."""
    total = 0.0
    for i in range(row.shape[0]):
        v = np.float64(row[i])
        total += v * v
    return total


@_parallel
def rms_norm_rows(x, scale, eps, y):
    """RMS norm over each row of the ``(R, K)`` matrix ``x``: ``y = (x·r)·scale`` with
    ``r = 1/√(Σx²/K + ε)`` (the sum in float64, ``r`` rounded once to the compute dtype) and the
    element-wise ``scale = w + o`` ``(K,)`` in the compute dtype (ones for no weight: the product
    is then exact). ``y`` may be ``x``."""
    cast = x.dtype.type
    rows, size = x.shape
    for r in numba.prange(rows):
        src = x[r]
        dst = y[r]
        inverse = cast(1.0 / math.sqrt(_sum_squares64(src) / size + eps))
        for i in range(size):
            dst[i] = (src[i] * inverse) * scale[i]
