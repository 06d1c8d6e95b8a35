"""normkit's Keras layers, under the names ``normkit_tensorflow`` has always given them.

The layers moved to ``normkit-keras`` (:mod:`normkit_keras`), which runs them on every Keras
backend; these are the same classes, not copies (``normkit_tensorflow.layers.BatchNormalization
is normkit_keras.BatchNormalization``), registered once with Keras's serialization as
``"normkit>BatchNormalization"``, ``"normkit>LayerNormalization"``,
``"normkit>InstanceNormalization"``, ``"normkit>GroupNormalization"`` and
``"normkit>RMSNormalization"``: ``.keras`` files saved with either name load with either import.
"""

from __future__ import annotations

try:
    from normkit_keras import (
        PACKAGE,
        BatchNormalization,
        GroupNormalization,
        InstanceNormalization,
        LayerNormalization,
        RMSNormalization,
    )
except ModuleNotFoundError as error:  # normkit-tensorflow depends on it: a broken installation
    if error.name != "normkit_keras":
        raise
    raise ImportError(
        "normkit_tensorflow's Keras layers are normkit_keras's (normkit-keras, a dependency of "
        "normkit-tensorflow), which is not installed: pip install normkit-keras"
    ) from error

__all__ = [
    "PACKAGE",
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
]
