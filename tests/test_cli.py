"""The ``normkit`` command: info, check, bench."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from normkit.cli import main


def test_python_dash_m_normkit_runs_the_same_command() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "normkit", "--version"], capture_output=True, text=True, timeout=60
    )
    assert process.returncode == 0 and process.stdout.strip() == "normkit 0.1.0"


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "normkit 0.1.0 (spec version 2)" in out
    assert re.search(r"numpy +normkit 0.1.0", out) and "loaded (built in)" in out


def test_check_prints_the_agreement_matrix_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "numpy  (error nearest its tolerance)" in out
    assert "\nHow cases are judged: docs/conformance.md\n" in out
    for op in ("batch_norm", "instance_norm", "layer_norm"):
        for dtype in ("float16", "float32", "float64"):
            line = next(line for line in out.splitlines() if line.split()[:3] == [op, dtype, "pass"])
            error, tolerance = re.search(r"pass +(\S+) \(tol (\S+)\)", line).groups()
            assert 0 <= float(error) <= float(tolerance), line  # a pass shows an error within its tolerance
    assert "every case passes on every backend" in out


def test_check_fails_with_exit_code_1_when_a_backend_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    import types

    import numpy as np

    import normkit
    from normkit import _registry, numpy_backend

    def normkit_backend_info() -> normkit.BackendInfo:
        return normkit.BackendInfo(**{**numpy_backend.normkit_backend_info().__dict__, "name": "off-by-eps"})

    def normkit_layer_norm(x, weight, bias, axes, eps):
        return (numpy_backend.normkit_layer_norm(x, weight, bias, axes, eps) * np.float32(1.001)).astype(
            x.dtype
        )

    module = types.ModuleType("off_by_eps")
    module.normkit_backend_info = normkit.hookimpl(normkit_backend_info)
    module.normkit_layer_norm = normkit.hookimpl(normkit_layer_norm)
    normkit.register_backend(module, "off-by-eps")
    try:
        assert main(["check", "--backend", "numpy", "--backend", "off-by-eps"]) == 1
    finally:
        _registry.reset()
    out = capsys.readouterr().out
    assert "FAIL" in out and "numpy vs off-by-eps" in out and "normkit check: FAILED" in out
    failing = re.findall(r"FAIL \d+/\d+ +(\S+) \(tol (\S+)\)", out)
    assert failing and all(float(error) > float(tolerance) for error, tolerance in failing)
    assert "replay:  from normkit.testing import Case, run_case" in out


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch (the native baseline) is not installed"
)
def test_bench_reports_batch_norm_against_torch_and_the_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "bench.json"
    assert (
        main(
            ["bench", "--backend", "numpy", "--workload", "bn2d-nchw", "--rounds", "3", "--json", str(output)]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("bn2d-nchw")]
    # compiled kernels, compiled writing into out=, pure NumPy
    variants = ["numpy", "numpy-out", "numpy-pure"] if importlib.util.find_spec("numba") else ["numpy-pure"]
    assert [(row[3], row[4]) for row in rows] == [(m, v) for m in ("train", "eval") for v in variants]
    assert all(row[6] == "ms" and row[9] == "(torch)" for row in rows)  # times carry their unit
    assert "x floor    median of the per-round ratios normkit / floor" in out  # the legend
    results = json.loads(output.read_text())["results"]
    for result in results:
        assert result["native"] == "torch" and result["shape"] == [32, 64, 56, 56]
        assert result["ratio_to_native"] > 0 and result["ratio_to_floor"] > 0 and result["rounds"] == 3


def test_check_fails_when_no_case_can_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--backend", "numpy", "--device", "cuda"]) == 1
    assert "numpy: no case ran (backend 'numpy' has no device 'cuda')" in capsys.readouterr().out


def test_bench_rejects_bad_arguments_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backend", "nope"]) == 2
    assert "backend='nope' is neither registered nor installed" in capsys.readouterr().err
    assert main(["bench", "--workload", "nope"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--rounds", "1"])
    assert "need at least 2 rounds" in capsys.readouterr().err


def test_bench_plots_time_over_the_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    assert (
        main(["bench", "--backend", "numpy", "--workload", "tiny", "--rounds", "2", "--plot", str(plot)]) == 0
    )
    assert f"plot written to {plot}" in capsys.readouterr().out
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.stat().st_size > 5000


def test_bench_help_lists_every_workload(capsys: pytest.CaptureFixture[str]) -> None:
    from normkit.bench import WORKLOADS

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    listed = [
        line.split()[0] for line in out.split("workloads (default: all):")[1].splitlines() if line.strip()
    ]
    assert listed == [w.name for w in WORKLOADS]


def test_tiny_times_are_printed_in_microseconds() -> None:
    from normkit.bench import format_time

    assert [format_time(ms) for ms in (0.0123, 0.0999, 0.1, 3.714)] == [
        "12.3 µs",
        "99.9 µs",
        "0.10 ms",
        "3.71 ms",
    ]


def _result(workload: str, noise: float):
    from normkit.bench import BenchResult

    return BenchResult(
        workload=workload, shape=(2, 4), dtype="float32", mode="train", backend="numpy", native=None,
        normkit_ms=1.0, native_ms=None, floor_ms=1.0, ratio_to_native=None, ratio_to_floor=1.0,
        overhead_us=None, noise=noise, rounds=2,
    )  # fmt: skip


def test_bench_warns_when_a_row_is_noisy() -> None:
    from normkit.bench import noise_warning

    assert noise_warning([_result("tiny", 0.25), _result("bn1d", 0.1)]) is None
    warning = noise_warning([_result("tiny", 0.4), _result("bn1d", 0.56), _result("ln-768", 0.2)])
    assert (
        warning is not None
        and "noise above 25 % in 2 row(s) (tiny train on numpy, bn1d train on numpy)" in warning
    )


def test_no_timed_callable_can_shadow_another() -> None:
    from normkit.bench import timed_calls

    def mine() -> None: ...

    def native() -> None: ...

    def floor() -> None: ...

    calls = timed_calls({"torch": mine}, floor, {"torch": native})  # a backend and a native both named torch
    assert calls == {"normkit:torch": mine, "floor": floor, "native:torch": native}
    with pytest.raises(ValueError, match="'native:torch' and 'normkit:torch' are the same callable"):
        timed_calls({"torch": mine}, floor, {"torch": mine})
    with pytest.raises(ValueError, match="the same callable"):
        timed_calls({"numpy": mine}, mine, {})
    # labels of different kinds cannot coincide, whatever the names
    assert len(timed_calls({"floor": mine, "native:x": native}, floor, {"normkit:floor": lambda: None})) == 4


def test_each_job_times_distinct_callables_under_distinct_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The calls a bench job times: normkit's variants, the floor and the natives, all different."""
    from normkit import bench

    seen: list[dict] = []
    original = bench._time_interleaved

    def spy(calls: dict, rounds: int, repeats: int = 1) -> dict:
        seen.append(dict(calls))
        return original(calls, rounds, repeats)

    monkeypatch.setattr(bench, "_time_interleaved", spy)
    tiny = next(w for w in bench.WORKLOADS if w.name == "tiny")
    results = bench.run_bench(["numpy"], (tiny,), rounds=2)
    assert len(seen) == 2 and len(results) == 2 * len(seen[0]) - 2 * (
        1 + len(bench.baselines.natives_for("numpy"))
    )
    for calls in seen:
        assert "floor" in calls and any(label.startswith("normkit:") for label in calls)
        assert len({id(call) for call in calls.values()}) == len(calls)


@pytest.mark.parametrize("user_setting", [None, "0"])
def test_check_and_bench_quiet_tensorflow_unless_the_user_chose(
    user_setting: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    if user_setting is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", user_setting)
    assert main(["check", "--backend", "numpy"]) == 0
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == (user_setting or "2")  # INFO and WARNING notices hidden


def test_a_closed_pipe_ends_the_command_without_a_traceback() -> None:
    """``normkit info | head -0``: the reader is gone before the first line is written."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = subprocess.run(
            [sys.executable, "-m", "normkit", "info"], stdout=write_end, stderr=subprocess.PIPE, timeout=300
        )
    finally:
        os.close(write_end)
    assert process.returncode == 1 and b"Traceback" not in process.stderr, process.stderr.decode()
