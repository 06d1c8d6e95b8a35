r"""The spec's RMS norm on ``torch.Tensor``: ATen's ``rms_norm`` where it computes exactly the
spec's choice, the same formula written out where it does not.

.. math::

   \hat x = \frac{x}{\sqrt{\frac1n \sum x^2 + \epsilon}}, \qquad y = \hat x\,(w + o) .

``torch.rms_norm`` (what ``F.rms_norm`` and ``torch.nn.RMSNorm`` call; on the CPU its
composite, ``aten/src/ATen/native/layer_norm.cpp``: ``rms_norm_composite``) upcasts the input to
float32 (float64 stays), takes ``rsqrt(mean(x²) + eps)``, multiplies by it and then by the
weight in float32, and rounds to the input dtype once: the spec's ``cast_before_weight=False``
with offset 0. It is used for exactly that, with the normalized axes moved to the end as a view:
without a weight, or with offset 0, the cast after the weight (or float32/float64 input, where
the two orders agree) and a weight of the input's dtype (for another dtype ATen warns once and
falls back to the same composite). Under ``torch.jit.trace`` (the TorchScript ONNX exporter,
which cannot export ``aten::rms_norm``) the operations are written out, as below.

Everything else computes the same sequence of operations itself: upcast, ``square().mean()``
over ``axes`` (a sum of squares in the compute dtype; there is no mean to subtract, so no
cancellation), ``rsqrt(· + eps)``, the product; then

* ``cast_before_weight=False`` (torch, Gemma, Keras): :math:`\hat x\,(w + o)` in the compute
  dtype (the wider of it and the weight's), rounded once;
* ``cast_before_weight=True`` for float16/bfloat16 input (Llama, the ONNX spec): :math:`\hat x`
  rounded to the input dtype, multiplied by :math:`w + o` in the compute dtype, rounded again.

:math:`w + o` is formed in the compute dtype (Gemma's ``1 + w.float()``), never in a half
dtype. All plain torch operations: differentiable, any device, traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normkit_torch import capture
from normkit_torch.kernels import compute_dtype, moved

__all__ = ["rms_norm"]

Tensor = torch.Tensor


def _aten_computes_it(
    x: Tensor, weight: Tensor | None, weight_offset: float, cast_before_weight: bool
) -> bool:
    """Whether ``torch.rms_norm``'s result is the spec's for these options (see the module
    docstring)."""
    if weight is None:
        return True
    rounds_once = not cast_before_weight or x.dtype == compute_dtype(x)
    return weight_offset == 0 and rounds_once and weight.dtype == x.dtype


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> Tensor:
    """The spec's RMS norm (:func:`normkit.hookspecs.normkit_rms_norm`): ``torch.rms_norm``
    where it computes the spec's choice, the same operations written out elsewhere."""
    ndim, k = x.dim(), len(axes)
    trailing = tuple(range(ndim - k, ndim))
    axes = tuple(axes)
    # the TorchScript ONNX exporter has no symbolic for aten::rms_norm (normkit_torch.capture)
    if _aten_computes_it(x, weight, weight_offset, cast_before_weight) and not capture.jit_tracing():
        xt = x if axes == trailing else moved(x, axes, trailing)
        y = F.rms_norm(xt, xt.shape[ndim - k :], weight, eps)
        return y if axes == trailing else moved(y, trailing, axes)
    cdt = compute_dtype(x)
    xc = x.to(cdt)
    xhat = xc * torch.rsqrt(xc.square().mean(axes, keepdim=True) + eps)
    if weight is None:
        return xhat.to(x.dtype)
    shape = [1] * ndim
    for a, size in zip(axes, weight.shape, strict=True):
        shape[a] = size
    gain = weight.to(torch.promote_types(cdt, weight.dtype)).reshape(shape)
    if weight_offset != 0:
        gain = gain + weight_offset
    if cast_before_weight and x.dtype != cdt:
        xhat = xhat.to(x.dtype).to(gain.dtype)  # round x̂ to the input dtype, then multiply
    return (xhat * gain).to(x.dtype)
