"""normkit's TensorFlow backend: kernels for eager execution, ``tf.function`` and XLA, with
gradients through ``tf.GradientTape``.

Installing ``normkit-tensorflow`` is enough for ``normkit.batch_norm(tensor, ...)`` and the
``normkit.BatchNorm`` layers to accept ``tf.Tensor`` and ``tf.Variable`` input: normkit finds
this backend through the ``normkit.backends`` entry point once ``tensorflow`` is imported.
Its Keras 3 layers are ``normkit_keras``'s (``normkit-keras``, a dependency, runs them on every
Keras backend), under their old names too (see :mod:`normkit_tensorflow.layers`):

>>> import keras, normkit_tensorflow
>>> layer = normkit_tensorflow.BatchNormalization(preset="torch")   # unbiased moving variance
>>> layer.momentum, layer.epsilon
(0.9, 1e-05)

Importing this package registers the layers with Keras's serialization (as
``"normkit>BatchNormalization"`` and so on), so that a ``.keras`` file holding them loads in a
new process after ``import keras, normkit_tensorflow``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
    "__version__",
]

_LAYERS = (
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
)


def __getattr__(name: str) -> Any:
    """The Keras layers, :mod:`normkit_keras`'s, through :mod:`normkit_tensorflow.layers`
    (imported here if :func:`_register_keras_layers` left it for later)."""
    if name in _LAYERS:
        from normkit_tensorflow import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'normkit_tensorflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAYERS})


def _importable(name: str) -> bool:
    try:
        return name in sys.modules or importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a module without a spec
        return False


def _register_keras_layers() -> None:
    """Import :mod:`normkit_tensorflow.layers`, which imports :mod:`normkit_keras`, whose classes
    register themselves with Keras (``keras.saving.register_keras_serializable``):
    ``keras.models.load_model`` finds a custom layer only by that registration.

    This module is also imported by normkit itself, as the parent of the plugin
    (``normkit_tensorflow.plugin``) that it loads once ``tensorflow`` is imported, for
    ``normkit.batch_norm(tensor)``; that path must not import Keras 3 where TensorFlow came
    without it. TensorFlow 2.16+ imports Keras 3 itself (``import tensorflow`` ends by
    importing ``keras.src.optimizers``), so there Keras is already loaded and registering costs
    only this package's module. The one case left alone is TensorFlow imported while Keras 3
    is not (``TF_USE_LEGACY_KERAS=1``, where ``tf.keras`` is ``tf_keras``): the layers then
    register on first use (``normkit_tensorflow.BatchNormalization``), as before.

    Without TensorFlow, Keras or normkit-keras installed this package imports as before, and
    registers nothing (the first use of a layer says what is missing).
    A failure here must not take normkit's TensorFlow kernels down with it (they need no Keras):
    it is a warning, and the same error is raised again by the first use of a layer.
    """
    if not (_importable("keras") and _importable("tensorflow") and _importable("normkit_keras")):
        return
    if "tensorflow" in sys.modules and "keras" not in sys.modules:
        return
    try:
        importlib.import_module("normkit_tensorflow.layers")
    except Exception as error:  # reported; the first use of a layer raises it again
        warnings.warn(
            f"normkit_tensorflow could not register its Keras layers ({type(error).__name__}: {error}); "
            f"normkit's TensorFlow kernels are unaffected",
            RuntimeWarning,
            stacklevel=2,
        )


_register_keras_layers()
