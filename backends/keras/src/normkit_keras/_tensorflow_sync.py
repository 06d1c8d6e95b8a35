r"""``BatchNormalization(synchronized=True)`` on Keras's TensorFlow backend: the statistics of
the global batch of a ``tf.distribute`` strategy.

Imported by the layer only in training with ``synchronized=True`` under
``KERAS_BACKEND=tensorflow``; it needs ``normkit-tensorflow`` (``normkit-keras[tensorflow]``),
whose :class:`~normkit_tensorflow.distributed.ReplicaCommunicator` gathers each replica's
per-channel moments :math:`(n_r, \mu_r, M_{2,r})` (masks honoured) in replica order; Chan's
merge in float64 gives the global :math:`(N, \mu, M_2)`, every replica normalizes with
:math:`\mu` and :math:`M_2/N`, and the moving statistics move with :math:`N`, bit-identical on
every replica. Keras's own layer all-reduces :math:`\sum x` and :math:`\sum x^2` instead, and
with a mask does not synchronize at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tensorflow as tf

import normkit
from normkit.distributed import CommunicatorError, synchronized_moments
from normkit.functional.masked import running_update

try:
    from normkit_tensorflow.distributed import ReplicaCommunicator
    from normkit_tensorflow.plugin import normkit_backend_info, normkit_moments, normkit_normalize
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "BatchNormalization(synchronized=True) on Keras's TensorFlow backend needs normkit's TensorFlow "
        "backend: pip install 'normkit-keras[tensorflow]'"
    ) from error

if TYPE_CHECKING:
    from normkit_keras.batch_normalization import BatchNormalization

__all__ = ["batch_norm"]


def replica_context() -> tf.distribute.ReplicaContext | None:
    """The replica context to synchronize over: inside ``strategy.run`` with more than one
    replica; else ``None`` (the local layer)."""
    context = tf.distribute.get_replica_context()  # None in a cross-replica context
    if context is None or context.num_replicas_in_sync < 2:
        return None
    return context


def batch_norm(
    layer: BatchNormalization, inputs: Any, selected: Any, axis: int, context: tf.distribute.ReplicaContext
) -> tuple[Any, Any, Any]:
    r"""Training-mode batch norm of ``layer`` with the global batch's statistics over the
    replicas of ``context``: this replica's output and the new moving statistics (the same bits
    on every replica). ``selected``: the mask with the input's rank (``None``: every value).

    :raises ValueError: eagerly, on every replica, for a global batch of one value per channel
        unless the preset allows it (inside ``tf.function``: an ``InvalidArgumentError`` with the
        same words), and for replicas whose channel count or dtype disagree
        (:class:`normkit_tensorflow.distributed.LayoutMismatch`).
    """
    inputs = tf.convert_to_tensor(inputs)
    gamma, beta, moving_mean, moving_variance = (  # the replica's values, as tensors
        None if v is None else tf.convert_to_tensor(v.value)
        for v in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
    )
    comm = ReplicaCommunicator(
        context, layer=layer.name, channels=inputs.shape[axis], dtype=inputs.dtype.name
    )
    reduced = tuple(a for a in range(len(inputs.shape)) if a != axis)
    # the TensorFlow backend's kernels themselves, as the spec's hooks define them (normkit.normalize
    # would hand an empty replica a new empty tensor, with no gradient path to x, gamma and beta)
    local = normkit.Moments(*normkit_moments(inputs, reduced, selected, None, None))
    try:
        total = synchronized_moments(local, comm, layer=layer.name)
    except CommunicatorError as error:
        if isinstance(error.__cause__, ValueError):  # the layout check: its own words
            raise error.__cause__ from None
        raise
    checks = []
    if not layer.allow_single_value:
        words = (
            f"layer {layer.name!r}: the global batch over {comm.engine} has 1 value per channel; expected "
            f"more than 1 value per channel when training (preset={layer.preset!r}; preset='keras' allows it)"
        )
        single = tf.equal(tf.reduce_max(total.count), 1)
        if tf.executing_eagerly():
            if bool(single):
                raise ValueError(words)
        else:
            checks.append(tf.debugging.Assert(tf.logical_not(single), [words]))
    wide = total.mean.dtype  # float64: the merge's
    n = tf.cast(total.count, wide)
    empty = tf.cast(total.count == 0, wide)
    var = total.m2 / (n + empty)  # M2 / N, 0 / 1 where nothing counts
    with tf.control_dependencies(checks):
        y = normkit_normalize(inputs, total.mean, var, gamma, beta, layer.epsilon, reduced, (axis,))
        mean, variance = running_update(
            normkit_backend_info(), total, moving_mean, moving_variance, 1.0 - layer.momentum,
            layer.unbiased_running_var,
        )  # fmt: skip
    return y, mean, variance
