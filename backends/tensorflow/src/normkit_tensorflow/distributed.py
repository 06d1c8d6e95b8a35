r"""Synchronized batch norm on ``tf.distribute``: ``MirroredStrategy`` (the devices of one
machine, logical CPU devices included) and ``MultiWorkerMirroredStrategy`` (``TF_CONFIG``).

:class:`ReplicaCommunicator` is the :class:`normkit.distributed.Communicator` protocol over the
current replica context (``tf.distribute.get_replica_context()``): inside ``strategy.run`` (and
so inside Keras's ``fit``, whose train step runs there), eagerly or inside ``tf.function``.
``normkit_tensorflow.BatchNormalization(synchronized=True)`` uses it in training:

1. each replica computes its per-channel moments :math:`(n_r, \mu_r, M_{2,r})` with normkit's
   shifted two-pass kernel (:func:`normkit_tensorflow.kernels.moments`; Keras's mask selects
   the values; an empty replica has :math:`(0, 0, 0)`);
2. :meth:`ReplicaCommunicator.all_gather` packs them, after a small header, into one float64
   vector and makes **one** ``ReplicaContext.all_gather(value, axis=0)``; every replica merges
   every replica's moments with Chan's formula in replica order
   (:func:`normkit.distributed.synchronized_moments`):

   .. math::

      n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad \mu = \mu_a + \delta\,\frac{n_b}{n},
      \quad M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n},

   so every replica holds bit-identical :math:`(N, \mu, M_2)`, exact for unequal and empty
   replicas and stable far from 0 (Keras's own ``synchronized=True`` all-reduces
   :math:`\sum x`, :math:`\sum x^2` and the count and takes :math:`E[x^2] - E[x]^2`);
3. :math:`y = \gamma\,(x - \mu)/\sqrt{M_2/N + \epsilon} + \beta` on each replica's part, and the
   moving statistics move with the global count (:math:`M_2/(N-1)` for the unbiased variance of
   the torch preset; a global count of 0 leaves them unchanged).

Gradients need nothing of normkit's own: TensorFlow differentiates through
``ReplicaContext.all_gather`` (its gradient all-reduces the gathered values' gradients and
slices this replica's part back out), so each replica's :math:`\partial/\partial x` is the
gradient of the sum of every replica's loss, as for batch norm on the concatenated batch, and
its :math:`\partial/\partial\gamma`, :math:`\partial/\partial\beta` are the sums over its own
part, which the strategy sums over the replicas as it does every gradient.

**The layout check travels with the moments.** Inside ``tf.function`` every gathered value is a
tensor, so the core's :func:`normkit.distributed.check_layout` (a separate collective whose
integers Python compares) cannot run there. Instead each replica's vector starts with a header,
``[length, replica id, channels, dtype code, number of arrays, their sizes, their dtype codes]``;
every replica walks the gathered vector by those lengths, reads every replica's header and
compares it with its own. Different channel counts give vectors of different lengths, which
``all_gather`` along axis 0 accepts (so nothing hangs), and the walk finds each replica's header
wherever it is, so **every** replica sees the disagreement: eagerly a :class:`LayoutMismatch`
(a ``ValueError``) naming the layer, the engine and every replica's channels and dtype; inside
``tf.function`` a ``tf.errors.InvalidArgumentError`` from a ``tf.debugging.Assert`` with the same
words and each replica's ``[rank, channels, dtype code]``. Under ``MirroredStrategy`` all replicas run
one layer object with one set of variables, so their layouts cannot disagree; under
``MultiWorkerMirroredStrategy`` each worker builds its own model, and this is what catches two
workers that built different ones. The check costs ``5 + 2k`` numbers per replica in the one
collective (``k = 3`` arrays), no extra collective, on every call.

The replica id in the header also puts the gathered parts in replica order whatever order the
engine returns them in (both strategies return replica order; the reordering makes it certain).

**Failures of the engine itself** (a worker that never joins, a lost peer) are TensorFlow's own
errors, raised where TensorFlow raises them: eagerly the strategy runs the collective in its main
thread (``merge_call``), outside the replica's Python, and inside ``tf.function`` at run time, so
neither passes through normkit's code to be renamed; inside ``tf.function`` TensorFlow names the
node, which carries the layer's name (``batch_normalization/allgather/CollectiveGatherV2``).
Without a timeout a worker that skips the collective leaves the others waiting: give
``MultiWorkerMirroredStrategy(communication_options=tf.distribute.experimental.CommunicationOptions(
timeout_seconds=...))`` (or this communicator's ``timeout``) for a ``DeadlineExceededError``
instead. Under ``MirroredStrategy`` every replica runs the same function, so none can skip it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from normkit.distributed.sync import DTYPE_CODES

__all__ = ["LayoutMismatch", "ReplicaCommunicator", "engine_name"]

_HEADER_FIXED = 5
"""``[length, replica id, channels, dtype code, number of arrays]``, then each array's size and
each array's dtype code."""

_ARRAY_DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")
"""The dtypes :meth:`ReplicaCommunicator.all_gather` carries (exactly, in float64: integers
below :math:`2^{53}`, every float16/bfloat16/float32)."""


class LayoutMismatch(ValueError):
    """The replicas disagree on the layout of what they synchronize (channel count, dtype):
    raised on every replica, naming the layer, the engine and each replica's layout."""


def engine_name(strategy: tf.distribute.Strategy) -> str:
    """``"tf.distribute (MirroredStrategy)"``, ``"tf.distribute (MultiWorkerMirroredStrategy)"``:
    the strategy by its public name (``MultiWorkerMirroredStrategy``'s class is
    ``CollectiveAllReduceStrategy``)."""
    cls = type(strategy)
    name = cls.__name__
    try:
        from tensorflow.python.util import tf_export

        canonical = tf_export.get_canonical_name_for_symbol(cls, api_name="tensorflow")
        if canonical:
            name = canonical.rsplit(".", 1)[-1]
    except Exception:  # pragma: no cover - an internal moved: the class's own name will do
        pass
    return f"tf.distribute ({name})"


def _describe(channels: int, code: int) -> str:
    dtype = DTYPE_CODES[code] if 0 <= code < len(DTYPE_CODES) else "another dtype"
    return f"{channels} channels, {dtype}"


class ReplicaCommunicator:
    """The :class:`normkit.distributed.Communicator` protocol over a ``tf.distribute`` replica
    context (see the module docstring).

    :param context: the replica context (default: ``tf.distribute.get_replica_context()``).
    :param layer: the layer's name, for errors raised inside ``tf.function``.
    :param channels: this replica's channel count, compared across replicas in
        :meth:`all_gather` (-1: none).
    :param dtype: this replica's input dtype name, compared likewise (``None``: none).
    :param timeout: seconds :meth:`all_gather` waits for the other replicas before it fails with
        ``tf.errors.DeadlineExceededError`` (``CommunicationOptions(timeout_seconds=...)``, which
        TensorFlow honours under ``MultiWorkerMirroredStrategy`` only); ``None``: the strategy's
        own ``communication_options``.
    :raises RuntimeError: in a cross-replica context (inside ``strategy.scope()`` but not inside
        ``strategy.run``), where there is no replica to be.

    ``engine`` names the strategy; ``size`` is ``num_replicas_in_sync``; ``rank`` is
    ``replica_id_in_sync_group`` as a Python int (MirroredStrategy and
    MultiWorkerMirroredStrategy know it while tracing; -1 where a strategy knows it only at run
    time: it then appears in messages only). The replica id that orders the gathered parts is
    the tensor itself, so that case is exact too.
    """

    def __init__(
        self,
        context: tf.distribute.ReplicaContext | None = None,
        *,
        layer: str = "",
        channels: int = -1,
        dtype: str | None = None,
        timeout: float | None = None,
    ) -> None:
        context = context if context is not None else tf.distribute.get_replica_context()
        if context is None:
            raise RuntimeError(
                "no replica context: this is tf.distribute's cross-replica context (inside "
                "strategy.scope() but outside strategy.run); synchronize inside strategy.run"
            )
        self.context = context
        self.engine = engine_name(context.strategy)
        self.size = int(context.num_replicas_in_sync)
        static = tf.get_static_value(context.replica_id_in_sync_group)
        self.rank = -1 if static is None else int(static)
        self.layer = layer
        self.options = (
            None
            if timeout is None
            else tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        )
        self.layout = (int(channels), DTYPE_CODES.index(dtype) if dtype in DTYPE_CODES else -1)

    # -- the protocol -----------------------------------------------------------------------

    def all_gather(self, arrays: Sequence[Any]) -> list[tuple[tf.Tensor, ...]]:
        """Every replica's ``arrays``, in replica order, by one ``ReplicaContext.all_gather``
        of one float64 vector (header, then each array flattened); the results have the shapes
        and dtypes of this replica's ``arrays``, which must be the same on every replica (checked:
        :class:`LayoutMismatch` eagerly, ``InvalidArgumentError`` inside ``tf.function``, on every
        replica). Differentiable: TensorFlow's gradient of ``all_gather``."""
        tensors = [tf.convert_to_tensor(a) for a in arrays]
        for index, t in enumerate(tensors):
            if t.dtype.name not in _ARRAY_DTYPES:
                raise TypeError(f"arrays[{index}] has dtype {t.dtype.name}; expected one of {_ARRAY_DTYPES}")
            if not t.shape.is_fully_defined():
                raise ValueError(f"arrays[{index}] has shape {t.shape}; expected a static shape")
        sizes = [int(t.shape.num_elements()) for t in tensors]
        codes = [_ARRAY_DTYPES.index(t.dtype.name) for t in tensors]
        header_length = _HEADER_FIXED + 2 * len(tensors)
        length = header_length + sum(sizes)
        rank = tf.cast(tf.reshape(self.context.replica_id_in_sync_group, [1]), tf.float64)
        fixed = [float(length)], [float(v) for v in (*self.layout, len(tensors), *sizes, *codes)]
        mine = tf.concat(
            [
                tf.constant(fixed[0], tf.float64),
                rank,
                tf.constant(fixed[1], tf.float64),
                *(tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors),
            ],
            axis=0,
        )
        gathered = self.context.all_gather(mine, axis=0, options=self.options)
        headers, consistent = self._headers(gathered, header_length)
        expected = tf.constant([float(length), *fixed[1]], tf.float64)
        comparable = tf.concat([headers[:, :1], headers[:, 2:]], axis=1)  # all but the replica id
        agree = tf.logical_and(consistent, tf.reduce_all(tf.equal(comparable, expected[None, :])))
        layouts = tf.cast(headers[:, 1:4], tf.int64)  # each replica's [replica id, channels, dtype code]
        if tf.executing_eagerly():
            if not bool(agree):
                self._raise(layouts.numpy().tolist())
            checks = []
        else:
            checks = [tf.debugging.Assert(agree, [self._graph_message(), layouts], summarize=-1)]
        with tf.control_dependencies(checks):
            rows = tf.reshape(gathered, [self.size, length])
        order = tf.argsort(headers[:, 1])  # replica order, whatever order the engine used
        rows = tf.gather(rows, order)[:, header_length:]
        parts = tf.split(rows, sizes, axis=1) if tensors else []
        return [
            tuple(
                tf.cast(tf.reshape(part[r], t.shape), t.dtype) for part, t in zip(parts, tensors, strict=True)
            )
            for r in range(self.size)
        ]

    def all_gather_ints(self, values: Sequence[int]) -> list[tuple[int, ...]]:
        """Every replica's few small integers, in replica order, as Python ints: eagerly only
        (inside ``tf.function`` gathered values are tensors; the layer's layout check travels
        with :meth:`all_gather` instead)."""
        if not tf.executing_eagerly():
            raise RuntimeError(
                "all_gather_ints needs eager execution: inside tf.function the gathered values are "
                "tensors, which Python cannot compare (normkit_tensorflow's BatchNormalization checks "
                "the layout inside its one all_gather instead)"
            )
        (gathered,) = zip(*self.all_gather([tf.constant([int(v) for v in values], tf.int64)]), strict=True)
        return [tuple(int(v) for v in t.numpy()) for t in gathered]

    # -- the header ---------------------------------------------------------------------------

    def _headers(self, gathered: tf.Tensor, header_length: int) -> tuple[tf.Tensor, tf.Tensor]:
        """Every replica's header, ``(size, header_length)``, found by walking the gathered
        vector by each part's own length (its first number), and whether the lengths add up to
        the whole. The walk is unrolled over the (static) number of replicas; the vector is
        padded so that no slice runs past its end, whatever a part claims."""
        total = tf.shape(gathered, out_type=tf.int64)[0]
        padded = tf.concat([gathered, tf.zeros([header_length], tf.float64)], axis=0)
        position = tf.constant(0, tf.int64)
        headers = []
        for _ in range(self.size):
            header = tf.slice(padded, tf.reshape(position, [1]), [header_length])
            headers.append(header)
            step = tf.maximum(tf.cast(header[0], tf.int64), 1)
            position = tf.minimum(position + step, total)
        lengths = tf.cast(tf.stack([h[0] for h in headers]), tf.int64)
        consistent = tf.equal(tf.reduce_sum(lengths), total)
        return tf.stack(headers), consistent

    def _message(self) -> str:
        return f"layer {self.layer!r}: the replicas over {self.engine} disagree on the input's layout"

    def _raise(self, layouts: list[list[int]]) -> None:
        described = ", ".join(f"rank {r}: {_describe(c, d)}" for r, c, d in sorted(layouts))
        raise LayoutMismatch(
            f"{self._message()} ({described}); every rank must give a synchronized batch norm the same "
            f"channel count and dtype"
        )

    def _graph_message(self) -> str:
        codes = ", ".join(f"{i} {name}" for i, name in enumerate(DTYPE_CODES))
        return (
            f"{self._message()}; every rank must give a synchronized batch norm the same channel count and "
            f"dtype. Each rank's [rank, channels, dtype code] (dtype codes: {codes}, -1 another):"
        )
