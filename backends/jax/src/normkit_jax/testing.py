"""The JAX backend with every kernel run under :func:`jax.jit`, registered under its own name
(``jax-jit``) so that normkit's conformance suite checks the compiled computations exactly as it
checks eager execution. Every hook is compiled: the composites and the primitives (``moments``,
``normalize``). Arrays and the Python floats ``eps``, ``momentum`` and ``weight_offset`` are
traced arguments; flags, axes and group counts are static (each distinct value compiles once).

A kernel under ``jit`` returns new arrays, but the spec wants the running statistics it was
given back when it does not update them (eval, or ``use_input_stats=False``): the hooks that
:func:`normkit.testing.wrapped_backend` builds around the compiled kernels return them, as a
user's own wrapper would.

>>> import jax.numpy as jnp, normkit
>>> from normkit_jax.testing import register_jit_backend
>>> with register_jit_backend():
...     y = normkit.layer_norm(jnp.asarray([[1.0, 3.0]]), 2, backend="jax-jit")
>>> [round(v, 4) for v in y[0].tolist()]
[-1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax

import normkit
from normkit.testing import wrapped_backend
from normkit_jax import kernels, plugin

__all__ = [
    "JIT_BACKEND",
    "STATIC_ARGUMENTS",
    "enable_x64",
    "jit_plugin",
    "refresh_backends",
    "register_jit_backend",
]

JIT_BACKEND = "jax-jit"
"""The name the compiled kernels are registered under."""


STATIC_ARGUMENTS = {
    "batch_norm": ("training", "axis", "unbiased_running_var"),
    "instance_norm": ("use_input_stats", "axis", "unbiased_running_var"),
    "layer_norm": ("axes",),
    "moments": ("axes", "group_axis", "num_groups"),
    "normalize": ("axes", "param_axes"),
    "group_norm": ("num_groups", "axis"),
    "rms_norm": ("axes", "cast_before_weight"),
}
"""Each kernel's arguments that ``jax.jit`` takes as static (Python values fixed while tracing)."""


def _compiled(op: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` under :func:`jax.jit` with the op's static arguments; axes given as lists are
    passed as tuples (static arguments must be hashable)."""
    compiled = jax.jit(kernel, static_argnames=STATIC_ARGUMENTS[op])

    def run(*args: Any) -> Any:
        return compiled(*(tuple(a) if isinstance(a, list) else a for a in args))

    return run


def jit_plugin(name: str = JIT_BACKEND) -> types.ModuleType:
    """A plugin module whose hooks run the kernels of :mod:`normkit_jax.kernels` under
    :func:`jax.jit`, described as backend ``name`` (:func:`normkit.testing.wrapped_backend`)."""
    return wrapped_backend(name, plugin.backend_info, kernels, _compiled)


_JIT_PLUGINS: dict[str, types.ModuleType] = {}
"""The compiled plugins registered by :func:`register_jit_backend`, by name."""


@contextlib.contextmanager
def register_jit_backend(name: str = JIT_BACKEND) -> Iterator[str]:
    """Register the compiled kernels as backend ``name`` for the duration of the block."""
    module = jit_plugin(name)
    normkit.register_backend(module, name)
    _JIT_PLUGINS[name] = module
    try:
        yield name
    finally:
        _JIT_PLUGINS.pop(name, None)
        normkit.unregister_backend(name)


def refresh_backends() -> None:
    """Register the ``jax`` backend (and the compiled ones registered here) again, so that
    normkit describes them anew: normkit reads a backend's :class:`~normkit.BackendInfo` once per
    array type, and whether it has float64 depends on ``jax_enable_x64``."""
    normkit.unregister_backend("jax")
    normkit.register_backend(plugin, "jax")
    for name, module in _JIT_PLUGINS.items():
        normkit.unregister_backend(name)
        normkit.register_backend(module, name)


@contextlib.contextmanager
def enable_x64(enabled: bool = True) -> Iterator[None]:
    """Set ``jax_enable_x64`` for the duration of the block (then restore it), with normkit's view
    of the JAX backends refreshed on entry and exit (:func:`refresh_backends`).

    JAX's own advice is to set the flag once, at startup (``JAX_ENABLE_X64=1`` or
    ``jax.config.update("jax_enable_x64", True)`` before creating arrays); this is for tests
    that check both modes in one process."""
    previous = kernels.x64_enabled()
    jax.config.update("jax_enable_x64", enabled)
    refresh_backends()
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
        refresh_backends()
