r"""Folding: each eval-mode batch norm absorbed into the convolution or dense layer before it.

In eval mode a batch norm is a fixed affine map of each channel,
:math:`y_o = \gamma_o (z_o - \mu_o)/\sqrt{\sigma^2_o + \epsilon} + \beta_o`, and the layer before
it is linear in its weights: :math:`z_o = \sum_k W_{o,k}\,x_k + b_o`. So the pair is one layer
with, for every output channel :math:`o`,

.. math::

   s_o = \frac{\gamma_o}{\sqrt{\sigma^2_o + \epsilon}}, \qquad
   W'_{o,\cdot} = s_o\,W_{o,\cdot}, \qquad
   b'_o = (b_o - \mu_o)\,s_o + \beta_o ,

with a missing bias, :math:`\gamma` or :math:`\beta` taken as 0, 1 and 0, and :math:`\epsilon`
the batch norm's own. :func:`fold_weights` computes this once, in float64, for every kernel
layout the frameworks use (which kernel entries feed output channel :math:`o`); the caller casts
the results to the weights' dtype, so a float16 or bfloat16 model is rounded once, at the end
(folding in the model's dtype rounds :math:`s`, the product and the bias in it, and loses more
than the unfolded model does). :func:`fold` takes a whole model and dispatches to its
framework's implementation (``normkit_torch.fold``, ``normkit_tensorflow.fold``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from normkit.testtime.sites import find_batch_norms, framework_module

__all__ = ["LAYOUTS", "fold", "fold_weights"]

LAYOUTS: dict[str, str] = {
    "out-first": "(C_out, ...): torch Conv1d/2d/3d (C_out, C_in/groups, *k) and Linear (C_out, C_in)",
    "torch-transposed": (
        "(C_in, C_out/groups, *k): torch ConvTranspose1d/2d/3d; input channel i is in group "
        "g = i // (C_in/groups), and its column j feeds output channel g*(C_out/groups) + j"
    ),
    "out-last": "(..., C_out): Keras Conv1D/2D/3D (*k, C_in/groups, C_out) and Dense (C_in, C_out)",
    "keras-transposed": "(*k, C_out, C_in): Keras Conv1DTranspose/2D/3D",
    "keras-depthwise": (
        "(*k, C_in, M): Keras DepthwiseConv1D/2D with depth_multiplier M; "
        "entry (c, m) feeds output channel c*M + m"
    ),
}
"""The kernel layouts :func:`fold_weights` knows: which entries feed which output channel."""


def _output_channels(shape: tuple[int, ...], layout: str, groups: int) -> tuple[int, np.ndarray]:
    """The number of output channels of a kernel and, broadcastable to its shape, the output
    channel each entry feeds."""
    ndim = len(shape)
    if layout == "out-first":
        return shape[0], np.arange(shape[0]).reshape((shape[0],) + (1,) * (ndim - 1))
    if layout == "out-last":
        return shape[-1], np.arange(shape[-1])
    if layout == "keras-transposed":
        return shape[-2], np.arange(shape[-2])[:, None]
    if layout == "keras-depthwise":
        return shape[-2] * shape[-1], np.arange(shape[-2] * shape[-1]).reshape(shape[-2:])
    # torch-transposed
    c_in, per_group = shape[0], shape[1]
    if c_in % groups:
        raise ValueError(
            f"groups={groups}: a 'torch-transposed' kernel of shape {shape} has {c_in} input channels "
            f"(axis 0), expected a multiple of groups"
        )
    group = np.arange(c_in) // (c_in // groups)
    index = group[:, None] * per_group + np.arange(per_group)[None, :]
    return groups * per_group, index.reshape((c_in, per_group) + (1,) * (ndim - 2))


def _vector(value: object, name: str, channels: int, default: float | None) -> np.ndarray:
    """``value`` as a float64 vector of ``channels`` finite entries (``default`` where None)."""
    if value is None:
        if default is None:
            raise ValueError(f"{name}=None: expected {channels} values, one per output channel")
        return np.full(channels, default, np.float64)
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (channels,):
        raise ValueError(
            f"{name} has shape {array.shape}: expected ({channels},), one value per output channel of the kernel"
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name}[{bad[0]}] is {array[bad[0]]}: expected finite values ({bad.size} are not; a "
            f"statistic that overflowed a float16 buffer?)"
        )
    return array


def fold_weights(
    kernel: object,
    bias: object | None,
    running_mean: object,
    running_var: object,
    gamma: object | None,
    beta: object | None,
    eps: float,
    *,
    layout: str,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The kernel and bias of a linear layer with the eval-mode batch norm after it folded in.

    With :math:`s_o = \gamma_o / \sqrt{\sigma^2_o + \epsilon}` for every output channel
    :math:`o`:

    .. math::

       W' = W \cdot s_o \ \text{(every entry of W that feeds output channel } o\text{)}, \qquad
       b'_o = (b_o - \mu_o)\,s_o + \beta_o ,

    computed in float64 (a missing ``bias``, ``gamma`` or ``beta`` is 0, 1 or 0). The caller
    casts the results to the weights' dtype.

    :param kernel: the layer's kernel, in ``layout`` (see :data:`LAYOUTS`).
    :param bias: the layer's bias (one value per output channel), or None.
    :param running_mean: :math:`\mu`, one value per output channel.
    :param running_var: :math:`\sigma^2`, one value per output channel.
    :param gamma: :math:`\gamma`, or None (a batch norm without scale).
    :param beta: :math:`\beta`, or None (a batch norm without offset).
    :param eps: the batch norm's own :math:`\epsilon` (not a default: folding with another
        :math:`\epsilon` is silently wrong where :math:`\sigma^2` is small).
    :param layout: which kernel entries feed which output channel: ``"out-first"`` (torch
        Conv, Linear), ``"torch-transposed"`` (torch ConvTranspose, with ``groups``),
        ``"out-last"`` (Keras Conv, Dense), ``"keras-transposed"``, ``"keras-depthwise"``.
    :param groups: the groups of a ``"torch-transposed"`` kernel, whose output channels are
        spread over its first two axes; every other layout has them on one axis (1).
    :returns: ``(kernel, bias)`` in float64, the kernel in the input's shape and layout.
    :raises ValueError: for an unknown layout, groups that do not fit the kernel, statistics or
        parameters that are not one finite value per output channel, a negative or non-finite
        ``eps``, or :math:`\sigma^2 + \epsilon \le 0` (the batch norm divides by zero).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups={groups!r}: expected a positive integer")
    if groups != 1 and layout != "torch-transposed":
        raise ValueError(
            f"groups={groups}: only a 'torch-transposed' kernel spreads its output channels over "
            f"groups; the output channel of a {layout!r} kernel is its own axis (pass groups=1)"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise ValueError(f"eps={eps!r}: expected a number >= 0 (the batch norm's own epsilon)")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={eps!r}: expected a finite number >= 0 (the batch norm's own epsilon)")
    w = np.asarray(kernel, dtype=np.float64)
    minimum = {"out-first": 1, "out-last": 1, "torch-transposed": 2}.get(layout, 2)
    if w.ndim < minimum:
        raise ValueError(f"kernel has shape {w.shape}: a {layout!r} kernel has at least {minimum} axes")
    channels, index = _output_channels(w.shape, layout, int(groups))
    mean = _vector(running_mean, "running_mean", channels, None)
    var = _vector(running_var, "running_var", channels, None)
    scale = _vector(gamma, "gamma", channels, 1.0)
    offset = _vector(beta, "beta", channels, 0.0)
    b = _vector(bias, "bias", channels, 0.0)
    denominator = var + float(eps)
    bad = np.flatnonzero(~(denominator > 0))
    if bad.size:
        raise ValueError(
            f"running_var[{bad[0]}] + eps = {denominator[bad[0]]}: expected > 0 (the batch norm "
            f"divides by its square root)"
        )
    s = scale / np.sqrt(denominator)
    return w * s[index], (b - mean) * s + offset


def fold(model: Any) -> Any:
    r"""A copy of ``model`` with every eval-mode batch norm folded into the convolution or dense
    layer that feeds it, and no batch norm left: its eval outputs equal ``model``'s.

    For each batch norm, with :math:`s_o = \gamma_o/\sqrt{\sigma^2_o + \epsilon}` from its
    running statistics and its own :math:`\epsilon`, the layer before it gets
    :math:`W' = s_o W` along output channel :math:`o` and :math:`b' = (b - \mu)s + \beta`
    (:func:`fold_weights`), computed in float64 and cast to the weights' dtype.

    * **PyTorch** (``normkit-torch``): the model is traced with ``torch.fx``; every
      ``torch.nn`` batch norm (the ``normkit_torch`` drop-ins included) directly after a
      ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (grouped included) or ``Linear`` is folded.
      Returns a ``torch.fx.GraphModule`` in eval mode; ``model`` is untouched.
    * **Keras 3** (``normkit-tensorflow``): Sequential and functional models; every
      ``BatchNormalization`` on the output-channel axis of a ``Conv1D/2D/3D``,
      ``Conv1DTranspose/2D/3D``, ``DepthwiseConv1D/2D`` or ``Dense`` with a linear activation.
      Returns a new model of the same kind whose outputs equal ``model(x, training=False)``.

    Fold last: after training and any recalibration (:func:`normkit.testtime.recalibrate`),
    since the folded model has no statistics left to adapt.

    :raises ValueError: for a model without batch norm, and for any batch norm that cannot be
        folded (the message names it and says why: its input is not the output of an absorbable
        layer, that output is used elsewhere too, it has no running statistics, it is in
        training mode, ...); ``model`` is unchanged.
    :raises TypeError: for a model of no supported framework, one whose backend distribution is
        not installed, or normkit's own layers (which are not attached to a layer before them).
    """
    implementation = framework_module(model, "fold", "fold it")
    if implementation is None:
        what = f"{type(model).__module__}.{type(model).__qualname__}"
        if find_batch_norms(model):
            raise TypeError(
                f"model is a {what} holding normkit's own BatchNorm layers: they are not attached to "
                f"a convolution or dense layer, so there is nothing to fold them into (fold takes "
                f"PyTorch and Keras models)"
            )
        raise TypeError(f"model is a {what}: fold takes PyTorch (torch.nn.Module) and Keras models")
    return implementation.fold_model(model)
