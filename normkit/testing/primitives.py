r"""Play the cases of the spec-v2 primitives (``moments``, ``normalize``) and of the merge on a
backend, and compare with the float64 reference.

Bounds, derived from what is computed:

* **count** is exact.
* **mean** is a sum of :math:`n` terms, then rounded to the compute dtype: its error is at most
  :math:`\epsilon_c|\mu|` (the rounding) plus the summation's
  :math:`r(n)\,\epsilon_c\,\overline{|x|}` with :math:`r` = :func:`~normkit.testing.tolerances.reduction_growth`.
* **M2** is a two-pass sum of :math:`n` squares of deviations: its error is
  :math:`r(n)\,\epsilon_c M_2` plus what the error of the mean costs it,
  :math:`n\,e_\mu^2` (first order vanishes: :math:`\sum (x - \mu) = 0`), plus the rounding to the
  compute dtype, :math:`\epsilon_c M_2`. A one-pass :math:`\sum x^2 - n\mu^2` is off by
  :math:`n\,\epsilon_c\,\mu^2`, far outside this at large offsets.
* **the merge** (Chan) of parts :math:`a, b` moves the error of each part's mean into
  :math:`\delta = \mu_b - \mu_a`: :math:`e_\delta \le e_{\mu_a} + e_{\mu_b}`, and
  :math:`\delta^2 n_a n_b/n` is off by :math:`(2|\delta| e_\delta + e_\delta^2)\,n_a n_b/n`; the
  merged mean is off by at most the larger part error. The bound follows the merge step by step.
* **normalize** is checked like every output (:func:`~normkit.testing.tolerances.output_tolerance`,
  conditioning from a perturbed input, the centering term for the mean it subtracts).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import normkit
from normkit import reference
from normkit.hookspecs import BackendInfo
from normkit.testing.cases import Case
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    compute_dtype,
    output_tolerance,
    reduction_growth,
)

__all__ = ["moments_bounds", "play_primitive"]


def _reduced(case: Case) -> tuple[int, ...]:
    ndim = len(case.shape)
    axes = case.options.get("axes")
    if axes is not None:
        return tuple(sorted(a % ndim for a in ((axes,) if isinstance(axes, int) else axes)))
    return tuple(a for a in range(ndim) if a != case.channel_axis)


def moments_bounds(
    x: np.ndarray, axes: tuple[int, ...], mask: np.ndarray | None, dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, m2, mean_bound, m2_bound)``: the float64 reference and the allowed errors
    of a backend's moments of ``x`` (see the module docstring)."""
    count, mean, m2 = reference.moments(x, axes, mask)
    eps_c = EPS[compute_dtype(dtype)]
    weights = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    safe = np.maximum(count, 1.0)
    mean_abs = np.sum(np.abs(x) * weights, axis=axes) / safe
    growth = np.vectorize(reduction_growth)(count)
    mean_bound = eps_c * np.abs(mean) + growth * eps_c * mean_abs
    m2_bound = (growth + 1.0) * eps_c * m2 + count * mean_bound**2
    return count, mean, m2, mean_bound, m2_bound


def _check(result: Any, where: str, got: np.ndarray, ref: np.ndarray, bound: np.ndarray) -> None:
    from normkit.testing.runner import _compare

    _compare(result, where, np.asarray(got, np.float64), np.asarray(ref, np.float64), bound, record=True)


def _check_count(result: Any, got: np.ndarray, expected: np.ndarray) -> None:
    got = np.asarray(got)
    if got.dtype.kind not in "iu":
        result.failures.append(f"count has dtype {got.dtype}; expected an integer dtype")
    if got.shape != expected.shape or not np.array_equal(got, expected):
        result.failures.append(f"count is {got.tolist()}; expected {expected.astype(int).tolist()}")


def play_primitive(case: Case, info: BackendInfo, backend: str, device: str | None, result: Any) -> None:
    """Run a ``moments``, ``normalize`` or ``merge_moments`` case (see the module docstring)."""
    x_np = case.input(0)
    x64 = x_np.astype(np.float64)
    x = info.asarray(x_np, case.dtype, device)
    axes = _reduced(case)
    state_dtype = case.state_dtype
    if case.op == "moments":
        mask_np = case.mask()
        mask = None
        if mask_np is not None:
            mask = info.asarray(mask_np, "bool", device)
        got = normkit.moments(x, axes=axes, mask=mask, backend=backend)
        count, mean, m2, mean_bound, m2_bound = moments_bounds(x64, axes, mask_np, case.dtype)
        _check_count(result, info.to_numpy(got.count), count)
        for name, value in (("mean", got.mean), ("m2", got.m2)):
            if info.dtype_name(value) != compute_dtype(case.dtype):
                result.failures.append(
                    f"{name} has dtype {info.dtype_name(value)}; expected the compute dtype {compute_dtype(case.dtype)}"
                )
        _check(result, "mean", info.to_numpy(got.mean), mean, mean_bound)
        _check(result, "m2", info.to_numpy(got.m2), m2, m2_bound)
        return
    if case.op == "merge_moments":
        sizes = case.options["parts"]
        parts, start = [], 0
        for size in sizes:
            parts.append(normkit.moments(x[start : start + size], axis=case.channel_axis, backend=backend))
            start += size
        merged = normkit.merge_moments(*parts)
        _, _, _, bound_mean, bound_m2 = _merge_bounds(x64[:start], sizes, case.channel_axis, case.dtype)
        count, mean, m2 = reference.moments(x64[:start], axes)
        _check_count(result, info.to_numpy(merged.count), count)
        _check(result, "merged mean", info.to_numpy(merged.mean), mean, bound_mean)
        _check(result, "merged m2", info.to_numpy(merged.m2), m2, bound_m2)
        return
    # normalize: statistics near those of the data, with a per-channel affine
    state = case.initial_state()
    channel = case.channel_axis
    mean_np, var_np = state["running_mean"], state["running_var"]
    if case.loc:
        mean_np = (mean_np + case.loc).astype(state_dtype)
    as_backend = {k: info.asarray(v, state_dtype, device) for k, v in state.items()}
    y = normkit.normalize(
        x,
        info.asarray(mean_np, state_dtype, device),
        as_backend["running_var"],
        as_backend["weight"],
        as_backend["bias"],
        eps=1e-5,
        axis=channel,
        backend=backend,
    )
    if info.dtype_name(y) != case.dtype:
        result.failures.append(f"output dtype {info.dtype_name(y)}, expected {case.dtype}")
    args = (mean_np, var_np, state["weight"], state["bias"])
    y_ref = reference.normalize(x64, *args, eps=1e-5, axis=channel)
    eps_c = EPS[compute_dtype(case.dtype)]
    u = np.random.default_rng([case.seed, 7]).uniform(-1.0, 1.0, size=x64.shape)
    y_pert = reference.normalize(x64 * (1.0 + eps_c * u), *args, eps=1e-5, axis=channel)
    shape = [x64.shape[a] if a == channel else 1 for a in range(x64.ndim)]
    gain = np.abs(mean_np.astype(np.float64)) * np.abs(state["weight"].astype(np.float64))
    gain = gain / np.sqrt(var_np.astype(np.float64) + 1e-5)
    bound = output_tolerance(case.dtype).bound(y_ref, float(np.abs(y_ref - y_pert).max()))
    bound = bound + CENTERING_FACTOR * eps_c * gain.reshape(shape)
    from normkit.testing.runner import _compare

    _compare(result, "y", np.asarray(info.to_numpy(y), np.float64), y_ref, bound, record=True)


def _merge_bounds(
    x: np.ndarray, sizes: tuple[int, ...], axis: int, dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference of Chan's merge of the parts' moments, step by step, with the allowed
    errors: each part's bounds from :func:`moments_bounds`, carried through the merge."""
    axes = tuple(a for a in range(x.ndim) if a != axis)
    merged = None
    start = 0
    for size in sizes:
        part = x[start : start + size]
        start += size
        count, mean, m2, e_mean, e_m2 = moments_bounds(part, axes, None, dtype)
        if merged is None:
            merged = (count, mean, m2, e_mean, e_m2)
            continue
        na, mean_a, m2_a, e_a, e2_a = merged
        n = na + count
        safe = np.maximum(n, 1.0)
        delta = mean - mean_a
        e_delta = np.where((na > 0) & (count > 0), e_a + e_mean, 0.0)
        weight = na * count / safe
        merged = (
            n,
            mean_a + delta * count / safe,
            m2_a + m2 + delta**2 * weight,
            np.maximum(np.where(na > 0, e_a, 0.0), np.where(count > 0, e_mean, 0.0)),
            e2_a + e_m2 + (2 * np.abs(delta) * e_delta + e_delta**2) * weight,
        )
    assert merged is not None
    return merged
