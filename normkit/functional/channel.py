"""Batch and instance norm: per-channel statistics (over the batch, or per instance), running
statistics updated in training and used in eval."""

from __future__ import annotations

from typing import Any, NamedTuple

from normkit import presets
from normkit._registry import Backend
from normkit.functional._checks import (
    _backend,
    _check_axis,
    _check_input,
    _check_instance_axis,
    _check_out,
    _check_param,
    _check_running_stats,
    _check_values_per_group,
    _empty_like,
    _momentum,
    _size,
)
from normkit.functional.masked import masked_batch_norm
from normkit.functional.statistics import check_mask

__all__ = ["BatchNormResult", "InstanceNormResult", "batch_norm", "instance_norm"]

Array = Any


class BatchNormResult(NamedTuple):
    """``(y, running_mean, running_var)``; the statistics are ``None`` when none were given."""

    y: Array
    running_mean: Array | None
    running_var: Array | None


InstanceNormResult = BatchNormResult
"""``(y, running_mean, running_var)`` of :func:`instance_norm` (the same record)."""


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
    mask: Array | None = None,
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
    if mask is not None:
        check_mask(be, mask, shape)
        if use_batch_stats:  # eval ignores the mask (Keras)
            _check_out(be, be.normalize, op, out, x, shape)
            if _size(shape) == 0:
                return (_empty_like(be, x, shape) if out is None else out), running_mean, running_var
            return masked_batch_norm(
                be, x, mask, axis, weight, bias, running_mean, running_var, m, eps, unbiased, out
            )
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
    mask: Array | None = None,
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
    :param mask: a boolean array (``True`` counts) with ``x``'s rank and, on each axis, ``x``'s size
        or 1 (Keras's semantics). In training the statistics are those of the unmasked values
        only (every value is normalized with them), and the running statistics move with each
        channel's own count: a channel with nothing unmasked keeps its running statistics (Keras
        pulls them toward 0, Flax gives NaN), and under the unbiased estimator a channel with one
        unmasked value keeps its running variance. Eval ignores the mask. With a mask, one value
        per channel is never an error (the counts are data).
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
            mask,
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
