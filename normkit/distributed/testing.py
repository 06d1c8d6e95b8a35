"""A communicator for tests: ``size`` ranks in one process, one thread each.

>>> import numpy as np, normkit
>>> from normkit.distributed import synchronized_moments
>>> from normkit.distributed.testing import ThreadGroup
>>> parts = [np.arange(n, dtype=np.float32).reshape(n, 1) for n in (1, 0, 3)]
>>> results = ThreadGroup(3).run(
...     lambda comm: synchronized_moments(normkit.moments(parts[comm.rank], axis=1), comm, layer="bn")
... )
>>> [r.count for r in results], results[0].mean           # 0 | 0 1 2: four values, mean 0.75
([array([4]), array([4]), array([4])], array([0.75]))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from normkit.distributed.communicator import CommunicatorError

__all__ = ["ThreadCommunicator", "ThreadGroup"]

T = TypeVar("T")


class ThreadGroup:
    """``size`` in-process ranks sharing a barrier: :meth:`run` calls a function once per rank,
    each in its own thread with that rank's :class:`ThreadCommunicator`, and returns the results
    in rank order (re-raising the first rank's error, if any rank failed).

    :param timeout: seconds a collective waits for the other ranks before it fails with a
        :class:`~normkit.distributed.CommunicatorError` on every waiting rank (a rank that skips
        a collective the others make leaves them with that error, never an endless wait).
    """

    def __init__(self, size: int, *, timeout: float = 10.0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r}: expected a positive int")
        self.size, self.timeout = size, float(timeout)
        self.errors: list[BaseException | None] = [None] * size
        self._reset()

    def _reset(self) -> None:
        self._condition = threading.Condition()
        self._rounds: dict[int, list[Any]] = {}  # collective number -> each rank's value
        self._next = [0] * self.size  # each rank's next collective
        self._failed: int | None = None  # a rank that raised

    def communicators(self) -> list[ThreadCommunicator]:
        return [ThreadCommunicator(self, rank) for rank in range(self.size)]

    def _exchange(self, rank: int, value: Any) -> list[Any]:
        """Collective number k of ``rank``: wait until every rank has given its k-th value."""
        with self._condition:
            k = self._next[rank]
            self._next[rank] += 1
            values = self._rounds.setdefault(k, [_MISSING] * self.size)
            values[rank] = value
            self._condition.notify_all()
            done = self._condition.wait_for(
                lambda: all(v is not _MISSING for v in values) or self._failed is not None, self.timeout
            )
            if all(v is not _MISSING for v in values):
                return list(values)
            why = f"rank {self._failed} failed" if self._failed is not None else "timed out"
            raise CommunicatorError(
                f"rank {rank} of {self.size}: collective {k} over threads {why}"
                + ("" if done else f" after {self.timeout} s (another rank did not join it)")
            )

    def _fail(self, rank: int) -> None:
        with self._condition:
            if self._failed is None:
                self._failed = rank
            self._condition.notify_all()

    def run(self, function: Callable[[ThreadCommunicator], T]) -> list[T]:
        results: list[Any] = [None] * self.size
        errors: list[BaseException | None] = [None] * self.size

        def target(comm: ThreadCommunicator) -> None:
            try:
                results[comm.rank] = function(comm)
            except BaseException as error:  # reported below, in rank order
                errors[comm.rank] = error
                self._fail(comm.rank)  # ranks waiting on it fail fast instead of timing out

        threads = [threading.Thread(target=target, args=(c,)) for c in self.communicators()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._reset()
        self.errors = errors
        first = next((e for e in errors if e is not None and not isinstance(e, CommunicatorError)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results


_MISSING = object()


class ThreadCommunicator:
    """One rank of a :class:`ThreadGroup` (the :class:`~normkit.distributed.Communicator`
    protocol); arrays are shared, not copied: the caller must not write them."""

    engine = "threads (normkit.distributed.testing)"

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def all_gather(self, arrays: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [tuple(a) for a in self.group._exchange(self.rank, tuple(arrays))]

    def all_gather_ints(self, values: Sequence[int]) -> list[tuple[int, ...]]:
        return [tuple(int(v) for v in a) for a in self.group._exchange(self.rank, tuple(values))]
