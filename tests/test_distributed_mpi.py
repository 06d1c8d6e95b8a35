"""Synchronized batch norm over MPI (normkit.distributed.mpi.MPICommunicator), in real processes:
``mpiexec -n 4|3|2 python -m mpi4py tests/mpi_worker.py`` over loopback, one launch per group
of checks (each launch takes 2-5 s on 2 cores). Every rank's output is compared with the float64
reference on the concatenated batch, the running statistics must be bit-identical on every rank
and equal to one process on the whole batch; faults must be errors on every rank, never hangs.

Runs where mpi4py and an ``mpiexec`` are installed (``pip install 'normkit[mpi]'``: mpi4py and
the mpich wheel); skips with the reason otherwise. Each launch has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import normkit
from normkit import reference

# the thread tests' helpers: the same data, state and output bound on every engine
from normkit.testing.distributed import bn_state, output_bound, parts_of
from normkit.testing.tolerances import statistics_tolerance

WORKER = Path(__file__).with_name("mpi_worker.py")
LAUNCH_TIMEOUT = 120.0
"""Seconds one mpiexec launch may take before the test fails (they take 1-3 s)."""

OVERSUBSCRIBED = {
    # MPICH's own CI settings for more ranks than cores (pmodels/mpich ci-workflow.yml): yield
    # in the progress loop instead of spinning, so 4 ranks share 2 cores without crawling
    "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
    "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1",
    "NUMBA_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}

CASES = {"float32-offset-1e4": ("float32", 1e4), "float16": ("float16", 3.0)}
LAUNCHES = {"unequal": (1, 7, 64, 200), "one-empty": (0, 5, 11), "pair": (3, 64)}


def find_mpiexec() -> tuple[list[str], str | None]:
    """The launcher next to this Python (the mpich wheel's, which matches mpi4py), else on the
    PATH; with the flags its kind needs; and why the tests cannot run, if they cannot."""
    try:
        import mpi4py  # noqa: F401  (not mpi4py.MPI: the test process stays out of MPI)
    except ImportError:
        return [], "mpi4py is not installed (pip install 'normkit[mpi]')"
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        return [], "no mpiexec next to this Python or on the PATH (pip install mpich)"
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "HYDRA" in version:  # MPICH: start the ranks on this machine, never by ssh
        return [found, "-launcher", "fork"], None
    if "Open MPI" in version or "OpenRTE" in version:
        return [found, "--oversubscribe"], None
    return [found], None


MPIEXEC, MISSING = find_mpiexec()


class Launch(NamedTuple):
    returncode: int
    seconds: float
    output: str
    arrays: list[dict[str, np.ndarray]]  # per rank
    notes: list[dict[str, Any]]  # per rank


def launch(ranks: int, scenario: str, inputs: dict[str, np.ndarray], outdir: Path) -> Launch:
    """``mpiexec -n ranks python -m mpi4py mpi_worker.py scenario``, and what each rank wrote."""
    if MISSING is not None and os.environ.get("NORMKIT_TEST_MPI") == "required":
        pytest.fail(f"NORMKIT_TEST_MPI=required, but {MISSING}")  # CI installs normkit[mpi]
    if MISSING is not None:
        pytest.skip(MISSING)
    outdir.mkdir()
    np.savez(outdir / "inputs.npz", **inputs)
    command = [*MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(WORKER), scenario]
    start = time.monotonic()
    done = subprocess.run(
        [*command, str(outdir / "inputs.npz"), str(outdir)],
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        env=os.environ | OVERSUBSCRIBED,
    )
    seconds = time.monotonic() - start
    arrays = [dict(np.load(p)) if (p := outdir / f"rank{r}.npz").exists() else {} for r in range(ranks)]
    notes = [
        json.loads(p.read_text()) if (p := outdir / f"rank{r}.json").exists() else {} for r in range(ranks)
    ]
    return Launch(done.returncode, seconds, done.stdout + done.stderr, arrays, notes)


def numerics_inputs(sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    state = bn_state()
    inputs = {f"state/{k}": np.asarray(state[k]) for k in ("weight", "bias", "running_mean", "running_var")}
    for case, (dtype, loc) in CASES.items():
        for r, part in enumerate(parts_of(sizes, loc, dtype)):
            inputs[f"{case}/part{r}"] = part
    for r, part in enumerate(parts_of(tuple(n + 2 for n in sizes), 2.0, "float32", seed=7)):
        inputs[f"group/part{r}"] = part
    return inputs


@pytest.fixture(scope="module", params=list(LAUNCHES), ids=list(LAUNCHES))
def numerics(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    sizes = LAUNCHES[request.param]
    inputs = numerics_inputs(sizes)
    run = launch(len(sizes), "numerics", inputs, tmp_path_factory.mktemp("mpi") / request.param)
    assert run.returncode == 0, run.output[-4000:]
    assert [n["size"] for n in run.notes] == [len(sizes)] * len(sizes), "the ranks did not form one job"
    return sizes, inputs, run


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_normalizes_with_the_global_batch(numerics: tuple, case: str) -> None:
    sizes, inputs, run = numerics
    dtype, _ = CASES[case]
    results = run.arrays
    # running statistics: the same bits on every rank, after two steps
    for r in results:
        np.testing.assert_array_equal(r[f"{case}/running_mean"], results[0][f"{case}/running_mean"])
        np.testing.assert_array_equal(r[f"{case}/running_var"], results[0][f"{case}/running_var"])
        assert int(r[f"{case}/num_batches_tracked"]) == 2
    # against the float64 reference on the concatenated batch, two steps
    parts = [inputs[f"{case}/part{r}"] for r in range(len(sizes))]
    whole = np.concatenate(parts)
    state = bn_state()
    rm, rv = (np.asarray(state[k], np.float64) for k in ("running_mean", "running_var"))
    w = np.asarray(state["weight"], np.float64)
    for _ in range(2):
        y_ref, rm, rv = reference.batch_norm(
            whole, w, state["bias"], rm, rv,
            training=True, momentum=0.1, eps=1e-5, axis=1, unbiased_running_var=True,
        )  # fmt: skip
    magnitude = float(np.abs(whole.astype(np.float64)).max())
    steps = 2
    for statistic, expected in (("mean", rm), ("var", rv)):
        tolerance = statistics_tolerance(dtype, statistic, magnitude)
        np.testing.assert_allclose(
            results[0][f"{case}/running_{statistic}"], expected,
            rtol=steps * tolerance.rtol, atol=steps * tolerance.atol,
        )  # fmt: skip
    ys = [r[f"{case}/y"] for r in results]
    assert [y.shape[0] for y in ys] == list(sizes) and all(y.dtype == np.dtype(dtype) for y in ys)
    y = np.concatenate(ys).astype(np.float64)
    count, mu, m2 = reference.moments(whole, (0, 2), None)
    assert np.all(
        np.abs(y - y_ref) <= output_bound(whole.astype(np.float64), y_ref, mu, m2 / count, w, dtype)
    )
    # and one process on the whole batch: the same running statistics within both tolerances
    single = normkit.BatchNorm(3)
    single.load_state_dict(state)
    for _ in range(2):
        single(whole)
    for statistic, expected in (("mean", single.running_mean), ("var", single.running_var)):
        tolerance = statistics_tolerance(dtype, statistic, magnitude).pairwise()
        np.testing.assert_allclose(
            results[0][f"{case}/running_{statistic}"], expected,
            rtol=steps * tolerance.rtol, atol=steps * tolerance.atol,
        )  # fmt: skip


def test_all_ranks_empty_leave_the_running_statistics_and_counter_alone(numerics: tuple) -> None:
    state = bn_state()
    for r in numerics[2].arrays:
        assert r["empty/y"].shape == (0, 3, 4)
        np.testing.assert_array_equal(r["empty/running_mean"], state["running_mean"])
        np.testing.assert_array_equal(r["empty/running_var"], state["running_var"])
        assert int(r["empty/num_batches_tracked"]) == 0


def test_layouts_that_disagree_and_a_global_single_value_are_errors_on_every_rank(numerics: tuple) -> None:
    sizes, _, run = numerics
    last = len(sizes) - 1
    layouts = ", ".join(f"rank {r}: {4 if r == last else 3} channels, float32" for r in range(len(sizes)))
    dtypes = ", ".join(
        f"rank {r}: 3 channels, {'float16' if r == 0 else 'float32'}" for r in range(len(sizes))
    )
    for r, notes in enumerate(run.notes):
        engine = re.escape(notes["engine"])
        assert re.fullmatch(
            rf"ValueError: layer 'BatchNorm\({4 if r == last else 3}\)': the replicas over {engine} disagree "
            rf"on the input's layout \({layouts}\); .*",
            notes["channels"],
        ), notes["channels"]
        assert notes["dtype"].startswith("ValueError: ") and f"({dtypes})" in notes["dtype"]
        assert re.match(
            rf"ValueError: layer 'BatchNorm\(3\)': the global batch over {engine} has 1 value",
            notes["single"],
        )
    assert re.fullmatch(r"MPI \(.+\)", run.notes[0]["engine"])


def test_eval_never_communicates(numerics: tuple) -> None:
    notes = numerics[2].notes[0]  # rank 0 alone called a layer in eval; a collective would time out
    assert notes["eval_error"] is None


def test_a_straggler_within_the_timeout_is_waited_for(numerics: tuple) -> None:
    notes = numerics[2].notes  # rank 1 joined 0.5 s late; the timeout is 5 s
    assert all(n["late_error"] is None for n in notes)
    assert notes[0]["late_seconds"] >= 0.5


def test_one_buffer_carries_every_dtype_and_shape_exactly(numerics: tuple) -> None:
    from mpi_worker import own_arrays

    sizes, _, run = numerics
    for r in range(len(sizes)):
        for j, expected in enumerate(own_arrays(r)):
            for gathered in run.arrays:
                got = gathered[f"gather/{r}/{j}"]
                assert got.dtype == expected.dtype and got.shape == expected.shape, (r, j)
                assert got.tobytes() == expected.tobytes(), (r, j)  # the same bits
    for notes in run.notes:
        assert notes["gather_types"] == ["ndarray"]
        assert notes["blocking_equal"]  # timeout=None: a blocking Allgather, the same result
        assert notes["gather_empty"] == [[]] * len(sizes)
        assert notes["ints"] == [[r, -(2**40) - r, 2**62] for r in range(len(sizes))]
        assert (
            notes["too_big"]
            == "ValueError: arrays[0] holds integers beyond 2**53, which a float64 buffer would round"
        )


def test_cupy_like_arrays_go_through_host_memory_or_as_device_buffers(numerics: tuple) -> None:
    for notes in numerics[2].notes:
        # not CUDA-aware: the backend's to_numpy once per array, asarray back onto its device
        assert notes["standin_host"] == {
            "types": ["StandIn"],
            "to_numpy": 2,
            "devices": ["cuda:0"],
            "equal": True,
        }
        # CUDA-aware: packed and unpacked by the array's namespace, after one stream synchronize
        assert notes["standin_device"] == {
            "types": ["DeviceStandIn"], "synchronized": 1, "equal": True, "staged_types": ["ndarray"],
        }  # fmt: skip


def test_sub_communicators_synchronize_each_group_alone(numerics: tuple) -> None:
    sizes, inputs, run = numerics
    for color in (0, 1):  # MPI.COMM_WORLD.Split(rank % 2): ranks 0, 2, ... and 1, 3, ...
        group = list(range(color, len(sizes), 2))
        assert [run.notes[r]["group"] for r in group] == [[i, len(group)] for i in range(len(group))]
        for r in group:
            np.testing.assert_array_equal(
                run.arrays[r]["group/running_var"], run.arrays[group[0]]["group/running_var"]
            )
        whole = np.concatenate([inputs[f"group/part{r}"] for r in group])
        single = normkit.BatchNorm(3)
        single.load_state_dict(bn_state())
        single(whole)
        tolerance = statistics_tolerance("float32", "var", float(np.abs(whole).max())).pairwise()
        np.testing.assert_allclose(
            run.arrays[group[0]]["group/running_var"], single.running_var, **tolerance.kwargs
        )


def test_bad_input_is_refused_by_name(numerics: tuple) -> None:
    notes = numerics[2].notes[0]
    assert notes["bad_comm"] == (
        "TypeError: comm is a builtins.int; expected an mpi4py.MPI.Intracomm (MPI.COMM_WORLD or a "
        "communicator from its Split or Dup), or None for MPI.COMM_WORLD"
    )
    assert notes["null_comm"].startswith("ValueError: comm is MPI.COMM_NULL")
    assert notes["bad_timeout"] == "ValueError: timeout=0: expected a positive number of seconds, or None"
    assert notes["pickle_comm"].startswith("TypeError: an MPICommunicator cannot be pickled")
    assert notes["pickled_layer_communicator"] == "None"


def test_a_rank_that_skips_the_collective_leaves_the_others_with_an_error_not_a_hang(tmp_path: Path) -> None:
    run = launch(2, "skip", {}, tmp_path / "skip")
    # rank 1 is in eval and then waits in a barrier of its own; rank 0's layout check times out
    # after 1 s, and its uncaught error aborts the job (python -m mpi4py)
    assert run.returncode != 0 and "MPI_Abort" in run.output, run.output[-4000:]
    notes = run.notes[0]
    assert re.fullmatch(
        r"CommunicatorError: layer 'BatchNorm\(3\)': the layout check over MPI \(.+\) failed on rank 0 of 2 "
        r"\(CommunicatorError: rank 0 of 2: the MPI all-gather of integers did not complete within 1 s: "
        r"a rank has not joined it .*",
        notes["error"],
    ), notes["error"]
    assert notes["seconds"] >= 1.0  # it waited for the deadline (no upper bound: no timed asserts)
    assert "unusable" in notes["after"]  # later collectives refuse at once
    assert (tmp_path / "skip" / "rank1.barrier").read_text() == "entered"  # aborted while waiting


def test_importing_the_module_imports_no_mpi() -> None:
    code = "import sys, normkit.distributed.mpi; assert 'mpi4py' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
