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

__all__ = ["Communicator", "CommunicatorError"]

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
        (on the device of the input)."""

    def all_gather_ints(self, values: Sequence[int]) -> list[tuple[int, ...]]:
        """Every rank's few small integers, in rank order (the layout check)."""
