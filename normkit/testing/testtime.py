r"""Oracles for the test-time tools (:mod:`normkit.testtime`), written independently of them
in float64 NumPy, with the bounds a float32 implementation must meet.

Prior mixing of one batch-norm layer (Schneider et al. 2020): for a test batch of :math:`n`
samples, :math:`\lambda = N/(N+n)` (1 for :math:`N=\infty`),
:math:`\mu = \lambda\mu_r + (1-\lambda)\bar x`,
:math:`\sigma^2 = \lambda\sigma^2_r + (1-\lambda)s^2` with :math:`s^2` the unbiased batch
variance, and :math:`y = \gamma(x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta`.

Shift diagnosis of one layer (:mod:`normkit.testtime.diagnose`): from the layer's input values,
:math:`\mu_d` and :math:`\sigma^2_d` (with ``ddof`` 1 or 0, the layer's variance convention),
and its running :math:`\mu_r, \sigma^2_r`: :math:`z = (\mu_d-\mu_r)/\sqrt{\sigma^2_r+\epsilon}`,
:math:`r = (\sigma^2_d+\epsilon)/(\sigma^2_r+\epsilon)`, :math:`\ell = \log r`,
:math:`KL = \tfrac12(r + (\mu_d-\mu_r)^2/(\sigma^2_r+\epsilon) - 1 - \log r)`.

Batch-norm folding (:mod:`normkit.testtime.fold`): a layer computing :math:`Wx + b` followed by
a batch norm in eval equals the layer with :math:`W' = sW`, :math:`b' = s(b - \mu) + \beta`,
:math:`s = \gamma/\sqrt{\sigma^2+\epsilon}` (per output channel); the two computations differ
only by rounding, bounded by :func:`folding_bound`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from normkit.testing.tolerances import (
    EPS,
    assert_within,
    output_tolerance,
    reduction_growth,
    statistics_effect,
    statistics_tolerance,
)

if TYPE_CHECKING:
    from normkit.testtime.diagnose import LayerShift

__all__ = [
    "ELEMENTWISE_ROUNDINGS",
    "SHIFT_KEYS",
    "assert_shift_matches",
    "folding_bound",
    "folding_offset",
    "prior_mixed_reference",
    "prior_mixing_bound",
    "shift_bounds",
    "shift_reference",
]


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


SHIFT_KEYS = ("data_mean", "data_var", "z", "log_ratio", "kl")
"""The per-channel values of a :class:`~normkit.testtime.diagnose.LayerShift` the shift oracle
computes and bounds."""


def shift_reference(
    values: np.ndarray, running_mean: Any, running_var: Any, eps: float, *, ddof: int
) -> dict[str, np.ndarray]:
    r"""The textbook float64 shift statistics of one layer from its input ``values`` (samples,
    channels) and its running statistics, the data variance with ``ddof`` (1: the layer stores
    the unbiased variance, 0: the biased one): ``data_mean`` :math:`\mu_d`, ``data_var``
    :math:`\sigma^2_d`, ``z`` :math:`= (\mu_d-\mu_r)/\sqrt{\sigma^2_r+\epsilon}`, ``ratio``
    :math:`r = (\sigma^2_d+\epsilon)/(\sigma^2_r+\epsilon)`, ``log_ratio`` :math:`\ell = \log r`,
    ``kl`` :math:`= \tfrac12(r + (\mu_d-\mu_r)^2/(\sigma^2_r+\epsilon) - 1 - \log r)`."""
    values = np.asarray(values, np.float64)
    mu_r, var_r = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    mu_d, var_d = values.mean(0), values.var(0, ddof=ddof)
    ratio = (var_d + eps) / (var_r + eps)
    kl = 0.5 * (ratio + (mu_d - mu_r) ** 2 / (var_r + eps) - 1.0 - np.log(ratio))
    z = (mu_d - mu_r) / np.sqrt(var_r + eps)
    return {
        "data_mean": mu_d,
        "data_var": var_d,
        "z": z,
        "log_ratio": np.log(ratio),
        "kl": kl,
        "ratio": ratio,
    }


def shift_bounds(
    magnitude: float,
    data_mean: Any,
    data_var: Any,
    running_var: Any,
    eps: float,
    *,
    z: Any,
    log_ratio: Any,
) -> dict[str, np.ndarray]:
    r"""How far diagnose's values may be from exact ones (``z``, ``log_ratio`` at the data
    statistics ``data_mean``, ``data_var``): its data statistics come from float32 moments per
    batch (merged in float64), off by up to
    :func:`~normkit.testing.tolerances.statistics_tolerance` like a stored running statistic
    (inputs up to ``magnitude``), :math:`\delta_\mu` and :math:`\delta_{\sigma^2}`; that error
    propagates, exactly bounded, with :math:`s_r = \sqrt{\sigma^2_r+\epsilon}`:

    * :math:`|\Delta z| \le \delta_\mu / s_r`;
    * :math:`|\Delta\ell| \le \delta_{\sigma^2}/(\sigma^2_d + \epsilon - \delta_{\sigma^2})`
      (log's slope);
    * KL :math:`= \tfrac12 z^2 + \tfrac12(e^\ell - 1 - \ell)`: the first part moves by at most
      :math:`|z|\Delta z + \tfrac12\Delta z^2`, the second by at most
      :math:`\tfrac12|e^\ell - 1|(e^{\Delta\ell} - 1) + \tfrac12(e^{\Delta\ell} - 1 - \Delta\ell)`;

    plus the float64 rounding of both computations: 16 ulps of the terms summed. Returns the
    bound for each of :data:`SHIFT_KEYS`."""
    tm, tv = (
        statistics_tolerance("float32", "mean", magnitude),
        statistics_tolerance("float32", "var", magnitude),
    )
    d_mean = tm.rtol * np.abs(data_mean) + tm.atol
    d_var = tv.rtol * np.abs(data_var) + tv.atol
    s_r = np.sqrt(np.asarray(running_var, np.float64) + eps)
    z, log_ratio = np.asarray(z, np.float64), np.asarray(log_ratio, np.float64)
    ratio = np.exp(log_ratio)
    dz = d_mean / s_r
    dl = d_var / (np.asarray(data_var) + eps - d_var)
    assert np.all(dl < 1), "the data variance is not resolved at float32 precision"
    dkl = np.abs(z) * dz + 0.5 * dz**2 + 0.5 * np.abs(ratio - 1) * np.expm1(dl) + 0.5 * (np.expm1(dl) - dl)
    rounding = 16 * EPS["float64"]
    return {
        "data_mean": d_mean,
        "data_var": d_var,
        "z": dz + rounding * np.abs(z),
        "log_ratio": dl + rounding * (1 + np.abs(log_ratio)),
        "kl": dkl + rounding * (ratio + z**2 + 1 + np.abs(log_ratio)),
    }


def assert_shift_matches(
    layer: LayerShift, values: np.ndarray, running_mean: Any, running_var: Any, eps: float, *, ddof: int
) -> None:
    """Fail unless ``layer`` (a :class:`~normkit.testtime.diagnose.LayerShift`) holds
    :func:`shift_reference`'s values from the layer's input ``values`` (samples, channels; every
    value of every batch) within :func:`shift_bounds` (``magnitude``: the largest
    :math:`|x|`), its running statistics exactly (as float64), a count of ``len(values)`` per
    channel, ``eps`` and the variance convention ``ddof``."""
    values = np.asarray(values, np.float64)
    expected = shift_reference(values, running_mean, running_var, eps, ddof=ddof)
    bounds = shift_bounds(
        float(np.abs(values).max()), expected["data_mean"], expected["data_var"], running_var, eps,
        z=expected["z"], log_ratio=expected["log_ratio"],
    )  # fmt: skip
    for key in SHIFT_KEYS:
        assert_within(np.abs(getattr(layer, key) - expected[key]), bounds[key], f"layer {layer.label} {key}")
    np.testing.assert_array_equal(layer.running_mean, np.asarray(running_mean, np.float64))
    np.testing.assert_array_equal(layer.running_var, np.asarray(running_var, np.float64))
    np.testing.assert_array_equal(layer.count, [len(values)] * values.shape[1])
    assert layer.eps == eps, f"layer {layer.label}: eps {layer.eps!r}, expected {eps!r}"
    assert layer.unbiased == (ddof == 1), f"layer {layer.label}: unbiased={layer.unbiased}, ddof={ddof}"


ELEMENTWISE_ROUNDINGS = 8
"""Roundings outside the layer's sums, each at most eps times the magnitude: the folded kernel
entry and the folded bias's operations; the batch norm's subtraction, square root, division,
scale and shift as written out in float64 (or a framework's scale — add, rsqrt, multiply —,
shift and fused multiply-add)."""


def folding_offset(
    running_mean: Any, running_var: Any, eps: float, *, gamma: Any = None, beta: Any = None, bias: Any = None
) -> np.ndarray:
    r"""The bias part of :func:`folding_bound`'s magnitude per output channel, in float64:
    :math:`|s|(|b| + |\mu|) + |\beta|` with :math:`s = \gamma/\sqrt{\sigma^2+\epsilon}` (a
    missing ``gamma`` is 1, a missing ``beta`` or layer ``bias`` 0). The layer run on
    :math:`|x|` with the folded kernel's :math:`|W'|` and this bias gives the magnitude."""

    def absolute(value: Any, default: float) -> np.ndarray:
        return np.asarray(default) if value is None else np.abs(np.asarray(value, np.float64))

    scale = absolute(gamma, 1.0) / np.sqrt(np.asarray(running_var, np.float64) + eps)
    return scale * (absolute(bias, 0.0) + absolute(running_mean, 0.0)) + absolute(beta, 0.0)


def folding_bound(magnitude: np.ndarray, terms: int, dtype: str) -> np.ndarray:
    r"""How far a folded layer's output and the layer + batch norm's may be apart, both computed
    in ``dtype``: each sums ``terms`` products plus the bias, off by
    :func:`~normkit.testing.tolerances.reduction_growth` (``terms + 1``) eps times what it sums,
    and rounds :data:`ELEMENTWISE_ROUNDINGS` times elementwise:
    :math:`\epsilon\,(2\sqrt{terms+1} + 8)\,m`. ``magnitude`` :math:`m` is, per output element,
    :math:`\sum|W'||x| + |s|(|b| + |\mu|) + |\beta|` with
    :math:`s = \gamma/\sqrt{\sigma^2+\epsilon}` (:func:`folding_offset` for its bias part), which
    bounds every intermediate of both computations (in units of their scale)."""
    return (
        EPS[dtype]
        * (2 * reduction_growth(terms + 1) + ELEMENTWISE_ROUNDINGS)
        * np.asarray(magnitude, np.float64)
    )
