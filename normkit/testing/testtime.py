r"""Oracles for the test-time tools (:mod:`normkit.testtime`), written independently of them
in float64 NumPy, with the bounds a float32 implementation must meet.

Prior mixing of one batch-norm layer (Schneider et al. 2020): for a test batch of :math:`n`
samples, :math:`\lambda = N/(N+n)` (1 for :math:`N=\infty`),
:math:`\mu = \lambda\mu_r + (1-\lambda)\bar x`,
:math:`\sigma^2 = \lambda\sigma^2_r + (1-\lambda)s^2` with :math:`s^2` the unbiased batch
variance, and :math:`y = \gamma(x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta`.
"""

from __future__ import annotations

import math

import numpy as np

from normkit.testing.tolerances import EPS, output_tolerance, statistics_effect, statistics_tolerance

__all__ = ["prior_mixed_reference", "prior_mixing_bound"]


def _per_channel(array: np.ndarray | None, ndim: int, axis: int, default: float) -> np.ndarray:
    if array is None:
        return np.asarray(default)
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(array, np.float64).reshape(shape)


def prior_mixed_reference(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    *,
    eps: float,
    axis: int,
    N: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, mean, var)`` of prior mixing in float64: the output, and the mixed statistics
    (per channel), from the layer's arrays and a batch ``x`` with samples on axis 0."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    reduced = tuple(a for a in range(x.ndim) if a != axis)
    lam = 1.0 if math.isinf(N) else N / (N + x.shape[0])
    batch_mean = x.mean(axis=reduced)
    batch_var = x.var(axis=reduced, ddof=1) if lam < 1.0 else np.zeros_like(batch_mean)
    mean = lam * np.asarray(running_mean, np.float64) + (1 - lam) * batch_mean
    var = lam * np.asarray(running_var, np.float64) + (1 - lam) * batch_var
    y = (x - _per_channel(mean, x.ndim, axis, 0.0)) / np.sqrt(_per_channel(var, x.ndim, axis, 0.0) + eps)
    return _per_channel(weight, x.ndim, axis, 1.0) * y + _per_channel(bias, x.ndim, axis, 0.0), mean, var


def prior_mixing_bound(
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weight: np.ndarray | None,
    *,
    eps: float,
    axis: int,
    N: float,
    dtype: str = "float32",
) -> np.ndarray:
    r"""Elementwise bound on ``|y_impl - y|`` for an implementation in ``dtype`` (``y``,
    ``mean``, ``var``: :func:`prior_mixed_reference`'s).

    Three sources, each from the dtype's epsilon: the batch statistics, computed in the compute
    dtype (:func:`~normkit.testing.tolerances.statistics_tolerance` for data of ``x``'s
    magnitude), enter with the batch's share :math:`1-\lambda`; the mixed statistics are stored
    in the running statistics' dtype (one rounding, :math:`\epsilon|\mu|`, :math:`\epsilon\sigma^2`);
    their effect on the output follows
    :func:`~normkit.testing.tolerances.statistics_effect`. The normalization with the mixed
    statistics is then one normalization call (:func:`~normkit.testing.tolerances.output_tolerance`
    with the centering term for :math:`\mu`)."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    lam = 1.0 if math.isinf(N) else N / (N + x.shape[0])
    magnitude = float(np.abs(x).max())
    eps_s = EPS["float64" if dtype == "float64" else "float32"]
    mean_tol = statistics_tolerance(dtype, "mean", magnitude)
    var_tol = statistics_tolerance(dtype, "var", magnitude)
    mean_error = (1 - lam) * (mean_tol.rtol * np.abs(mean) + mean_tol.atol) + eps_s * np.abs(mean)
    var_error = (1 - lam) * (var_tol.rtol * np.abs(var) + var_tol.atol) + eps_s * np.abs(var)
    per_channel = {
        name: _per_channel(value, x.ndim, axis, 0.0)
        for name, value in (
            ("mean", mean),
            ("var", var),
            ("mean_error", mean_error),
            ("var_error", var_error),
        )
    }
    gamma = None if weight is None else _per_channel(weight, x.ndim, axis, 1.0)
    effect = statistics_effect(
        x, per_channel["mean"], per_channel["var"], eps, gamma,
        mean_error=per_channel["mean_error"], var_error=per_channel["var_error"],
    )  # fmt: skip
    gain = np.abs(per_channel["mean"]) * (1.0 if gamma is None else np.abs(gamma))
    gain = gain / np.sqrt(per_channel["var"] + eps)
    tolerance = output_tolerance(dtype, centering_gain=float(np.max(gain)))
    return tolerance.rtol * np.abs(y) + tolerance.atol + effect
