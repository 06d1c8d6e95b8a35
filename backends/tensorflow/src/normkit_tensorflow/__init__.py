"""normkit's TensorFlow backend: kernels for eager execution, ``tf.function`` and XLA, with
gradients through ``tf.GradientTape``.

Installing ``normkit-tensorflow`` is enough for ``normkit.batch_norm(tensor, ...)`` and the
``normkit.BatchNorm`` layers to accept ``tf.Tensor`` and ``tf.Variable`` input: normkit finds
this backend through the ``normkit.backends`` entry point once ``tensorflow`` is imported.
Import this package for the Keras 3 layers (see :mod:`normkit_tensorflow.layers`):

>>> import keras, normkit_tensorflow
>>> layer = normkit_tensorflow.BatchNormalization(preset="torch")   # unbiased moving variance
>>> layer.momentum, layer.epsilon
(0.9, 1e-05)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["BatchNormalization", "InstanceNormalization", "LayerNormalization", "__version__"]

_LAYERS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization")


def __getattr__(name: str) -> Any:
    """The Keras layers, imported on first use: the normkit plugin (``normkit_tensorflow.plugin``)
    loads with TensorFlow alone, without importing Keras."""
    if name in _LAYERS:
        from normkit_tensorflow import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'normkit_tensorflow' has no attribute {name!r}")
