r"""One tolerance policy, derived from machine epsilon.

Every backend is compared with the float64 reference (:mod:`normkit.reference`) computed on
exactly the same inputs. For an output ``y`` in storage dtype ``d`` computed in compute dtype
``c`` (float32, or float64 for float64 input):

.. math::

   |y_b - y_{ref}| \le r\,|y_{ref}| + r + K\,\Delta, \qquad r = \epsilon_d + 64\,\epsilon_c ,

* :math:`\epsilon_d` covers the final rounding to the storage dtype;
* :math:`64\,\epsilon_c` covers rounding inside a reasonable algorithm (reductions of up to
  millions of terms in pairwise, blocked or float64 accumulation);
* :math:`\Delta` is the conditioning of the case itself: how far the exact output moves when
  every input is perturbed by one unit in the last place of the compute dtype,
  :math:`x(1 + \epsilon_c u)`, :math:`u \in [-1, 1]`. A backward-stable algorithm cannot do
  better, so an ill-conditioned case (a mean offset of :math:`10^4\sigma`) is judged by what
  its conditioning allows, while :math:`E[x^2]-E[x]^2`, which is not backward stable, still
  fails by orders of magnitude. ``K = 8``.

Normalization ignores a common shift of its group, so no perturbation of the data models the
rounding of the mean an algorithm subtracts; yet the spec allows a two-pass algorithm in the
compute dtype, whose mean is only known to :math:`\epsilon_c|\mu|` (and ATen-style fused
``x*a + (b - mu*a)`` rounds ``mu*a`` likewise). The runner therefore adds
:math:`2\,\epsilon_c\,|\mu|\,|\gamma|/\sqrt{\sigma^2+\epsilon}` per element
(:data:`CENTERING_FACTOR` is the 2; the running statistics take the place of μ and σ² in eval).
For a group of two or three values that term dominates; for large groups the perturbation
term already covers it. :math:`E[x^2]-E[x]^2` loses
:math:`\epsilon_c\,\mu^2/\sigma^2`, a factor :math:`|\mu|/\sigma` more, and still fails.

Running statistics are stored in float32 (float64 for float64 input), so their epsilon
:math:`\epsilon_s` equals :math:`\epsilon_c`; each update rounds once:

.. math::

   |s_b - s_{ref}| \le 64\,\epsilon_s\,|s_{ref}| + a_s + K\,\Delta ,

with :math:`a_s = 64\,\epsilon_c M` for the mean and :math:`a_s = (16\,\epsilon_c M)^2` for the
variance, where ``M`` is the largest input magnitude seen (a float32 mean of data at
:math:`10^4` is only known to :math:`\epsilon_c \cdot 10^4`, and its error enters the variance
squared).

Tests that compare two implementations with each other, rather than one with the reference,
derive their tolerances from the same epsilons (a picked constant breaks on the next CPU):

* one normalization call, two implementations: each is within the bound above of the exact
  value, so they agree within twice it (:func:`agreement_tolerance`, :meth:`Tolerance.pairwise`);
* a model trained side by side for ``K`` steps: every step rounds its reductions of ``N`` terms
  in its own order, about :math:`\sqrt{N}\,\epsilon_c` of what they sum
  (:func:`reduction_growth`), and the steps add up (:func:`training_tolerance`);
* a gradient against central differences of the reference: truncation plus rounding
  (:func:`central_difference_error`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "CENTERING_FACTOR",
    "CONDITIONING_FACTOR",
    "EPS",
    "Tolerance",
    "agreement_tolerance",
    "assert_within",
    "centering_gain",
    "central_difference_error",
    "central_differences",
    "compute_dtype",
    "normalization_gradient_tolerances",
    "normalized_by",
    "output_tolerance",
    "reduction_growth",
    "statistics_effect",
    "statistics_tolerance",
    "training_tolerance",
]

EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
"""Machine epsilon (spacing of 1.0 to the next value) per dtype name."""

CONDITIONING_FACTOR = 8.0
"""``K``: how many times the case's own conditioning a backend may lose."""

CENTERING_FACTOR = 2.0
r"""How many units of :math:`\epsilon_c|\mu|` the mean a backend subtracts may be off by (ATen's
float32 two-pass needs at most 0.6 on groups of two to sixteen values)."""


def compute_dtype(dtype: str) -> str:
    """The spec's compute dtype for an input dtype."""
    return "float64" if dtype == "float64" else "float32"


@dataclass(frozen=True)
class Tolerance:
    """``|got - ref| <= rtol*|ref| + atol + K*conditioning`` elementwise."""

    rtol: float
    atol: float

    def bound(self, reference: np.ndarray, conditioning: float) -> np.ndarray:
        return self.rtol * np.abs(reference) + self.atol + CONDITIONING_FACTOR * conditioning

    def pairwise(self) -> Tolerance:
        """The tolerance between two results that are each within this one of the exact value:
        twice it, by the triangle inequality (to first order: ``|ref|`` and ``|b|`` differ by
        ``rtol*|ref|``)."""
        return Tolerance(rtol=2 * self.rtol, atol=2 * self.atol)

    @property
    def kwargs(self) -> dict[str, float]:
        """``{"rtol": ..., "atol": ...}``, for ``numpy.testing.assert_allclose`` and
        ``torch.testing.assert_close``, which check ``|got - expected| <= atol + rtol*|expected|``."""
        return {"rtol": self.rtol, "atol": self.atol}


def output_tolerance(dtype: str, *, centering_gain: float = 0.0) -> Tolerance:
    r"""Tolerance for a normalized output of the given input dtype; with ``centering_gain``
    :math:`g = \max|\mu|\,|\gamma|/\sqrt{\sigma^2+\epsilon}` (over the groups, for the statistics
    used), the centering term :math:`2\,\epsilon_c\,g` joins ``atol`` (the runner adds it per
    element instead)."""
    r = EPS[dtype] + 64 * EPS[compute_dtype(dtype)]
    return Tolerance(rtol=r, atol=r + CENTERING_FACTOR * EPS[compute_dtype(dtype)] * centering_gain)


def statistics_tolerance(dtype: str, statistic: str, magnitude: float) -> Tolerance:
    """Tolerance for a running statistic (``"mean"`` or ``"var"``) after training on inputs
    of the given dtype whose largest magnitude is ``magnitude``."""
    eps_c = EPS[compute_dtype(dtype)]  # also the stored statistics' dtype (float32, or float64)
    atol = 64 * eps_c * magnitude if statistic == "mean" else (16 * eps_c * magnitude) ** 2
    return Tolerance(rtol=64 * eps_c, atol=atol)


def centering_gain(mean: object, var: object, eps: float, weight: object = None) -> float:
    r""":math:`\max|\mu|\,|\gamma|/\sqrt{\sigma^2+\epsilon}` over the groups, for
    :func:`output_tolerance` and :func:`agreement_tolerance`: how far an output moves per unit of
    relative error in the mean subtracted (``mean``, ``var`` and ``weight`` broadcast together;
    ``weight=None`` is γ = 1)."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    gamma = 1.0 if weight is None else np.abs(np.asarray(weight, np.float64))
    return float(np.max(np.abs(mean) * gamma / np.sqrt(var + eps)))


def agreement_tolerance(dtype: str, *, centering_gain: float = 0.0) -> Tolerance:
    r"""Tolerance between two implementations of one normalization call on the same input of the
    given dtype (normkit against ``torch.nn`` or Keras, or two backends).

    Each is held by the suite to :math:`r|y| + r` of the exact value plus the centering term
    :math:`2\,\epsilon_c\,g` (:data:`CENTERING_FACTOR`), with ``centering_gain``
    :math:`g = \max|\mu|\,|\gamma| / \sqrt{\sigma^2+\epsilon}` over the groups (for the statistics
    used: batch or running); so the two agree within twice that:

    .. math::

       |a - b| \le 2r\,|b| + 2r + 2 \cdot 2\,\epsilon_c\,g .

    The conditioning term of :meth:`Tolerance.bound` is left out: it is below the others unless
    the data sits thousands of σ from 0, where a test should measure it as the runner does."""
    return output_tolerance(dtype, centering_gain=centering_gain).pairwise()


def statistics_effect(
    x: object,
    mean: object,
    var: object,
    eps: float,
    weight: object = None,
    *,
    mean_error: object,
    var_error: object,
) -> np.ndarray:
    r"""How far an output normalized with the statistics ``mean`` and ``var`` moves, to first
    order, when they are off by up to ``mean_error`` and ``var_error``: for an eval output
    computed by two implementations from their own running statistics, whose difference is
    bounded by :func:`statistics_tolerance` (:meth:`Tolerance.pairwise`). With
    :math:`s = \sqrt{\sigma^2+\epsilon}` and :math:`\hat x = (x - \mu)/s`, since
    :math:`\partial y/\partial\mu = -\gamma/s` and
    :math:`\partial y/\partial\sigma^2 = -\gamma\hat x/(2s^2)`:

    .. math::

       |\Delta y| \le \frac{|\gamma|}{s}\,\delta_\mu + \frac{|\gamma\,\hat x|}{2s^2}\,\delta_{\sigma^2}

    elementwise (every argument broadcast against ``x``; ``weight=None`` is γ = 1)."""
    x, mean, var = (np.asarray(a, np.float64) for a in (x, mean, var))
    gamma = 1.0 if weight is None else np.abs(np.asarray(weight, np.float64))
    s = np.sqrt(var + eps)
    xhat = np.abs(x - mean) / s
    return gamma / s * np.asarray(mean_error) + gamma * xhat / (2 * s**2) * np.asarray(var_error)


def reduction_growth(terms: int) -> float:
    r""":math:`\sqrt{n}`: the rounding error of a float sum of ``n`` terms, in units of
    :math:`\epsilon\sum|t_i|`.

    Recursive summation is off by :math:`(n-1)\,\epsilon\sum|t_i|` only when every rounding error
    has the same sign; rounding errors behave as independent zero-mean variables, so the error
    grows as :math:`\lambda\sqrt{n}\,\epsilon\sum|t_i|` with :math:`\lambda` of order one (Higham
    and Mary, *A new approach to probabilistic rounding error analysis*, SIAM J. Sci. Comput. 41,
    2019); a blocked (vectorized) sum of ``w`` lanes is recursive over :math:`n/w` terms per lane,
    and pairwise summation stays within :math:`\lceil\log_2 n\rceil\,\epsilon` even in the worst
    case. Two implementations that sum in different orders (other kernels, another vector
    width) differ by at most the sum of their errors. Independent reductions along one
    computation add their errors in quadrature, so for a chain of them ``n`` is the total number
    of terms summed.

    This is an estimate, not a bound: Higham and Mary bound the error by
    :math:`\lambda\sqrt{n}\,\epsilon\sum|t_i|` with probability at least
    :math:`1 - 2\exp(-\lambda^2/2)`, which says nothing at :math:`\lambda = 1`. The tolerances
    built on it keep a margin instead: they add contributions linearly that add in quadrature
    (:math:`\sqrt K` over K training steps, :math:`\sqrt 2` or more for the several reductions
    of one evaluation), and they are checked against measured errors, which sit below 0.2 of
    them in the tests that use them."""
    return math.sqrt(max(int(terms), 1))


def training_tolerance(dtype: str, *, steps: int, reduction_size: int, scale: float) -> Tolerance:
    r"""Tolerance between two implementations of one model trained side by side on the same data
    for ``steps`` optimizer steps and then evaluated once (``steps=0``: one forward pass).

    *One step.* A forward pass, a backward pass and the update round in every reduction. Where
    two implementations sum in different orders their results differ by about
    :math:`\sqrt{N}\,\epsilon_c` times the magnitudes summed (:func:`reduction_growth`), with
    ``reduction_size`` :math:`N` the number of terms summed along the step: every reduction on
    the path from the input to the loss and back. The update :math:`\theta - \eta g` rounds once
    more, by :math:`\epsilon_c|\theta|`.

    *K steps.* Each step's difference is carried in the weights into every later step. At a
    learning rate inside the stable range, for a few steps, a carried difference is not amplified
    (it grows by at most :math:`(1 + \eta\lVert H\rVert)^K`, close to 1 there, with :math:`H` the
    loss's Hessian), so the differences add up: one per step, plus one for the forward pass whose
    results are compared:

    .. math::

       |a - b| \le r\,(|b| + s), \qquad r = \epsilon_d + (K + 1)\sqrt{N}\,\epsilon_c ,

    with :math:`\epsilon_d` the final rounding to the storage dtype and ``scale`` :math:`s` what
    the rounding is relative to:

    * for an output (a prediction, an activation), its largest magnitude;
    * for weights, the largest change one step made to a weight, :math:`\eta\max|g|`: a
      gradient's rounding is relative to the terms it sums, not to its value, and the update
      carries it into the weight; a weight whose exact gradient cancels (a bias just before a
      normalization) moves by such rounding only.

    Rounding errors favour neither sign, so summing the steps linearly over-covers by about
    :math:`\sqrt{K}`. A semantic difference (another eps, momentum or variance estimator) moves
    results by orders of magnitude more than :math:`r`; the tests that use this check that it
    still fails them."""
    if steps < 0:
        raise ValueError(f"steps={steps!r}: expected a count >= 0")
    r = EPS[dtype] + (steps + 1) * reduction_growth(reduction_size) * EPS[compute_dtype(dtype)]
    return Tolerance(rtol=r, atol=r * scale)


def central_difference_error(
    *,
    step: float,
    value_error: float,
    third_derivative: float | np.ndarray = 0.0,
    argument: float | np.ndarray = 0.0,
    derivative: float | np.ndarray = 0.0,
    dtype: str = "float64",
) -> float | np.ndarray:
    r"""The largest error of the central difference :math:`D = (f(a+h) - f(a-h)) / 2h`, evaluated
    in ``dtype`` with ``step`` :math:`h`, as an estimate of :math:`f'(a)`:

    .. math::

       |D - f'(a)| \le \frac{h^2}{6} M_3 + \frac{E}{h} + \frac{\epsilon\,|a|\,|f'(a)|}{h} .

    * *Truncation.* Taylor's theorem gives :math:`f(a \pm h) = f \pm h f' + \tfrac{h^2}{2} f''
      \pm \tfrac{h^3}{6} f^{(3)}(\xi_\pm)`, so :math:`D - f' = \tfrac{h^2}{12}(f^{(3)}(\xi_+) +
      f^{(3)}(\xi_-))`: at most :math:`h^2 M_3 / 6`, with ``third_derivative``
      :math:`M_3 \ge |f^{(3)}|` within ``h`` of ``a`` (0 where ``f`` is affine in ``a``).
    * *Rounding of f.* Each evaluation is off by at most ``value_error`` :math:`E`, their
      difference by :math:`2E`, which is divided by :math:`2h`.
    * *Rounding of the argument.* :math:`a + h` and :math:`(a + h) - 2h` are each stored within
      :math:`\epsilon|a|/2` (twice that for the second), so the step taken is off by up to
      :math:`\tfrac32\epsilon|a|` of :math:`2h`, a relative error below :math:`\epsilon|a|/h` of
      :math:`f'` (``argument`` :math:`|a|`, ``derivative`` :math:`|f'(a)|`).

    The step that minimizes the sum balances the first two terms: :math:`h = (3E/M_3)^{1/3}`."""
    eps = EPS[dtype]
    truncation = step**2 / 6 * np.abs(third_derivative)
    return truncation + value_error / step + eps * np.abs(argument) * np.abs(derivative) / step


class NormalizedBy(NamedTuple):
    """What each element of ``x`` is normalized with, broadcast against ``x`` (float64)."""

    mean: np.ndarray
    std: np.ndarray
    r""":math:`\sqrt{\sigma^2 + \epsilon}`."""
    weight: np.ndarray
    bias: np.ndarray
    batch_statistics: bool
    """Whether the statistics are the input's own (they then depend on ``x``)."""


def normalized_by(
    op: str,
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    axis: int | tuple[int, ...],
    training: bool,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    eps: float,
) -> NormalizedBy:
    """The statistics and affine of one ``batch_norm``, ``instance_norm`` (``axis``: the channel
    axis; ``training`` False: the running statistics) or ``layer_norm`` (``axis``: the
    normalized axes) call, for :func:`normalization_gradient_tolerances` and
    :func:`centering_gain`."""
    x = np.asarray(x, dtype=np.float64)
    param_axes = tuple(axis) if op == "layer_norm" else (axis,)  # type: ignore[arg-type]
    shape = [1] * x.ndim
    for a, size in zip(param_axes, np.shape(weight), strict=True):
        shape[a] = size
    weight, bias = np.reshape(weight, shape), np.reshape(bias, shape)
    if op != "layer_norm" and not training:
        mean = np.reshape(np.asarray(running_mean, np.float64), shape)
        std = np.sqrt(np.reshape(np.asarray(running_var, np.float64), shape) + eps)
        return NormalizedBy(mean, std, weight, bias, False)
    if op == "layer_norm":
        axes = param_axes
    else:
        axes = tuple(a for a in range(x.ndim) if a != axis and (op == "batch_norm" or a != 0))
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return NormalizedBy(mean, np.sqrt(var + eps), weight, bias, True)


def central_differences(
    loss: Callable[..., float], arrays: list[np.ndarray], step: float
) -> list[np.ndarray]:
    r"""The gradient of ``loss(*arrays)`` with respect to each array by central differences,
    :math:`(L(a + h e_i) - L(a - h e_i)) / 2h` in float64, with ``h = step``: the numeric side
    of :func:`normalization_gradient_tolerances`."""
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for position in np.ndindex(array.shape):
            shifted = [a.copy() for a in arrays]
            shifted[index][position] += step
            up = loss(*shifted)
            shifted[index][position] -= 2 * step
            grad[position] = (up - loss(*shifted)) / (2 * step)
        grads.append(grad)
    return grads


def normalization_gradient_tolerances(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    upstream: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    batch_statistics: bool,
    step: float,
) -> list[tuple[float, float]]:
    r"""``(rtol, atol)`` for the gradients of :math:`L = \sum g\,y` with respect to ``x``,
    ``weight`` and ``bias`` estimated by float64 central differences with ``step`` :math:`h`,
    where :math:`y = \gamma (x - \mu)/s + \beta` (all broadcast to ``x``; ``upstream`` is ``g``,
    ``std`` is :math:`s = \sqrt{\sigma^2 + \epsilon}`), from :func:`central_difference_error`:

    * :math:`E`, the rounding of one evaluation of L: the statistics (two sums of at most
      :math:`N` = ``x.size`` terms, :math:`\sqrt N\epsilon` each of what they sum), four
      elementwise steps, the products with g and the loss's sum (:math:`\sqrt N\epsilon`) leave
      at most :math:`(2\sqrt N + 6)\,\epsilon\sum|g|\,(|\gamma|(1 + |\hat x| + |\mu|/s) + |\beta|)`.
    * :math:`M_3`: L is affine in γ and β (no truncation error there) and, with running
      statistics, in x. With batch statistics, along one element t of x,
      :math:`L = (P + Qt)/s(t)` with :math:`s(t)^2` quadratic in t; differentiating
      :math:`1/s(t)` and using :math:`|\hat x| \le \sqrt n` gives
      :math:`|\partial^3 L/\partial t^3| \le 48\max|g\gamma|/s^3`.
    * The argument's rounding, :math:`\epsilon|a|\,|f'|/h`: ``rtol`` (times :math:`|f'|`)."""
    eps = EPS["float64"]
    g = np.abs(upstream)
    terms = g * (np.abs(weight) * (1 + np.abs((x - mean) / std) + np.abs(mean) / std) + np.abs(bias))
    value_error = (2 * reduction_growth(x.size) + 6) * eps * float(terms.sum())
    third = 48 * g.max() * np.abs(weight).max() / std.min() ** 3 if batch_statistics else 0.0
    tolerances = []
    for array, third_derivative in ((x, third), (weight, 0.0), (bias, 0.0)):
        atol = central_difference_error(step=step, value_error=value_error, third_derivative=third_derivative)
        tolerances.append((eps * float(np.abs(array).max()) / step, float(atol)))
    return tolerances


def assert_within(error: np.ndarray, bound: np.ndarray, what: str) -> None:
    """Fail unless every ``error`` is within its ``bound`` (NaN fails), naming ``what`` and the
    worst value: its index, its error, the bound there and how many values are outside."""
    error = np.asarray(error, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), error.shape)
    outside = ~(error <= bound)
    if not outside.any():
        return
    worst = np.unravel_index(
        int(np.argmax(np.where(outside, np.nan_to_num(error - bound, nan=np.inf), -np.inf))), error.shape
    )
    raise AssertionError(
        f"{what}: {int(outside.sum())} of {error.size} values outside tolerance; worst at "
        f"{tuple(int(i) for i in worst)}: error {error[worst]:.3g}, allowed {bound[worst]:.3g}"
    )
