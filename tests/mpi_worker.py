"""One MPI rank of ``tests/test_distributed_mpi.py``, launched as
``mpiexec -n N python -m mpi4py tests/mpi_worker.py SCENARIO INPUTS OUTDIR``.

Each rank writes what it computed (``OUTDIR/rank<r>.npz``: arrays) and what it saw
(``OUTDIR/rank<r>.json``: error texts, types, timings); the test compares them with its oracles.
Nothing here asserts: a rank that failed to compute something records the error instead, so
every rank keeps making the same collectives in the same order.

Scenarios:

* ``numerics``: every case ``INPUTS`` holds (``<case>/part<r>``: this rank's batch) trained two
  steps with :class:`normkit.BatchNorm` over :class:`MPICommunicator`, from the state
  ``state/<name>``; then the faults that must be errors on every rank (mismatched channels and
  dtypes, a global single value), all ranks empty, eval without communication, the
  communicator's own round trip (dtypes, shapes, a CuPy-like stand-in through host memory and as
  device buffers), sub-communicators from ``Split`` and its bad input.
* ``skip``: rank 1 is in eval while rank 0 trains (it never joins the collective) and then waits
  in a barrier of its own; rank 0's communicator has a 1 s timeout. Rank 0 records the error and
  re-raises it: ``python -m mpi4py`` aborts the job.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

import normkit
from normkit.distributed.mpi import MPICommunicator


def main() -> None:
    from mpi4py import MPI  # here: the test imports this module's helpers without MPI

    scenario, inputs, outdir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    world = MPI.COMM_WORLD
    arrays: dict[str, np.ndarray] = {}
    notes: dict[str, Any] = {"size": world.Get_size()}
    out = outdir / f"rank{world.Get_rank()}"
    try:
        if scenario == "numerics":
            numerics(dict(np.load(inputs)), arrays, notes)
        elif scenario == "skip":
            skip(notes, out)
        else:
            raise ValueError(f"scenario={scenario!r}")
    finally:
        np.savez(out.with_suffix(".npz"), **arrays)
        out.with_suffix(".json").write_text(json.dumps(notes))


def error_of(call: Any) -> str | None:
    """``"TypeName: message"`` of what ``call()`` raised, or ``None``."""
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def fresh(state: dict[str, np.ndarray], comm: Any, channels: int = 3) -> normkit.BatchNorm:
    bn = normkit.BatchNorm(channels, communicator=comm)
    if channels == 3:
        bn.load_state_dict(state)
    return bn


def numerics(inputs: dict[str, np.ndarray], arrays: dict[str, np.ndarray], notes: dict[str, Any]) -> None:
    from mpi4py import MPI

    comm = MPICommunicator(timeout=30.0)
    rank, size = comm.rank, comm.size
    notes["engine"], notes["repr"] = comm.engine, repr(comm)
    layer = normkit.BatchNorm(3)
    layer(np.zeros((2, 3), np.float32))  # creates the state
    state = layer.state_dict() | {"num_batches_tracked": 0}
    state |= {k.split("/", 1)[1]: v for k, v in inputs.items() if k.startswith("state/")}

    # every case: two training steps on this rank's part
    cases = sorted({k.split("/")[0] for k in inputs if not k.startswith(("state/", "group/"))})
    for case in cases:
        bn = fresh(state, comm)
        start = time.perf_counter()
        for _ in range(2):
            y = bn(inputs[f"{case}/part{rank}"])
        notes[f"{case}/seconds"] = time.perf_counter() - start
        arrays[f"{case}/y"] = y
        arrays[f"{case}/running_mean"] = bn.running_mean
        arrays[f"{case}/running_var"] = bn.running_var
        arrays[f"{case}/num_batches_tracked"] = np.asarray(bn.num_batches_tracked)

    # all ranks empty: the running statistics and the counter stay
    bn = fresh(state, comm)
    arrays["empty/y"] = bn(np.zeros((0, 3, 4), np.float32))
    arrays["empty/running_mean"], arrays["empty/running_var"] = bn.running_mean, bn.running_var
    arrays["empty/num_batches_tracked"] = np.asarray(bn.num_batches_tracked)

    # layouts that disagree, and a global single value: a ValueError on every rank
    channels = 4 if rank == size - 1 else 3
    notes["channels"] = error_of(
        lambda: normkit.BatchNorm(communicator=comm)(np.ones((2, channels), np.float32))
    )
    dtype = np.float16 if rank == 0 else np.float32
    notes["dtype"] = error_of(lambda: normkit.BatchNorm(3, communicator=comm)(np.ones((2, 3), dtype)))
    single = np.ones((1 if rank == 0 else 0, 3), np.float32)
    notes["single"] = error_of(lambda: normkit.BatchNorm(3, communicator=comm)(single))

    # eval never communicates: rank 0 alone calls a layer in eval
    bn = fresh(state, MPICommunicator(timeout=5.0))
    if rank == 0:
        start = time.perf_counter()
        notes["eval_error"] = error_of(lambda: bn.eval()(np.ones((2, 3), np.float32)))
        notes["eval_seconds"] = time.perf_counter() - start

    # a straggler within the timeout: the others wait for it (polling), then all succeed
    bn = fresh(state, MPICommunicator(timeout=5.0))
    if rank == 1:
        time.sleep(0.5)
    start = time.perf_counter()
    notes["late_error"] = error_of(lambda: bn(np.ones((2, 3), np.float32)))
    notes["late_seconds"] = time.perf_counter() - start

    # the communicator's round trip: dtypes, shapes, zero-size and 0-d arrays, integers
    mine = own_arrays(rank)
    gathered = comm.all_gather(mine)
    for r, theirs in enumerate(gathered):
        for j, a in enumerate(theirs):
            arrays[f"gather/{r}/{j}"] = a
    notes["gather_types"] = sorted({type(a).__name__ for t in gathered for a in t})
    blocking = MPICommunicator(timeout=None).all_gather(mine)  # MPI's blocking Allgather
    notes["blocking_equal"] = all(
        a.tobytes() == b.tobytes() and a.dtype == b.dtype and a.shape == b.shape
        for t, u in zip(blocking, gathered, strict=True)
        for a, b in zip(t, u, strict=True)
    )
    notes["gather_empty"] = [list(t) for t in comm.all_gather([])]
    notes["ints"] = comm.all_gather_ints([rank, -(2**40) - rank, 2**62])
    notes["too_big"] = error_of(lambda: comm.all_gather([np.array([2**60 + 1], np.int64)]))

    # a CuPy-like stand-in: through host memory (the backend's to_numpy/asarray) ...
    normkit.register_backend(StandInPlugin(), "cupy-standin")
    host = comm.all_gather([own_arrays(rank)[1].view(StandIn), own_arrays(rank)[2].view(StandIn)])
    notes["standin_host"] = {
        "types": sorted({type(a).__name__ for t in host for a in t}),
        "to_numpy": StandInPlugin.to_numpy_calls,
        "devices": sorted(set(StandInPlugin.asarray_devices)),
        "equal": all(
            np.array_equal(np.asarray(a), b) and a.dtype == b.dtype
            for r, t in enumerate(host)
            for a, b in zip(t, own_arrays(r)[1:3], strict=True)
        ),
    }
    # ... and as device buffers (cuda_aware=True): packed by the array's namespace, stream synced
    aware = MPICommunicator(timeout=30.0, cuda_aware=True)
    device = aware.all_gather(
        [own_arrays(rank)[1].view(DeviceStandIn), own_arrays(rank)[2].view(DeviceStandIn)]
    )
    staged = comm.all_gather([own_arrays(rank)[1].view(DeviceStandIn)])  # not CUDA-aware: host
    notes["standin_device"] = {
        "types": sorted({type(a).__name__ for t in device for a in t}),
        "synchronized": DEVICE.cuda.synchronized,
        "equal": all(
            np.array_equal(np.asarray(a), b) and a.dtype == b.dtype
            for r, t in enumerate(device)
            for a, b in zip(t, own_arrays(r)[1:3], strict=True)
        ),
        "staged_types": sorted({type(a).__name__ for t in staged for a in t}),
    }

    # sub-communicators (process groups): ranks 0, 2, ... and 1, 3, ... each synchronize alone
    half = MPICommunicator(MPI.COMM_WORLD.Split(rank % 2, rank), timeout=30.0)
    bn = fresh(state, half)
    arrays["group/y"] = bn(inputs[f"group/part{rank}"])
    arrays["group/running_var"] = bn.running_var
    notes["group"] = [half.rank, half.size]

    # bad input, refused before any collective
    notes["bad_comm"] = error_of(lambda: MPICommunicator(3))
    notes["null_comm"] = error_of(lambda: MPICommunicator(MPI.COMM_NULL))
    notes["bad_timeout"] = error_of(lambda: MPICommunicator(timeout=0))
    notes["pickle_comm"] = error_of(lambda: pickle.dumps(comm))
    layer = pickle.loads(pickle.dumps(fresh(state, comm)))
    notes["pickled_layer_communicator"] = repr(layer.communicator)


def own_arrays(rank: int) -> list[np.ndarray]:
    """What rank ``rank`` gathers: every dtype the buffer carries exactly, odd shapes."""
    base = np.float64(rank) + np.array([1 / 3, -2.5e-300, 1e300, np.pi])
    return [
        base,
        np.array([rank + 1 / 3, -1e-40, 3.4e38], np.float32).reshape(3, 1),  # a subnormal, near the max
        np.array([[rank + 1 / 3, 65504.0], [-6e-8, np.pi]], np.float16),
        np.array([2**53, -(2**53), rank], np.int64),
        np.zeros((0, 5), np.float32),
        np.array(rank, np.float32),  # 0-d
        np.array([True, rank % 2 == 1]),
    ]


class StandIn(np.ndarray):
    """A CuPy-like array on a pretend device, for the host-staging path."""


class StandInPlugin:
    to_numpy_calls = 0
    asarray_devices: list[str | None] = []  # noqa: RUF012

    @staticmethod
    @normkit.hookimpl
    def normkit_backend_info() -> normkit.BackendInfo:
        def to_numpy(a: StandIn) -> np.ndarray:
            StandInPlugin.to_numpy_calls += 1
            return np.array(a)

        def asarray(a: np.ndarray, dtype: str, device: str | None) -> StandIn:
            StandInPlugin.asarray_devices.append(device)
            return np.asarray(a).astype(dtype).view(StandIn)

        return normkit.BackendInfo(
            name="cupy-standin",
            distribution="normkit-cupy",
            array_types=(f"{__name__}:StandIn",),
            dtypes=("float16", "float32", "float64"),
            devices=("cuda:0",),
            asarray=asarray,
            to_numpy=to_numpy,
            dtype_name=lambda a: a.dtype.name,
            device=lambda a: "cuda:0",
            shape=lambda a: a.shape,
            full=lambda shape, value, dtype, like: np.full(shape, value, dtype).view(StandIn),
        )


class _Stream:
    def synchronize(self) -> None:
        DEVICE.cuda.synchronized += 1


DEVICE = SimpleNamespace(
    concatenate=lambda arrays: np.concatenate(arrays).view(DeviceStandIn),
    empty_like=lambda a, shape: np.empty(shape, a.dtype).view(DeviceStandIn),
    cuda=SimpleNamespace(synchronized=0, get_current_stream=_Stream),
)
"""The array namespace of :class:`DeviceStandIn`: the few CuPy functions the device path uses."""


class DeviceStandIn(np.ndarray):
    """A CuPy-like CUDA array whose "device pointer" is host memory (MPI reads it either way)."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        interface = self.__array_interface__
        return {"shape": self.shape, "typestr": interface["typestr"], "data": interface["data"], "version": 3}

    def __array_namespace__(self, api_version: str | None = None) -> SimpleNamespace:
        return DEVICE


def skip(notes: dict[str, Any], out: Path) -> None:
    from mpi4py import MPI

    comm = MPICommunicator(timeout=1.0)
    bn = normkit.BatchNorm(3, communicator=comm)
    if comm.rank == 1:
        bn.eval()(np.ones((2, 3), np.float32))  # no collective: the others wait for it in vain
        out.with_suffix(".barrier").write_text("entered")
        MPI.COMM_WORLD.Barrier()  # its next collective, which rank 0 never reaches
        out.with_suffix(".barrier").write_text("left")
        return
    start = time.monotonic()
    try:
        bn(np.ones((2, 3), np.float32))
    except Exception as error:
        notes["error"] = f"{type(error).__name__}: {error}"
        notes["seconds"] = time.monotonic() - start
        notes["traceback"] = traceback.format_exc()
        notes["after"] = error_of(lambda: comm.all_gather_ints([1]))
        out.with_suffix(".json").write_text(json.dumps(notes))
        raise  # python -m mpi4py: MPI_Abort of every rank


if __name__ == "__main__":
    main()
