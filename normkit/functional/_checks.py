"""Validation shared by every operation: each check names the parameter, what it got and what
was expected, and runs before any kernel (so a call that fails changes nothing)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

from normkit import presets
from normkit._registry import (
    Backend,
    backend_for,
    backend_named,
    is_subclass_of_named,
    takes_out,
    type_name,
    unsupported_array_message,
)
from normkit.errors import NoBackendError

Array = Any
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _backend(x: Array, backend: str | None, min_ndim: int, what: str) -> Backend:
    """The backend for the input ``x`` of op ``what`` (which needs ``min_ndim`` dimensions).

    One dict lookup for an array type seen before; the rest runs only when resolution fails,
    to say what ``x`` is and what to pass instead.
    """
    try:
        return backend_for(x) if backend is None else backend_named(backend, x)
    except TypeError as error:
        message = _not_an_array_message(x, min_ndim, what)
        if message is None:
            raise
        raise (NoBackendError if isinstance(error, NoBackendError) else TypeError)(message) from None


def dimensions(n: int) -> str:
    """``"1 dimension"``, ``"2 dimensions"``: a count of dimensions for messages."""
    return f"{n} dimension" if n == 1 else f"{n} dimensions"


def _not_an_array_message(x: object, min_ndim: int, what: str) -> str | None:
    """The error for an input ``x`` that no backend takes because it is a masked array, a
    scalar, a list or a tuple; ``None`` for anything else (the registry's error stands)."""
    cls = type(x)
    masked = unsupported_array_message(cls, "x", is_input=True)
    if masked is not None:
        return masked
    expected = f"{what} expects an array with at least {dimensions(min_ndim)}"
    if is_subclass_of_named(cls, "numpy:generic"):
        return (
            f"x is a {type_name(cls)} scalar, not an array; {expected}: normalization needs a group of "
            f"values, e.g. np.asarray(values, dtype=np.float32) with shape (batch, channels, ...)"
        )
    unhandled = f"no normkit backend handles arrays of type {type_name(cls)}"
    if isinstance(x, (bool, int, float, complex)):
        return (
            f"x is a Python {cls.__name__}, a scalar ({unhandled}); {expected}, such as a "
            f"numpy.ndarray or a framework's tensor"
        )
    if isinstance(x, (list, tuple)):
        return (
            f"x is a {cls.__name__}, not an array ({unhandled}); {expected}: convert it first, "
            f"e.g. with np.asarray(x, dtype=np.float32)"
        )
    return None


def _check_input(be: Backend, x: Array, min_ndim: int, what: str) -> tuple[int, ...]:
    dtype = be.info.dtype_name(x)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {dtype}; {what} expects a floating dtype, one of {FLOAT_DTYPES}")
    if dtype not in be.info.dtypes:
        raise TypeError(f"x has dtype {dtype}, which backend {be.name!r} does not support {be.info.dtypes}")
    shape = tuple(be.info.shape(x))
    if len(shape) < min_ndim:
        got = "a 0-d array (a scalar)" if not shape else f"{dimensions(len(shape))}"
        raise ValueError(
            f"x has shape {shape}, {got}; {what} expects an array with at least {dimensions(min_ndim)}"
        )
    return shape


def _size(shape: tuple[int | None, ...]) -> int | None:
    """The number of elements, or ``None`` while a dimension is unknown (a traced graph)."""
    return None if None in shape else math.prod(shape)


def _same_shape(got: tuple[int | None, ...], expected: tuple[int | None, ...]) -> bool:
    """Equal shapes, where an unknown dimension (``None``) matches any size."""
    return len(got) == len(expected) and all(
        g is None or e is None or g == e for g, e in zip(got, expected, strict=True)
    )


def _index(value: object, name: str) -> int:
    """``value`` as an int (any integer type, NumPy's included); bools are not integers here."""
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected an int")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name}={value!r}: expected an int") from None


def as_shape(value: object, name: str) -> tuple[int, ...]:
    """An int or a sequence of ints as a shape of positive sizes.

    :raises TypeError: for anything but ints; :raises ValueError: for sizes below 1.
    """
    try:
        dims = (_index(value, name),)
    except TypeError:
        if not isinstance(value, Sequence):
            raise TypeError(f"{name}={value!r}: expected an int or a sequence of ints") from None
        dims = tuple(_index(v, name) for v in value)
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"{name}={value!r}: expected one or more sizes >= 1")
    return dims


def _check_axis(axis: object, ndim: int, name: str = "axis") -> int:
    axis = _index(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input with {dimensions(ndim)}")
    return axis % ndim


def _check_param(be: Backend, name: str, value: Array | None, shape: tuple[int, ...], x: Array) -> None:
    if value is None:
        return
    if not be.handles(type(value)):
        raise TypeError(
            unsupported_array_message(type(value), name, is_input=False)
            or f"{name} is a {type_name(type(value))} but x is a {type_name(type(x))}: every array "
            f"in one call must belong to the same backend ({be.name!r})"
        )
    dtype = be.info.dtype_name(value)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}; expected a floating dtype, one of {FLOAT_DTYPES}")
    got = tuple(be.info.shape(value))
    if not _same_shape(got, shape):
        raise ValueError(f"{name} has shape {got}; expected {shape}")


def _check_running_stats(running_mean: Array | None, running_var: Array | None) -> None:
    if (running_mean is None) != (running_var is None):
        given, missing = (
            ("running_mean", "running_var") if running_var is None else ("running_var", "running_mean")
        )
        raise ValueError(f"{given} is given but {missing} is None; pass both or neither")


def _momentum(momentum: object, momentum_weights: object, preset: presets.Preset, updating: bool) -> float:
    """The weight of the new batch statistic (0 when nothing is updated)."""
    weights = presets.check_momentum_weights(
        preset.momentum_weights if momentum_weights is None else momentum_weights
    )
    if momentum is presets.DEFAULT:
        return preset.update_weight
    if momentum is None:
        if updating:
            raise ValueError(
                "momentum=None (the cumulative average) needs a batch counter; use a layer "
                "(normkit.BatchNorm(momentum=None)) or pass momentum=1/k for the k-th batch"
            )
        return 0.0
    return presets.batch_weight(presets.check_momentum(momentum), weights)


def _empty_like(be: Backend, x: Array, shape: tuple[int, ...]) -> Array:
    return be.info.full(shape, 0.0, be.info.dtype_name(x), x)


def _check_out(
    be: Backend, kernel: Any, op: str, out: Array | None, x: Array, shape: tuple[int, ...]
) -> None:
    """``out`` must be an array of ``x``'s backend, dtype, shape and device, and the backend's
    kernel must write into one."""
    if out is None:
        return
    if not takes_out(kernel):
        raise TypeError(
            f"out=: backend {be.name!r} does not write {op}'s output into a given array; pass out=None"
        )
    if not be.handles(type(out)):
        raise TypeError(
            unsupported_array_message(type(out), "out", is_input=False)
            or f"out is a {type_name(type(out))}; expected an array like x ({type_name(type(x))})"
        )
    info = be.info
    if info.dtype_name(out) != info.dtype_name(x):
        raise TypeError(f"out has dtype {info.dtype_name(out)}; expected x's dtype {info.dtype_name(x)}")
    if not _same_shape(tuple(info.shape(out)), shape):
        raise ValueError(f"out has shape {tuple(info.shape(out))}; expected x's shape {shape}")
    if info.device(out) != info.device(x):
        raise ValueError(f"out is on device {info.device(out)}; expected x's device {info.device(x)}")


def _check_values_per_group(
    n: int, shape: tuple[int, ...], allow_single_value: bool, unbiased_update: bool, what: str
) -> None:
    if n == 1 and not allow_single_value:
        raise ValueError(
            f"x has shape {shape}: expected more than 1 value per {what} when using batch "
            f"statistics (the torch preset's rule; allow_single_value=True allows it)"
        )
    if n == 1 and unbiased_update:
        raise ValueError(
            f"x has shape {shape}: an unbiased running variance needs at least 2 values per "
            f"{what}; use running_var_estimator='biased'"
        )


def _check_instance_axis(axis: object, ndim: int) -> int:
    axis = _check_axis(axis, ndim)
    if axis == 0:
        raise ValueError("axis=0 is the batch axis; instance_norm needs a channel axis >= 1")
    return axis
