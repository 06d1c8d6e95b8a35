r"""``python -m normkit.bench_sync``: what a synchronized batch-norm call costs against a local
one, under MPI (``mpiexec -n W python -m normkit.bench_sync``) with NumPy arrays.

The global batch, ``(32, 64, 56, 56)`` float32 by default, is split evenly across the ``W``
ranks. Each rank times, interleaved over ``--rounds`` rounds (median of each), a training call of
``normkit.BatchNorm(64)`` on its shard alone (*local*: what each replica would compute without
synchronization, the statistics of its shard only) and a training call of
``normkit.BatchNorm(64, communicator=...)`` on the same shard (*synchronized*: the same
normalization with the global batch's statistics). The synchronized layer's communicator counts
the collectives and bytes of each call (:class:`~normkit.distributed.CountingCommunicator`).
Rank 0 prints one JSON record: the engine, ``W``, the shard's shape, both medians, the ratio, and
collectives and bytes per call (the first call's layout check excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

import normkit
from normkit.distributed.communicator import CountingCommunicator
from normkit.numpy_backend import kernels_in_use

__all__ = ["layers_for", "main", "measure"]


def layers_for(
    communicator: Any, channels: int
) -> tuple[normkit.BatchNorm, normkit.BatchNorm, CountingCommunicator]:
    """The local layer (no communicator) and the synchronized one (a counting communicator over
    ``communicator``): the two things compared, which must differ."""
    counting = CountingCommunicator(communicator)
    return normkit.BatchNorm(channels), normkit.BatchNorm(channels, communicator=counting), counting


def measure(communicator: Any, shape: tuple[int, ...], rounds: int, seed: int = 0) -> dict[str, Any]:
    """Time both layers on this rank's shard of a global batch of ``shape`` (module docstring)."""
    size, rank = communicator.size, communicator.rank
    if shape[0] % size:
        raise ValueError(f"shape={shape}: the batch of {shape[0]} does not split evenly across {size} ranks")
    shard_shape = (shape[0] // size, *shape[1:])
    x = np.random.default_rng(seed + rank).normal(1.0, 2.0, size=shard_shape).astype(np.float32)
    local, synchronized, counting = layers_for(communicator, shape[1])
    local(x), synchronized(x)  # warm-up: state, compiled kernels, the layout check
    before = (counting.collectives, counting.sent, counting.received)
    times: dict[str, list[float]] = {"local": [], "synchronized": []}
    for _ in range(rounds):
        for name, layer in (("local", local), ("synchronized", synchronized)):
            start = time.perf_counter()
            layer(x)
            times[name].append(time.perf_counter() - start)
    per_call = [
        (after - start) / rounds
        for after, start in zip((counting.collectives, counting.sent, counting.received), before, strict=True)
    ]
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "engine": communicator.engine,
        "ranks": size,
        "global_shape": list(shape),
        "shard_shape": list(shard_shape),
        "rounds": rounds,
        "local_ms": round(1e3 * medians["local"], 3),
        "synchronized_ms": round(1e3 * medians["synchronized"], 3),
        "ratio": round(medians["synchronized"] / medians["local"], 3),
        "collectives_per_call": per_call[0],
        "bytes_sent_per_call": per_call[1],
        "bytes_received_per_call": per_call[2],
        "numpy_kernels": kernels_in_use(),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m normkit.bench_sync", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--shape", default="32,64,56,56", help="the global batch's shape (default 32,64,56,56)"
    )
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    from normkit.distributed.mpi import MPICommunicator

    shape = tuple(int(n) for n in args.shape.split(","))
    communicator = MPICommunicator()
    record = measure(communicator, shape, args.rounds)
    if communicator.rank == 0:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
