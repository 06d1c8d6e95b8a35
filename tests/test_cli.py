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
    assert "normkit 0.1.0 (spec version 1)" in out
    assert re.search(r"numpy +normkit 0.1.0", out) and "loaded (built in)" in out


def test_check_prints_the_agreement_matrix_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "numpy  (max abs / rel error)" in out
    for op in ("batch_norm", "instance_norm", "layer_norm"):
        for dtype in ("float16", "float32", "float64"):
            assert any(line.split()[:3] == [op, dtype, "pass"] for line in out.splitlines()), (op, dtype)
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
    variants = ["numpy", "numpy-pure"] if importlib.util.find_spec("numba") else ["numpy-pure"]
    assert [(row[3], row[4]) for row in rows] == [(m, v) for m in ("train", "eval") for v in variants]
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
