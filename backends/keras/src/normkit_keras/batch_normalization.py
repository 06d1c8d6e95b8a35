r"""``BatchNormalization``: Keras's layer on normkit's ops, under every Keras backend."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

import normkit
from normkit import presets
from normkit.errors import StateDictError
from normkit_keras import _eager
from normkit_keras._base import (
    PACKAGE,
    PresetOptions,
    check_axis,
    check_epsilon,
    check_flag,
    keras_momentum,
    metadata,
    to_numpy,
    unsupported,
)

__all__ = ["BatchNormalization"]


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchNormalization(PresetOptions, keras.layers.BatchNormalization):
    r"""``keras.layers.BatchNormalization`` on normkit's ops, with ``preset=``.

    Keras's arguments, defaults, weights (``gamma, beta, moving_mean, moving_variance``, in that
    order) and ``training`` rules: batch statistics only when ``training`` is true *and* the
    layer is trainable (a frozen layer normalizes with its moving statistics), then
    :math:`y = \gamma (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta` with the biased batch
    variance :math:`\sigma^2`, and :math:`r \leftarrow m\,r + (1 - m)\,b` for each moving
    statistic (``momentum`` is always Keras's weight of the old value; the stored variance is
    the biased one, or :math:`\frac{n}{n-1}\sigma^2` under ``preset="torch"``). The statistics
    are two-pass, in at least float32, on every Keras backend (Keras's own layer computes
    :math:`E[x^2] - E[x]^2` on torch).

    ``mask`` (Keras's, ``inputs.shape[:-1]``, broadcast over the last axis; propagated from
    ``Embedding(mask_zero=True)``): in training the statistics are those of the unmasked values,
    counted per channel, and every position is normalized with them; a channel with nothing
    unmasked keeps its moving statistics (Keras's layer pulls them toward 0). Eval ignores it.

    ``synchronized=True``: on Keras's TensorFlow backend, in training inside a ``tf.distribute``
    replica context with more than one replica, every replica normalizes with the statistics of
    the global batch, merged exactly (see :mod:`normkit_tensorflow.distributed`); outside one it
    is the local layer. Keras's other backends have no synchronized batch statistics: training
    there raises :class:`NotImplementedError` naming the backend, while eval (a model saved under
    TensorFlow, loaded elsewhere) works; Keras's own layer refuses to be constructed there.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float | None = None,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: Any = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        unsupported(renorm=renorm)
        synchronized = check_flag("synchronized", synchronized)
        p = presets.get_preset(preset)
        super().__init__(
            axis=check_axis(axis),
            momentum=keras_momentum(momentum, p),
            epsilon=check_epsilon(epsilon, p.batch_norm_eps),
            center=check_flag("center", center),
            scale=check_flag("scale", scale),
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            synchronized=False,  # Keras's refuses True off TensorFlow, even for a model loaded for eval
            **kwargs,
        )
        self.synchronized = synchronized
        self._set_preset(p)

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        r"""Batch statistics when ``training`` and the layer is trainable (over the unmasked
        values, with a mask), the moving statistics otherwise:
        :math:`y = \gamma (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`, cast to the compute dtype;
        in training the moving statistics are assigned their new values."""
        rank = len(inputs.shape)
        axis = self.axis % rank
        if mask is not None and len(mask.shape) != rank - 1:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}: expected one dimension less than inputs, whose "
                f"shape is {tuple(inputs.shape)} (Keras's mask of positions, broadcast over the last axis)"
            )
        use_batch_stats = bool(training) and self.trainable
        if mask is None and not (use_batch_stats and self.synchronized):
            y = _eager.run(
                self, "_local_call", (axis, use_batch_stats), inputs, fixed_axes=(axis,),
                reduced_axes=tuple(a for a in range(rank) if a != axis) if use_batch_stats else None,
                weights=(self.moving_mean, self.moving_variance, self.gamma, self.beta),
                options=(self.momentum, self.epsilon, self.unbiased_running_var, self.preset, self.compute_dtype),
            )  # fmt: skip
            if y is not None:  # eager on TensorFlow: the same ops as one traced call
                return y
        selected = None
        if use_batch_stats and mask is not None:  # eval ignores the mask
            selected = keras.ops.expand_dims(keras.ops.cast(mask, "bool"), -1)
        context = self._replica_context() if use_batch_stats and self.synchronized else None
        if context is None:
            return self._local_call(inputs, axis, use_batch_stats, selected)
        from normkit_keras import _tensorflow_sync

        y, mean, var = _tensorflow_sync.batch_norm(self, inputs, selected, axis, context)
        # each replica assigns its own copy (the variables' aggregation is Keras's "none", as for
        # Keras's own layer): the same bits on every replica
        self.moving_mean.assign(mean)
        self.moving_variance.assign(var)
        return self._output(y)

    def _local_call(self, inputs: Any, axis: int, use_batch_stats: bool, selected: Any = None) -> Any:
        """The layer on this replica's batch alone (``selected``: the mask, with the input's
        rank): normkit's batch norm, the new moving statistics assigned in training, the output
        in the compute dtype. Eagerly on TensorFlow it runs as one traced call (:mod:`._eager`)."""
        if use_batch_stats and selected is None:  # with a mask the counts are data
            self._check_values_per_group(inputs, [a for a in range(len(inputs.shape)) if a != axis])
        y, mean, var = normkit.batch_norm(
            inputs, *self._channel_state(), training=use_batch_stats, axis=axis, mask=selected,
            **self._moving_options(),
        )  # fmt: skip
        if use_batch_stats:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(var)
        return self._output(y)

    def _replica_context(self) -> Any:
        """Training with ``synchronized=True``: the ``tf.distribute`` replica context to
        synchronize over, or ``None`` outside one (or with one replica: the local layer).

        :raises NotImplementedError: on a Keras backend other than TensorFlow, which has no
            replicas for normkit to synchronize over (Keras's own layer refuses
            ``synchronized=True`` there when it is constructed).
        """
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise NotImplementedError(
                f"BatchNormalization(synchronized=True) is not supported on Keras's {backend!r} backend "
                f"(nor is Keras's own): normkit synchronizes batch statistics across the replicas of a "
                f"tf.distribute strategy, on Keras's TensorFlow backend only. Train with "
                f"synchronized=False here (eval and frozen layers work either way)."
            )
        from normkit_keras import _tensorflow_sync  # imports TensorFlow: only on its backend

        return _tensorflow_sync.replica_context()

    def state_dict(self) -> dict[str, Any]:
        """The layer's state in normkit's format (NumPy arrays and ``_metadata``): what
        ``normkit.BatchNorm.from_state_dict``, ``normkit.convert_state_dict`` and the torch
        layers' ``load_state_dict`` (through ``normkit.BatchNorm``) read. Keras counts no
        batches, so ``num_batches_tracked`` is 0."""
        if not self.built:
            raise RuntimeError("the layer has no weights yet: call it on an input or build it first")
        affine = self.scale or self.center  # normkit keeps γ and β together: the missing one is 1 or 0
        layer = normkit.BatchNorm(
            self.moving_mean.shape[0], eps=self.epsilon, momentum=self.momentum, affine=affine,
            axis=self.axis, momentum_weights="running", running_var_estimator=self.running_var_estimator,
            allow_single_value=self.allow_single_value, preset=self.preset,
        )  # fmt: skip
        arrays = {"running_mean": to_numpy(self.moving_mean), "running_var": to_numpy(self.moving_variance)}
        if affine:
            shape, dtype = arrays["running_mean"].shape, arrays["running_mean"].dtype
            arrays["weight"] = to_numpy(self.gamma) if self.scale else np.ones(shape, dtype)
            arrays["bias"] = to_numpy(self.beta) if self.center else np.zeros(shape, dtype)
        layer.load_state_dict({k: np.array(v) for k, v in arrays.items()} | {"num_batches_tracked": 0})
        return layer.state_dict()

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], *, preset: str | None = None, axis: int = -1, **kwargs: Any
    ) -> BatchNormalization:
        """A layer holding a normkit batch-norm state (from ``normkit.BatchNorm.state_dict()``,
        or :meth:`state_dict`), e.g. one trained in PyTorch; its weights are set when it is built.

        ``eps`` is carried over (so eval outputs do not change) and ``momentum`` re-expressed in
        Keras's convention; ``preset`` (default: the state's own) sets the other conventions for
        further training (see :func:`normkit.convert_state_dict`). ``axis`` is this layer's
        channel axis: ``-1`` for channels-last data, whatever layout the state was trained on.
        """
        found = metadata(state_dict, ("BatchNorm",))
        target = presets.get_preset(preset or found.get("preset", "keras"))
        if found["momentum"] is None:
            raise StateDictError("momentum=None (a cumulative average) has no Keras equivalent")
        if not found.get("track_running_stats", True):
            raise StateDictError(
                "the state tracks no running statistics (track_running_stats=False): Keras's "
                "BatchNormalization always has moving statistics to normalize with in inference"
            )
        weight = presets.batch_weight(found["momentum"], found["momentum_weights"])
        affine = bool(found.get("affine", True))
        layer = cls(
            axis=axis, momentum=round(1.0 - weight, 12), epsilon=found["eps"], center=affine,
            scale=affine, preset=target.name, **kwargs,
        )  # fmt: skip
        if preset is None:  # the state's own choices, including ones that override its preset
            if "running_var_estimator" in found:
                layer.unbiased_running_var = found["running_var_estimator"] == "unbiased"
            if "allow_single_value" in found:
                layer.allow_single_value = bool(found["allow_single_value"])
        names = {"moving_mean": "running_mean", "moving_variance": "running_var"}
        if affine:
            names.update(gamma="weight", beta="bias")
        layer._pending_weights = {ours: to_numpy(state_dict[theirs]) for ours, theirs in names.items()}
        return layer

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "preset": self.preset}
