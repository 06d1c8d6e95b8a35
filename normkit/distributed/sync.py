r"""Synchronized batch norm, engine-neutral: every replica normalizes with the statistics of the
global batch.

Each rank :math:`r` computes the moments :math:`(n_r, \mu_r, M_{2,r})` of its part per channel
(masks included) with its backend's kernel; one all-gather gives every rank every rank's
moments, and every rank merges them with Chan's formula **in rank order**, in float64 where the
backend has it:

.. math::

   n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad \mu = \mu_a + \delta\,\frac{n_b}{n},
   \quad M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n},

so every rank holds bit-identical global statistics :math:`(N, \mu, M_2)`, exact for unequal
and empty replicas and stable at any offset (never :math:`E[x^2] - E[x]^2`, never a variance
rebuilt from :math:`1/\sqrt{\sigma^2+\epsilon}`). Each rank then normalizes its part with
:math:`\mu` and :math:`\sigma^2 = M_2/N`, and updates the running statistics with the global
count: :math:`M_2/(N-1)` for the unbiased running variance. :math:`N = 0` leaves them unchanged;
:math:`N = 1` is refused on every rank unless the preset allows a single value. Eval never
communicates.
"""

from __future__ import annotations

from typing import Any

from normkit._registry import Backend
from normkit.distributed.communicator import Communicator, CommunicatorError
from normkit.functional._arrays import cast, widest_float
from normkit.functional.masked import masked_batch_norm
from normkit.functional.statistics import Moments, merge_moments

__all__ = ["check_layout", "sync_batch_norm", "synchronized_moments"]

Array = Any

DTYPE_CODES = ("float16", "bfloat16", "float32", "float64")
"""How the layout check sends a dtype: its index here."""


def _collective(comm: Communicator, layer: str, what: str, call: Any, *args: Any) -> Any:
    """Run a collective, turning an engine's failure into an error that names the layer."""
    try:
        return call(*args)
    except Exception as error:
        raise CommunicatorError(
            f"layer {layer!r}: the {what} over {comm.engine} failed on rank {comm.rank} of {comm.size} "
            f"({type(error).__name__}: {error})"
        ) from error


def check_layout(comm: Communicator, *, channels: int, dtype: str, layer: str) -> None:
    """Check, in one small collective, that every rank has the same channel count and dtype.

    :raises ValueError: on every rank when they disagree, naming the layer, the engine and each
        rank's layout (before any collective whose shapes would disagree, which could hang).
    """
    code = DTYPE_CODES.index(dtype) if dtype in DTYPE_CODES else -1
    layouts = _collective(comm, layer, "layout check", comm.all_gather_ints, (int(channels), code))
    if len({tuple(layout) for layout in layouts}) > 1:
        described = ", ".join(
            f"rank {r}: {c} channels, {DTYPE_CODES[d] if 0 <= d < len(DTYPE_CODES) else 'another dtype'}"
            for r, (c, d) in enumerate(layouts)
        )
        raise ValueError(
            f"layer {layer!r}: the replicas over {comm.engine} disagree on the input's layout ({described}); "
            f"every rank must give a synchronized batch norm the same channel count and dtype"
        )


def synchronized_moments(local: Moments, comm: Communicator, *, layer: str) -> Moments:
    """The moments of the global batch from this rank's ``local`` ones: one all-gather of every
    rank's ``(count, mean, m2)`` (float64 where the backend has it), merged in rank order with
    Chan's formula (:func:`normkit.merge_moments`), so every rank gets bit-identical results.

    :raises CommunicatorError: if the collective fails (a timeout included), naming the layer.
    """
    from normkit._registry import backend_for

    info = backend_for(local.mean).info
    wide = widest_float(info)
    mine = tuple(cast(info, a, wide) for a in local)  # counts as floats: one buffer, exact below 2**53
    parts = _collective(comm, layer, "all-gather of the moments", comm.all_gather, mine)
    return merge_moments(*(Moments(cast(info, c, "int64"), m, m2) for c, m, m2 in parts))


def sync_batch_norm(
    be: Backend,
    x: Array,
    mask: Array | None,
    axis: int,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    momentum: float,
    eps: float,
    unbiased: bool,
    allow_single_value: bool,
    comm: Communicator,
    layer: str,
) -> tuple[Array, Array | None, Array | None, Moments]:
    """Training-mode batch norm with the global batch's statistics (module docstring): this
    rank's normalized part, the new running statistics (the same on every rank) and the global
    moments. It is masked batch norm's composition
    (:func:`normkit.functional.masked.masked_batch_norm`) with this rank's moments replaced by
    the global ones.

    :raises ValueError: on every rank, for a global count of one value per channel unless
        ``allow_single_value``.
    """
    merged: list[Moments] = []

    def combine(local: Moments) -> Moments:
        total = synchronized_moments(local, comm, layer=layer)
        counts = be.info.to_numpy(total.count)
        if not allow_single_value and counts.size and int(counts.max()) == 1:
            raise ValueError(
                f"layer {layer!r}: the global batch over {comm.engine} has 1 value per channel; expected "
                f"more than 1 value per channel when training (the preset does not allow a single value)"
            )
        merged.append(total)
        return total

    y, new_mean, new_var = masked_batch_norm(
        be, x, mask, axis, weight, bias, running_mean, running_var, momentum, eps, unbiased, None, combine
    )
    return y, new_mean, new_var, merged[0]
