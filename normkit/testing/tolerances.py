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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CENTERING_FACTOR",
    "CONDITIONING_FACTOR",
    "EPS",
    "Tolerance",
    "compute_dtype",
    "output_tolerance",
    "statistics_tolerance",
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


def output_tolerance(dtype: str) -> Tolerance:
    """Tolerance for a normalized output of the given input dtype."""
    r = EPS[dtype] + 64 * EPS[compute_dtype(dtype)]
    return Tolerance(rtol=r, atol=r)


def statistics_tolerance(dtype: str, statistic: str, magnitude: float) -> Tolerance:
    """Tolerance for a running statistic (``"mean"`` or ``"var"``) after training on inputs
    of the given dtype whose largest magnitude is ``magnitude``."""
    eps_c = EPS[compute_dtype(dtype)]  # also the stored statistics' dtype (float32, or float64)
    atol = 64 * eps_c * magnitude if statistic == "mean" else (16 * eps_c * magnitude) ** 2
    return Tolerance(rtol=64 * eps_c, atol=atol)
