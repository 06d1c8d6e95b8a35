r"""How the CuPy kernels split a reduction into stages a GPU runs at full width.

A normalization reduces ``x`` over some axes and keeps the others (the channels, the rows, the
(sample, group) pairs). Whatever the layout, once ``x`` is viewed in its memory order with
adjacent axes of the same kind merged, almost every case is one 4-D view

.. math::

   x_{g,a,c,b}, \qquad (G, A, C, B), \qquad \text{kept } (g, c), \text{ reduced } (a, b),

with ``b`` the contiguous axis: channels-first batch norm is ``(1, N, C, H W)``, channels-last
``(1, N H W, C, 1)``, ``(N, C)`` batch norm ``(1, N, C, 1)``, layer norm and channels-first
instance and group norm ``(1, 1, R, K)``, channels-last instance norm ``(N, H W, C, 1)`` and
channels-last group norm ``(N, H W, G, C/G)``.

One ``ReductionKernel`` over ``(a, b)`` at once gives each kept value a few long strided sweeps
(measured on an H200: 2086 µs for one NCHW statistic, 12 GB/s). So the sum is split in two
stages, the first producing many partial sums that read ``x`` with coalesced loads:

* **runs** (``B >= 32``, or ``A = 1``): sum each contiguous run of ``B`` values, giving
  ``(G, A, C)`` partial sums, then sum those over ``a``;
* **rows** (``B < 32``): sum blocks of ``k`` consecutive rows ``a`` (``k`` near 64, consecutive
  threads reading consecutive ``(c, b)``), giving ``(G, A/k, C, B)`` partial sums, then sum
  those over the blocks and ``b``; rows that do not fill a block are summed apart and added.

Each stage sums in the compute dtype in CuPy's tree order; the split changes only the order of
the additions, never what is added. A layout that is not such a view (axes interleaved in
another way, a strided or overlapping array) is left to the single reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MIN_RUN", "ROWS_PER_BLOCK", "Plan", "plan_reduction"]

MIN_RUN = 32
"""The shortest contiguous run of reduced values summed on its own in the first stage."""

ROWS_PER_BLOCK = 64
"""The rows each first-stage partial sum covers when the runs are short (measured best of 16-256
on an H200 for NHWC and ``(N, C)`` float32)."""


@dataclass(frozen=True)
class Plan:
    """A reduction of ``x`` over ``axes`` as sums over the view ``(G, A, C, B)``."""

    order: tuple[int, ...]
    """``x.transpose(order)`` is C-contiguous: the axes in memory order."""
    view: tuple[int, int, int, int]
    """``(G, A, C, B)`` of that C-contiguous view."""
    rows: int
    """``k``, the rows per first-stage block (``B < 32``); ``0`` to sum the runs of ``B``."""

    @property
    def stages(self) -> str:
        """``"rows"`` (blocks of rows, then the blocks), ``"runs"`` (runs of ``B``, then ``a``) or
        ``"single"`` (one reduction over ``(a, b)`` of the view: nothing to split)."""
        _, a, _, b = self.view
        if self.rows:
            return "rows"
        return "single" if a == 1 or b < MIN_RUN else "runs"

    @property
    def count(self) -> int:
        """The number of values reduced into each kept value, ``A B``."""
        return self.view[1] * self.view[3]

    @property
    def blocks(self) -> int:
        """Whole blocks of ``rows`` rows (0 when the runs of ``B`` are summed)."""
        return self.view[1] // self.rows if self.rows else 0

    @property
    def tail(self) -> int:
        """The rows after the last whole block, summed apart."""
        return self.view[1] - self.blocks * self.rows if self.rows else 0


def _memory_order(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
    """The permutation that makes the array C-contiguous, or ``None`` when no permutation does
    (a strided, sliced or broadcast array). Axes of size 1 stay where they are."""
    ndim = len(shape)
    big = [a for a in range(ndim) if shape[a] != 1]
    ordered = sorted(big, key=lambda a: -strides[a])
    expected = itemsize
    for a in reversed(ordered):
        if strides[a] != expected:
            return None
        expected *= shape[a]
    fill = iter(ordered)
    return tuple(next(fill) if shape[a] != 1 else a for a in range(ndim))


def _rows_per_block(rows: int) -> int:
    """A block size that divides ``rows`` near :data:`ROWS_PER_BLOCK`, else
    :data:`ROWS_PER_BLOCK` itself (the rows past the last block are summed apart)."""
    for k in (ROWS_PER_BLOCK, 48, 80, 96, 40, 112, 32, 128, 56, 72, 24, 120, 16):
        if rows % k == 0:
            return k
    return ROWS_PER_BLOCK


def plan_reduction(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, axes: tuple[int, ...]
) -> Plan | None:
    """The two-stage plan for summing an array of this ``shape`` and ``strides`` (in bytes) over
    ``axes``, or ``None`` where the single reduction is used: an empty array, nothing reduced or
    nothing kept, a layout that is not one C-contiguous view ``(G, A, C, B)``, or kept axes that
    memory orders differently from their logical order."""
    if not axes or math.prod(shape) == 0 or len(axes) == len(shape):
        return None
    order = _memory_order(shape, strides, itemsize)
    if order is None:
        return None
    kept = [a for a in order if a not in axes and shape[a] != 1]
    if kept != sorted(kept):
        return None  # the kept values would come out transposed
    runs: list[list[int | str]] = []  # [kind, size] in memory order, size-1 axes skipped
    for a in order:
        if shape[a] == 1:
            continue
        kind = "R" if a in axes else "K"
        if runs and runs[-1][0] == kind:
            runs[-1][1] = int(runs[-1][1]) * shape[a]
        else:
            runs.append([kind, shape[a]])
    pattern = "".join(str(kind) for kind, _ in runs)
    sizes = [int(size) for _, size in runs]
    view = {
        "KR": lambda: (1, 1, sizes[0], sizes[1]),
        "RK": lambda: (1, sizes[0], sizes[1], 1),
        "RKR": lambda: (1, sizes[0], sizes[1], sizes[2]),
        "KRK": lambda: (sizes[0], sizes[1], sizes[2], 1),
        "KRKR": lambda: (sizes[0], sizes[1], sizes[2], sizes[3]),
    }.get(pattern)
    if view is None:
        return None
    g, a, c, b = view()
    rows = _rows_per_block(a) if b < MIN_RUN and a >= 2 * ROWS_PER_BLOCK else 0
    return Plan(order=order, view=(g, a, c, b), rows=rows)
