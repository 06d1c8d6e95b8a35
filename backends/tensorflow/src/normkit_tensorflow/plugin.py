"""The normkit plugin: registered through the ``normkit.backends`` entry point named
``tensorflow``, loaded by normkit only once ``tensorflow`` has been imported. It describes the
backend and registers the kernels of :mod:`normkit_tensorflow.kernels` as its hooks.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import normkit
from normkit_tensorflow import kernels

__all__ = [
    "normkit_backend_info",
    "normkit_batch_norm",
    "normkit_group_norm",
    "normkit_instance_norm",
    "normkit_layer_norm",
    "normkit_moments",
    "normkit_normalize",
    "normkit_rms_norm",
]

DTYPES = {
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "float32": tf.float32,
    "float64": tf.float64,
}
"""The floating dtypes the kernels take."""

CAST_DTYPES = {**DTYPES, "int64": tf.int64, "bool": tf.bool}
"""Every dtype :func:`_astype` and :func:`_full` make (moments' counts are int64, masks bool)."""


def _asarray(array: np.ndarray, dtype: str, device: str | None) -> tf.Tensor:
    """A tensor of the named dtype holding ``array``'s values, rounded once by NumPy (bfloat16
    through ``ml_dtypes``, as TensorFlow's own bfloat16 is)."""
    from normkit.numpy_backend import numpy_dtype

    values = np.asarray(array).astype(numpy_dtype(dtype))
    if device is None:
        return tf.constant(values)
    with tf.device(device):
        return tf.identity(tf.constant(values))


def _device(t: tf.Tensor) -> str:
    """``"cpu"`` or ``"gpu"`` from TensorFlow's device string (``.../device:CPU:0``)."""
    name = t.device or "/device:CPU:0"
    return name.rsplit("device:", 1)[-1].split(":")[0].lower()


def _full(shape: tuple[int, ...], fill_value: float, dtype: str, like: tf.Tensor) -> tf.Tensor:
    with tf.device(like.device or None):
        return tf.fill(shape, tf.constant(fill_value, dtype=CAST_DTYPES[dtype]))


def _astype(t: tf.Tensor, dtype: str) -> tf.Tensor:
    """``t`` converted to the named dtype by ``tf.cast`` (on ``t``'s device; differentiable between
    floating dtypes; to ``bool``, nonzero is true); ``t`` itself if it has that dtype already."""
    target = CAST_DTYPES[dtype]
    t = tf.convert_to_tensor(t)
    return t if t.dtype == target else tf.cast(t, target)


def _devices() -> tuple[str, ...]:
    return ("cpu", "gpu") if tf.config.list_logical_devices("GPU") else ("cpu",)


def _keep_autograph_out_of_normkit() -> None:
    """normkit's Python is plain control flow on shapes and options, fixed while tracing: tell
    AutoGraph not to rewrite it (rewriting it is slow, warns, and has failed on keyword calls).
    AutoGraph has no public switch for a package, so this extends its rule list, as TensorFlow
    does for its own packages; if that internal moves, tracing still works, only noisier."""
    try:
        from tensorflow.python.autograph.core import config, config_lib
    except ImportError:  # pragma: no cover - a TensorFlow without this internal
        return
    names = ("normkit", "normkit_tensorflow")
    present = {getattr(rule, "_prefix", None) for rule in config.CONVERSION_RULES}
    rules = tuple(config_lib.DoNotConvert(name) for name in names if name not in present)
    config.CONVERSION_RULES = rules + tuple(config.CONVERSION_RULES)


_keep_autograph_out_of_normkit()

_INFO: normkit.BackendInfo | None = None


@normkit.hookimpl
def normkit_backend_info() -> normkit.BackendInfo:
    global _INFO
    if _INFO is None:
        _INFO = normkit.BackendInfo(
            name="tensorflow",
            distribution="normkit-tensorflow",
            array_types=("tensorflow:Tensor", "tensorflow:Variable"),
            dtypes=tuple(DTYPES),
            devices=_devices(),
            asarray=_asarray,
            to_numpy=lambda t: np.array(t.numpy(), copy=True),
            dtype_name=lambda t: t.dtype.name,
            device=_device,
            shape=lambda t: tuple(t.shape),
            full=_full,
            astype=_astype,
        )
    return _INFO


# The kernels take exactly the spec's parameters, so they are the hook implementations
# themselves (pluggy registers them under these names).
normkit_batch_norm = normkit.hookimpl(kernels.batch_norm)
normkit_instance_norm = normkit.hookimpl(kernels.instance_norm)
normkit_layer_norm = normkit.hookimpl(kernels.layer_norm)
normkit_moments = normkit.hookimpl(kernels.moments)
normkit_normalize = normkit.hookimpl(kernels.normalize)
normkit_group_norm = normkit.hookimpl(kernels.group_norm)
normkit_rms_norm = normkit.hookimpl(kernels.rms_norm)
