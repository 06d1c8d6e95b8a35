r"""What synchronized batch norm needs from a distributed engine: a *communicator*.

Each replica (rank) holds part of the global batch. The engine-neutral algorithm
(:mod:`normkit.distributed.sync`) needs two collectives: an all-gather of a few arrays (each
rank's moments, in one buffer), and an all-gather of a few small integers (the layout check).
An engine adapter implements them: ``normkit_torch.distributed.TorchCommunicator`` over
``torch.distributed``, ``normkit.distributed.mpi`` over MPI, and
:class:`normkit.distributed.testing.ThreadGroup` in one process for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Communicator", "CommunicatorError", "CountingCommunicator"]

Array = Any


class CommunicatorError(RuntimeError):
    """A collective failed or timed out; the message names the layer and the engine."""


@runtime_checkable
class Communicator(Protocol):
    """One rank's view of a group of replicas."""

    engine: str
    """The engine, for messages: ``"torch.distributed (gloo)"``, ``"MPI (mpich)"``."""
    rank: int
    size: int

    def all_gather(self, arrays: Sequence[Array]) -> list[tuple[Array, ...]]:
        """Every rank's ``arrays``, in rank order, in one collective. Every rank passes arrays
        of the same shapes and dtypes, of one backend; the result's arrays are of that backend
        (on the device of the input). Every engine also takes NumPy arrays (small host-side
        statistics: distributed recalibration)."""

    def all_gather_ints(self, values: Sequence[int]) -> list[tuple[int, ...]]:
        """Every rank's few small integers, in rank order (the layout check)."""


class CountingCommunicator:
    """Another communicator, counting what passes through it: ``collectives`` (calls of
    :meth:`all_gather` and :meth:`all_gather_ints`), ``sent`` and ``received`` (bytes of array
    data this rank contributes to and receives from them). For benchmarks and tests."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.engine, self.rank, self.size = inner.engine, inner.rank, inner.size
        self.collectives = self.sent = self.received = 0

    def all_gather(self, arrays: Sequence[Array]) -> list[tuple[Array, ...]]:
        gathered = self.inner.all_gather(arrays)
        self.collectives += 1
        self.sent += sum(_nbytes(a) for a in arrays)
        self.received += sum(_nbytes(a) for part in gathered for a in part)
        return gathered

    def all_gather_ints(self, values: Sequence[int]) -> list[tuple[int, ...]]:
        gathered = self.inner.all_gather_ints(values)
        self.collectives += 1
        self.sent += 8 * len(values)
        self.received += 8 * sum(len(part) for part in gathered)
        return gathered


def _nbytes(array: Array) -> int:
    """Bytes of an array's data (any backend): its size times its item size."""
    size = 1
    for n in getattr(array, "shape", ()):
        size *= int(n)
    itemsize = getattr(getattr(array, "dtype", None), "itemsize", None)
    if itemsize is None:  # torch: element_size()
        itemsize = array.element_size() if hasattr(array, "element_size") else 8
    return size * int(itemsize)
