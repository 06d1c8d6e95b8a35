r"""The oracle: plain float64 two-pass formulas, written to be read, not to be fast.

Every backend is checked against these functions. They share no code with any backend:
inputs are converted to float64, the channel (or normalized) axes are moved into one row per
group, and each statistic is the textbook formula

.. math::

   \mu = \frac{1}{n}\sum_i x_i, \qquad \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2 ,

with the mean corrected once by the mean of the residuals, :math:`\mu \leftarrow \mu +
\frac1n\sum_i (x_i - \mu)` (which is 0 in exact arithmetic and removes the float64 rounding of
a sum at a large offset).

Results are float64 NumPy arrays whatever the input dtype. Options mirror the spec's kernel
arguments (see :mod:`normkit.hookspecs`), with ``momentum`` the weight of the new batch.

The statistics as values (spec version 2) have their oracle here too: :func:`moments` gives
per-group ``(count, mean, m2)`` with :math:`M_2 = \sum_i (x_i - \mu)^2`, over the unmasked
values when a mask is given; :func:`normalize` applies given statistics; :func:`group_norm` and
:func:`rms_norm` are the two new layers' formulas (in exact float64 arithmetic: where a
half-precision input is cast is a rounding the spec names, not a formula).
"""

from __future__ import annotations

import numpy as np

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "moments", "normalize", "rms_norm"]


def _rows(x: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` as ``(C, n)``: one row per channel of axis ``axis``, and the moved shape."""
    moved = np.moveaxis(x, axis, 0)
    return moved.reshape(moved.shape[0], -1), moved.shape


def _unrows(rows: np.ndarray, moved_shape: tuple[int, ...], axis: int) -> np.ndarray:
    return np.moveaxis(rows.reshape(moved_shape), 0, axis)


def _axes_rows(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """``x`` as one row per group of the axes not in ``axes`` (the reduced axes along each row),
    with the transposed shape and the axis order, for :func:`_axes_unrows`."""
    axes = tuple(sorted(a % x.ndim for a in axes))
    order = tuple(a for a in range(x.ndim) if a not in axes) + axes
    moved = np.transpose(x, order)
    groups = int(np.prod(moved.shape[: x.ndim - len(axes)]))  # explicit: either may be 0
    return moved.reshape(groups, -1 if groups else 0), moved.shape, order


def _axes_unrows(rows: np.ndarray, moved_shape: tuple[int, ...], order: tuple[int, ...]) -> np.ndarray:
    return np.transpose(rows.reshape(moved_shape), np.argsort(order))


def _mean_and_biased_var(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = rows.shape[1]
    mean = rows.sum(axis=1) / n
    # One correction step: a float64 sum of values at |mu| >> sigma leaves the mean off by about
    # eps*|mu|*log(n), which at |mu| = 100 sigma is more than a careful backend's error; the mean of
    # the residuals x - mean is off by only eps*sigma. The oracle must be the most accurate party.
    mean = mean + (rows - mean[:, None]).sum(axis=1) / n
    var = ((rows - mean[:, None]) ** 2).sum(axis=1) / n
    return mean, var


def _vector(param: object, size: int, fill: float) -> np.ndarray:
    if param is None:
        return np.full(size, fill)
    return np.asarray(param, dtype=np.float64).reshape(size)


def _ema(old: object, batch: np.ndarray, momentum: float) -> np.ndarray:
    return (1.0 - momentum) * np.asarray(old, dtype=np.float64) + momentum * batch


def batch_norm(
    x: object,
    weight: object = None,
    bias: object = None,
    running_mean: object = None,
    running_var: object = None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Batch norm per :func:`normkit.hookspecs.normkit_batch_norm`; returns
    ``(y, running_mean, running_var)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    rows, _ = _rows(x, axis)
    n = rows.shape[1]
    if training:
        mean, var = _mean_and_biased_var(rows)
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    y = normalize(x, mean, var, weight, bias, eps=eps, axis=axis)
    if running_mean is None:
        return y, None, None
    if not training:
        return y, np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    stored_var = var * n / (n - 1) if unbiased_running_var else var
    return y, _ema(running_mean, mean, momentum), _ema(running_var, stored_var, momentum)


def instance_norm(
    x: object,
    weight: object = None,
    bias: object = None,
    running_mean: object = None,
    running_var: object = None,
    *,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Instance norm per :func:`normkit.hookspecs.normkit_instance_norm`; returns
    ``(y, running_mean, running_var)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    if not use_input_stats:
        return batch_norm(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            training=False,
            momentum=momentum,
            eps=eps,
            axis=axis,
            unbiased_running_var=unbiased_running_var,
        )
    instances = []
    means = []
    stored_vars = []
    channels = x.shape[axis]
    for sample in x:  # each instance is a batch norm of one sample; momentum 1 returns its statistics
        y, mean, stored_var = batch_norm(
            sample[None], weight, bias, np.zeros(channels), np.zeros(channels),
            training=True, momentum=1.0, eps=eps, axis=axis, unbiased_running_var=unbiased_running_var,
        )  # fmt: skip
        instances.append(y[0])
        means.append(mean)
        stored_vars.append(stored_var)
    y = np.stack(instances) if instances else np.empty_like(x)
    if running_mean is None:
        return y, None, None
    return (
        y,
        _ema(running_mean, np.mean(means, axis=0), momentum),
        _ema(running_var, np.mean(stored_vars, axis=0), momentum),
    )


def layer_norm(
    x: object,
    weight: object = None,
    bias: object = None,
    *,
    axes: tuple[int, ...],
    eps: float,
) -> np.ndarray:
    """Layer norm per :func:`normkit.hookspecs.normkit_layer_norm`; returns ``y`` in float64."""
    rows, moved_shape, order = _axes_rows(np.asarray(x, dtype=np.float64), axes)
    mean, var = _mean_and_biased_var(rows)
    z = (rows - mean[:, None]) / np.sqrt(var[:, None] + eps)
    if weight is not None:
        z = z * np.asarray(weight, dtype=np.float64).reshape(1, -1)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64).reshape(1, -1)
    return _axes_unrows(z, moved_shape, order)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, and 0 where the denominator is 0: with ``eps = 0`` a
    constant (or all-zero) group has a zero numerator there too, and normalizes to 0."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 0.0)


def moments(
    x: object, axes: tuple[int, ...], mask: object = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per-group ``(count, mean, m2)`` of ``x`` reduced over ``axes`` (the other axes index the
    groups, in order), in float64:

    .. math::

       n = \sum_i m_i, \qquad \mu = \frac1n \sum_i m_i x_i, \qquad
       M_2 = \sum_i m_i (x_i - \mu)^2 ,

    with :math:`m_i` the boolean ``mask`` (broadcast to ``x``; ``True`` counts) or 1. A group
    with nothing counted is ``(0, 0, 0)``, the identity of the merge. The mean is corrected once
    by the mean of its residuals, as everywhere in this module."""
    x = np.asarray(x, dtype=np.float64)
    weights = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)
    rows, moved_shape, _ = _axes_rows(np.where(weights > 0, x, 0.0), axes)  # select: NaN * 0 is NaN
    counts, _, _ = _axes_rows(weights.astype(np.float64), axes)
    group_shape = moved_shape[: x.ndim - len(set(a % x.ndim for a in axes))]
    count = counts.sum(axis=1)
    safe = np.where(count > 0, count, 1.0)
    mean = (rows * counts).sum(axis=1) / safe
    mean = mean + ((rows - mean[:, None]) * counts).sum(axis=1) / safe
    m2 = (((rows - mean[:, None]) ** 2) * counts).sum(axis=1)
    return count.reshape(group_shape), mean.reshape(group_shape), m2.reshape(group_shape)


def normalize(
    x: object,
    mean: object,
    var: object,
    weight: object = None,
    bias: object = None,
    *,
    eps: float,
    axis: int,
) -> np.ndarray:
    r"""Given per-channel statistics along ``axis``:
    :math:`y = (x - \mu_c)/\sqrt{\sigma^2_c + \epsilon}\,\gamma_c + \beta_c`, in float64."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    rows, moved_shape = _rows(x, axis)
    channels = rows.shape[0]
    mean, var = _vector(mean, channels, 0.0), _vector(var, channels, 1.0)
    gamma, beta = _vector(weight, channels, 1.0), _vector(bias, channels, 0.0)
    y_rows = (rows - mean[:, None]) / np.sqrt(var[:, None] + eps) * gamma[:, None] + beta[:, None]
    return _unrows(y_rows, moved_shape, axis)


def group_norm(
    x: object,
    num_groups: int,
    weight: object = None,
    bias: object = None,
    *,
    eps: float,
    axis: int,
) -> np.ndarray:
    r"""Group norm of ``x`` (batch axis 0, channels on ``axis``): the ``C`` channels fall into
    ``num_groups`` contiguous blocks of ``C / num_groups``; each sample's block is normalized by
    its own mean and biased variance over the block's channels and every other axis, then the
    per-channel affine applies: :math:`y = (x - \mu_{n,g})/\sqrt{\sigma^2_{n,g} + \epsilon}\,
    \gamma_c + \beta_c`. One group is layer norm over all but the batch axis (with per-channel
    affine); ``C`` groups are instance norm."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    if axis == 0:
        raise ValueError("axis=0 is the batch axis; group norm needs a channel axis other than 0")
    channels = x.shape[axis]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of the {channels} channels")
    moved = np.moveaxis(x, axis, 1)  # (N, C, ...)
    n = moved.shape[0]
    blocks = moved.reshape(n, num_groups, -1)  # each block: C/G channels x the other axes
    mean, var = _mean_and_biased_var(blocks.reshape(n * num_groups, -1))
    z = _divide(blocks - mean.reshape(n, num_groups, 1), np.sqrt(var.reshape(n, num_groups, 1) + eps))
    z = z.reshape(moved.shape)
    shape = (1, channels) + (1,) * (moved.ndim - 2)
    y = z * _vector(weight, channels, 1.0).reshape(shape) + _vector(bias, channels, 0.0).reshape(shape)
    return np.moveaxis(y, 1, axis)


def rms_norm(
    x: object,
    weight: object = None,
    *,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float = 0.0,
) -> np.ndarray:
    r"""RMS norm over ``axes``: :math:`y = x / \sqrt{\frac1n\sum x^2 + \epsilon}\,(w + o)`,
    with element-wise ``weight`` :math:`w` over the normalized axes and ``weight_offset``
    :math:`o` (Gemma's :math:`1 + w` is :math:`o = 1`); without a weight the factor is 1 (the
    offset too is ignored). No mean is subtracted."""
    rows, moved_shape, order = _axes_rows(np.asarray(x, dtype=np.float64), axes)
    mean_square = (rows**2).sum(axis=1) / rows.shape[1]
    z = _divide(rows, np.sqrt(mean_square[:, None] + eps))
    if weight is not None:  # without a weight there is nothing to offset (the spec's rule)
        z = z * (np.asarray(weight, dtype=np.float64).reshape(-1) + weight_offset)[None, :]
    return _axes_unrows(z, moved_shape, order)
