"""``normkit bench`` cannot time a backend against itself: for every torch and tensorflow
workload, the native callable runs none of normkit's code and normkit's callable does.

(A native named like the backend once overwrote normkit's own op in the table of timed calls,
and every torch row read 1.00x.)"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

import normkit
from normkit import bench

pytest.importorskip("normkit_torch")
pytest.importorskip("normkit_tensorflow")

TINY = tuple(w for w in bench.WORKLOADS if w.name == "tiny" or (w.module and w.name.endswith("-tiny")))


def _patch_normkit(monkeypatch: pytest.MonkeyPatch, running: list[str], made: list[tuple[str, str]]) -> None:
    """Record, with the label being timed, every call into normkit: its functional ops and the
    kernels of the torch and Keras layers (TensorFlow runs Python only while tracing, so the
    calls are recorded as they happen, during the first calls of the run)."""
    import normkit_tensorflow.kernels
    import normkit_torch.kernels

    for module in (normkit, normkit_torch.kernels, normkit_tensorflow.kernels):
        for op in ("batch_norm", "instance_norm", "layer_norm"):
            original = getattr(module, op)

            @functools.wraps(original)  # the same signature: plugins register kernels as hooks
            def counting(*args: Any, _original: Any = original, _name: str = op, **kwargs: Any) -> Any:
                made.append((running[-1], _name))
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, op, counting)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_natives_run_no_normkit_code_and_normkit_rows_do(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, made = ["(none)"], []
    _patch_normkit(monkeypatch, running, made)
    labels: list[list[str]] = []
    original = bench._time_interleaved

    def spy(calls: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1) -> dict[str, list[float]]:
        labels.append(list(calls))

        job = len(labels) - 1

        def labelled(label: str, call: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                running.append(f"{job}/{label}")
                try:
                    return call()
                finally:
                    running.pop()

            return run

        return original({label: labelled(label, call) for label, call in calls.items()}, rounds, 1)

    monkeypatch.setattr(bench, "_time_interleaved", spy)
    results = bench.run_bench([backend], TINY, rounds=2)
    assert {r.workload for r in results} == {w.name for w in TINY}
    assert all(r.native is not None for r in results)
    assert len(labels) == len({(r.workload, r.mode) for r in results})
    ran = {label for label, _ in made}  # "<job>/<label>" of every callable that ran normkit's code
    for job, job_labels in enumerate(labels):
        natives = [label for label in job_labels if label.startswith(bench.NATIVE)]
        assert natives and bench.NORMKIT + backend in job_labels
        assert not ran.intersection(f"{job}/{label}" for label in natives), (
            f"job {job}: a native ran normkit's code"
        )
        assert f"{job}/{bench.NORMKIT}{backend}" in ran, (
            f"job {job}: normkit's row ran none of normkit's code"
        )
    assert {label.split("/", 1)[1] for label in ran} == {bench.NORMKIT + backend}
