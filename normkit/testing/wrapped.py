"""A backend's kernels wrapped by a transformation (``jax.jit``, ``tf.function``, a compiler)
as a plugin of their own, so that the conformance suite checks the transformed kernels exactly
as it checks the eager ones: register the module under its own name and subclass
:class:`~normkit.testing.ConformanceTests` with ``backend = name``.

>>> import numpy as np, normkit
>>> from normkit import numpy_backend
>>> from normkit.testing import wrapped_backend
>>> calls = []
>>> def logged(op, kernel):  # the transformation: here, record each call
...     def run(*args):
...         calls.append(op)
...         return kernel(*args)
...     return run
>>> kernels = {"layer_norm": numpy_backend.normkit_layer_norm}
>>> module = wrapped_backend("numpy-logged", numpy_backend.normkit_backend_info, kernels, logged)
>>> normkit.register_backend(module, "numpy-logged")
'numpy-logged'
>>> y = normkit.layer_norm(np.array([[1.0, 3.0]]), backend="numpy-logged")
>>> [round(v, 4) for v in y[0].tolist()], calls
([-1.0, 1.0], ['layer_norm'])
>>> normkit.unregister_backend("numpy-logged")
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

from normkit._registry import OPS, hookimpl
from normkit.hookspecs import BackendInfo

__all__ = ["wrapped_backend"]

Kernel = Callable[..., Any]
Wrap = Callable[[str, Kernel], Kernel]


def _kernels(kernels: object) -> dict[str, Kernel]:
    """The kernels by operation name, from a mapping or a module's attributes named after the ops."""
    if isinstance(kernels, Mapping):
        unknown = sorted(set(kernels) - set(OPS))
        if unknown:
            raise ValueError(
                f"kernels has {unknown}, which are not operations of the spec; expected some of {OPS}"
            )
        return dict(kernels)
    found = {op: getattr(kernels, op) for op in OPS if callable(getattr(kernels, op, None))}
    if not found:
        raise ValueError(f"kernels={kernels!r} has none of the spec's operations {OPS} as attributes")
    return found


def wrapped_backend(
    name: str, info: BackendInfo | Callable[[], BackendInfo], kernels: object, wrap: Wrap
) -> types.ModuleType:
    """A plugin module named ``name`` whose hooks call ``wrap(op, kernel)`` for each kernel.

    :param name: the backend's name; the ``BackendInfo`` it describes itself with carries it.
    :param info: the eager backend's ``BackendInfo``, or a function returning it (called on each
        ``normkit_backend_info`` call, for a description that can change, such as JAX's dtypes
        with ``jax_enable_x64``).
    :param kernels: a module, or a mapping from operation name (``"batch_norm"``, ...,
        ``"moments"``, ``"normalize"``) to kernel; each kernel takes the spec hook's parameters
        in the spec's order (``x, weight, bias, ...``). Operations without a kernel get no hook
        (normkit composes the composites from the primitives, as for any backend).
    :param wrap: ``wrap(op, kernel)`` returns the transformed kernel, called with the hook's
        arguments positionally, in the spec's order (``jax.jit`` with the op's static arguments,
        ``tf.function``, ...). It is called once per operation, here.
    :returns: the module, to pass to :func:`normkit.register_backend` (under ``name``).

    A transformed batch or instance norm returns new arrays even when it updates nothing, but
    the spec gives back the running statistics it was given when it does not update them (eval;
    ``use_input_stats=False``): the hooks return those objects then, as a user's own wrapper
    would.
    """
    found = _kernels(kernels)
    wrapped = {op: wrap(op, kernel) for op, kernel in found.items()}

    def normkit_backend_info() -> BackendInfo:
        return dataclasses.replace(info() if callable(info) else info, name=name)

    def normkit_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    ):
        y, mean, var = wrapped["batch_norm"](
            x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
        )
        return (y, mean, var) if training else (y, running_mean, running_var)

    def normkit_instance_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var
    ):
        y, mean, var = wrapped["instance_norm"](
            x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis,
            unbiased_running_var,
        )  # fmt: skip
        return (y, mean, var) if use_input_stats else (y, running_mean, running_var)

    def normkit_layer_norm(x, weight, bias, axes, eps):
        return wrapped["layer_norm"](x, weight, bias, axes, eps)

    def normkit_moments(x, axes, mask, group_axis, num_groups):
        return wrapped["moments"](x, axes, mask, group_axis, num_groups)

    def normkit_normalize(x, mean, var, weight, bias, eps, axes, param_axes):
        return wrapped["normalize"](x, mean, var, weight, bias, eps, axes, param_axes)

    def normkit_group_norm(x, num_groups, weight, bias, eps, axis):
        return wrapped["group_norm"](x, num_groups, weight, bias, eps, axis)

    def normkit_rms_norm(x, weight, axes, eps, weight_offset, cast_before_weight):
        return wrapped["rms_norm"](x, weight, axes, eps, weight_offset, cast_before_weight)

    hooks = {
        "batch_norm": normkit_batch_norm,
        "instance_norm": normkit_instance_norm,
        "layer_norm": normkit_layer_norm,
        "moments": normkit_moments,
        "normalize": normkit_normalize,
        "group_norm": normkit_group_norm,
        "rms_norm": normkit_rms_norm,
    }
    module = types.ModuleType(name)
    module.normkit_backend_info = hookimpl(normkit_backend_info)  # type: ignore[attr-defined]
    for op in found:
        setattr(module, f"normkit_{op}", hookimpl(hooks[op]))
    return module
