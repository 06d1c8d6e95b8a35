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

import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from normkit.functional.statistics import Moments, merge_moments
from normkit.testtime.sites import Recorder, Site, adapter_for

__all__ = ["ESTIMATORS", "recalibrate"]

ESTIMATORS = ("population", "batch-average")

Array = Any


def _input_of(batch: object) -> Array:
    """A batch's input: the batch itself, or the first element of a tuple or list (``(x, y)``)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _stored(site: Site, m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the variance the site's layer stores (unbiased or biased), float64 NumPy."""
    count, mean, m2 = (site.to_numpy(a) for a in m)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / (count - 1.0) if site.unbiased else m2 / count
    return mean, var


def _estimate(site: Site, parts: list[Moments], estimator: str) -> tuple[np.ndarray, np.ndarray]:
    if estimator == "population":
        return _stored(site, merge_moments(*parts))
    stored = [_stored(site, part) for part in parts]
    return np.mean([s[0] for s in stored], axis=0), np.mean([s[1] for s in stored], axis=0)


def recalibrate(
    model: object,
    batches: Iterable[object],
    *,
    forward: Callable[[Array], object] | None = None,
    estimator: str = "population",
    progress: bool = False,
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
    :param progress: print a line per batch to stderr.
    :returns: each layer's merged :class:`~normkit.Moments` over all batches, by name.
    :raises ValueError: for an unknown estimator, a model without batch norm, no batches, or a
        layer that no batch reached; any error (a batch the model refuses included) leaves the
        model exactly as it was.
    :raises TypeError: for a model of a framework without an adapter.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; expected one of {ESTIMATORS}")
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if not sites:
        raise ValueError(
            f"model is a {type(model).__name__} with no batch norm that tracks running statistics; "
            f"nothing to recalibrate"
        )
    recorders = {name: Recorder() for name in sites}
    attached: list[Site] = []
    try:
        with adapter.running(model) as default_forward:
            run = forward or default_forward
            for name, site in sites.items():
                site.attach(recorders[name])
                attached.append(site)
            seen = 0
            for seen, batch in enumerate(batches, start=1):
                run(_input_of(batch))
                if progress:
                    print(f"\rrecalibrate: batch {seen}", end="", file=sys.stderr, flush=True)
            if progress and seen:
                print(file=sys.stderr)
        if seen == 0:
            raise ValueError("batches is empty; recalibration needs at least one batch")
        silent = [name or "the layer" for name in sites if not recorders[name].parts]
        if silent:
            raise ValueError(f"no batch reached the layer(s) {silent}: forward does not call them")
        estimates = {name: _estimate(site, recorders[name].parts, estimator) for name, site in sites.items()}
    except BaseException:
        for site in attached:
            site.restore()
        raise
    for name, site in sites.items():
        site.commit(*estimates[name])
    return {name: merge_moments(*recorder.parts) for name, recorder in recorders.items()}
