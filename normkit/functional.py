r"""The public operations: validate once, dispatch to the array's backend, return new state.

These functions are pure: they never modify their arguments, and return the output together
with the new running statistics. Defaults come from the ``preset`` (``"torch"`` unless you say
otherwise); every option can be overridden by keyword. The math and the train/eval rules are
those of :mod:`normkit.hookspecs`.

>>> import numpy as np, normkit
>>> x = np.arange(12, dtype=np.float32).reshape(3, 4)       # (N, C)
>>> y, mean, var = normkit.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32),
...                                   training=True)
>>> y[:, 0]                                  # (x - 4) / sqrt(32/3 + 1e-5)
array([-1.2247443,  0.       ,  1.2247443], dtype=float32)
>>> mean, var                                # 0.9 * running + 0.1 * (batch mean, unbiased batch var)
(array([0.4, 0.5, 0.6, 0.7], dtype=float32), array([2.5, 2.5, 2.5, 2.5], dtype=float32))

Errors name the parameter at fault: ``TypeError`` for a wrong array type or dtype
(:class:`~normkit.errors.NoBackendError` when no backend handles the array: a scalar, a list,
a ``numpy.ma.MaskedArray``), ``ValueError`` for wrong shapes and values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

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

__all__ = ["BatchNormResult", "InstanceNormResult", "batch_norm", "instance_norm", "layer_norm"]

Array = Any
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class BatchNormResult(NamedTuple):
    """``(y, running_mean, running_var)``; the statistics are ``None`` when none were given."""

    y: Array
    running_mean: Array | None
    running_var: Array | None


InstanceNormResult = BatchNormResult
"""``(y, running_mean, running_var)`` of :func:`instance_norm` (the same record)."""


# -- validation helpers ---------------------------------------------------------------------
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


# -- operations -----------------------------------------------------------------------------
def _channel_norm(
    op: str,
    be: Backend,
    x: Array,
    shape: tuple[int, ...],
    axis: int,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    use_batch_stats: bool,
    momentum: object,
    eps: float | None,
    momentum_weights: str | None,
    running_var_estimator: str | None,
    allow_single_value: bool | None,
    p: presets.Preset,
    out: Array | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Batch or instance norm once the backend, the input's shape and the axis are known
    (the entry point for layers, which resolve those themselves)."""
    channels = (shape[axis],)
    for name, value in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_param(be, name, value, channels, x)
    _check_running_stats(running_mean, running_var)
    m = _momentum(momentum, momentum_weights, p, updating=use_batch_stats and running_mean is not None)
    default_eps = p.batch_norm_eps if op == "batch_norm" else p.instance_norm_eps
    eps = presets.check_eps(default_eps if eps is None else eps)
    unbiased = presets.check_estimator(running_var_estimator or p.running_var_estimator)
    allow = p.allow_single_value if allow_single_value is None else bool(allow_single_value)
    if not use_batch_stats and running_mean is None:
        flag = "training=False" if op == "batch_norm" else "use_input_stats=False"
        raise ValueError(
            f"running_mean and running_var are None: {flag} normalizes with running statistics; pass them"
        )
    kernel = be.batch_norm if op == "batch_norm" else be.instance_norm
    _check_out(be, kernel, op, out, x, shape)
    size = _size(shape)
    if size == 0:
        return (_empty_like(be, x, shape) if out is None else out), running_mean, running_var
    if use_batch_stats and size is not None:  # unknown sizes are the kernel's to handle
        per_group, what = (
            (size // shape[axis], "channel")
            if op == "batch_norm"
            else (size // (shape[0] * shape[axis]), "instance and channel")
        )
        _check_values_per_group(per_group, shape, allow, unbiased and running_mean is not None, what)
    if out is not None:
        return kernel(
            x, weight, bias, running_mean, running_var, use_batch_stats, m, eps, axis, unbiased, out=out
        )
    return kernel(x, weight, bias, running_mean, running_var, use_batch_stats, m, eps, axis, unbiased)


def batch_norm(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool = False,
    momentum: float | presets._Default = presets.DEFAULT,
    eps: float | None = None,
    axis: int | None = None,
    momentum_weights: presets.MomentumWeights | None = None,
    running_var_estimator: presets.RunningVarEstimator | None = None,
    allow_single_value: bool | None = None,
    preset: str | presets.Preset = "torch",
    backend: str | None = None,
    out: Array | None = None,
) -> BatchNormResult:
    r"""Batch normalization (see :func:`normkit.hookspecs.normkit_batch_norm` for the math).

    :param x: input with the batch on axis 0 and channels on ``axis``, at least 2-D.
    :param running_mean: running mean, shape ``(C,)``; used in eval, updated in training.
    :param running_var: running variance, shape ``(C,)``.
    :param weight: γ, shape ``(C,)``, or ``None``.
    :param bias: β, shape ``(C,)``, or ``None``.
    :param training: normalize with batch statistics and return updated running statistics
        (when given); otherwise normalize with the running statistics, which are then required.
    :param momentum: in the preset's convention (``momentum_weights``); default the preset's.
    :param eps: added to the variance inside the square root; default the preset's.
    :param axis: channel axis; default the preset's (1 for torch/onnx, -1 for keras/flax).
    :param momentum_weights: ``"batch"`` or ``"running"``: which term ``momentum`` weights.
    :param running_var_estimator: ``"unbiased"`` or ``"biased"`` batch variance in the update.
    :param allow_single_value: allow one value per channel in training (then ``y = bias``).
    :param preset: ``"torch"``, ``"keras"``, ``"flax"`` or ``"onnx"``.
    :param backend: force a backend by name instead of choosing by ``x``'s type.
    :param out: an array of ``x``'s type, shape, dtype and device to write ``y`` into (it is
        then returned as ``y``); ``x`` itself normalizes in place. Only backends whose kernel
        takes ``out`` accept it (the NumPy backend does).
    :returns: :class:`BatchNormResult` ``(y, running_mean, running_var)``.
    """
    p = presets.get_preset(preset)
    be = _backend(x, backend, 2, "batch_norm")
    shape = _check_input(be, x, 2, "batch_norm")
    axis = _check_axis(p.axis if axis is None else axis, len(shape))
    return BatchNormResult(
        *_channel_norm(
            "batch_norm",
            be,
            x,
            shape,
            axis,
            running_mean,
            running_var,
            weight,
            bias,
            bool(training),
            momentum,
            eps,
            momentum_weights,
            running_var_estimator,
            allow_single_value,
            p,
            out,
        )
    )


def instance_norm(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    use_input_stats: bool = True,
    momentum: float | presets._Default = presets.DEFAULT,
    eps: float | None = None,
    axis: int | None = None,
    momentum_weights: presets.MomentumWeights | None = None,
    running_var_estimator: presets.RunningVarEstimator | None = None,
    allow_single_value: bool | None = None,
    preset: str | presets.Preset = "torch",
    backend: str | None = None,
    out: Array | None = None,
) -> InstanceNormResult:
    r"""Instance normalization (see :func:`normkit.hookspecs.normkit_instance_norm`).

    :param x: input ``(N, C, *spatial)`` (``axis=1``) or ``(N, *spatial, C)`` (``axis=-1``),
        at least 3-D.
    :param use_input_stats: normalize each instance with its own statistics (and update the
        running statistics when given); otherwise use the running statistics.
    :returns: :class:`InstanceNormResult` ``(y, running_mean, running_var)``.

    The other parameters are those of :func:`batch_norm`; ``allow_single_value`` is about
    one value per instance and channel (a spatial size of 1).
    """
    p = presets.get_preset(preset)
    be = _backend(x, backend, 3, "instance_norm")
    shape = _check_input(be, x, 3, "instance_norm")
    axis = _check_instance_axis(p.axis if axis is None else axis, len(shape))
    return InstanceNormResult(
        *_channel_norm(
            "instance_norm",
            be,
            x,
            shape,
            axis,
            running_mean,
            running_var,
            weight,
            bias,
            bool(use_input_stats),
            momentum,
            eps,
            momentum_weights,
            running_var_estimator,
            allow_single_value,
            p,
            out,
        )
    )


def _check_instance_axis(axis: object, ndim: int) -> int:
    axis = _check_axis(axis, ndim)
    if axis == 0:
        raise ValueError("axis=0 is the batch axis; instance_norm needs a channel axis >= 1")
    return axis


def normalized_axes(
    shape: tuple[int, ...], normalized_shape: int | Sequence[int] | None, axis: int | Sequence[int] | None
) -> tuple[int, ...]:
    """The sorted non-negative axes layer norm normalizes over.

    ``normalized_shape`` (PyTorch) names the trailing dimensions by their sizes; ``axis``
    (Keras/Flax) names axes directly; with neither, the last axis.
    """
    ndim = len(shape)
    if normalized_shape is not None and axis is not None:
        raise ValueError("pass normalized_shape or axis, not both")
    if normalized_shape is not None:
        dims = as_shape(normalized_shape, "normalized_shape")
        if len(dims) > ndim or not _same_shape(tuple(shape[ndim - len(dims) :]), dims):
            raise ValueError(
                f"normalized_shape={dims} does not match the trailing dimensions of x with shape {shape}"
            )
        return tuple(range(ndim - len(dims), ndim))
    if axis is None:
        return (ndim - 1,)
    raw = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    if not raw:
        raise ValueError("axis=() names no axis to normalize over")
    axes = sorted(_check_axis(a, ndim) for a in raw)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis={axis!r} names an axis twice")
    return tuple(axes)


def layer_norm(
    x: Array,
    normalized_shape: int | Sequence[int] | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int | Sequence[int] | None = None,
    eps: float | None = None,
    preset: str | presets.Preset = "torch",
    backend: str | None = None,
    out: Array | None = None,
) -> Array:
    r"""Layer normalization (see :func:`normkit.hookspecs.normkit_layer_norm`).

    :param x: input of any rank >= 1.
    :param normalized_shape: PyTorch style: the sizes of the trailing dimensions to normalize.
    :param weight: γ with the shape of the normalized dimensions, or ``None``.
    :param bias: β with the same shape, or ``None``.
    :param axis: Keras style: an axis or a list of axes to normalize over (default: the last).
    :param eps: default the preset's (1e-5 torch/onnx, 1e-3 keras, 1e-6 flax).
    :param out: where to write ``y``, as in :func:`batch_norm`.
    :returns: ``y``, same shape and dtype as ``x``. The same in training and eval.
    """
    p = presets.get_preset(preset)
    be = _backend(x, backend, 1, "layer_norm")
    shape = _check_input(be, x, 1, "layer_norm")
    axes = normalized_axes(shape, normalized_shape, axis)
    return _layer_norm(be, x, shape, axes, weight, bias, eps, p, out)


def _layer_norm(
    be: Backend,
    x: Array,
    shape: tuple[int, ...],
    axes: tuple[int, ...],
    weight: Array | None,
    bias: Array | None,
    eps: float | None,
    p: presets.Preset,
    out: Array | None = None,
) -> Array:
    """Layer norm once the backend, shape and axes are known (the entry point for layers)."""
    param_shape = tuple(shape[a] for a in axes)
    _check_param(be, "weight", weight, param_shape, x)
    _check_param(be, "bias", bias, param_shape, x)
    eps = presets.check_eps(p.layer_norm_eps if eps is None else eps)
    _check_out(be, be.layer_norm, "layer_norm", out, x, shape)
    if _size(shape) == 0:
        return _empty_like(be, x, shape) if out is None else out
    if out is not None:
        return be.layer_norm(x, weight, bias, axes, eps, out=out)
    return be.layer_norm(x, weight, bias, axes, eps)
