r"""Every composite operation, composed from a backend's two primitives.

A backend that implements :func:`~normkit.hookspecs.normkit_moments` and
:func:`~normkit.hookspecs.normkit_normalize` serves every composite it lacks through these
compositions (the registry builds them once per backend). Each is the spec's formula spelled
with the primitives:

* batch norm: ``moments`` over every axis but the channel axis, :math:`\sigma^2 = M_2/n`,
  ``normalize`` per channel; the running statistics move by
  :math:`r \leftarrow r + m\,(b - r)` with :math:`b = \mu` and :math:`b = M_2/(n-1)` or
  :math:`M_2/n`;
* instance norm: the same per (sample, channel); the running update takes the mean over the
  batch of the per-instance statistics (itself a ``moments`` call over axis 0);
* layer norm: ``moments`` over its axes, ``normalize`` with element-wise γ, β;
* group norm: ``moments`` with the channel axis pooled in groups, ``normalize`` per group;
* RMS norm: the mean square :math:`\overline{x^2} = M_2/n + \mu^2` (a sum of two non-negative
  terms: nothing cancels), then ``normalize`` with mean 0 and variance :math:`\overline{x^2}`;
  the weight :math:`w + o` is applied after the rounding to the input dtype for
  ``cast_before_weight`` and inside ``normalize`` otherwise.

Dtype changes go through the backend's ``BackendInfo.astype``; a version-1 style backend
without it makes a round trip through NumPy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from normkit.functional._arrays import cast, mix
from normkit.hookspecs import BackendInfo

__all__ = ["composite"]

TINY = 1e-30
"""An eps > 0 that leaves ``sqrt(1 + eps)`` exactly 1 in float32 and float64."""

Array = Any
Kernel = Callable[..., Any]


def _compute(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _other_axes(ndim: int, kept: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in kept)


def composite(op: str, info: BackendInfo, moments: Kernel, normalize: Kernel) -> Kernel | None:
    """The kernel for composite ``op`` built from ``moments`` and ``normalize`` (``None`` for a
    primitive, which cannot be composed)."""

    def astype(array: Array, dtype: str) -> Array:
        return cast(info, array, dtype)

    def statistics(x: Array, axes: tuple[int, ...], group_axis: int | None = None, groups: int | None = None):
        count, mean, m2 = moments(x, axes, None, group_axis, groups)
        cdt = _compute(info.dtype_name(x))
        return astype(count, cdt), mean, m2

    def update(old: Array, batch: Array, momentum: float) -> Array:
        return mix(info, old, batch, momentum)

    def channel_norm(
        x, weight, bias, running_mean, running_var, use_batch, momentum, eps, axis, unbiased, first
    ):
        ndim = len(info.shape(x))
        if not use_batch:  # eval: the running statistics, per channel
            reduced = _other_axes(ndim, (axis,))
            y = normalize(x, running_mean, running_var, weight, bias, eps, reduced, (axis,))
            return y, running_mean, running_var
        kept = (0, axis) if first else (axis,)
        count, mean, m2 = statistics(x, _other_axes(ndim, kept))
        y = normalize(x, mean, m2 / count, weight, bias, eps, _other_axes(ndim, kept), (axis,))
        if running_mean is None:
            return y, None, None
        stored = m2 / (count - 1.0) if unbiased else m2 / count
        if first:  # the mean over instances of the per-instance statistics
            mean = moments(mean, (0,), None, None, None)[1]
            stored = moments(stored, (0,), None, None, None)[1]
        return y, update(running_mean, mean, momentum), update(running_var, stored, momentum)

    if op == "batch_norm":

        def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var):  # fmt: skip
            return channel_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var, False)  # fmt: skip

        return batch_norm
    if op == "instance_norm":

        def instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var):  # fmt: skip
            return channel_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis, unbiased_running_var, True)  # fmt: skip

        return instance_norm
    if op == "layer_norm":

        def layer_norm(x, weight, bias, axes, eps):
            count, mean, m2 = statistics(x, axes)
            return normalize(x, mean, m2 / count, weight, bias, eps, axes, axes)

        return layer_norm
    if op == "group_norm":

        def group_norm(x, num_groups, weight, bias, eps, axis):
            axes = _other_axes(len(info.shape(x)), (0, axis))
            count, mean, m2 = statistics(x, axes, axis, num_groups)
            return normalize(x, mean, m2 / count, weight, bias, eps, axes, (axis,))

        return group_norm
    if op == "rms_norm":

        def rms_norm(x, weight, axes, eps, weight_offset, cast_before_weight):
            count, mean, m2 = statistics(x, axes)
            mean_square = m2 / count + mean * mean
            cdt = _compute(info.dtype_name(x))
            kept = tuple(info.shape(mean))
            zeros = info.full(kept, 0.0, cdt, mean)
            scale = None if weight is None else astype(weight, cdt) + weight_offset
            half = info.dtype_name(x) in ("float16", "bfloat16")
            if not (cast_before_weight and half and scale is not None):
                return normalize(x, zeros, mean_square, scale, None, eps, axes, axes)
            rounded = normalize(x, zeros, mean_square, None, None, eps, axes, axes)
            # the product by w + o: mean 0, variance 1 and eps TINY (> 0, as the spec requires)
            # make the divisor exactly 1 in float32
            ones = info.full(kept, 1.0, cdt, mean)
            product = normalize(astype(rounded, "float32"), zeros, ones, scale, None, TINY, axes, axes)
            return astype(product, info.dtype_name(x))

        return rms_norm
    return None
