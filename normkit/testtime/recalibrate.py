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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from normkit.functional.statistics import Moments, merge_moments, moments
from normkit.layers.channel_norm import BatchNorm

__all__ = ["ESTIMATORS", "recalibrate"]

ESTIMATORS = ("population", "batch-average")

Array = Any


def find_batch_norms(model: object) -> dict[str, BatchNorm]:
    """The :class:`~normkit.BatchNorm` layers with running statistics in ``model``: the layer
    itself, the values of a mapping, the items of a list or tuple, or an object's attributes, one
    level deep, by name (``"0"``, ``"conv_bn"``)."""
    if isinstance(model, BatchNorm):
        found: dict[str, Any] = {"": model}
    elif isinstance(model, Mapping):
        found = {str(k): v for k, v in model.items()}
    elif isinstance(model, (list, tuple)):
        found = {str(i): v for i, v in enumerate(model)}
    else:
        found = dict(vars(model)) if hasattr(model, "__dict__") else {}
    return {
        name: layer
        for name, layer in found.items()
        if isinstance(layer, BatchNorm) and layer.track_running_stats
    }


def _input_of(batch: object) -> Array:
    """A batch's input: the batch itself, or the first element of a tuple or list (``(x, y)``)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@dataclass
class _Recorder:
    """The moments of one layer's input, batch by batch."""

    parts: list[Moments] = field(default_factory=list)

    def __call__(self, x: Array, axis: int, mask: Array | None) -> None:
        self.parts.append(moments(x, axis=axis, mask=mask))


def _stored(layer: BatchNorm, m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the variance this layer stores (unbiased or biased), as float64 NumPy arrays."""
    info = layer._state_backend.info if layer._state_backend is not None else None
    to_numpy = info.to_numpy if info is not None else np.asarray
    count = np.asarray(to_numpy(m.count), np.float64)
    mean = np.asarray(to_numpy(m.mean), np.float64)
    m2 = np.asarray(to_numpy(m.m2), np.float64)
    unbiased = layer.running_var_estimator == "unbiased"
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / (count - 1.0) if unbiased else m2 / count
    return mean, var


def _estimate(layer: BatchNorm, parts: list[Moments], estimator: str) -> tuple[np.ndarray, np.ndarray]:
    if estimator == "population":
        return _stored(layer, merge_moments(*parts))
    stored = [_stored(layer, part) for part in parts]
    return np.mean([s[0] for s in stored], axis=0), np.mean([s[1] for s in stored], axis=0)


def recalibrate(
    model: object,
    batches: Iterable[object],
    *,
    forward: Callable[[Array], object],
    estimator: str = "population",
    progress: bool = False,
) -> dict[str, Moments]:
    """Set every batch norm's running statistics to the statistics of its input over ``batches``.

    :param model: normkit :class:`~normkit.BatchNorm` layers with running statistics: one layer,
        a list, tuple or mapping of them, or an object holding them as attributes.
    :param batches: arrays, or tuples/lists whose first element is the input (a data loader).
    :param forward: called with each batch's input; it runs the computation that calls the
        layers (other layers, such as dropout, are the caller's to put in eval mode).
    :param estimator: ``"population"`` (exact pooled statistics) or ``"batch-average"``
        (``update_bn``'s average of per-batch statistics); see the module docstring.
    :param progress: print a line per batch to stderr.
    :returns: each layer's merged :class:`~normkit.Moments` over all batches, by name.
    :raises ValueError: for an unknown estimator, a model without batch norm, no batches, a layer
        that no batch reached, or a batch the layers refuse (the layers are then unchanged).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; expected one of {ESTIMATORS}")
    layers = find_batch_norms(model)
    if not layers:
        raise ValueError(
            f"model is a {type(model).__name__} with no normkit BatchNorm that tracks running statistics; "
            f"nothing to recalibrate"
        )
    saved = {name: (layer.training, layer._state, layer._state_backend) for name, layer in layers.items()}
    recorders = {name: _Recorder() for name in layers}
    seen = 0
    try:
        for name, layer in layers.items():
            layer._input_observers = (recorders[name],)
            layer.train()
        for seen, batch in enumerate(batches, start=1):
            forward(_input_of(batch))
            if progress:
                print(f"\rrecalibrate: batch {seen}", end="", file=sys.stderr, flush=True)
        if progress and seen:
            print(file=sys.stderr)
        if seen == 0:
            raise ValueError("batches is empty; recalibration needs at least one batch")
        silent = [name or type(layers[name]).__name__ for name in layers if not recorders[name].parts]
        if silent:
            raise ValueError(f"no batch reached the layer(s) {silent}: forward does not call them")
        estimates = {name: _estimate(layers[name], recorders[name].parts, estimator) for name in layers}
    except BaseException:
        for name, layer in layers.items():
            layer.training, layer._state, layer._state_backend = saved[name]
            layer._input_observers = ()
        raise
    result = {}
    for name, layer in layers.items():
        training, state, backend = saved[name]
        layer._input_observers = ()
        layer.training = training
        layer._state_backend = backend or layer._state_backend
        if state is None:  # created by the first recorded call: as if never trained
            state = layer._state.replace(num_batches_tracked=0)
        info = layer._state_backend.info
        like = state.running_mean
        dtype = info.dtype_name(like)
        mean, var = estimates[name]
        layer._state = state.replace(
            running_mean=info.asarray(mean, dtype, info.device(like)),
            running_var=info.asarray(var, dtype, info.device(like)),
        )
        result[name] = merge_moments(*recorders[name].parts)
    return result
