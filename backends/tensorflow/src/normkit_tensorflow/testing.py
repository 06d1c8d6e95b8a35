"""The TensorFlow backend with every kernel run inside ``tf.function`` (optionally compiled by
XLA), registered under its own name so that normkit's conformance suite can check the traced
graphs exactly as it checks eager execution (built by :func:`normkit.testing.wrapped_backend`).
Every hook is traced: the composites and the primitives (``moments``, ``normalize``); the Python
arguments (axes, flags, ``eps``, ``mask=None``) are constants of the graph, so each distinct
value traces once.

>>> import tensorflow as tf, normkit
>>> from normkit_tensorflow.testing import register_function_backends
>>> with register_function_backends():
...     y = normkit.layer_norm(tf.constant([[1.0, 3.0]]), backend="tensorflow-xla")
>>> [round(v, 4) for v in y.numpy()[0].tolist()]
[-1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

import normkit
from normkit.testing import wrapped_backend
from normkit_tensorflow import kernels, plugin

__all__ = ["FUNCTION_BACKENDS", "register_function_backends"]

FUNCTION_BACKENDS = {"tensorflow-function": False, "tensorflow-xla": True}
"""Backend name -> ``jit_compile``."""


def _function_plugin(name: str, jit_compile: bool) -> types.ModuleType:
    """The kernels of :mod:`normkit_tensorflow.kernels`, each in ``tf.function``, as backend ``name``."""

    def traced(op: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
        return tf.function(kernel, jit_compile=jit_compile)

    return wrapped_backend(name, plugin.normkit_backend_info, kernels, traced)


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
