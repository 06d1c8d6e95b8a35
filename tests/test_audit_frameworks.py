"""What the recorded audit (docs/audit.md) says about the frameworks' own layers, asserted
against this machine's frameworks: each failure listed in the audit's documentation is a
failing cell, and the stable implementations pass the same cases. Runs in ``tox -e audit``
(the frameworks pinned in constraints.txt); skips an implementation that is not installed."""

from __future__ import annotations

import math

import pytest

from normkit.audit import AUDIT_CASES, builtin_adapters, run_audit
from normkit.testing.runner import CaseResult

pytestmark = pytest.mark.slow

_ADAPTERS = {a.name: a for a in builtin_adapters()}
_CASES = {c.id: c for c in AUDIT_CASES}


def _audit(name: str, *case_ids: str) -> dict[str, CaseResult]:
    adapter = _ADAPTERS[name]
    missing = adapter.missing()
    if missing:
        pytest.skip(f"{name} needs {missing}")
    report = run_audit([adapter], [_CASES[i] for i in case_ids], presets=False)
    (implementation,) = report.implementations
    assert implementation.error is None, implementation.error
    return {r.case.id: r for r in implementation.results}


def _fails(result: CaseResult) -> bool:
    return not result.passed and not result.skipped


def _error_beyond(result: CaseResult, factor: float) -> bool:
    """The failing value's error exceeds ``factor`` times its tolerance (NaN counts)."""
    return math.isnan(result.worst_error) or result.worst_error > factor * result.worst_tolerance


GN_OFFSETS = ("gn-offset-1000-std-1", "gn-offset-1000-std-0.1", "gn-offset-1e4-channels-first")


def test_onnxruntime_group_normalization_is_one_pass() -> None:
    results = _audit(
        "onnxruntime (opset 23)", *GN_OFFSETS, "gn-basic-f32", "ln-offset-1e4", "bn-keras-preset-offset-1e4"
    )
    assert _fails(results["gn-offset-1000-std-1"]) and _error_beyond(results["gn-offset-1000-std-1"], 100)
    assert "nan" in results["gn-offset-1000-std-0.1"].failures[0]
    # the same runtime's LayerNormalization and BatchNormalization kernels are stable
    for case in ("gn-basic-f32", "ln-offset-1e4", "bn-keras-preset-offset-1e4"):
        assert results[case].passed, results[case].report()


def test_onnxruntime_rms_normalization_rounds_after_the_scale_and_lacks_float64_instance_norm() -> None:
    results = _audit(
        "onnxruntime (opset 23)", "rms-cast-before-f16", "rms-basic-f32", "in-basic-f64", "in-basic-f32"
    )
    assert "rounds in the other order" in results["rms-cast-before-f16"].failures[-1]
    assert results["rms-basic-f32"].passed
    assert "NOT_IMPLEMENTED" in results["in-basic-f64"].failures[0]
    assert results["in-basic-f32"].passed


def test_torch_group_norm_is_one_pass_on_channels_last_memory_only() -> None:
    cases = ("gn-offset-1000-std-1", "gn-offset-1000-bf16-large-groups", "gn-offset-1e4-channels-last")
    channels_last = _audit("torch.nn (channels_last)", *cases)
    contiguous = _audit("torch.nn", *cases)
    for case in cases:
        assert _fails(channels_last[case]) and _error_beyond(channels_last[case], 10), case
        assert contiguous[case].passed, contiguous[case].report()


def test_flax_fast_variance_fails_at_an_offset_and_the_stable_one_passes() -> None:
    fast = _audit("flax.linen", "ln-offset-1000-std-0.1", "ln-basic-f32")
    stable = _audit("flax.linen (use_fast_variance=False)", "ln-offset-1000-std-0.1")
    assert _fails(fast["ln-offset-1000-std-0.1"]) and _error_beyond(fast["ln-offset-1000-std-0.1"], 100)
    assert fast["ln-basic-f32"].passed
    assert stable["ln-offset-1000-std-0.1"].passed


def test_keras_moments_are_one_pass_on_torch_and_clipped_on_tensorflow() -> None:
    cases = (
        "moments-offset-1e4",
        "moments-bf16-large-variance",
        "gn-offset-1000-std-0.1",
        "bn-keras-preset-offset-1e4",
    )
    on_torch = _audit("keras (torch)", *cases)
    on_tensorflow = _audit("keras (tensorflow)", *cases)
    assert _fails(on_torch["moments-offset-1e4"]) and _error_beyond(on_torch["moments-offset-1e4"], 100)
    assert "nan" in on_torch["gn-offset-1000-std-0.1"].failures[0]
    assert "nan" in on_torch["bn-keras-preset-offset-1e4"].failures[0]
    assert on_torch["moments-bf16-large-variance"].passed
    # TensorFlow's moments clip a bfloat16 variance to float16's largest value, 65504 -> 65536
    assert "got np.float64(65536.0)" in on_tensorflow["moments-bf16-large-variance"].failures[0]
    for case in ("moments-offset-1e4", "gn-offset-1000-std-0.1"):
        assert on_tensorflow[case].passed, on_tensorflow[case].report()


def test_exporters() -> None:
    torchscript = _audit(
        "torch.onnx TorchScript opset 17 -> onnxruntime",
        "bn-channels-last",
        "rms-basic-f32",
        "bn-eval-after-train",
    )
    assert "Invalid attribute perm {0, -1, 1, 2}" in torchscript["bn-channels-last"].failures[0]
    assert "aten::rms_norm" in torchscript["rms-basic-f32"].failures[0]
    assert torchscript[
        "bn-eval-after-train"
    ].passed  # training=TrainingMode.TRAINING exports batch statistics
    dynamo = _audit(
        "torch.onnx dynamo opset 23 -> onnxruntime",
        "bn-eval-after-train",
        "gn-offset-1000-std-1",
        "rms-basic-f32",
    )
    # a training-mode BatchNorm is exported as inference: the training steps use the running statistics
    assert dynamo["bn-eval-after-train"].failures[0].startswith("step 0 (train)")
    assert "GroupNormalization" in dynamo["gn-offset-1000-std-1"].notes and _fails(
        dynamo["gn-offset-1000-std-1"]
    )
    assert "RMSNormalization" in dynamo["rms-basic-f32"].notes and dynamo["rms-basic-f32"].passed
    opset_18 = _audit("torch.onnx dynamo opset 18 -> onnxruntime", "gn-offset-1000-std-1")
    assert "InstanceNormalization" in opset_18["gn-offset-1000-std-1"].notes
    assert "GroupNormalization" not in opset_18["gn-offset-1000-std-1"].notes
    assert opset_18["gn-offset-1000-std-1"].passed
    keras_21 = _audit("keras model.export opset 21 (tensorflow) -> onnxruntime", "ln-basic-f32")
    assert "Opset 21 is not supported" in keras_21["ln-basic-f32"].failures[0]
    keras = _audit(
        "keras model.export default opset (tensorflow) -> onnxruntime", "ln-basic-f32", "gn-offset-1000-std-1"
    )
    assert keras["gn-offset-1000-std-1"].passed
    emitted = set(keras["ln-basic-f32"].notes + keras["gn-offset-1000-std-1"].notes)
    assert emitted, "the exported models' operators are recorded"
    # tf2onnx decomposes the norms into elementwise and reduction arithmetic
    assert not {"LayerNormalization", "GroupNormalization", "InstanceNormalization"} & emitted
