"""Play a conformance case on a backend and on the float64 reference, and compare.

Used by the pytest suite (:mod:`normkit.testing.suite`) and by ``normkit check``. The
reference side re-implements the layer's train/eval decisions from the spec on purpose: it
shares nothing with :mod:`normkit.layers` but the preset table, so it checks the layers too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import normkit
from normkit import presets, reference
from normkit._registry import load_backend
from normkit.hookspecs import BackendInfo
from normkit.numpy_backend import numpy_dtype
from normkit.testing.cases import Case
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    compute_dtype,
    output_tolerance,
    statistics_tolerance,
)

__all__ = ["CaseResult", "StepOutput", "run_case"]

LAYERS = {
    "batch_norm": normkit.BatchNorm,
    "instance_norm": normkit.InstanceNorm,
    "layer_norm": normkit.LayerNorm,
    "group_norm": normkit.GroupNorm,
    "rms_norm": normkit.RMSNorm,
}
STATELESS = ("layer_norm", "group_norm", "rms_norm")
"""Layers without running state: identical in training and eval."""


@dataclass
class StepOutput:
    """One call's output as float64 NumPy, with its reference and allowed error."""

    y: np.ndarray
    reference: np.ndarray
    bound: np.ndarray


@dataclass
class CaseResult:
    """The outcome of one case on one backend."""

    case: Case
    backend: str
    device: str | None
    skipped: str | None = None
    failures: list[str] = field(default_factory=list)
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    worst_error: float = 0.0
    """The error at the value nearest its tolerance (largest error / allowed error)."""
    worst_tolerance: float = 0.0
    """The allowed error at that value."""
    outputs: list[StepOutput] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What an audited implementation reports about how it computed (the ONNX operators an
    export emitted); no part of the verdict."""

    @property
    def passed(self) -> bool:
        return self.skipped is None and not self.failures

    def repro(self) -> str:
        """A snippet that replays the case (for any case, random ones included) and the calls
        it makes."""
        case = self.case
        if case.op not in LAYERS:
            return (
                f"case {case.id!r} (seed {case.seed}) on backend {self.backend!r}, device {self.device!r}\n"
                f"  replay:  from normkit.testing import get_case, run_case\n"
                f"           print(run_case(get_case({case.id!r}), backend={self.backend!r}, device={self.device!r}).report())"
            )
        x = f"np.random.default_rng([{case.seed}, step]).normal({case.loc}, {case.scale}, size={case.input(0).shape}).astype({case.dtype!r})"
        if case.noncontiguous:
            x += "[..., ::2]"
        return (
            f"case {case.id!r} (seed {case.seed}) on backend {self.backend!r}, device {self.device!r}\n"
            f"  replay:  from normkit.testing import Case, run_case\n"
            f"           print(run_case({case!r},\n"
            f"                          backend={self.backend!r}, device={self.device!r}).report())\n"
            f"  calls:   layer = normkit.{LAYERS[case.op].__name__}(**{dict(case.options)!r}, backend={self.backend!r})\n"
            f"           layer.load_state_dict(case.initial_state() as {self.backend} arrays)\n"
            f"           for step, mode in enumerate({case.steps!r}): y = layer.train(mode == 'train')(x)\n"
            f"           with x = {x}"
            + (
                f", channel {case.constant_channel} set to {case.loc + 0.1 * case.scale}"
                if case.constant_channel is not None
                else ""
            )
        )

    def report(self) -> str:
        status = "skipped: " + self.skipped if self.skipped else ("passed" if self.passed else "FAILED")
        lines = [
            f"{self.case.id} on {self.backend}: {status} (max abs error {self.max_abs_error:.3g}, "
            f"max rel error {self.max_rel_error:.3g})"
        ]
        lines += [f"  - {failure}" for failure in self.failures]
        if self.failures:
            lines.append(self.repro())
        return "\n".join(lines)


@dataclass
class _ReferenceState:
    arrays: dict[str, np.ndarray]
    count: int = 0


def _options(case: Case) -> dict[str, Any]:
    """The case's layer options with every preset default filled in (from the preset table)."""
    o = dict(case.options)
    p = presets.get_preset(o.get("preset", "torch"))
    if case.op == "group_norm":
        return {
            "eps": o.get("eps", p.group_norm_eps),
            "axis": case.channel_axis,
            "groups": o["num_groups"],
            "affine": o.get("affine", True),
        }
    if case.op == "rms_norm":
        ndim = len(case.shape)
        axes = tuple(range(ndim - len(case.param_shape()), ndim))
        if o.get("axis") is not None:
            raw = (o["axis"],) if isinstance(o["axis"], int) else o["axis"]
            axes = tuple(sorted(a % ndim for a in raw))
        eps = o.get("eps", p.rms_norm_eps)
        return {
            "eps": presets.machine_eps(case.dtype) if eps is None else eps,
            "axes": axes,
            "affine": o.get("elementwise_affine", True),
            "offset": o.get("weight_offset", p.rms_weight_offset),
            "before": o.get("cast", p.rms_cast) == "before_weight",
        }
    if case.op == "layer_norm":
        eps = o.get("eps", p.layer_norm_eps)
        axes = tuple(range(len(case.shape) - len(case.param_shape()), len(case.shape)))
        if o.get("axis") is not None:
            raw = (o["axis"],) if isinstance(o["axis"], int) else o["axis"]
            axes = tuple(sorted(a % len(case.shape) for a in raw))
        affine = o.get("affine", True)
        return {"eps": eps, "axes": axes, "affine": affine, "bias": affine and o.get("bias", True)}
    weights = o.get("momentum_weights", p.momentum_weights)
    momentum = o.get("momentum", presets.momentum_in_convention(p.update_weight, weights))
    default_affine = True if case.op == "batch_norm" else p.instance_norm_affine
    return {
        "eps": o.get("eps", p.batch_norm_eps if case.op == "batch_norm" else p.instance_norm_eps),
        "momentum": None if momentum is None else presets.batch_weight(momentum, weights),
        "unbiased": o.get("running_var_estimator", p.running_var_estimator) == "unbiased",
        "axis": case.channel_axis,
        "affine": o.get("affine", default_affine),
        "track": o.get("track_running_stats", case.op == "batch_norm"),
    }


def _rounds_before_weight(case: Case, o: dict[str, Any], weight: np.ndarray | None) -> bool:
    return o["before"] and weight is not None and case.dtype in ("float16", "bfloat16")


def _rms_reference(
    case: Case, o: dict[str, Any], x: np.ndarray, weight: np.ndarray | None, *, model_rounding: bool
) -> np.ndarray:
    """RMS norm in float64; for ``cast="before_weight"`` on half-precision input (and
    ``model_rounding``) the normalized value is rounded to the input dtype before the weight, as
    the spec names it: a rounding that is part of the result, not an error."""
    if not (model_rounding and _rounds_before_weight(case, o, weight)):
        return reference.rms_norm(x, weight, axes=o["axes"], eps=o["eps"], weight_offset=o["offset"])
    unit = reference.rms_norm(x, None, axes=o["axes"], eps=o["eps"])
    rounded = unit.astype(numpy_dtype(case.dtype)).astype(np.float64)
    shape = [x.shape[a] if a in o["axes"] else 1 for a in range(x.ndim)]
    return rounded * (np.asarray(weight, np.float64).reshape(shape) + o["offset"])


def _reference_step(
    case: Case,
    o: dict[str, Any],
    state: _ReferenceState,
    x: np.ndarray,
    training: bool,
    *,
    model_rounding: bool = True,
) -> np.ndarray:
    w = state.arrays.get("weight")
    b = state.arrays.get("bias")
    if case.op == "layer_norm":
        return reference.layer_norm(x, w, b, axes=o["axes"], eps=o["eps"])
    if case.op == "group_norm":
        return reference.group_norm(x, o["groups"], w, b, eps=o["eps"], axis=o["axis"])
    if case.op == "rms_norm":
        return _rms_reference(case, o, x, w, model_rounding=model_rounding)
    if x.size == 0:
        return np.zeros(x.shape)
    update = training and o["track"]
    use_batch = training or not o["track"]
    count = state.count + 1
    momentum = (1.0 / count if o["momentum"] is None else o["momentum"]) if update else 0.0
    rm = state.arrays.get("running_mean") if (update or not use_batch) else None
    rv = state.arrays.get("running_var") if (update or not use_batch) else None
    function = reference.batch_norm if case.op == "batch_norm" else reference.instance_norm
    flag = "training" if case.op == "batch_norm" else "use_input_stats"
    y, new_mean, new_var = function(
        x,
        w,
        b,
        rm,
        rv,
        **{flag: use_batch},
        momentum=momentum,
        eps=o["eps"],
        axis=o["axis"],
        unbiased_running_var=o["unbiased"],
    )
    if update:
        state.arrays["running_mean"], state.arrays["running_var"] = new_mean, new_var
        state.count = count
    return y


def _centering_gain(
    case: Case, o: dict[str, Any], state: _ReferenceState, x: np.ndarray, training: bool
) -> np.ndarray | float:
    r""":math:`|\mu|\,|\gamma| / \sqrt{\sigma^2 + \epsilon}` per element: how far ``y`` moves per
    unit of relative error in the mean it subtracts.

    The spec allows a two-pass algorithm in the compute dtype, whose mean is only known to
    :math:`\epsilon_c|\mu|`, and ATen-style fused ``x*a + (b - mu*a)`` rounds ``mu*a`` likewise. No
    perturbation of the data models that (normalization ignores a common shift), so the bound
    adds :data:`~normkit.testing.tolerances.CENTERING_FACTOR` times :math:`\epsilon_c` times this
    gain. :math:`E[x^2]-E[x]^2` loses :math:`\epsilon_c\,\mu^2/\sigma^2`, far more, and still fails.
    """
    if x.size == 0 or case.op == "rms_norm":
        return 0.0  # RMS norm subtracts no mean
    shape = [1] * x.ndim
    if case.op == "group_norm":
        axis, groups = o["axis"], o["groups"]
        moved = np.moveaxis(x, axis, 1)
        blocks = moved.reshape(moved.shape[0], groups, -1)
        mean = np.repeat(np.abs(blocks.mean(axis=2)), moved.shape[1] // groups, axis=1)
        var = np.repeat(blocks.var(axis=2), moved.shape[1] // groups, axis=1)
        weight = state.arrays.get("weight")
        gamma = 1.0 if weight is None else np.abs(weight)[None, :]
        gain = (mean * gamma / np.sqrt(var + o["eps"])).reshape(moved.shape[:2] + (1,) * (x.ndim - 2))
        return np.moveaxis(np.broadcast_to(gain, moved.shape), 1, axis)
    if case.op == "layer_norm":
        axes = o["axes"]
        for a in axes:
            shape[a] = x.shape[a]
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    else:
        axis = o["axis"] % x.ndim
        shape[axis] = x.shape[axis]
        if training or not o["track"]:
            first = 1 if case.op == "instance_norm" else 0
            axes = tuple(a for a in range(first, x.ndim) if a != axis)
            mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        else:
            mean = state.arrays["running_mean"].reshape(shape)
            var = state.arrays["running_var"].reshape(shape)
    weight = state.arrays.get("weight")
    gamma = 1.0 if weight is None else np.abs(weight).reshape(shape)
    return np.abs(mean) * gamma / np.sqrt(var + o["eps"])


def _expected_keys(case: Case, o: dict[str, Any]) -> list[str]:
    if case.op == "group_norm":
        return ["weight", "bias"] if o["affine"] else []
    if case.op == "rms_norm":
        return ["weight"] if o["affine"] else []
    if case.op == "layer_norm":
        return (["weight"] if o["affine"] else []) + (["bias"] if o["bias"] else [])
    return (["weight", "bias"] if o["affine"] else []) + (
        ["running_mean", "running_var"] if o["track"] else []
    )


def _snapshot(info: BackendInfo, layer: Any) -> dict[str, Any]:
    state = layer.state_dict()
    return {
        k: (info.to_numpy(v) if k not in ("num_batches_tracked", "_metadata") else v)
        for k, v in state.items()
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if isinstance(a[key], np.ndarray):
            if not np.array_equal(a[key], b[key], equal_nan=True):
                return False
        elif a[key] != b[key]:
            return False
    return True


def _as64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def run_case(
    case: Case, backend: str = "numpy", device: str | None = None, *, raise_errors: bool = False
) -> CaseResult:
    """Run ``case`` on the backend named ``backend`` and compare with the reference.

    :param raise_errors: let an exception from the backend propagate (with the repro snippet
        attached as a note) instead of recording it as a failure.
    """
    result = CaseResult(case, backend, device)
    info = load_backend(backend)
    if case.dtype not in info.dtypes:
        result.skipped = f"backend {backend!r} does not support {case.dtype}"
        return result
    if device is not None and device not in info.devices:
        result.skipped = f"backend {backend!r} has no device {device!r}"
        return result
    try:
        if case.op in LAYERS:
            _play(case, info, backend, device, result)
        else:
            from normkit.testing.primitives import play_primitive

            play_primitive(case, info, backend, device, result)
    except NotImplementedError as error:
        if not _lacks_an_op(error):
            if raise_errors:
                _add_note(error, result.repro())
                raise
            result.failures.append(f"raised {type(error).__name__}: {error}")
        else:  # a backend without this op (a spec-1 backend and a new op): not a failure
            result.skipped = str(error)
    except Exception as error:
        if raise_errors:
            _add_note(error, result.repro())
            raise
        result.failures.append(f"raised {type(error).__name__}: {error}")
    return result


def _lacks_an_op(error: NotImplementedError) -> bool:
    """Whether ``error`` comes from the registry's stand-in for an op the backend lacks (a
    spec-1 backend and a spec-2 op), not from a backend's own kernel."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return bool(frames) and frames[-1] == "missing"


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)


def _play(case: Case, info: BackendInfo, backend: str, device: str | None, result: CaseResult) -> None:
    o = _options(case)
    layer = LAYERS[case.op](**case.options, backend=backend)
    initial = case.initial_state()
    keys = _expected_keys(case, o)
    tracks = case.op not in STATELESS and o["track"]
    if keys:
        state_dict: dict[str, Any] = {k: info.asarray(initial[k], case.state_dtype, device) for k in keys}
        if tracks:
            state_dict["num_batches_tracked"] = 0
        layer.load_state_dict(state_dict)
    clean = _ReferenceState({k: _as64(initial[k]) for k in keys})
    perturbed = _ReferenceState({k: _as64(initial[k]) for k in keys})
    magnitude = 0.0
    for step, mode in enumerate(case.steps):
        training = mode == "train"
        wide = case.input(step)
        x_np = wide[..., ::2] if case.noncontiguous else wide
        x = info.asarray(wide, case.dtype, device)
        if case.noncontiguous:
            x = x[..., ::2]
        before = info.to_numpy(x)
        held = {k: v for k, v in layer.state_dict().items() if k in keys} if keys else {}
        held_values = {k: info.to_numpy(v) for k, v in held.items()}
        state_before = _snapshot(info, layer) if (keys or tracks) else {}
        layer.train(training)
        y = layer(x)
        where = f"step {step} ({mode})"
        if not np.array_equal(info.to_numpy(x), before, equal_nan=True):
            result.failures.append(f"{where}: the input was modified")
        for key, array in held.items():  # the arrays the layer passed to the kernel
            if not np.array_equal(info.to_numpy(array), held_values[key], equal_nan=True):
                result.failures.append(
                    f"{where}: {key} was modified in place (kernels must return new arrays)"
                )
        if info.dtype_name(y) != case.dtype:
            result.failures.append(f"{where}: output dtype {info.dtype_name(y)}, expected {case.dtype}")
        if tuple(info.shape(y)) != tuple(x_np.shape):
            result.failures.append(f"{where}: output shape {tuple(info.shape(y))}, expected {x_np.shape}")
        if not training and (keys or tracks) and not _same(state_before, _snapshot(info, layer)):
            result.failures.append(f"{where}: eval changed the layer's state")
        if case.op in STATELESS:
            other = info.to_numpy(layer.train(not training)(x))
            if not np.array_equal(other, info.to_numpy(y), equal_nan=True):
                result.failures.append(f"{where}: {case.op} differs between training and eval")

        x64 = _as64(x_np)
        magnitude = max(magnitude, float(np.abs(x64).max()) if x64.size else 0.0)
        y_ref, bound = expected_step(case, o, clean, perturbed, x64, step, training)
        _compare(result, where, _as64(info.to_numpy(y)), y_ref, bound, record=True)
        check_rounding_order(result, case, o, clean, x64, info.to_numpy(y), where)

    if tracks:
        final = layer.state_dict()
        if final["num_batches_tracked"] != clean.count:
            result.failures.append(
                f"num_batches_tracked is {final['num_batches_tracked']}, expected {clean.count}"
            )
        for key in ("running_mean", "running_var"):
            if info.dtype_name(final[key]) != case.state_dtype:
                result.failures.append(
                    f"{key} has dtype {info.dtype_name(final[key])}, expected {case.state_dtype}"
                )
        got = {key: _as64(info.to_numpy(final[key])) for key in ("running_mean", "running_var")}
        check_running_statistics(result, case, clean, perturbed, magnitude, got)


def expected_step(
    case: Case,
    o: dict[str, Any],
    clean: _ReferenceState,
    perturbed: _ReferenceState,
    x64: np.ndarray,
    step: int,
    training: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference output of one call and its allowed error (the module docstring of
    :mod:`normkit.testing.tolerances`); advances both reference states."""
    eps_c = EPS[compute_dtype(case.dtype)]
    u = np.random.default_rng([case.seed, step, 7]).uniform(-1.0, 1.0, size=x64.shape)
    y_ref = _reference_step(case, o, clean, x64, training)
    y_pert = _reference_step(case, o, perturbed, x64 * (1.0 + eps_c * u), training, model_rounding=False)
    y_exact = (
        _reference_step(case, o, clean, x64, training, model_rounding=False)
        if case.op == "rms_norm"
        else y_ref
    )
    conditioning = float(np.abs(y_exact - y_pert).max()) if y_ref.size else 0.0
    bound = output_tolerance(case.dtype).bound(
        y_ref, conditioning
    ) + CENTERING_FACTOR * eps_c * _centering_gain(case, o, clean, x64, training)
    if case.op == "rms_norm" and _rounds_before_weight(case, o, clean.arrays.get("weight")):
        # the compute-dtype normalized value may round to the neighbour of the exact one's
        # rounding: one unit in the last place of the input dtype, times the weight
        unit = np.abs(_rms_reference(case, o, x64, None, model_rounding=False))
        shape = [x64.shape[a] if a in o["axes"] else 1 for a in range(x64.ndim)]
        w = np.abs(clean.arrays["weight"].reshape(shape) + o["offset"])
        bound = bound + EPS[case.dtype] * unit * w
    return y_ref, bound


def check_rounding_order(
    result: CaseResult,
    case: Case,
    o: dict[str, Any],
    clean: _ReferenceState,
    x64: np.ndarray,
    y: np.ndarray,
    where: str,
) -> None:
    """RMS norm in half precision with a weight: the output must round in the named order.

    The two orders (round the normalized value to the input dtype, then multiply by the
    weight and round again; or multiply, then round once) differ by one unit in the last place
    on a share of the outputs, which the tolerance allows. On exactly those outputs, the
    implementation must match the named order's rounding at least as often as the other's: an
    implementation that rounds in the other order matches the other on nearly all of them.
    """
    weight = clean.arrays.get("weight")
    if case.op != "rms_norm" or weight is None or case.dtype not in ("float16", "bfloat16"):
        return
    dtype = numpy_dtype(case.dtype)
    unit = reference.rms_norm(x64, None, axes=o["axes"], eps=o["eps"])
    shape = [x64.shape[a] if a in o["axes"] else 1 for a in range(x64.ndim)]
    w = weight.reshape(shape) + o["offset"]
    before = (unit.astype(dtype).astype(np.float64) * w).astype(dtype)
    after = (unit * w).astype(dtype)
    differ = before != after
    if not differ.any() or y.shape != unit.shape:
        return
    named, other = (before, after) if o["before"] else (after, before)
    got = np.asarray(y).astype(dtype)[differ]
    share_named, share_other = np.mean(got == named[differ]), np.mean(got == other[differ])
    if share_named < share_other:
        order = "before" if o["before"] else "after"
        result.failures.append(
            f"{where}: rounds in the other order: of the {int(differ.sum())} outputs where rounding "
            f"{order} the weight and the other order differ, {share_other:.0%} equal the other "
            f"order's rounding and {share_named:.0%} the named one's"
        )


def check_running_statistics(
    result: CaseResult,
    case: Case,
    clean: _ReferenceState,
    perturbed: _ReferenceState,
    magnitude: float,
    got: dict[str, np.ndarray],
) -> None:
    """Compare final running statistics (float64 NumPy) with the reference's, within
    :func:`~normkit.testing.tolerances.statistics_tolerance` of the largest input seen."""
    for key, statistic in (("running_mean", "mean"), ("running_var", "var")):
        ref = clean.arrays[key]
        conditioning = float(np.abs(ref - perturbed.arrays[key]).max())
        bound = statistics_tolerance(case.dtype, statistic, magnitude).bound(ref, conditioning)
        _compare(result, key, got[key], ref, bound, record=False)


def tolerance_used(error: Any, bound: Any) -> Any:
    """``error / bound``: how much of its tolerance an error uses (over 1 fails); NaN errors and
    errors over a zero bound use an infinite share, a zero error over a zero bound none."""
    error, bound = np.asarray(error, np.float64), np.asarray(bound, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(bound > 0, error / np.where(bound > 0, bound, 1.0), np.where(error > 0, np.inf, 0.0))
    return np.where(np.isnan(error), np.inf, share)


def _compare(
    result: CaseResult, where: str, got: np.ndarray, ref: np.ndarray, bound: np.ndarray, *, record: bool
) -> None:
    if record:
        result.outputs.append(StepOutput(got, ref, bound))
    if got.shape != ref.shape:
        result.failures.append(f"{where}: shape {got.shape}, expected {ref.shape}")
        return
    if got.size == 0:
        return
    error = np.abs(got - ref)
    bad = ~(error <= bound)  # NaN counts as bad
    scale = float(np.abs(ref).max())
    max_error = math.inf if np.isnan(error).any() else float(error.max())
    bound = np.broadcast_to(bound, error.shape)
    used = tolerance_used(error, bound)
    worst = int(np.argmax(used))
    if used.flat[worst] >= tolerance_used(result.worst_error, result.worst_tolerance):
        result.worst_error, result.worst_tolerance = float(error.flat[worst]), float(bound.flat[worst])
    result.max_abs_error = max(result.max_abs_error, max_error)
    result.max_rel_error = max(result.max_rel_error, max_error / scale if scale > 0 else max_error)
    if np.any(bad):
        index = np.unravel_index(int(np.argmax(np.where(bad, error - bound, -np.inf))), error.shape)
        result.failures.append(
            f"{where}: {int(bad.sum())} of {error.size} values outside tolerance; worst at {tuple(int(i) for i in index)}: "
            f"got {got[index]!r}, reference {ref[index]!r}, allowed error {bound[index]:.3g}"
        )
