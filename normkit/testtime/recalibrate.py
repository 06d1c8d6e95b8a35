r"""Recalibration (PreciseBN): replace each batch norm's running statistics by the statistics of
its input over a whole data set.

For each batch-norm layer, the moments :math:`(n_b, \mu_b, M_{2,b})` of its input in every batch
are recorded while the forward function runs, the layers normalizing with batch statistics as in
training. Two estimators turn them into running statistics:

* ``"population"`` (fvcore's since 2021, Wu and Johnson 2021): Chan's exact merge of all the
  batches, so the stored mean and variance are those of every input value at once, whatever the
  batch sizes, :math:`\mu = \frac1N\sum_b n_b\mu_b`, :math:`\sigma^2 = M_2/N` (or
  :math:`M_2/(N-1)` for a layer that stores the unbiased variance);
* ``"batch-average"`` (``torch.optim.swa_utils.update_bn``): the plain average over batches of
  each batch's mean and stored variance (unbiased under the torch preset). With small or
  correlated batches it under-estimates the variance (about 2x with batches of 2 samples whose
  samples differ by an offset: the spread between batches is lost).

Used on data of the target domain, recalibration is AdaBN (Li et al. 2016). Afterwards every
layer's mode, momentum, counter and arrays other than the running statistics are as before; if
anything fails, the layers are left exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from normkit.functional.statistics import Moments, merge_moments
from normkit.testtime.recording import recorded
from normkit.testtime.sites import Site

__all__ = ["ESTIMATORS", "layer_statistics", "pooled_moments", "recalibrate"]

ESTIMATORS = ("population", "batch-average")

Array = Any


def _stored(site: Site, m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the variance the site's layer stores (unbiased or biased), float64 NumPy."""
    count, mean, m2 = (
        np.asarray(a, np.float64) if isinstance(a, np.ndarray) else site.to_numpy(a) for a in m
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / (count - 1.0) if site.unbiased else m2 / count
    return mean, var


def layer_statistics(
    site: Site, parts: list[Moments], estimator: str = "population"
) -> tuple[np.ndarray, np.ndarray]:
    r"""The running mean and variance ``estimator`` gives a site for its recorded ``parts``,
    per channel, float64, in the layer's variance convention.

    A batch norm's population statistics are those of every value (Chan's merge); an instance
    norm's running statistics average each sample's mean and variance (as its training updates
    do), so its population statistics are the average over every sample of every batch. The
    batch average takes each batch's statistics and averages them over batches.
    """
    if site.per_instance:
        means, variances = zip(*(_stored(site, part) for part in parts), strict=True)  # (N_b, C) each
        if estimator == "population":  # every sample alike
            return np.concatenate(means).mean(0), np.concatenate(variances).mean(0)
        return np.mean([m.mean(0) for m in means], axis=0), np.mean([v.mean(0) for v in variances], axis=0)
    if estimator == "population":
        return _stored(site, merge_moments(*parts))
    stored = [_stored(site, part) for part in parts]
    return np.mean([s[0] for s in stored], axis=0), np.mean([s[1] for s in stored], axis=0)


def pooled_moments(site: Site, parts: list[Moments]) -> Moments:
    """The moments of every value the site saw, per channel: Chan's merge of the batches (of
    the samples too, for an instance norm, in float64 NumPy)."""
    if not site.per_instance:
        return merge_moments(*parts)
    count, mean, m2 = (
        np.concatenate([site.to_numpy(a) for a in field]) for field in zip(*parts, strict=True)
    )
    total = count.sum(0)
    pooled_mean = (count * mean).sum(0) / total
    return Moments(
        total.astype(np.int64), pooled_mean, m2.sum(0) + (count * (mean - pooled_mean) ** 2).sum(0)
    )


def _local_sums(site: Site, parts: list[Moments], estimator: str) -> tuple[np.ndarray, ...]:
    """What a rank contributes to the distributed estimate, per channel, float64: for the
    population estimate of a batch norm its pooled ``(n, mean, M2)`` (zeros for no batch), for
    every other estimate the sums of the averaged statistics and how many they are."""
    channels = site.channels
    if parts:
        channels = int(np.asarray(site.to_numpy(parts[0].mean)).shape[-1])
    if channels is None:
        raise ValueError(
            f"layer {site.name or 'the layer'!r}: its channel count is unknown on a rank without batches"
        )
    zeros = np.zeros(channels)
    if not site.per_instance and estimator == "population":
        if not parts:
            return zeros, zeros, zeros
        merged = merge_moments(*parts)
        return tuple(np.asarray(site.to_numpy(a), np.float64) for a in merged)
    stored = [_stored(site, part) for part in parts]
    if site.per_instance and estimator == "population":  # every sample alike
        means = [m.reshape(-1, channels) for m, _ in stored]
        variances = [v.reshape(-1, channels) for _, v in stored]
        taken = sum(len(m) for m in means)
        total_mean = sum((m.sum(0) for m in means), zeros)
        total_var = sum((v.sum(0) for v in variances), zeros)
    else:  # one term per batch
        taken = len(stored)
        average = (lambda a: a.mean(0)) if site.per_instance else (lambda a: a)
        total_mean = sum((average(m) for m, _ in stored), zeros)
        total_var = sum((average(v) for _, v in stored), zeros)
    return np.full(channels, float(taken)), total_mean, total_var


def _distributed_statistics(
    site: Site, parts: list[Moments], estimator: str, communicator: Any
) -> tuple[tuple[np.ndarray, np.ndarray], Moments]:
    """The estimate over every rank's batches (the same bits on every rank), and the pooled
    moments of a batch norm (of this rank, for an instance norm)."""
    from normkit.distributed.sync import _collective

    label = site.name or "the layer"
    mine = _local_sums(site, parts, estimator)
    gathered = _collective(
        communicator, label, "all-gather of the recorded statistics", communicator.all_gather, mine
    )
    if not site.per_instance and estimator == "population":
        total = merge_moments(*(Moments(np.asarray(c).astype(np.int64), m, m2) for c, m, m2 in gathered))
        if not np.asarray(total.count).any():
            raise ValueError(f"layer {label!r}: no rank recorded any value (every shard is empty)")
        return _stored(site, total), total
    taken = sum(np.asarray(g[0], np.float64) for g in gathered)
    if not taken.any():
        raise ValueError(f"layer {label!r}: no rank recorded any value (every shard is empty)")
    mean = sum(np.asarray(g[1], np.float64) for g in gathered) / taken
    var = sum(np.asarray(g[2], np.float64) for g in gathered) / taken
    return (mean, var), (pooled_moments(site, parts) if parts else Moments(*(np.zeros_like(mean),) * 3))


def recalibrate(
    model: object,
    batches: Iterable[object],
    *,
    forward: Callable[[Array], object] | None = None,
    estimator: str = "population",
    progress: bool = True,
    communicator: Any = None,
) -> dict[str, Moments]:
    """Set every batch norm's running statistics to the statistics of its input over ``batches``.

    :param model: a PyTorch module (every ``torch.nn`` batch norm with running statistics, the
        ``normkit_torch`` drop-ins included; every other module in eval mode meanwhile, so dropout
        is off), or normkit :class:`~normkit.BatchNorm` layers: one layer, a list, tuple or
        mapping of them, or an object holding them as attributes.
    :param batches: arrays, or tuples/lists whose first element is the input (a data loader).
    :param forward: called with each batch's input; default ``model(x)`` for a PyTorch module,
        required for normkit's layers (whose other layers, such as dropout, are the caller's to
        put in eval mode).
    :param estimator: ``"population"`` (exact pooled statistics) or ``"batch-average"``
        (``update_bn``'s average of per-batch statistics); see the module docstring.
    :param progress: show a progress bar on stderr once the run has taken a second.
    :param communicator: a :class:`normkit.distributed.Communicator`: ``batches`` is this rank's
        shard of a data set sharded across ranks (possibly empty), and every rank stores the
        statistics of the whole data set, the same bits everywhere (one all-gather per layer of
        each rank's pooled moments, merged in rank order; for the other estimates, the sums of
        the averaged statistics and their number).
    :returns: each layer's merged :class:`~normkit.Moments` over all batches, by name.
    :raises ValueError: for an unknown estimator, a model without batch norm, no batches, or a
        layer that no batch reached; any error (a batch the model refuses included) leaves the
        model exactly as it was.
    :raises TypeError: for a model of a framework without an adapter.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; expected one of {ESTIMATORS}")
    with recorded(
        model, batches, forward=forward, progress=progress, task="recalibrate",
        allow_no_batches=communicator is not None,
    ) as (sites, parts):  # fmt: skip
        if communicator is None:
            estimates = {name: layer_statistics(site, parts[name], estimator) for name, site in sites.items()}
            merged = {name: pooled_moments(site, parts[name]) for name, site in sites.items()}
        else:
            both = {
                name: _distributed_statistics(site, parts[name], estimator, communicator)
                for name, site in sites.items()
            }
            estimates = {name: value[0] for name, value in both.items()}
            merged = {name: value[1] for name, value in both.items()}
        for name, site in sites.items():
            site.commit(*estimates[name])
        return merged
