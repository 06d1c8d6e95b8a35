r"""The Keras adapter of :mod:`normkit.testtime`: a Keras model's batch norms as sites.

Every ``keras.layers.BatchNormalization`` in a model (nested models included; normkit's own
``normkit_tensorflow.BatchNormalization`` subclasses it) is a site. While recording, the model
runs as ``model(x, training=False)`` — dropout and every other training-only behaviour off —
while each site's ``call`` is wrapped to record the moments of its input (channels on the
layer's ``axis``; Keras's mask of positions, where given, selects the values) and to normalize
with batch statistics as in training (a site made non-trainable is trainable meanwhile, as
Keras's ``trainable=False`` would otherwise run it in inference mode). Afterwards each layer's
``call``, ``trainable`` flag and moving statistics are as before, except the statistics
committed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from normkit.testtime.sites import EvalForward, LayerView, Recorder

__all__ = ["ADAPTER", "KerasAdapter", "KerasSite"]


class KerasSite:
    """One ``keras.layers.BatchNormalization``."""

    def __init__(self, name: str, layer: keras.layers.BatchNormalization) -> None:
        self.name, self.layer = name, layer
        self.per_instance = False
        self.unbiased = bool(getattr(layer, "unbiased_running_var", False))
        self.eps = float(layer.epsilon)
        self.channels = int(layer.moving_mean.shape[0]) if layer.built else None
        self._saved: dict[str, Any] = {}

    def _axis(self, rank: int) -> int:
        axis = self.layer.axis
        return (axis[0] if isinstance(axis, (list, tuple)) else axis) % rank

    def running(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.layer.built:
            return None
        if self._saved:
            return self._saved["moving_mean"].astype(np.float64), self._saved["moving_variance"].astype(
                np.float64
            )
        return self.to_numpy(self.layer.moving_mean), self.to_numpy(self.layer.moving_variance)

    def attach(self, recorder: Recorder) -> None:
        layer = self.layer
        recorder.channels = self.channels
        self._saved = {
            "trainable": layer.trainable,
            "call": layer.__dict__.get("call"),
            "moving_mean": np.array(layer.moving_mean.numpy()) if layer.built else None,
            "moving_variance": np.array(layer.moving_variance.numpy()) if layer.built else None,
        }
        own = layer.call

        def call(inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
            inputs = tf.convert_to_tensor(inputs)
            axis = self._axis(len(inputs.shape))
            selected = None
            if mask is not None:  # Keras's mask of positions, inputs.shape[:-1]
                selected = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(inputs))
            recorder(inputs, axis, selected)
            return own(inputs, training=True, mask=mask)

        layer.trainable = True
        layer.call = call

    def _put_back(self) -> None:
        layer, saved = self.layer, self._saved
        if saved["call"] is None:
            layer.__dict__.pop("call", None)
        else:
            layer.call = saved["call"]
        layer.trainable = saved["trainable"]
        if saved["moving_mean"] is not None:
            layer.moving_mean.assign(saved["moving_mean"])
            layer.moving_variance.assign(saved["moving_variance"])
        elif layer.built:  # built by the first recorded call: as a fresh layer would be
            layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, layer.moving_mean.dtype))
            layer.moving_variance.assign(np.ones(layer.moving_variance.shape, layer.moving_variance.dtype))

    def commit(self, mean: np.ndarray, var: np.ndarray) -> None:
        self._put_back()
        layer = self.layer
        layer.moving_mean.assign(np.asarray(mean, np.float64).astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(np.asarray(var, np.float64).astype(layer.moving_variance.dtype))
        self._saved = {}

    def restore(self) -> None:
        if self._saved:
            self._put_back()
            self._saved = {}

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(array), np.float64)

    def substitute(self, forward: EvalForward | None) -> None:
        layer = self.layer
        if forward is None:
            layer.__dict__.pop("call", None)
            return
        own = layer.call

        def call(inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
            if training and layer.trainable:
                return own(inputs, training=training, mask=mask)
            inputs = tf.convert_to_tensor(inputs)
            view = LayerView(
                self._axis(len(inputs.shape)),
                float(layer.epsilon),
                tf.convert_to_tensor(layer.moving_mean),
                tf.convert_to_tensor(layer.moving_variance),
                None if layer.gamma is None else tf.convert_to_tensor(layer.gamma),
                None if layer.beta is None else tf.convert_to_tensor(layer.beta),
            )
            return tf.cast(forward(inputs, view), layer.compute_dtype)

        layer.call = call

    @property
    def substituted(self) -> bool:
        return "call" in self.layer.__dict__


class KerasAdapter:
    """Keras models (and layers): the sites are their ``BatchNormalization`` layers; the model
    runs as ``model(x, training=False)``."""

    def sites(self, model: object) -> dict[str, KerasSite]:
        assert isinstance(model, keras.layers.Layer)
        layers = model._flatten_layers(include_self=True, recursive=True)
        prefix = f"{model.path or model.name}/"

        def name(layer: keras.layers.Layer) -> str:
            """The layer's path below the model's (``"bn"``, ``"inner/bn"``): stable, unlike
            the model's own name, which Keras numbers per process (``sequential_3``)."""
            path = layer.path or layer.name
            return "" if layer is model else path.removeprefix(prefix)

        return {
            name(layer): KerasSite(name(layer), layer)
            for layer in layers
            if isinstance(layer, keras.layers.BatchNormalization)
        }

    @contextlib.contextmanager
    def running(self, model: object) -> Iterator[Callable[[Any], object]]:
        assert isinstance(model, keras.layers.Layer)

        def forward(x: Any) -> object:
            return model(x, training=False)

        yield forward


ADAPTER = KerasAdapter()
