"""The JAX backend with every kernel run under :func:`jax.jit`, registered under its own name
(``jax-jit``) so that normkit's conformance suite checks the compiled computations exactly as it
checks eager execution. Every hook is compiled: the composites and the primitives (``moments``,
``normalize``). Arrays and the Python floats ``eps``, ``momentum`` and ``weight_offset`` are
traced arguments; flags, axes and group counts are static (each distinct value compiles once).

A kernel under ``jit`` returns new arrays, but the spec wants the running statistics it was
given back when it does not update them (eval, or ``use_input_stats=False``): the Python
wrapper around the compiled kernel returns them, as a user's own wrapper would.

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
from collections.abc import Iterator
from typing import Any

import jax

import normkit
from normkit_jax import kernels, plugin

__all__ = ["JIT_BACKEND", "enable_x64", "jit_plugin", "refresh_backends", "register_jit_backend"]

JIT_BACKEND = "jax-jit"
"""The name the compiled kernels are registered under."""

Array = Any


def jit_plugin(name: str = JIT_BACKEND) -> types.ModuleType:
    """A plugin module whose hooks run the kernels of :mod:`normkit_jax.kernels` under
    :func:`jax.jit`, described as backend ``name``."""
    batch_norm = jax.jit(kernels.batch_norm, static_argnames=("training", "axis", "unbiased_running_var"))
    instance_norm = jax.jit(
        kernels.instance_norm, static_argnames=("use_input_stats", "axis", "unbiased_running_var")
    )
    layer_norm = jax.jit(kernels.layer_norm, static_argnames=("axes",))
    moments = jax.jit(kernels.moments, static_argnames=("axes", "group_axis", "num_groups"))
    normalize = jax.jit(kernels.normalize, static_argnames=("axes", "param_axes"))
    group_norm = jax.jit(kernels.group_norm, static_argnames=("num_groups", "axis"))
    rms_norm = jax.jit(kernels.rms_norm, static_argnames=("axes", "cast_before_weight"))

    def normkit_backend_info() -> normkit.BackendInfo:
        return plugin.backend_info(name)

    def normkit_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    ):
        y, mean, var = batch_norm(
            x, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps,
            axis=axis, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        return (y, mean, var) if training else (y, running_mean, running_var)

    def normkit_instance_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var
    ):
        y, mean, var = instance_norm(
            x, weight, bias, running_mean, running_var, use_input_stats=use_input_stats, momentum=momentum,
            eps=eps, axis=axis, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        return (y, mean, var) if use_input_stats else (y, running_mean, running_var)

    def normkit_layer_norm(x, weight, bias, axes, eps):
        return layer_norm(x, weight, bias, axes=tuple(axes), eps=eps)

    def normkit_moments(x, axes, mask, group_axis, num_groups):
        return moments(x, axes=tuple(axes), mask=mask, group_axis=group_axis, num_groups=num_groups)

    def normkit_normalize(x, mean, var, weight, bias, eps, axes, param_axes):
        return normalize(x, mean, var, weight, bias, eps=eps, axes=tuple(axes), param_axes=tuple(param_axes))

    def normkit_group_norm(x, num_groups, weight, bias, eps, axis):
        return group_norm(x, num_groups=num_groups, weight=weight, bias=bias, eps=eps, axis=axis)

    def normkit_rms_norm(x, weight, axes, eps, weight_offset, cast_before_weight):
        return rms_norm(
            x, weight, axes=tuple(axes), eps=eps, weight_offset=weight_offset,
            cast_before_weight=cast_before_weight,
        )  # fmt: skip

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
