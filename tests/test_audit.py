"""``normkit audit`` itself: deliberately wrong implementations are caught by the case that
exposes them, a correct one passes everything it can express, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from normkit.audit import (
    AUDIT_CASES,
    Adapter,
    Config,
    Unsupported,
    audit_adapter,
    builtin_adapters,
    run_audit,
)


def _shape(config: Config, axes: tuple[int, ...]) -> list[int]:
    return [config.shape[a] if a not in axes else 1 for a in range(len(config.shape))]


class NumpyNorms(Adapter):
    """Layer, batch and group norm written out in NumPy (float64 inside), with an optional
    flaw: ``one-pass`` (E[x^2] - E[x]^2 in the input's precision), ``bessel`` (the unbiased
    variance in the normalization) or ``eps-outside`` ((x - mean) / (std + eps))."""

    ops = ("layer_norm", "batch_norm", "group_norm")
    dtypes = ("float32",)

    def __init__(self, flaw: str | None = None) -> None:
        self.flaw = flaw
        self.name = f"numpy ({flaw or 'correct'})"  # type: ignore[misc]

    def _normalize(
        self, x: np.ndarray, axes: tuple[int, ...], eps: float
    ) -> tuple[np.ndarray, Any, Any, int]:
        n = int(np.prod([x.shape[a] for a in axes]))
        if self.flaw == "one-pass":
            x32 = x.astype(np.float32)
            mean = x32.mean(axis=axes, keepdims=True, dtype=np.float32)
            var = np.maximum((x32 * x32).mean(axis=axes, keepdims=True, dtype=np.float32) - mean * mean, 0)
            mean, var = mean.astype(np.float64), var.astype(np.float64)
        else:
            mean = x.mean(axis=axes, keepdims=True)
            var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        if self.flaw == "bessel":
            var = var * n / max(n - 1, 1)
        if self.flaw == "eps-outside":
            return (x - mean) / (np.sqrt(var) + eps), mean, var, n
        return (x - mean) / np.sqrt(var + eps), mean, var, n

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Any:
        if config.native_defaults:
            raise Unsupported("no defaults")
        arrays = {k: np.asarray(v, np.float64) for k, v in state.items()}
        adapter = self

        class Layer:
            def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
                x = np.asarray(x, np.float64)
                c = config
                if c.op == "layer_norm":
                    y, *_ = adapter._normalize(x, c.axes, c.eps)
                    shape = [x.shape[a] if a in c.axes else 1 for a in range(x.ndim)]
                    weight = arrays.get("weight")
                    if weight is not None:
                        y = y * weight.reshape(shape)
                    if "bias" in arrays:
                        y = y + arrays["bias"].reshape(shape)
                    return y.astype(c.dtype)
                channel = [x.shape[a] if a == c.axis else 1 for a in range(x.ndim)]
                if c.op == "group_norm":
                    moved = np.moveaxis(x, c.axis, 1)
                    grouped = moved.reshape(moved.shape[0], c.groups, -1)
                    y, *_ = adapter._normalize(grouped, (2,), c.eps)
                    y = np.moveaxis(y.reshape(moved.shape), 1, c.axis)
                else:
                    if c.momentum is None or not c.track_running_stats or x.size == 0:
                        raise Unsupported("the test adapter keeps an exponential average only")
                    axes = tuple(a for a in range(x.ndim) if a != c.axis)
                    if training:
                        y, mean, var, n = adapter._normalize(x, axes, c.eps)
                        unbiased = var * n / max(n - 1, 1) if c.unbiased else var
                        m = c.momentum
                        arrays["running_mean"] = (1 - m) * arrays["running_mean"] + m * mean.reshape(-1)
                        arrays["running_var"] = (1 - m) * arrays["running_var"] + m * unbiased.reshape(-1)
                    else:
                        mean = arrays["running_mean"].reshape(channel)
                        var = arrays["running_var"].reshape(channel)
                        y = (x - mean) / np.sqrt(var + c.eps)
                if "weight" in arrays:
                    y = y * arrays["weight"].reshape(channel) + arrays["bias"].reshape(channel)
                return y.astype(c.dtype)

            def running_stats(self) -> dict[str, np.ndarray]:
                return {k: arrays[k].astype(np.float32) for k in ("running_mean", "running_var")}

        return Layer()


def _failed(adapter: Adapter) -> set[str]:
    report = audit_adapter(adapter, presets=False)
    return {r.case.id for r in report.results if not r.passed and not r.skipped}


def test_a_correct_implementation_passes_every_case_it_can_express() -> None:
    report = audit_adapter(NumpyNorms(), presets=False)
    ran = [r for r in report.results if not r.skipped]
    assert len(ran) >= 30
    assert [r.report() for r in ran if not r.passed] == []


@pytest.mark.parametrize(
    ("flaw", "exposed_by"),
    [
        # a float32 one-pass variance loses everything at |mean|/std = 1e4
        (
            "one-pass",
            {"ln-offset-1e4", "gn-offset-1e4-channels-first", "bn-offset-1e4", "ln-offset-1000-std-0.1"},
        ),
        # n/(n-1) in the normalization: a factor of 2 with two values per channel
        ("bessel", {"bn-two-values-per-channel", "gn-basic-f32", "ln-basic-f32"}),
        # eps outside the square root: off by about eps/(2 var) relative with keras's eps 1e-3
        ("eps-outside", {"ln-keras-preset", "gn-keras-preset", "bn-keras-preset-ema"}),
    ],
)
def test_a_wrong_implementation_is_caught_by_the_case_that_exposes_it(
    flaw: str, exposed_by: set[str]
) -> None:
    failed = _failed(NumpyNorms(flaw))
    assert exposed_by <= failed, f"{flaw}: not caught by {sorted(exposed_by - failed)}"


def test_the_failure_names_the_error_and_its_tolerance() -> None:
    report = run_audit(
        [NumpyNorms("one-pass")], [c for c in AUDIT_CASES if c.id == "ln-offset-1e4"], presets=False
    )
    ((name, result),) = report.failures
    assert name == "numpy (one-pass)"
    assert result.worst_error > result.worst_tolerance > 0
    assert "outside tolerance" in result.failures[0]


def test_unsupported_configurations_are_n_a_not_failures() -> None:
    report = audit_adapter(NumpyNorms(), presets=False)
    skipped = {r.case.id: r.skipped for r in report.results if r.skipped}
    assert skipped["bn-cumulative-average"] == "the test adapter keeps an exponential average only"
    assert "has no rms_norm" in skipped["rms-basic-f32"]


def test_an_adapter_that_raises_is_a_failure_with_the_message() -> None:
    class Broken(NumpyNorms):
        def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Any:
            raise RuntimeError("no kernel for this")

    report = audit_adapter(Broken(), [c for c in AUDIT_CASES if c.id == "ln-basic-f32"], presets=False)
    assert report.results[0].failures == ["raised RuntimeError: no kernel for this"]


def test_missing_packages_are_listed_not_errors() -> None:
    class Absent(NumpyNorms):
        requires = ("a_module_that_is_not_installed",)

    absent = Absent()
    absent.name = "absent"  # type: ignore[misc]
    report = run_audit([absent])
    assert report.missing == {"absent": ["a_module_that_is_not_installed"]}
    assert report.implementations == []


def test_listing_the_builtin_adapters_imports_no_framework() -> None:
    code = (
        "import sys; from normkit.audit import builtin_adapters; names = [a.name for a in builtin_adapters()]; "
        "heavy = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'flax', 'onnx', 'onnxruntime', 'mlx', "
        "'equinox') if m in sys.modules]; print(len(names), heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, heavy = done.stdout.split(" ", 1)
    assert int(count) >= 10
    assert heavy.strip() == "[]"


def test_builtin_adapter_names_are_unique() -> None:
    names = [a.name for a in builtin_adapters()]
    assert len(names) == len(set(names))


def test_cli_rejects_an_unknown_implementation() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "normkit", "audit", "--implementation", "nope"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "unknown implementation(s) ['nope']" in done.stderr


def test_cli_json_and_markdown(tmp_path: Any) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "audit.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "normkit",
            "audit",
            "--implementation",
            "torch.nn",
            "--case",
            "ln-basic-f32",
            "--case",
            "gn-offset-1e4-channels-last",
            "--markdown",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "| ln-basic-f32 | pass " in done.stdout
    data = json.loads(path.read_text())
    (implementation,) = data["implementations"]
    assert implementation["name"] == "torch.nn"
    assert {r["case"] for r in implementation["results"]} == {"ln-basic-f32", "gn-offset-1e4-channels-last"}
    assert implementation["presets"]["layer_norm"] == ["torch", "onnx"]  # eps 1e-5 over trailing axes


def test_the_docs_show_the_recorded_run() -> None:
    """docs/audit.md's tables are what the recorded run (bench/results/cpu-audit.json) renders."""
    from pathlib import Path

    from normkit.audit.report import read_json, to_markdown

    root = Path(__file__).resolve().parents[1]
    recorded = read_json((root / "bench" / "results" / "cpu-audit.json").read_text())
    page = (root / "docs" / "audit.md").read_text()
    begin, end = "<!-- recorded audit: begin -->\n", "\n<!-- recorded audit: end -->"
    shown = page[page.index(begin) + len(begin) : page.index(end)]
    assert shown.strip() == to_markdown(recorded, failures=False).strip()
