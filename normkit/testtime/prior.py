r"""Prior mixing (Schneider et al. 2020) and prediction-time batch norm (Nado et al. 2020):
eval-mode batch norm with statistics mixed from the running estimates and the test batch.

For a test batch of :math:`n` samples whose per-channel mean is :math:`\mu_b` and unbiased
variance :math:`s^2_b`, every batch norm in eval mode normalizes with

.. math::

   \lambda = \frac{N}{N + n}, \qquad
   \mu = \lambda\,\mu_{\text{running}} + (1 - \lambda)\,\mu_b, \qquad
   \sigma^2 = \lambda\,\sigma^2_{\text{running}} + (1 - \lambda)\,s^2_b ,

:math:`y = \gamma(x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`, as ``bethgelab/robustness``
(``BayesianBatchNorm``) does: :math:`N` is how many samples the running estimates are worth.
:math:`N = 0` is prediction-time batch norm (each test batch's own statistics),
:math:`N = \infty` standard eval (the layers are left alone, so the outputs are bit-identical).
The batch statistics come from normkit's two-pass moments in the compute dtype (float32 for
half-precision input); the mix is taken in float64 where the backend has it. Training mode is
unchanged, and the running estimates are never updated.
"""

from __future__ import annotations

import math
from typing import Any

from normkit._registry import backend_for
from normkit.functional._arrays import mix
from normkit.functional.statistics import moments, normalize
from normkit.testtime.sites import LayerView, Site, adapter_for

__all__ = ["PriorMixing", "prior_mixed_batch_norm", "prior_mixing", "prior_weight"]

Array = Any


def _check_prior(N: object) -> float:
    if isinstance(N, bool) or not isinstance(N, (int, float)) or math.isnan(N) or N < 0:
        raise ValueError(
            f"N={N!r}: expected a number >= 0 (the samples the running statistics are worth; "
            f"0 for prediction-time batch norm, math.inf for standard eval)"
        )
    return float(N)


def prior_weight(N: float, n: int) -> float:
    r""":math:`\lambda = N/(N + n)`, the running statistics' share for a batch of ``n`` samples
    (1 for :math:`N = \infty`)."""
    return 1.0 if math.isinf(N) else N / (N + n)


def prior_mixed_batch_norm(x: Array, view: LayerView, N: float) -> Array:
    """Normalize ``x`` (batch on axis 0, channels on ``view.axis``) with the statistics mixed
    from ``view``'s running estimates and ``x``'s own (see the module docstring), on ``x``'s
    backend.

    :raises ValueError: for a batch with one value per channel while the batch's share
        :math:`1-\\lambda` is positive: its unbiased variance is undefined.
    """
    shape = tuple(x.shape)
    n = int(shape[0])
    weight = prior_weight(N, n)
    per_channel = math.prod(shape) // max(int(shape[view.axis]), 1)
    if per_channel < 2 and weight < 1.0:
        raise ValueError(
            f"x has shape {shape}: {per_channel} value per channel, whose unbiased variance is undefined; "
            f"prior mixing with N={N} needs at least 2 values per channel in a test batch"
        )
    batch = moments(x, axis=view.axis)
    info = backend_for(x).info
    mean = mix(info, view.running_mean, batch.mean, 1.0 - weight)
    var = mix(info, view.running_var, batch.var(unbiased=True), 1.0 - weight)
    return normalize(x, mean, var, view.weight, view.bias, eps=view.eps, axis=view.axis)


class PriorMixing:
    """Prior mixing active on a model's batch norms: undone by :meth:`remove` or on leaving a
    ``with`` block."""

    def __init__(self, sites: dict[str, Site], N: float) -> None:
        self.N, self._sites = N, sites

    @property
    def active(self) -> bool:
        return any(site.substituted for site in self._sites.values())

    def remove(self) -> None:
        """Put every layer's own eval back (idempotent)."""
        for site in self._sites.values():
            site.substitute(None)

    def __enter__(self) -> PriorMixing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PriorMixing(N={self.N}, layers={list(self._sites)}, active={self.active})"


def prior_mixing(model: object, N: float) -> PriorMixing:
    r"""Make every batch norm of ``model`` normalize, in eval mode, with
    :math:`\lambda\,\text{running} + (1-\lambda)\,\text{batch}` statistics,
    :math:`\lambda = N/(N+n)` for a test batch of :math:`n` samples (module docstring).

    Reversible: use the result as a context manager (``with prior_mixing(model, 16): ...``) or
    call its ``remove()``.

    :param model: a PyTorch module, a Keras model, or normkit :class:`~normkit.BatchNorm` layers
        (as for :func:`~normkit.testtime.recalibrate`); the layers must be in eval mode to mix.
    :param N: the samples the running statistics are worth, ``>= 0``; ``0`` is prediction-time
        batch norm, ``math.inf`` standard eval.
    :raises ValueError: for ``N`` not a number ``>= 0``, a model without batch norm with running
        statistics, or one where prior mixing is active already; the model is unchanged.
    """
    N = _check_prior(N)
    adapter = adapter_for(model)
    sites = {name: site for name, site in adapter.sites(model).items() if not site.per_instance}
    if not sites:
        raise ValueError(
            f"model is a {type(model).__name__} with no batch norm that tracks running statistics; "
            f"nothing to mix"
        )
    busy = [name or "the layer" for name, site in sites.items() if site.substituted]
    if busy:
        raise ValueError(f"prior mixing is active already on {busy}: remove() it first")
    if not math.isinf(N):
        for site in sites.values():
            site.substitute(lambda x, view: prior_mixed_batch_norm(x, view, N))
    return PriorMixing(sites, N)
