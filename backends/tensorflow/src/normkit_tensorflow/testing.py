"""The TensorFlow backend with every kernel run inside ``tf.function`` (optionally compiled by
XLA), registered under its own name so that normkit's conformance suite can check the traced
graphs exactly as it checks eager execution. Every hook is traced: the composites and the
primitives (``moments``, ``normalize``); the Python arguments (axes, flags, ``eps``, ``mask=None``)
are constants of the graph, so each distinct value traces once.

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
    moments = tf.function(kernels.moments, jit_compile=jit_compile)
    normalize = tf.function(kernels.normalize, jit_compile=jit_compile)
    group_norm = tf.function(kernels.group_norm, jit_compile=jit_compile)
    rms_norm = tf.function(kernels.rms_norm, jit_compile=jit_compile)

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

    def normkit_moments(x, axes, mask, group_axis, num_groups):
        return moments(x, axes, mask, group_axis, num_groups)

    def normkit_normalize(x, mean, var, weight, bias, eps, axes, param_axes):
        return normalize(x, mean, var, weight, bias, eps, axes, param_axes)

    def normkit_group_norm(x, num_groups, weight, bias, eps, axis):
        return group_norm(x, num_groups, weight, bias, eps, axis)

    def normkit_rms_norm(x, weight, axes, eps, weight_offset, cast_before_weight):
        return rms_norm(x, weight, axes, eps, weight_offset, cast_before_weight)

    module = types.ModuleType(name)
    hooks = (
        normkit_backend_info,
        normkit_batch_norm,
        normkit_instance_norm,
        normkit_layer_norm,
        normkit_moments,
        normkit_normalize,
        normkit_group_norm,
        normkit_rms_norm,
    )
    for hook in hooks:
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
