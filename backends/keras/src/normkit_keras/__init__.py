"""normkit's Keras 3 layers, for every Keras backend (TensorFlow, JAX, PyTorch).

``BatchNormalization``, ``LayerNormalization``, ``GroupNormalization`` and ``RMSNormalization``
subclass their Keras namesakes (the same arguments, defaults, weights in Keras's order,
``training`` rules, masks and serialization); ``InstanceNormalization`` is new. In ``call`` they
pass the input and their variables' values to normkit's functional ops, so normkit's registry
runs the backend of the tensor's own type (``normkit_tensorflow``, ``normkit_jax`` or
``normkit_torch``), and store new moving statistics with ``variable.assign``.

>>> import keras, normkit_keras
>>> layer = normkit_keras.BatchNormalization(preset="torch")   # unbiased moving variance
>>> layer.momentum, layer.epsilon, layer.autocast
(0.9, 1e-05, False)

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
