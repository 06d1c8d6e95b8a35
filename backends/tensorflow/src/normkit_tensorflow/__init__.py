"""normkit's TensorFlow backend: kernels for eager execution, ``tf.function`` and XLA, with
gradients through ``tf.GradientTape``.

Installing ``normkit-tensorflow`` is enough for ``normkit.batch_norm(tensor, ...)`` and the
``normkit.BatchNorm`` layers to accept ``tf.Tensor`` and ``tf.Variable`` input: normkit finds
this backend through the ``normkit.backends`` entry point once ``tensorflow`` is imported.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
