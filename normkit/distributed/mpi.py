r"""Synchronized batch norm over MPI: :class:`MPICommunicator`, a
:class:`~normkit.distributed.Communicator` on an `mpi4py <https://mpi4py.readthedocs.io>`_
intracommunicator, for NumPy and CuPy arrays (any normkit backend's arrays, through host
memory).

>>> from normkit.distributed.mpi import MPICommunicator          # doctest: +SKIP
>>> comm = MPICommunicator()          # MPI.COMM_WORLD; one for the whole model   # doctest: +SKIP
>>> bn = normkit.BatchNorm(64, communicator=comm)                 # doctest: +SKIP

launched as ``mpiexec -n 4 python -m mpi4py train.py`` (``-m mpi4py`` turns an uncaught error on
any rank into ``MPI_Abort`` of the whole job, instead of leaving the other ranks waiting).

**One collective per call.** :meth:`MPICommunicator.all_gather` packs the arrays of a rank,
:math:`a_1, \dots, a_k` with :math:`n = \sum_j |a_j|` values, into one contiguous float64 buffer
(exact for float16, bfloat16, float32, float64 and integers up to :math:`2^{53}`), makes **one**
``Iallgather`` of :math:`n` doubles per rank (every rank receives :math:`W n`), and unpacks rank
:math:`r`'s values :math:`[r n, (r + 1) n)` back into arrays of the input's type, dtype and
device. Synchronized batch norm sends :math:`n = 3C` (count, mean and :math:`M_2` per channel).

**Arrays.** NumPy arrays are copied into the buffer directly; other backends' arrays (CuPy, torch) make a round
trip through host memory with the backend's own ``to_numpy`` and ``asarray`` (a device-to-host
and a host-to-device copy of :math:`n` and :math:`W n` doubles). With ``cuda_aware=True`` and an
MPI built with CUDA support, CuPy arrays are packed on their device and the device buffers are
given to MPI directly (after synchronizing the current stream, as mpi4py's CUDA-aware demo
does); the ``mpich`` wheel from PyPI is not CUDA-aware, so the default is host staging.

**Isolation.** The collectives run on ``comm.Dup()`` (made once, when the communicator is
built: a collective call that every rank of ``comm`` makes), so they never match the program's
own collectives on ``comm`` — the practice the MPI standard recommends to libraries.

**Faults.** MPI has no timeout of its own: a rank that skips a collective (it is in eval while
the others train, or it raised before the layer) leaves the others in ``MPI_Allgather`` for
ever. Here each collective is non-blocking (``Iallgather``, ``Idup``), polled with ``Test()``
until ``timeout`` seconds have passed; then it raises :class:`~normkit.distributed.CommunicatorError`
(which the layer names). A collective cannot be cancelled in MPI, so the communicator is then
unusable (every later call raises at once): end the job — an uncaught error under
``python -m mpi4py`` aborts every rank. ``timeout=None`` waits in a blocking collective, as MPI
programs usually do. A rank that dies ends the job through ``mpiexec`` (hydra kills the others).

Importing this module imports no MPI; building an :class:`MPICommunicator` imports ``mpi4py``
(which initializes MPI).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from normkit.distributed.communicator import CommunicatorError

__all__ = ["DEFAULT_TIMEOUT", "MPICommunicator"]

Array = Any

DEFAULT_TIMEOUT = 1800.0
"""Seconds a collective waits for the other ranks by default: ``torch.distributed``'s default
for gloo (30 minutes)."""

_EXACT_INTEGER = 2**53
"""Integers of magnitude up to this travel exactly in a float64 buffer."""

_SPIN = 2e-4
"""Seconds a collective is polled with ``Test()`` alone (a prompt collective costs no more than
a blocking one)."""

_YIELD = 1e-2
"""Seconds until which polling yields the core between two ``Test()`` calls (``sleep(0)``: on an
oversubscribed machine, a rank that shares the core needs it to progress the collective)."""

_SLEEP, _MAX_SLEEP = 1e-5, 1e-3
"""After that, sleeps between two ``Test()`` calls, doubling from the first to the last: a wait
of over 10 ms (a straggler) gains at most 1 ms, and a long one does not keep a core busy."""


def _library(version: str) -> str:
    """A short name of the MPI library from ``MPI.Get_library_version()``: ``"MPICH 5.0.2"``,
    ``"Open MPI v5.0.3"``, ``"Intel(R) MPI Library 2021.10 for Linux* OS"``."""
    first = next((line for line in version.splitlines() if line.strip()), "unknown MPI library")
    first = re.sub(r"\s*\bVersion\s*:\s*", " ", first.split(",")[0])
    return re.sub(r"\s+", " ", first).strip()[:80]


class MPICommunicator:
    r"""One rank's view of an MPI intracommunicator, for :class:`normkit.BatchNorm`'s
    ``communicator=`` (the :class:`~normkit.distributed.Communicator` protocol); see the module
    docstring for the buffer layout, CuPy and faults.

    :param comm: an ``mpi4py.MPI.Intracomm``; ``None`` for ``MPI.COMM_WORLD``. normkit works on
        a duplicate of it, made here: every rank of ``comm`` must build its communicator (build
        one and give it to every layer: each duplicate is an MPI context).
    :param timeout: seconds a collective (the duplication included) waits for every rank before
        it raises :class:`~normkit.distributed.CommunicatorError`; ``None`` waits for ever in
        blocking collectives.
    :param cuda_aware: give MPI the device buffers of CuPy arrays (an MPI built with CUDA
        support); ``False`` copies them through host memory.
    :raises ImportError: without mpi4py (``pip install 'normkit[mpi]'``).
    :raises TypeError: if ``comm`` is not an mpi4py intracommunicator.
    """

    def __init__(
        self, comm: Any = None, *, timeout: float | None = DEFAULT_TIMEOUT, cuda_aware: bool = False
    ) -> None:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds, or None")
        if not isinstance(cuda_aware, bool):
            raise TypeError(f"cuda_aware={cuda_aware!r}: expected a bool")
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise ImportError(
                f"MPICommunicator needs mpi4py ({error}); install it with: pip install 'normkit[mpi]' "
                f"(mpi4py and the mpich wheel)"
            ) from error
        if comm is None:
            comm = MPI.COMM_WORLD
        if isinstance(comm, MPI.Comm) and comm == MPI.COMM_NULL:
            raise ValueError("comm is MPI.COMM_NULL; expected a communicator this process belongs to")
        if not isinstance(comm, MPI.Intracomm):
            kind = type(comm).__module__ + "." + type(comm).__qualname__
            raise TypeError(
                f"comm is a {kind}; expected an mpi4py.MPI.Intracomm (MPI.COMM_WORLD or a communicator "
                f"from its Split or Dup), or None for MPI.COMM_WORLD"
                + (
                    " (an intercommunicator gathers from the remote group)"
                    if isinstance(comm, MPI.Comm)
                    else ""
                )
            )
        self._MPI = MPI
        self.timeout = None if timeout is None else float(timeout)
        self.cuda_aware = cuda_aware
        self.engine = f"MPI ({_library(MPI.Get_library_version())})"
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        self._broken: str | None = None
        self._abandoned: list[tuple[Any, ...]] = []  # requests MPI may still complete, and their buffers
        if self.timeout is None:
            self.comm = comm.Dup()
        else:
            self.comm, request = comm.Idup()
            self._wait(request, "duplication of the communicator", ())

    def __repr__(self) -> str:
        return f"MPICommunicator(rank={self.rank}, size={self.size}, engine={self.engine!r}, timeout={self.timeout})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "an MPICommunicator cannot be pickled (it is a connection to other processes); normkit's "
            "layers drop it when pickled: give the unpickled layer a new one"
        )

    # -- the protocol ------------------------------------------------------------------------

    def all_gather(self, arrays: Sequence[Array]) -> list[tuple[Array, ...]]:
        """Every rank's ``arrays`` in rank order, in one ``Allgather`` of one float64 buffer
        (the module docstring). Every rank must pass arrays of the same shapes and dtypes (the
        layer checks the channel count and dtype first); the results have the input's type,
        dtype and device.

        :raises CommunicatorError: if the collective does not complete within ``timeout``.
        :raises ValueError: for integers that a float64 buffer would round (beyond 2**53).
        """
        self._check_usable()
        arrays = list(arrays)
        device = self._device_namespace(arrays) if arrays else None
        if device is not None:
            return self._all_gather_device(arrays, device)
        numpy_input = all(type(a) is np.ndarray for a in arrays)
        if numpy_input:
            hosts = arrays
        else:
            from normkit._registry import backend_for

            info = backend_for(arrays[0]).info
            hosts = [info.to_numpy(a) for a in arrays]
        for j, host in enumerate(hosts):
            if (
                host.dtype.kind in "iu"
                and host.size
                and max(-int(host.min()), int(host.max())) > _EXACT_INTEGER
            ):
                raise ValueError(
                    f"arrays[{j}] holds integers beyond 2**53, which a float64 buffer would round"
                )
        send = (
            np.concatenate([np.asarray(h, np.float64).reshape(-1) for h in hosts]) if hosts else np.zeros(0)
        )
        recv = np.empty(self.size * send.size, np.float64)
        self._allgather(send, recv, "all-gather")
        ranks = [_split(recv[r * send.size : (r + 1) * send.size], hosts) for r in range(self.size)]
        if numpy_input:
            return [tuple(p.astype(h.dtype) for p, h in zip(pieces, hosts, strict=True)) for pieces in ranks]
        kinds = [(info.dtype_name(a), info.device(a)) for a in arrays]
        return [
            tuple(info.asarray(p, dtype, device) for p, (dtype, device) in zip(pieces, kinds, strict=True))
            for pieces in ranks
        ]

    def all_gather_ints(self, values: Sequence[int]) -> list[tuple[int, ...]]:
        """Every rank's few integers in rank order: one ``Allgather`` of an int64 buffer.

        :raises CommunicatorError: if the collective does not complete within ``timeout``.
        """
        self._check_usable()
        ints = [int(v) for v in values]
        if any(not -(2**63) <= v < 2**63 for v in ints):
            raise ValueError(f"values={ints!r}: expected integers that fit in int64")
        send = np.array(ints, np.int64)
        recv = np.empty(self.size * send.size, np.int64)
        self._allgather(send, recv, "all-gather of integers")
        return [tuple(int(v) for v in recv[r * send.size : (r + 1) * send.size]) for r in range(self.size)]

    # -- CUDA-aware MPI ------------------------------------------------------------------------

    def _device_namespace(self, arrays: list[Array]) -> Any:
        """The array namespace to pack device arrays with, when ``cuda_aware`` and the arrays
        are CUDA arrays (``__cuda_array_interface__``, CuPy's API: ``concatenate``,
        ``empty_like`` and ``cuda.get_current_stream``); ``None`` for host staging."""
        if not self.cuda_aware or not all(hasattr(a, "__cuda_array_interface__") for a in arrays):
            return None
        first = arrays[0]
        if hasattr(first, "__array_namespace__"):
            xp = first.__array_namespace__()
        else:
            import sys

            xp = sys.modules.get(type(first).__module__.partition(".")[0])
        if not all(hasattr(xp, name) for name in ("concatenate", "empty_like", "cuda")):
            return None  # not CuPy-like: stage through the host
        return xp

    def _all_gather_device(self, arrays: list[Array], xp: Any) -> list[tuple[Array, ...]]:
        """:meth:`all_gather` with device buffers (CUDA-aware MPI): pack on the device,
        synchronize the current stream so MPI reads finished values, gather, unpack."""
        send = xp.concatenate([a.astype("float64").reshape(-1) for a in arrays])
        recv = xp.empty_like(send, shape=(self.size * send.size,))
        xp.cuda.get_current_stream().synchronize()
        self._allgather(send, recv, "all-gather of device buffers")
        return [
            tuple(
                piece.astype(a.dtype)
                for piece, a in zip(
                    _split(recv[r * send.size : (r + 1) * send.size], arrays), arrays, strict=True
                )
            )
            for r in range(self.size)
        ]

    # -- collectives with a deadline -----------------------------------------------------------

    def _allgather(self, send: Any, recv: Any, what: str) -> None:
        MPI = self._MPI
        kind = MPI.INT64_T if send.dtype == np.int64 else MPI.DOUBLE
        if self.timeout is None:
            self.comm.Allgather([send, kind], [recv, kind])
            return
        request = self.comm.Iallgather([send, kind], [recv, kind])
        self._wait(request, what, (send, recv))

    def _wait(self, request: Any, what: str, buffers: tuple[Any, ...]) -> None:
        """Poll ``request`` until it completes; past the deadline, keep it and its buffers alive
        (MPI may still write them: a collective cannot be cancelled), mark the communicator
        unusable and raise."""
        if self.timeout is None:
            request.Wait()
            return
        start = time.monotonic()
        sleep = _SLEEP
        while not request.Test():
            waited = time.monotonic() - start
            if waited < _SPIN:
                continue
            if waited >= self.timeout:
                self._abandoned.append((request, *buffers))
                self._broken = (
                    f"the MPI {what} did not complete within {self.timeout:g} s: a rank has not joined "
                    f"it (it skipped the call, e.g. it is in eval while the others train, or it is stuck "
                    f"elsewhere)"
                )
                raise CommunicatorError(
                    f"rank {self.rank} of {self.size}: {self._broken}; MPI cannot cancel a collective, so "
                    f"this communicator is unusable now: end the job (an uncaught error under `mpiexec ... "
                    f"python -m mpi4py` aborts every rank)"
                )
            if waited < _YIELD:
                time.sleep(0)  # let a rank that shares this core progress the collective
            else:
                time.sleep(min(sleep, self.timeout - waited))
                sleep = min(2 * sleep, _MAX_SLEEP)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise CommunicatorError(f"this MPICommunicator is unusable: earlier, {self._broken}; end the job")


def _split(buffer: Any, like: Sequence[Any]) -> list[Any]:
    """``buffer`` cut into consecutive pieces of the sizes and shapes of ``like``'s arrays."""
    pieces, offset = [], 0
    for a in like:
        size = math.prod(a.shape)
        pieces.append(buffer[offset : offset + size].reshape(a.shape))
        offset += size
    return pieces
