r"""The spec's group norm on ``torch.Tensor``: ATen's ``group_norm`` where it is accurate, a
corrected two-pass path where it is not.

For each sample ``n`` and block ``g`` of ``C/G`` consecutive channels,

.. math::

   y = \gamma_c\,\frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} + \beta_c .

**Where ATen is used.** ``torch.group_norm`` (what ``F.group_norm`` and ``torch.nn.GroupNorm``
call) when the channels are on dimension 1 and the memory is not channels-last (the layout
``Tensor.suggest_memory_format()`` reports, which picks ATen's kernel). Its CPU kernel for that
layout computes the statistics in float32 (float64 for float64) by Welford merges, also for
float16/bfloat16 input; measured against the float64 reference it stays within 0.4 of the
conformance bound in every dtype, at ``|mean|/std`` up to ``1e4``. Results, gradients included,
are then bit-for-bit ``torch.nn.GroupNorm``'s.

**Where it is not.** On channels-last memory (``x.is_contiguous(memory_format=
torch.channels_last)``, or ``channels_last_3d``) ATen's CPU kernel sums :math:`x` and
:math:`x^2` per group and takes :math:`\max(E[x^2] - E[x]^2, 0)`: in float32 at mean 1000 and
std 1 its error is 3.5 (the output's scale is 1), at mean 1000 and std 0.1 it is 155, and
float64 loses about :math:`10^{-9}`. There, and for a channel axis other than 1 (which ATen would
have to copy to channels-first, or would see as channels-last), the kernel here computes
:func:`normkit_torch.statistics.centered` (corrected two-pass, in float32 for half input) on a
view that splits the channel axis into ``(G, C/G)``, and applies
:math:`y = d\,a + (\beta - c\,a)` with :math:`d = x - s` from the second pass, :math:`a =
\gamma/\sqrt{\sigma^2 + \epsilon}` per sample and channel, and :math:`c` the mean's correction:
:math:`x - \mu` is never rounded at the scale of :math:`\mu`. The output keeps the input's
memory layout. This path is slower than ATen's one-pass kernel: it reads full-size data six
times and writes it three times (``d``, ``d²`` and ``y``), where ATen reads twice and writes
once; measured 2.5-3.7x ATen's time on ``(8, 512, 64, 64)`` float32 with 2 CPU threads, mostly
the first touch of the two fresh temporaries. It is accurate where ATen's is not.

**Under export** (:mod:`normkit_torch.capture`) neither is written as it stands: under
``torch.export`` (the dynamo ONNX exporter) ``torch.group_norm`` would become ONNX
``GroupNormalization`` at opset >= 21, which onnxruntime computes one-pass (NaN at mean 1e4), and
the two-pass path is a dozen ops. There :func:`instance_norm_group_norm` writes instance norm
over the ``(N, G, -1)`` view and the affine (``Reshape``, ``InstanceNormalization``,
``Reshape``, ``Mul``, ``Add`` in ONNX). Under the TorchScript ONNX exporter ``torch.group_norm``
is called with the channels on dimension 1, whatever the memory layout: its symbolic writes
that same form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normkit_torch import capture
from normkit_torch.kernels import compute_dtype, moved
from normkit_torch.statistics import centered, grouped_axes, split_groups

__all__ = ["aten_is_accurate", "group_norm", "instance_norm_group_norm", "strides_like_channels_last"]

Tensor = torch.Tensor


def strides_like_channels_last(x: Tensor) -> bool:
    """Whether ATen treats ``x`` as channels-last: ``x.suggest_memory_format()`` (c10's
    ``is_channels_last_strides_2d``/``3d``, which has no Python binding) for 4-D and 5-D tensors.

    Dimensions are visited from the innermost channels-last one outwards (C, then the spatial
    ones from last to first, then N); each stride must be at least the extent of the previous
    one, ambiguous size-1 cases falling back to channels-first, as c10 decides them."""
    if x.dim() not in (4, 5) or x.layout != torch.strided:
        return False
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    order = (1, 3, 2, 0) if x.dim() == 4 else (1, 4, 3, 2, 0)
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def aten_is_accurate(x: Tensor, axis: int) -> bool:
    """True where ``torch.group_norm`` computes its statistics two-pass-accurately: channels on
    dimension 1 and a memory layout ATen does not treat as channels-last."""
    return axis == 1 and not strides_like_channels_last(x)


def _per_channel(param: Tensor, axis: int, ndim: int, num_groups: int, dtype: torch.dtype) -> Tensor:
    """A ``(C,)`` parameter shaped ``(G, C/G)`` on ``axis, axis + 1`` of the grouped view."""
    shape = [1] * ndim
    shape[axis], shape[axis + 1] = num_groups, param.shape[0] // num_groups
    return param.to(dtype).reshape(shape)


def two_pass_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> Tensor:
    """Group norm by the corrected two-pass statistics (see the module docstring), any layout
    and channel axis; differentiable through plain torch operations."""
    cdt = compute_dtype(x)
    xc = split_groups(x.to(cdt), axis, num_groups)
    reduced = grouped_axes(tuple(a for a in range(1, x.dim()) if a != axis), axis)
    count, _, c, m2, d = centered(xc, reduced, None)  # count: one number, a Python (Sym)Int
    scale = torch.rsqrt(m2 / max(count, 1) + eps)  # type: ignore[call-overload]  # (N, 1.., G, 1, 1..)
    if weight is not None:
        scale = scale * _per_channel(weight, axis, xc.dim(), num_groups, cdt)
    shift = -c * scale
    if bias is not None:
        shift = shift + _per_channel(bias, axis, xc.dim(), num_groups, cdt)
    y = torch.addcmul(shift, d, scale)
    return y.flatten(axis, axis + 1).to(x.dtype)


def instance_norm_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> Tensor:
    """Group norm as ATen's instance norm over the ``(N, G, -1)`` view (channels moved to
    dimension 1 first), then the per-channel affine, in the compute dtype: the form written
    under ``torch.export`` (see the module docstring). Instance norm's ATen kernel is
    channels-first and two-pass-accurate; the reshape copies channels-last input."""
    cdt = compute_dtype(x)
    xc = x.to(cdt) if axis == 1 else moved(x.to(cdt), (axis,), (1,))
    y = F.instance_norm(xc.reshape(xc.shape[0], num_groups, -1), eps=eps).reshape(xc.shape)
    shape = [1] * xc.dim()
    shape[1] = xc.shape[1]
    if weight is not None:
        y = y * weight.to(cdt).reshape(shape)
    if bias is not None:
        y = y + bias.to(cdt).reshape(shape)
    y = y.to(x.dtype)
    return y if axis == 1 else moved(y, (1,), (axis,))


def _aten_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``torch.group_norm`` with γ and β in the compute dtype (channels on dimension 1).

    ATen's mixed-type path (float16/bfloat16 input, float32 γ and β) exists on the CPU only; on
    another device the input is upcast and the result rounded once, which is the same math."""
    cdt = compute_dtype(x)
    if weight is not None and weight.dtype != cdt:
        weight = weight.to(cdt)
    if bias is not None and bias.dtype != cdt:
        bias = bias.to(cdt)
    if x.dtype != cdt and not x.is_cpu and (weight is not None or bias is not None):
        y = torch.group_norm(x.to(cdt), num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
        return y.to(x.dtype)
    return torch.group_norm(x, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axis: int,
) -> Tensor:
    """The spec's group norm (:func:`normkit.hookspecs.normkit_group_norm`): ATen's
    ``torch.group_norm`` where :func:`aten_is_accurate`, :func:`two_pass_group_norm` elsewhere.

    ATen gets γ and β in the compute dtype (float32 beside float16/bfloat16 input: its mixed-type
    path, which applies them in float32). Under export, :func:`instance_norm_group_norm` or ATen
    on any layout (the module docstring)."""
    if capture.torch_exporting():
        return instance_norm_group_norm(x, num_groups, weight, bias, eps, axis)
    if capture.jit_tracing() and capture.in_onnx_export():
        xc = x if axis == 1 else moved(x, (axis,), (1,))
        y = _aten_group_norm(xc, num_groups, weight, bias, eps)
        return y if axis == 1 else moved(y, (1,), (axis,))
    if not aten_is_accurate(x, axis):
        return two_pass_group_norm(x, num_groups, weight, bias, eps, axis)
    return _aten_group_norm(x, num_groups, weight, bias, eps)
