r"""The CuPy kernels: two reductions and one fused elementwise pass per call, with no transposes.

For every op, with ``s`` one value of each group (its first) and everything after the reading
of ``x`` in the compute dtype (float32 for float16 input, float64 for float64):

.. math::

   \bar d = \frac1n\sum (x - s), \qquad \sigma^2 = \frac1n\sum (x - s - \bar d)^2, \qquad
   y = (x - s - \bar d)\,r\,\gamma + \beta, \quad r = 1/\sqrt{\sigma^2 + \epsilon} .

The shift keeps every sum of values the size of σ, whatever the mean (a constant channel, or a
group of one value, gives ``x - s = 0`` and so exactly β), and the centred output is exact where
the fused ``x a + (\beta - \mu a)`` would round ``\mu a``. In eval the same pass runs with
``s`` the running mean, :math:`\bar d = 0` and ``r`` from the running variance.

On CuPy arrays the three passes are a ``ReductionKernel`` for each sum (reducing over any set
of axes in place, channels-first or channels-last alike) and one ``ElementwiseKernel`` that
broadcasts the per-group values. On NumPy arrays the same glue runs with NumPy expressions:
that is how the kernels are tested on machines without a GPU. Pure: running statistics are
returned, never written.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["batch_norm", "instance_norm", "layer_norm"]

Array = Any


class _NumPyOps:
    """The three passes in NumPy (the stand-in for CuPy on a machine without a GPU)."""

    xp = np

    @staticmethod
    def shifted_mean(x: Array, s: Array, axes: tuple[int, ...]) -> Array:
        return (x.astype(s.dtype) - s).mean(axis=axes, keepdims=True)

    @staticmethod
    def shifted_var(x: Array, s: Array, m: Array, axes: tuple[int, ...]) -> Array:
        d = x.astype(s.dtype) - s - m
        return (d * d).mean(axis=axes, keepdims=True)

    @staticmethod
    def normalize(x: Array, s: Array, m: Array, r: Array, g: Array, b: Array) -> Array:
        return ((x.astype(s.dtype) - s - m) * r * g + b).astype(x.dtype)


class _CuPyOps:
    """The three passes as CuPy kernels (compiled by CuPy on first use, on the GPU)."""

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        mean = "y = a / (_in_ind.size() / _out_ind.size())"
        self._mean = cupy.ReductionKernel(
            "T x, S s", "S y", "S(x) - s", "a + b", mean, "0", "normkit_shifted_mean"
        )
        self._var = cupy.ReductionKernel(
            "T x, S s, S m",
            "S y",
            "(S(x) - s - m) * (S(x) - s - m)",
            "a + b",
            mean,
            "0",
            "normkit_shifted_var",
        )
        self._normalize = cupy.ElementwiseKernel(
            "T x, S s, S m, S r, S g, S b", "T y", "y = T((S(x) - s - m) * r * g + b)", "normkit_normalize"
        )

    def shifted_mean(self, x: Array, s: Array, axes: tuple[int, ...]) -> Array:
        return self._mean(x, s, axis=axes, keepdims=True)

    def shifted_var(self, x: Array, s: Array, m: Array, axes: tuple[int, ...]) -> Array:
        return self._var(x, s, m, axis=axes, keepdims=True)

    def normalize(self, x: Array, s: Array, m: Array, r: Array, g: Array, b: Array) -> Array:
        return self._normalize(x, s, m, r, g, b)


_CUPY_OPS: _CuPyOps | None = None


def _ops(x: Array) -> _NumPyOps | _CuPyOps:
    """CuPy's kernels for a CuPy array, NumPy's expressions for a NumPy array."""
    global _CUPY_OPS
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        if _CUPY_OPS is None:
            _CUPY_OPS = _CuPyOps()
        return _CUPY_OPS
    return _NumPyOps()


def _compute_dtype(x: Array) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _param(xp: Any, value: Array | None, shape: list[int], dtype: np.dtype, fill: float) -> Array:
    if value is None:
        return xp.asarray(fill, dtype=dtype)
    return value.astype(dtype, copy=False).reshape(shape)


def _updated(xp: Any, old: Array, batch: Array, momentum: float) -> Array:
    """``(1 - m) * old + m * batch`` in float64 (``C`` values), in ``old``'s dtype."""
    new = (1.0 - momentum) * old.astype(xp.float64) + momentum * batch.astype(xp.float64)
    return new.astype(old.dtype)


def _first(ndim: int, axes: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of each group's first value, keeping the reduced axes (as size 1)."""
    return tuple(slice(0, 1) if a in axes else slice(None) for a in range(ndim))


def _channel_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
    per_instance: bool,
) -> tuple[Array, Array | None, Array | None]:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    g, b = _param(xp, weight, shape, cdt, 1.0), _param(xp, bias, shape, cdt, 0.0)
    zero = xp.asarray(0.0, dtype=cdt)
    if not use_batch_stats:
        s = _param(xp, running_mean, shape, cdt, 0.0)
        r = 1.0 / xp.sqrt(_param(xp, running_var, shape, cdt, 1.0) + eps)
        return ops.normalize(x, s, zero, r, g, b), running_mean, running_var
    axes = tuple(a for a in range(1 if per_instance else 0, x.ndim) if a != axis)
    s = x[_first(x.ndim, axes)].astype(cdt)
    m = ops.shifted_mean(x, s, axes)
    var = ops.shifted_var(x, s, m, axes)
    y = ops.normalize(x, s, m, 1.0 / xp.sqrt(var + eps), g, b)
    if running_mean is None or running_var is None:
        return y, None, None
    mean = s + m
    if unbiased_running_var:
        n = x.size // mean.size
        var = var * (n / (n - 1))
    if per_instance:
        mean, var = mean.mean(axis=0), var.mean(axis=0)
    return (
        y,
        _updated(xp, running_mean, mean.reshape(-1), momentum),
        _updated(xp, running_var, var.reshape(-1), momentum),
    )


def _on_device_of(function: Any) -> Any:
    """Run ``function`` with ``x``'s GPU current, so that every temporary and kernel launch is on
    the array's own device (not whichever device happens to be current)."""

    def on_device(x: Array, *args: Any) -> Any:
        if isinstance(x, np.ndarray):
            return function(x, *args)
        with x.device:
            return function(x, *args)

    return on_device


_channel_norm = _on_device_of(_channel_norm)


def batch_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Array, Array | None, Array | None]:
    """The spec's batch norm (:func:`normkit.hookspecs.normkit_batch_norm`)."""
    return _channel_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var, False
    )


def instance_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Array, Array | None, Array | None]:
    """The spec's instance norm (:func:`normkit.hookspecs.normkit_instance_norm`)."""
    return _channel_norm(
        x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis,
        unbiased_running_var, True,
    )  # fmt: skip


def layer_norm(
    x: Array, weight: Array | None, bias: Array | None, axes: tuple[int, ...], eps: float
) -> Array:
    """The spec's layer norm (:func:`normkit.hookspecs.normkit_layer_norm`)."""
    return _layer_norm(x, weight, bias, axes, eps)


@_on_device_of
def _layer_norm(
    x: Array, weight: Array | None, bias: Array | None, axes: tuple[int, ...], eps: float
) -> Array:
    ops = _ops(x)
    xp = ops.xp
    cdt = _compute_dtype(x)
    axes = tuple(axes)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    s = x[_first(x.ndim, axes)].astype(cdt)
    m = ops.shifted_mean(x, s, axes)
    var = ops.shifted_var(x, s, m, axes)
    g, b = _param(xp, weight, shape, cdt, 1.0), _param(xp, bias, shape, cdt, 0.0)
    return ops.normalize(x, s, m, 1.0 / xp.sqrt(var + eps), g, b)
