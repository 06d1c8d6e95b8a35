"""Play one conformance case through an adapter, against the float64 reference.

The same cases, reference and tolerances as the conformance suite
(:mod:`normkit.testing.runner`): the adapter's outputs are NumPy arrays, so the checks that
need a backend's arrays (in-place writes of held state) become checks on what the adapter is
given and returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported
from normkit.numpy_backend import numpy_dtype
from normkit.testing.cases import Case
from normkit.testing.primitives import moments_bounds
from normkit.testing.runner import (
    STATELESS,
    CaseResult,
    _as64,
    _compare,
    _expected_keys,
    _options,
    _ReferenceState,
    check_rounding_order,
    check_running_statistics,
    expected_step,
)
from normkit.testing.tolerances import EPS

__all__ = ["case_config", "play"]


def case_config(case: Case, *, native_defaults: bool = False) -> Config:
    """The :class:`Config` of ``case``: its options with every preset default filled in."""
    o = _options(case) if case.op != "moments" else {}
    ndim = len(case.shape)
    common: dict[str, Any] = {
        "op": case.op,
        "dtype": case.dtype,
        "shape": tuple(case.shape),
        "native_defaults": native_defaults,
    }
    if case.op == "moments":
        axes = case.options.get("axes")
        if axes is not None:
            reduced = tuple(sorted(a % ndim for a in ((axes,) if isinstance(axes, int) else axes)))
            kept = next((a for a in range(ndim) if a not in reduced), 0)
        else:
            kept = case.channel_axis
            reduced = tuple(a for a in range(ndim) if a != kept)
        return Config(**common, axis=kept, axes=reduced)
    if case.op in ("layer_norm", "rms_norm"):
        rms = case.op == "rms_norm"
        return Config(
            **common,
            eps=o["eps"],
            axes=tuple(o["axes"]),
            affine=o["affine"],
            bias=False if rms else o["bias"],
            weight_offset=o["offset"] if rms else 0.0,
            cast_before_weight=o["before"] if rms else False,
        )
    if case.op == "group_norm":
        return Config(**common, eps=o["eps"], axis=o["axis"], groups=o["groups"], affine=o["affine"])
    return Config(
        **common,
        eps=o["eps"],
        axis=o["axis"],
        momentum=o["momentum"],
        unbiased=o["unbiased"],
        affine=o["affine"],
        track_running_stats=o["track"],
    )


def _step_input(case: Case, step: int) -> np.ndarray:
    wide = case.input(step)
    return wide[..., ::2] if case.noncontiguous else wide


def play(case: Case, adapter: Adapter, *, native_defaults: bool = False) -> CaseResult:
    """Run ``case`` through ``adapter``: ``skipped`` holds the reason for an ``n/a`` cell."""
    result = CaseResult(case, adapter.name, None)
    if case.op not in adapter.ops:
        result.skipped = f"{adapter.name} has no {case.op}"
        return result
    if case.dtype not in adapter.dtypes:
        result.skipped = f"{adapter.name} does not support {case.dtype}"
        return result
    if case.op == "moments" and case.mask() is not None:
        result.skipped = "a masked moments case (the audit passes no mask)"
        return result
    config = case_config(case, native_defaults=native_defaults)
    state = {k: v for k, v in case.initial_state().items() if k in _state_keys(case)}
    try:
        layer = adapter.build(config, {k: v.copy() for k, v in state.items()})
        try:
            if case.op == "moments":
                _play_moments(case, config, layer, result)
            else:
                _play_layer(case, layer, state, result)
        finally:
            result.notes = sorted(getattr(layer, "emitted", ()))
    except Unsupported as reason:
        result.skipped = str(reason)
    except Exception as error:  # the implementation's own error is a finding, not a crash
        message = str(error).strip().splitlines()
        result.failures.append(f"raised {type(error).__name__}: {message[0] if message else ''}")
    return result


def _state_keys(case: Case) -> list[str]:
    if case.op == "moments":
        return []
    return _expected_keys(case, _options(case))


def _running(layer: Any) -> dict[str, np.ndarray] | None:
    method = getattr(layer, "running_stats", None)
    return None if method is None else {k: np.array(v) for k, v in method().items()}


def _check_output(result: CaseResult, case: Case, where: str, y: Any, shape: tuple[int, ...]) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype != numpy_dtype(case.dtype):
        result.failures.append(f"{where}: output dtype {y.dtype}, expected {case.dtype}")
    if y.shape != shape:
        result.failures.append(f"{where}: output shape {y.shape}, expected {shape}")
    return y


def _play_layer(case: Case, layer: Any, state: Mapping[str, np.ndarray], result: CaseResult) -> None:
    o = _options(case)
    clean = _ReferenceState({k: _as64(v) for k, v in state.items()})
    perturbed = _ReferenceState({k: _as64(v) for k, v in state.items()})
    tracks = case.op not in STATELESS and o["track"]
    magnitude = 0.0
    for step, mode in enumerate(case.steps):
        training = mode == "train"
        x = _step_input(case, step)
        before = x.copy()
        held = _running(layer) if tracks else None
        where = f"step {step} ({mode})"
        y = _check_output(result, case, where, layer(x, training), x.shape)
        if not np.array_equal(x, before, equal_nan=True):
            result.failures.append(f"{where}: the input was modified")
        if not training and held is not None:
            after = _running(layer)
            if after is not None and any(not np.array_equal(after[k], held[k], equal_nan=True) for k in held):
                result.failures.append(f"{where}: eval changed the running statistics")
        if case.op in STATELESS:
            other = np.asarray(layer(x, not training))
            if not np.array_equal(other, y, equal_nan=True):
                result.failures.append(f"{where}: {case.op} differs between training and eval")
        x64 = _as64(x)
        magnitude = max(magnitude, float(np.abs(x64).max()) if x64.size else 0.0)
        y_ref, bound = expected_step(case, o, clean, perturbed, x64, step, training)
        if y.shape == y_ref.shape:
            _compare(result, where, _as64(y), y_ref, bound, record=True)
            check_rounding_order(result, case, o, clean, x64, y, where)
    final = _running(layer) if tracks else None
    if final is not None:
        check_running_statistics(
            result,
            case,
            clean,
            perturbed,
            magnitude,
            {k: _as64(final[k]) for k in ("running_mean", "running_var")},
        )


def _play_moments(case: Case, config: Config, layer: Any, result: CaseResult) -> None:
    r"""A ``(mean, variance)`` op: bounds from :func:`~normkit.testing.primitives.moments_bounds`
    (the variance's is M2's over the count), plus the rounding of what is returned to its
    dtype (an op may return the input's half-precision dtype)."""
    x = case.input(0)
    before = x.copy()
    mean, var = (np.asarray(v) for v in layer(x, True))
    if not np.array_equal(x, before, equal_nan=True):
        result.failures.append("the input was modified")
    count, ref_mean, m2, mean_bound, m2_bound = moments_bounds(_as64(x), config.axes, None, case.dtype)
    safe = np.maximum(count, 1.0)
    ref_var, var_bound = m2 / safe, m2_bound / safe
    for name, got, ref, bound in (
        ("mean", mean, ref_mean, mean_bound),
        ("variance", var, ref_var, var_bound),
    ):
        stored = EPS.get(str(got.dtype), 0.0)  # rounding to the returned dtype
        _compare(
            result,
            name,
            _as64(got).reshape(ref.shape) if got.size == ref.size else _as64(got),
            ref,
            bound + stored * np.abs(ref),
            record=True,
        )
