r"""Keras 3 layers on normkit's TensorFlow kernels.

``normkit_tensorflow.BatchNormalization``, ``LayerNormalization``, ``GroupNormalization`` and
``RMSNormalization`` subclass their Keras namesakes: the same arguments, defaults, weights (in
Keras's order: ``gamma, beta, moving_mean, moving_variance``; ``scale`` for RMS), ``training``
argument, masking and serialization, with normkit's kernels underneath (statistics in float32
for float16/bfloat16 input). ``InstanceNormalization`` is new (Keras has none); it follows the
same conventions.

``BatchNormalization`` takes Keras's ``mask`` (e.g. from ``Embedding(mask_zero=True)``): in
training the batch statistics are the masked ones, counted per channel; a batch with nothing
unmasked leaves the moving statistics unchanged (Keras's own layer pulls them toward 0).

``preset=`` chooses the conventions; the default is ``"keras"``:

* the running-variance estimator (``torch``: the unbiased :math:`\frac{n}{n-1}\sigma^2`);
* whether one value per channel is allowed in training;
* the default ``momentum`` and ``epsilon`` (``torch``: 0.9 and 1e-5);
* for ``RMSNormalization``, the half-precision cast order and the weight offset (``llama``,
  ``gemma``; see the class).

``momentum`` is always Keras's convention, the weight of the *old* value,
:math:`r \leftarrow m\,r + (1-m)\,b`, whatever the preset: ``preset="torch"`` defaults it to
0.9 (PyTorch's ``momentum=0.1``).

As in Keras, batch statistics are used only when ``training`` is true *and* the layer is
trainable; a frozen layer (``trainable=False``) normalizes with its moving statistics.

The layers are registered with Keras's serialization as ``"normkit>BatchNormalization"``,
``"normkit>LayerNormalization"``, ``"normkit>InstanceNormalization"``,
``"normkit>GroupNormalization"`` and ``"normkit>RMSNormalization"`` (importing
:mod:`normkit_tensorflow` imports this module): those names are in every ``.keras`` file
saved with them, so they do not change.

They run on Keras's TensorFlow backend only: constructing one under another
(``KERAS_BACKEND=torch`` or ``jax``) raises :class:`RuntimeError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import normkit
from normkit import presets
from normkit._registry import backend_for
from normkit.distributed import CommunicatorError, synchronized_moments
from normkit.errors import StateDictError
from normkit.functional._arrays import cast
from normkit.functional.masked import masked_batch_norm, running_update
from normkit.functional.statistics import Moments
from normkit_tensorflow import kernels
from normkit_tensorflow.distributed import ReplicaCommunicator

__all__ = [
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
]

PACKAGE = "normkit"
"""The package of the registered names (``"normkit>BatchNormalization"``), written into every
``.keras`` file: changing it (or a class name) would stop saved models from loading."""


def _check_keras_backend(layer: str) -> None:
    """Raise unless Keras runs on TensorFlow: the kernels take and return TensorFlow tensors,
    which another backend cannot differentiate (its ``fit`` fails deep inside).

    A :class:`RuntimeError`, not a ``ValueError``: no argument is wrong, and none would fix it;
    the process's Keras was set up, when it was imported, for another backend.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    setting = os.environ.get("KERAS_BACKEND")
    source = (
        f"KERAS_BACKEND={setting!r}"
        if setting
        else "KERAS_BACKEND is not set, so Keras took it from its keras.json"
    )
    raise RuntimeError(
        f"normkit_tensorflow.{layer} runs on Keras's TensorFlow backend only, but this process's "
        f"Keras uses the {backend!r} backend ({source}). Set the environment variable "
        f"KERAS_BACKEND=tensorflow before keras is first imported (Keras fixes its backend on import). "
        f"Support for Keras's other backends is planned."
    )


def _keras_momentum(momentum: float | None, preset: presets.Preset) -> float:
    """Keras's momentum (weight of the old value): the preset's default or ``momentum``."""
    if momentum is None:
        return round(preset.default_momentum("running"), 12)
    return presets.check_momentum(momentum)


def _epsilon(epsilon: object, default: float) -> float:
    """``epsilon`` (default: the preset's): a finite number >= 0, as Keras accepts it."""
    if epsilon is None:
        return default
    try:
        presets.check_eps(epsilon if epsilon != 0 else 1.0)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon={epsilon!r}: expected a finite number >= 0") from None
    return float(epsilon)  # type: ignore[arg-type]


def _unsupported(**options: Any) -> None:
    for name, value in options.items():
        if value:
            raise NotImplementedError(f"{name}={value!r} is not supported by normkit's Keras layers")


def _numpy(value: Any) -> np.ndarray:
    """Any backend's array (or a plain number) as a NumPy array."""
    if isinstance(value, np.ndarray | int | float):
        return np.asarray(value)
    return np.asarray(backend_for(value).info.to_numpy(value))


def _metadata(state_dict: Mapping[str, Any], layers: tuple[str, ...]) -> Mapping[str, Any]:
    metadata = state_dict.get("_metadata") if isinstance(state_dict, Mapping) else None
    if not isinstance(metadata, Mapping) or metadata.get("layer") not in layers:
        raise StateDictError(
            f"state_dict needs normkit's '_metadata' of a {' or '.join(layers)} (eps, momentum, axis); "
            f"make one with normkit.{layers[0]}(...).load_state_dict(arrays) and .state_dict()"
        )
    return metadata


class _PresetOptions:
    """The choices a preset makes that Keras hard-codes, and loading normkit state dicts."""

    _pending_weights: dict[str, np.ndarray] | None = None

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)  # Keras's own build: the weights, in Keras's order
        self._assign_pending_weights()

    def _assign_pending_weights(self) -> None:
        """Weights given to ``from_state_dict`` before the layer was built."""
        pending, self._pending_weights = self._pending_weights, None
        for name, value in (pending or {}).items():
            variable = getattr(self, name)
            if tuple(variable.shape) != value.shape:
                raise ValueError(
                    f"the state's {name} has shape {value.shape}, but this input gives the layer a "
                    f"{name} of shape {tuple(variable.shape)}: the state was saved for other features"
                )
            variable.assign(value)

    def _set_preset(self, p: presets.Preset) -> None:
        self.preset = p.name
        self.unbiased_running_var = p.running_var_estimator == "unbiased"
        self.allow_single_value = p.allow_single_value

    def _check_values_per_group(self, inputs: tf.Tensor, reduced_axes: list[int]) -> None:
        """One value per group in training: an error unless the preset allows it (checked when
        the reduced dimensions are known; a traced graph with unknown ones skips it)."""
        sizes = [inputs.shape[a] for a in reduced_axes]
        if self.allow_single_value or any(size is None for size in sizes):
            return
        n = 1
        for size in sizes:
            n *= size
        if n == 1:
            raise ValueError(
                f"inputs has shape {tuple(inputs.shape)}: expected more than 1 value per channel when "
                f"training (preset={self.preset!r}; preset='keras' allows it)"
            )


@keras.saving.register_keras_serializable(package=PACKAGE)
class BatchNormalization(_PresetOptions, keras.layers.BatchNormalization):
    r"""``keras.layers.BatchNormalization`` on normkit's kernels, with ``preset=``.

    ``synchronized=True``: in training, inside a ``tf.distribute`` replica context with more
    than one replica (``strategy.run``, and so Keras's ``fit`` under ``MirroredStrategy`` or
    ``MultiWorkerMirroredStrategy``), every replica normalizes with the statistics of the global
    batch: its per-channel moments :math:`(n_r, \mu_r, M_{2,r})` (masks honoured), one
    all-gather, Chan's merge in replica order in float64 (see
    :mod:`normkit_tensorflow.distributed`), :math:`y = \gamma (x - \mu)/\sqrt{M_2/N + \epsilon}
    + \beta`; the moving statistics move with the global count :math:`N` and are bit-identical on
    every replica. Keras's own layer takes :math:`E[x^2] - E[x]^2` of all-reduced sums instead,
    and with a mask does not synchronize at all. Outside a strategy, with one replica, or in
    eval, the layer is the local one (eval never communicates).
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
        _check_keras_backend("BatchNormalization")
        _unsupported(renorm=renorm)
        if not isinstance(synchronized, bool):
            raise TypeError(f"synchronized={synchronized!r}: expected True or False")
        p = presets.get_preset(preset)
        super().__init__(
            axis=axis,
            momentum=_keras_momentum(momentum, p),
            epsilon=_epsilon(epsilon, p.batch_norm_eps),
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            synchronized=synchronized,
            **kwargs,
        )
        self._set_preset(p)

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
            axis=self.axis, momentum_weights="running",
            running_var_estimator="unbiased" if self.unbiased_running_var else "biased",
            allow_single_value=self.allow_single_value, preset=self.preset,
        )  # fmt: skip
        arrays = {"running_mean": self.moving_mean.numpy(), "running_var": self.moving_variance.numpy()}
        if affine:
            dtype = arrays["running_mean"].dtype
            ones, zeros = (
                np.ones(arrays["running_mean"].shape, dtype),
                np.zeros(arrays["running_mean"].shape, dtype),
            )
            arrays["weight"] = self.gamma.numpy() if self.scale else ones
            arrays["bias"] = self.beta.numpy() if self.center else zeros
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
        metadata = _metadata(state_dict, ("BatchNorm",))
        target = presets.get_preset(preset or metadata.get("preset", "keras"))
        if metadata["momentum"] is None:
            raise StateDictError("momentum=None (a cumulative average) has no Keras equivalent")
        if not metadata.get("track_running_stats", True):
            raise StateDictError(
                "the state tracks no running statistics (track_running_stats=False): Keras's "
                "BatchNormalization always has moving statistics to normalize with in inference"
            )
        weight = presets.batch_weight(metadata["momentum"], metadata["momentum_weights"])
        affine = bool(metadata.get("affine", True))
        layer = cls(
            axis=axis, momentum=round(1.0 - weight, 12), epsilon=metadata["eps"], center=affine,
            scale=affine, preset=target.name, **kwargs,
        )  # fmt: skip
        if preset is None:  # the state's own choices, including ones that override its preset
            if "running_var_estimator" in metadata:
                layer.unbiased_running_var = metadata["running_var_estimator"] == "unbiased"
            if "allow_single_value" in metadata:
                layer.allow_single_value = bool(metadata["allow_single_value"])
        names = {"moving_mean": "running_mean", "moving_variance": "running_var"}
        if affine:
            names.update(gamma="weight", beta="bias")
        layer._pending_weights = {ours: _numpy(state_dict[theirs]) for ours, theirs in names.items()}
        return layer

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> tf.Tensor:
        """Keras's semantics, masks included: in training, ``mask`` (``inputs.shape[:-1]``, as
        Keras propagates it from ``Embedding(mask_zero=True)``; broadcast over the last axis)
        selects the values that enter the batch statistics, counted per channel, and every
        position is normalized with them; in eval the mask is ignored. A channel with no value
        selected keeps its moving statistics (Keras's own layer pulls them toward 0)."""
        inputs = tf.convert_to_tensor(inputs)
        rank = len(inputs.shape)
        axis = self.axis % rank
        if mask is not None and len(mask.shape) != rank - 1:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}: expected one dimension less than inputs, whose "
                f"shape is {tuple(inputs.shape)} (Keras's mask of positions, broadcast over the last axis)"
            )
        use_batch_stats = bool(training) and self.trainable
        context = self._replica_context() if use_batch_stats else None
        if use_batch_stats and context is None:  # synchronized, the global count is what counts
            self._check_values_per_group(inputs, [a for a in range(rank) if a != axis])
        if context is not None:
            y, mean, var = self._synchronized_batch_norm(inputs, mask, axis, context)
        elif use_batch_stats and mask is not None:
            y, mean, var = masked_batch_norm(  # normkit's one composition, on this backend's kernels
                backend_for(inputs),
                inputs,
                tf.expand_dims(tf.cast(mask, tf.bool), -1),
                axis,
                *(  # Keras variables as tensors (normkit's arrays)
                    None if v is None else tf.convert_to_tensor(v)
                    for v in (self.gamma, self.beta, self.moving_mean, self.moving_variance)
                ),
                1.0 - self.momentum,
                self.epsilon,
                self.unbiased_running_var,
                None,
            )
        else:
            y, mean, var = kernels.batch_norm(
                inputs,
                self.gamma,
                self.beta,
                self.moving_mean,
                self.moving_variance,
                use_batch_stats,
                1.0 - self.momentum,
                self.epsilon,
                axis,
                self.unbiased_running_var,
            )
        if use_batch_stats:
            # in a replica context each replica assigns its own copy (the variables' aggregation is
            # Keras's "none", as for Keras's own layer); synchronized, the values are the same bits
            self.moving_mean.assign(mean)
            self.moving_variance.assign(var)
        return tf.cast(y, self.compute_dtype)

    def _replica_context(self) -> tf.distribute.ReplicaContext | None:
        """The replica context to synchronize over: with ``synchronized=True``, inside
        ``strategy.run`` with more than one replica; else ``None`` (the local layer)."""
        if not self.synchronized:
            return None
        context = tf.distribute.get_replica_context()  # None in a cross-replica context
        if context is None or context.num_replicas_in_sync < 2:
            return None
        return context

    def _synchronized_batch_norm(
        self, inputs: tf.Tensor, mask: Any, axis: int, context: tf.distribute.ReplicaContext
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        r"""Training-mode batch norm with the global batch's statistics: this replica's output
        and the new moving statistics (the same bits on every replica). ``mask``: Keras's mask of
        positions (``inputs.shape[:-1]``), broadcast over the last axis.

        :raises ValueError: eagerly, on every replica, for a global batch of one value per
            channel unless the preset allows it (inside ``tf.function``: an
            ``InvalidArgumentError`` with the same words), and for replicas whose channel count
            or dtype disagree (:class:`normkit_tensorflow.distributed.LayoutMismatch`).
        """
        be = backend_for(inputs)
        info = be.info
        rank = len(inputs.shape)
        reduced = tuple(a for a in range(rank) if a != axis)
        comm = ReplicaCommunicator(
            context, layer=self.name, channels=inputs.shape[axis], dtype=inputs.dtype.name
        )
        selected = None if mask is None else tf.expand_dims(tf.cast(mask, tf.bool), -1)
        local = Moments(*be.moments(inputs, reduced, selected, None, None))
        try:
            total = synchronized_moments(local, comm, layer=self.name)
        except CommunicatorError as error:
            if isinstance(error.__cause__, ValueError):  # the layout check: its own words
                raise error.__cause__ from None
            raise
        checks = []
        if not self.allow_single_value:
            words = (
                f"layer {self.name!r}: the global batch over {comm.engine} has 1 value per channel; expected "
                f"more than 1 value per channel when training (preset={self.preset!r}; preset='keras' allows it)"
            )
            single = tf.equal(tf.reduce_max(total.count), 1)
            if tf.executing_eagerly():
                if bool(single):
                    raise ValueError(words)
            else:
                checks.append(tf.debugging.Assert(tf.logical_not(single), [words]))
        wide = info.dtype_name(total.mean)
        n = cast(info, total.count, wide)
        empty = cast(info, total.count == 0, wide)
        var = total.m2 / (n + empty)  # M2 / N, 0 / 1 where nothing counts
        gamma, beta, moving_mean, moving_variance = (  # Keras variables as tensors (normkit's arrays)
            None if v is None else tf.convert_to_tensor(v)
            for v in (self.gamma, self.beta, self.moving_mean, self.moving_variance)
        )
        with tf.control_dependencies(checks):
            y = be.normalize(inputs, total.mean, var, gamma, beta, self.epsilon, reduced, (axis,))
            mean, variance = running_update(
                info, total, moving_mean, moving_variance, 1.0 - self.momentum, self.unbiased_running_var
            )
        return y, mean, variance

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "preset": self.preset}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNormalization(_PresetOptions, keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` on normkit's kernels, with ``preset=`` (which sets
    the default ``epsilon``)."""

    def __init__(
        self,
        axis: int | list[int] = -1,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        _check_keras_backend("LayerNormalization")
        _unsupported(rms_scaling=kwargs.pop("rms_scaling", False))
        p = presets.get_preset(preset)
        super().__init__(
            axis=axis,
            epsilon=_epsilon(epsilon, p.layer_norm_eps),
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            **kwargs,
        )
        self._set_preset(p)

    def _axes(self, rank: int) -> tuple[int, ...]:
        """The normalized axes, non-negative and increasing."""
        return tuple(sorted(a % rank for a in self.axis))

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], *, axis: int | list[int] | None = None, **kwargs: Any
    ) -> LayerNormalization:
        """A layer holding a normkit layer-norm state (``normkit.LayerNorm.state_dict()``), e.g.
        one trained in PyTorch: ``eps`` is carried over; γ and β are set when it is built.
        ``axis`` defaults to the trailing axes the state normalized (PyTorch's
        ``normalized_shape``), else the last."""
        metadata = _metadata(state_dict, ("LayerNorm",))
        if axis is None:
            normalized_shape = metadata.get("normalized_shape")
            if isinstance(normalized_shape, int):
                normalized_shape = [normalized_shape]
            axis = list(range(-len(normalized_shape), 0)) if normalized_shape else -1
        affine = "weight" in state_dict
        layer = cls(
            axis=axis, epsilon=metadata["eps"], scale=affine, center="bias" in state_dict,
            preset=metadata.get("preset", "keras"), **kwargs,
        )  # fmt: skip
        names = {"gamma": "weight", "beta": "bias"}
        layer._pending_weights = {k: _numpy(state_dict[v]) for k, v in names.items() if v in state_dict}
        return layer

    def call(self, inputs: Any) -> tf.Tensor:
        inputs = tf.convert_to_tensor(inputs)
        axes = self._axes(len(inputs.shape))
        shape = [inputs.shape[a] for a in axes]
        # Keras lays γ and β out along its sorted axes as given (-1 before 1) and reshapes them
        # onto the increasing axes; do the same, so that stock Keras weights mean the same here.
        gamma = None if self.gamma is None else tf.reshape(self.gamma, shape)
        beta = None if self.beta is None else tf.reshape(self.beta, shape)
        y = kernels.layer_norm(inputs, gamma, beta, axes, self.epsilon)
        return tf.cast(y, self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("rms_scaling", None)
        return {**config, "preset": self.preset}


@keras.saving.register_keras_serializable(package=PACKAGE)
class InstanceNormalization(_PresetOptions, keras.layers.Layer):
    """Instance normalization for Keras: each sample's channels normalized over its spatial
    axes, with per-channel γ and β; optionally moving statistics for inference
    (``track_running_stats=True``, PyTorch's option), updated like batch norm's.

    :param axis: the channel axis (default -1, channels-last).
    :param momentum: Keras's convention (weight of the old value); default the preset's.
    :param epsilon: default the preset's (1e-3 for keras).
    """

    def __init__(
        self,
        axis: int = -1,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        track_running_stats: bool = False,
        momentum: float | None = None,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        _check_keras_backend("InstanceNormalization")
        super().__init__(**kwargs)
        p = presets.get_preset(preset)
        self._set_preset(p)
        self.axis = int(axis)
        self.epsilon = _epsilon(epsilon, p.instance_norm_eps)
        self.center, self.scale = center, scale
        self.track_running_stats = track_running_stats
        self.momentum = _keras_momentum(momentum, p)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None

    def build(self, input_shape: Any) -> None:
        if len(input_shape) < 3:
            raise ValueError(
                f"input_shape={tuple(input_shape)}: instance normalization needs (batch, *spatial, "
                f"channels) with at least one spatial axis"
            )
        axis = self.axis % len(input_shape)
        if axis == 0:
            raise ValueError("axis=0 is the batch axis; instance normalization needs a channel axis")
        shape = (input_shape[axis],)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint, autocast=False,
            )  # fmt: skip
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint, autocast=False,
            )  # fmt: skip
        if self.track_running_stats:
            self.moving_mean = self.add_weight(
                shape=shape, name="moving_mean", initializer="zeros", trainable=False, autocast=False
            )
            self.moving_variance = self.add_weight(
                shape=shape, name="moving_variance", initializer="ones", trainable=False, autocast=False
            )
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: input_shape[axis]})

    def call(self, inputs: Any, training: bool | None = None) -> tf.Tensor:
        inputs = tf.convert_to_tensor(inputs)
        rank = len(inputs.shape)
        axis = self.axis % rank
        use_input_stats = (bool(training) and self.trainable) or not self.track_running_stats
        if use_input_stats:
            self._check_values_per_group(inputs, [a for a in range(1, rank) if a != axis])
        y, mean, var = kernels.instance_norm(
            inputs,
            self.gamma,
            self.beta,
            self.moving_mean,
            self.moving_variance,
            use_input_stats,
            1.0 - self.momentum,
            self.epsilon,
            axis,
            self.unbiased_running_var,
        )
        if use_input_stats and self.track_running_stats:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(var)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "axis": self.axis,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "track_running_stats": self.track_running_stats,
            "momentum": self.momentum,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            "preset": self.preset,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupNormalization(_PresetOptions, keras.layers.GroupNormalization):
    r"""``keras.layers.GroupNormalization`` on normkit's kernels, with ``preset=`` (which sets the
    default ``epsilon``: 1e-3 for ``keras``, 1e-5 for ``torch``).

    Keras's arguments, defaults, weights (``gamma`` and ``beta``, one per channel) and
    serialization: ``groups`` contiguous blocks of ``C/groups`` channels (``groups=-1``: one per
    channel, instance normalization, fixed to ``C`` when the layer is built), each sample's block
    normalized over its channels and every axis but the batch axis,
    :math:`y = \gamma_c (x - \mu_{n,g})/\sqrt{\sigma^2_{n,g} + \epsilon} + \beta_c`. As Keras's
    layer it does not autocast (``autocast = False``): under a mixed-precision policy its input
    keeps its dtype (float32 input is not rounded to float16 first), the statistics are computed
    in at least float32, and the output has the policy's compute dtype; a mask passes through
    unchanged.

    Under ``preset="keras"`` (the default) it computes exactly as Keras's layer does, so a model
    gives bit-identical results after the swap, as the ``normkit_torch`` drop-ins do by calling
    ATen where ATen is accurate: on the TensorFlow backend Keras's statistics are two-pass
    (``tf.nn.moments`` of the raw values) and its output is the fused
    :math:`x\,a + (\beta - \mu a)`, which the spec allows (its rounding, about
    :math:`\epsilon|\mu|\gamma/\sigma`, is the centering term of the conformance bound: 2e-3 at
    ``|mean|/std = 1e4`` in float32). Under any other preset it runs normkit's kernel, a shifted
    two-pass that applies :math:`(x - \mu)\,a + \beta` and stays near 3e-7 there.
    """

    def __init__(
        self,
        groups: int = 32,
        axis: int = -1,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        *,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        _check_keras_backend("GroupNormalization")
        p = presets.get_preset(preset)
        super().__init__(
            groups=groups,
            axis=axis,
            epsilon=_epsilon(epsilon, p.group_norm_eps),
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            **kwargs,
        )
        self._set_preset(p)

    def build(self, input_shape: Any) -> None:
        if not isinstance(self.axis, int) or not -len(input_shape) <= self.axis < len(input_shape):
            raise ValueError(f"axis={self.axis!r}: expected one axis of inputs of rank {len(input_shape)}")
        if self.axis % len(input_shape) == 0:
            raise ValueError("axis=0 is the batch axis; group normalization needs a channel axis")
        super().build(input_shape)  # Keras's: checks groups against the channels, adds gamma and beta

    def call(self, inputs: Any) -> tf.Tensor:
        if self.preset == "keras":  # Keras's own computation: bit-identical, and conforming
            return super().call(inputs)
        inputs = tf.convert_to_tensor(inputs)
        axis = self.axis % len(inputs.shape)
        y = kernels.group_norm(inputs, self.groups, self.gamma, self.beta, self.epsilon, axis)
        return tf.cast(y, self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "preset": self.preset}


@keras.saving.register_keras_serializable(package=PACKAGE)
class RMSNormalization(_PresetOptions, keras.layers.RMSNormalization):
    r"""``keras.layers.RMSNormalization`` (Keras 3.9+) on normkit's kernels, with ``preset=``.

    Keras's arguments, weight (``scale``, over the normalized axes) and serialization:
    :math:`y = x/\sqrt{\overline{x^2} + \epsilon}\,(w + o)`, the mean square over ``axis``,
    computed in float32 for float16/bfloat16 input. The preset chooses

    * the default ``epsilon`` (``keras``: 1e-6; ``torch``: ``None``, the machine epsilon of the
      compute dtype, 1.19e-7 for float32, found when the layer is called);
    * the cast order for half-precision input (``keras``, ``torch``, ``gemma``: once, after the
      weight, as Keras; ``llama``, ``onnx``: to the input dtype before the weight, then again);
    * the weight offset :math:`o` (``gemma``: 1, and ``scale`` then starts at 0 so that
      :math:`w + o` starts at 1; otherwise 0 and ``scale`` starts at 1, as Keras's).

    ``scale`` multiplies the normalized axes in increasing order (Keras lays it out along the
    sorted axes as given, e.g. ``[-1, 1]``, and relies on broadcasting, which lines it up with
    the trailing axes only: ``axis=1`` on 3-D input is scaled along axis 1 here).
    """

    def __init__(
        self,
        axis: int | list[int] = -1,
        epsilon: float | None = None,
        *,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        _check_keras_backend("RMSNormalization")
        p = presets.get_preset(preset)
        epsilon = p.rms_norm_eps if epsilon is None else _epsilon(epsilon, 0.0)
        super().__init__(axis=axis, epsilon=epsilon, **kwargs)
        self._set_preset(p)
        self.cast_before_weight = p.rms_cast == "before_weight"
        self.weight_offset = float(p.rms_weight_offset)

    def build(self, input_shape: Any) -> None:
        """Keras's build (``axis`` becomes a sorted list, ``scale`` spans its sizes in that order),
        with ``scale`` starting at :math:`1 - o`."""
        rank = len(input_shape)
        axes = self.axis if isinstance(self.axis, list | tuple) else [self.axis]
        for a in axes:
            if not isinstance(a, int) or not -rank <= a < rank:
                raise ValueError(f"axis={self.axis!r}: expected axes of inputs of rank {rank}")
        self.axis = sorted(axes)
        initializer = keras.initializers.Constant(1.0 - self.weight_offset) if self.weight_offset else "ones"
        self.scale = self.add_weight(
            name="scale", shape=tuple(input_shape[a] for a in self.axis), initializer=initializer
        )
        self.built = True
        self._assign_pending_weights()

    def call(self, x: Any) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        rank = len(x.shape)
        axes = tuple(sorted(a % rank for a in self.axis))
        weight = self.scale
        if list(axes) != [a % rank for a in self.axis]:  # Keras's order of the axes is not increasing
            shape = tf.shape(x)
            weight = tf.reshape(weight, [shape[a] if x.shape[a] is None else x.shape[a] for a in axes])
        epsilon = self.epsilon if self.epsilon is not None else presets.machine_eps(x.dtype.name)
        return kernels.rms_norm(x, weight, axes, epsilon, self.weight_offset, self.cast_before_weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "preset": self.preset}
