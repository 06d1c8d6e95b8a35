"""The TensorFlow backend with every kernel run inside ``tf.function`` (optionally compiled by
XLA), registered under its own name so that normkit's conformance suite can check the traced
graphs exactly as it checks eager execution:

>>> import tensorflow as tf, normkit
>>> from normkit_tensorflow.testing import register_function_backends
>>> with register_function_backends():
...     y = normkit.layer_norm(tf.constant([[1.0, 3.0]]), backend="tensorflow-xla")
>>> [round(v, 4) for v in y.numpy()[0].tolist()]
[-1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator

import tensorflow as tf

import normkit
from normkit_tensorflow import kernels, plugin

__all__ = ["FUNCTION_BACKENDS", "register_function_backends"]

FUNCTION_BACKENDS = {"tensorflow-function": False, "tensorflow-xla": True}
"""Backend name -> ``jit_compile``."""


def _function_plugin(name: str, jit_compile: bool) -> types.ModuleType:
    batch_norm = tf.function(kernels.batch_norm, jit_compile=jit_compile)
    instance_norm = tf.function(kernels.instance_norm, jit_compile=jit_compile)
    layer_norm = tf.function(kernels.layer_norm, jit_compile=jit_compile)

    def normkit_backend_info() -> normkit.BackendInfo:
        return dataclasses.replace(plugin.normkit_backend_info(), name=name)

    def normkit_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    ):
        return batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
        )

    def normkit_instance_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var
    ):
        return instance_norm(
            x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis,
            unbiased_running_var,
        )  # fmt: skip

    def normkit_layer_norm(x, weight, bias, axes, eps):
        return layer_norm(x, weight, bias, axes, eps)

    module = types.ModuleType(name)
    for hook in (normkit_backend_info, normkit_batch_norm, normkit_instance_norm, normkit_layer_norm):
        setattr(module, hook.__name__, normkit.hookimpl(hook))
    return module


@contextlib.contextmanager
def register_function_backends() -> Iterator[tuple[str, ...]]:
    """Register ``tensorflow-function`` and ``tensorflow-xla`` for the duration of the block."""
    for name, jit_compile in FUNCTION_BACKENDS.items():
        normkit.register_backend(_function_plugin(name, jit_compile), name)
    try:
        yield tuple(FUNCTION_BACKENDS)
    finally:
        for name in FUNCTION_BACKENDS:
            normkit.unregister_backend(name)
