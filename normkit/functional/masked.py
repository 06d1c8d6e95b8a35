r"""Batch norm with a mask, composed from the primitives (``moments`` with the mask, then
``normalize``), with a running update per channel that follows each channel's own count.

For channel :math:`c` with :math:`n_c` unmasked values, mean :math:`\mu_c` and :math:`M_{2,c}`:
:math:`y = \gamma_c (x - \mu_c)/\sqrt{M_{2,c}/n_c + \epsilon} + \beta_c` at every position, and

.. math::

   \hat\mu_c \leftarrow \hat\mu_c + m\,[n_c > 0]\,(\mu_c - \hat\mu_c), \qquad
   \hat\sigma^2_c \leftarrow \hat\sigma^2_c + m\,[n_c > k]\,(v_c - \hat\sigma^2_c),

with :math:`v_c = M_{2,c}/(n_c - 1)`, :math:`k = 1` (unbiased) or :math:`v_c = M_{2,c}/n_c`,
:math:`k = 0` (biased). A channel with nothing unmasked normalizes with mean 0 and variance 0
(:math:`y = \gamma x/\sqrt\epsilon + \beta`; no statistic describes it) and keeps its running
statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from normkit._registry import Backend
from normkit.functional._arrays import cast, mix, widest_float
from normkit.functional.statistics import Moments
from normkit.hookspecs import BackendInfo

__all__ = ["masked_batch_norm", "running_update"]

Array = Any


def masked_batch_norm(
    be: Backend,
    x: Array,
    mask: Array,
    axis: int,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    momentum: float,
    eps: float,
    unbiased: bool,
    out: Array | None,
    combine: Callable[[Moments], Moments] | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Training-mode batch norm over the unmasked values (see the module docstring).

    :param combine: turns this call's moments into the ones to normalize with and update from
        (synchronized batch norm: the global batch's, :func:`normkit.distributed.sync_batch_norm`);
        ``None`` uses this call's own.
    """
    info = be.info
    shape = tuple(info.shape(x))
    reduced = tuple(a for a in range(len(shape)) if a != axis)
    statistics = Moments(*be.moments(x, reduced, mask, None, None))
    if combine is not None:
        statistics = combine(statistics)
    count, mean, m2 = statistics
    wide = info.dtype_name(mean)
    n = cast(info, count, wide)
    empty = cast(info, count == 0, wide)
    var = m2 / (n + empty)  # 0 / 1 for an empty channel
    if None not in shape and math.prod(shape) == 0:  # an empty part (a replica's): nothing to normalize
        y = x if out is None else out
    elif out is not None:
        y = be.normalize(x, mean, var, weight, bias, eps, reduced, (axis,), out=out)
    else:
        y = be.normalize(x, mean, var, weight, bias, eps, reduced, (axis,))
    if running_mean is None or running_var is None:
        return y, None, None
    new_mean, new_var = running_update(info, statistics, running_mean, running_var, momentum, unbiased)
    return y, new_mean, new_var


def running_update(
    info: BackendInfo,
    statistics: Moments,
    running_mean: Array,
    running_var: Array,
    momentum: float,
    unbiased: bool,
) -> tuple[Array, Array]:
    """The running statistics after a batch with these per-channel moments (module docstring):
    each channel moves by ``momentum`` where it has a value (two, for the unbiased variance),
    and keeps its statistics elsewhere."""
    count, mean, m2 = statistics
    wide = info.dtype_name(mean)
    n = cast(info, count, wide)
    # (1 - w) r + w b per channel, in the widest float the backend has, then cast back to each
    # statistic's own dtype: r + w (b - r) in the state dtype would lose r's digits (at w = 1 the
    # first cumulative-average batch, b - r rounds to -r when b << r)
    widest = widest_float(info)
    mean_weight = cast(info, count > 0, widest) * momentum
    if unbiased:
        few = cast(info, count < 2, wide)
        stored = m2 / (n - 1.0 + 2.0 * few)  # 0 / (1 or 2) where fewer than two values count
        var_weight = cast(info, count > 1, widest) * momentum
    else:
        stored = m2 / (n + cast(info, count == 0, wide))  # 0 / 1 for an empty channel
        var_weight = mean_weight
    return mix(info, running_mean, mean, mean_weight), mix(info, running_var, stored, var_weight)
