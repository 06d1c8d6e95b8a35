"""normkit's Keras 3 layers, for every Keras backend (TensorFlow, JAX, PyTorch).

``BatchNormalization``, ``LayerNormalization``, ``GroupNormalization`` and ``RMSNormalization``
subclass their Keras namesakes (the same arguments, defaults, weights in Keras's order,
``training`` rules, masks and serialization); ``InstanceNormalization`` is new. In ``call`` they
pass the input and their variables' values to normkit's functional ops, so normkit's registry
runs the backend of the tensor's own type (``normkit_tensorflow``, ``normkit_jax`` or
``normkit_torch``), and store new moving statistics with ``variable.assign``. Called eagerly
on Keras's TensorFlow backend, ``BatchNormalization``, ``InstanceNormalization`` and
``GroupNormalization`` run that same computation as one call of a ``tf.function`` traced once
per layer and configuration (bit-identical results, a fraction of the eager ops' dispatch cost:
see :mod:`normkit_keras._eager`).

>>> import keras, numpy as np, normkit_keras
>>> layer = normkit_keras.BatchNormalization(preset="torch")   # unbiased moving variance
>>> layer.momentum, layer.epsilon, layer.autocast
(0.9, 1e-05, False)
>>> x = np.array([[1.0, 2.0], [3.0, 2.0]], dtype="float32")  # batch mean (2, 2), variance (1, 0)
>>> y = layer(x, training=True)             # normkit's backend of this Keras backend's tensors
>>> keras.ops.convert_to_numpy(y)           # (x - mean) / sqrt(variance + 1e-5)
array([[-0.999995,  0.      ],
       [ 0.999995,  0.      ]], dtype=float32)
>>> keras.ops.convert_to_numpy(layer.moving_variance)   # 0.9 * 1 + 0.1 * unbiased (2, 0)
array([1.1, 0.9], dtype=float32)

Importing this package registers the layers with Keras's serialization as
``"normkit>BatchNormalization"`` and so on (the names ``normkit_tensorflow`` has always written
into ``.keras`` files), so a saved model loads in a new process, under any Keras backend, after
``import keras, normkit_keras``.
"""

from __future__ import annotations

from normkit_keras._base import PACKAGE
from normkit_keras.batch_normalization import BatchNormalization
from normkit_keras.group_normalization import GroupNormalization
from normkit_keras.instance_normalization import InstanceNormalization
from normkit_keras.layer_normalization import LayerNormalization
from normkit_keras.rms_normalization import RMSNormalization

__version__ = "0.1.0"

__all__ = [
    "PACKAGE",
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
    "__version__",
]
