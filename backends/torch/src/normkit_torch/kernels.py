r"""The PyTorch kernels: ATen's own normalization ops, with the spec's choices computed around them.

Each kernel implements one hook of :mod:`normkit.hookspecs` on ``torch.Tensor`` inputs, on any
device, and is differentiable with respect to ``x``, ``weight`` and ``bias``.

* **Batch norm** is ``torch.batch_norm`` (what ``F.batch_norm`` and ``torch.nn.BatchNorm2d``
  call), with the channel axis moved to dimension 1 as a view. ATen updates running statistics
  in place, so the kernel hands it copies and returns them: the caller's tensors are never
  written. ATen stores the unbiased batch variance in the compute dtype; for the biased
  estimator, or running statistics of another dtype (float64 beside float32 input), the kernel
  asks ATen for the batch statistics themselves (``momentum=1`` into zeroed buffers), rescales
  the variance by :math:`(n-1)/n` if needed and applies :math:`r \leftarrow (1-m)\,r + m\,b`
  itself (``C`` values, in the wider dtype). Either way the input is read by ATen's kernel only.
* :func:`batch_norm_biased_update` is the drop-in layers' form of the biased estimator's
  training call: the same operations, updating the layer's own buffers in place instead of
  returning new statistics (:mod:`normkit_torch.modules`).
* **Instance norm** is ``torch.batch_norm`` on the ``(1, N·C, ...)`` view, as ATen's own
  ``instance_norm`` does, with the running statistics averaged over the instances here (ATen's
  ``instance_norm`` rounds them to float16 for float16 input); with running statistics
  (``use_input_stats=False``) it is batch norm in eval.
* **Layer norm** is ``F.layer_norm`` over the trailing axes; other axes are moved to the end as
  a view first and back afterwards.

Axes are moved by ``permute`` with explicit non-negative dimensions (:func:`moved`), which
exports to ONNX as it is. While a graph is captured for export (:mod:`normkit_torch.capture`),
instance norm without running statistics to update is ATen's ``instance_norm`` (ONNX
``InstanceNormalization``), and a call that would update running statistics is refused under
the dynamo ONNX exporter.

The spec-v2 kernels live beside this module: the primitives ``moments`` and ``normalize`` in
:mod:`normkit_torch.statistics`, group norm in :mod:`normkit_torch.group_norm` (ATen's kernel on
channels-first memory only) and RMS norm in :mod:`normkit_torch.rms_norm`.

ATen computes float16/bfloat16 input in float32 and accepts float32 parameters beside it; the
kernels cast parameters to the compute dtype (float64 for float64 input, float32 otherwise)
when they differ, and cast updated running statistics back to the dtype they came in.

Accuracy is ATen's. Two limits are worth knowing (both measured, both shared by ``torch.nn``):
ATen's CPU batch norm on channels-last or ``(N, C)`` input sums each channel sequentially in
float32, so the error of its mean grows with ``n`` (measured: :math:`36\,\epsilon|\mu|` at
``n = 65536``, :math:`58\,\epsilon|\mu|` at ``n = 262144``, against :math:`0.3\,\epsilon|\mu|`
for ``torch.mean``), while its channels-first path stays near :math:`\epsilon|\mu|`; and its fused
:math:`x a + (\beta - \mu a)` leaves a residue of about
:math:`\epsilon\,|\mu\gamma|/\sqrt{\epsilon_{bn}}` on a constant channel where the NumPy
backend returns β exactly. Groups of one value are exactly β here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normkit_torch import capture

__all__ = [
    "aten_takes_as_is",
    "batch_norm",
    "batch_norm_biased_update",
    "compute_dtype",
    "instance_norm",
    "layer_norm",
]

Tensor = torch.Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (the spec's precision rule)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def aten_takes_as_is(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
) -> bool:
    """Whether :func:`batch_norm` would hand ATen these tensors unchanged: every one given is in
    the compute dtype of ``x``, and, for float16/bfloat16 ``x``, at least one is given (without
    any float32 tensor :func:`_parameters` adds a zero β so that ATen computes in float32), and
    the running statistics are both given or both absent.

    Where it holds, the batch-norm layers call ``torch.batch_norm`` on their own tensors, as
    ``torch.nn`` does (:mod:`normkit_torch.modules`). Five dtype reads: about 0.2 µs."""
    dt = x.dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    if (running_mean is None) != (running_var is None):
        return False
    given = dt == cdt
    for t in (weight, bias, running_mean, running_var):
        if t is not None:
            if t.dtype != cdt:
                return False
            given = True
    return given


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _parameters(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, channels: int, stats: bool
) -> tuple[Tensor | None, Tensor | None]:
    """γ and β in the compute dtype. Beside float16/bfloat16 input ATen computes the statistics
    in float32 only when some parameter is float32 (its "mixed type" path); without one it keeps
    the batch mean in the input's dtype and loses about 1 % on a channel with mean 3 and std 0.05.
    So when no float32 tensor would reach ATen, β = 0 is passed in float32 (an exact no-op)."""
    cdt = compute_dtype(x)
    weight, bias = _as(weight, cdt), _as(bias, cdt)
    if x.dtype != cdt and weight is None and bias is None and not stats:
        bias = torch.zeros(channels, dtype=cdt, device=x.device)
    return weight, bias


def _cudnn() -> bool:
    return torch.backends.cudnn.enabled


def moved(x: Tensor, source: tuple[int, ...], destination: tuple[int, ...]) -> Tensor:
    """``x.movedim(source, destination)``, as a ``permute`` with explicit non-negative dimensions.

    The dimensions not in ``source`` keep their order in the places ``destination`` leaves free.
    The TorchScript ONNX exporter writes the permutation of a traced ``movedim`` as given, so
    ``movedim(-1, 1)`` becomes ``Transpose(perm=[0, -1, 1, 2])``, which onnxruntime refuses to
    load; a ``permute`` by this list exports as it is, under either exporter."""
    ndim = x.dim()
    placed = {d % ndim: s % ndim for s, d in zip(source, destination, strict=True)}
    rest = iter([d for d in range(ndim) if d not in placed.values()])
    return x.permute([placed[i] if i in placed else next(rest) for i in range(ndim)])


def _channels_at_1(x: Tensor, axis: int) -> tuple[Tensor, tuple[int, ...] | None]:
    """A view of ``x`` with its channel axis at dimension 1, and how to undo it.

    Channels-last input of any rank becomes the 2-D view ``(-1, C)`` when that is a view (ATen
    treats ``(N, C)`` as a plain per-column reduction); otherwise the channel axis is moved.
    :returns: ``(view, original_shape)``; ``original_shape`` is ``None`` for a moved axis.
    """
    if axis == 1:
        return x, None
    if axis == x.dim() - 1 and x.is_contiguous():
        return x.view(-1, x.shape[-1]), tuple(x.shape)
    return moved(x, (axis,), (1,)), None


def _restore(y: Tensor, axis: int, original_shape: tuple[int, ...] | None) -> Tensor:
    if axis == 1:
        return y
    if original_shape is not None:
        return y.view(original_shape)
    return moved(y, (1,), (axis,))


def _copy(t: Tensor, dtype: torch.dtype, times: int) -> Tensor:
    """A new tensor with ``t``'s values in ``dtype``, repeated ``times`` times (outside autograd)."""
    if t.requires_grad:
        t = t.detach()
    if times > 1:
        return t.to(dtype).repeat(times)
    return t.clone() if t.dtype == dtype else t.to(dtype)


def _updated(old: Tensor, batch: Tensor, momentum: float) -> Tensor:
    """``(1 - m) * old + m * batch`` (as ``old + m * (batch - old)``) in the wider of the two
    dtypes, returned in ``old``'s dtype; ``C`` values."""
    wide = torch.promote_types(old.dtype, batch.dtype)
    return torch.lerp(old.to(wide), batch.to(wide), momentum).to(old.dtype)


def _biased(unbiased_var: Tensor, n: int) -> Tensor:
    """The biased variance from ATen's unbiased one (a variance of one value is 0, not 0/0)."""
    return unbiased_var * ((n - 1) / n) if n > 1 else torch.zeros_like(unbiased_var)


def _shift_only(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The output for one value per group (channels at dimension 1): exactly β (or 0).

    A new tensor, never a view of ``bias``, and still differentiable: ``x - μ`` is identically 0
    there, so the gradients to ``x`` and γ are 0 and to β is 1, as ``0·x + 0·γ + β`` has them.
    """
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    y = x * 0
    if weight is not None:
        y = y + weight.view(shape) * 0
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype)


def _normalize_and_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    unbiased_running_var: bool,
    n: int,
    instances: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Normalize ``x`` (channels at dimension 1, ``n`` values per channel) with its batch
    statistics through ``torch.batch_norm`` and return the new running statistics.

    For instance norm ``x`` is ATen's ``(1, N*C, ...)`` view, the parameters are repeated
    ``instances = N`` times, and the running statistics take the mean over the instances.
    """
    if running_mean is None or running_var is None:
        if n == 1:
            return _shift_only(x, weight, bias), None, None
        return torch.batch_norm(x, weight, bias, None, None, True, momentum, eps, _cudnn()), None, None
    cdt = compute_dtype(x)
    aten_update = unbiased_running_var and running_mean.dtype == cdt and running_var.dtype == cdt
    if aten_update:  # ATen's own update, on copies: bit-for-bit torch.nn
        mean, var = _copy(running_mean, cdt, instances), _copy(running_var, cdt, instances)
        step = momentum
    else:  # momentum 1 into zeros: ATen leaves the (unbiased) batch statistics there
        mean, var = torch.zeros(2, running_mean.numel() * instances, dtype=cdt, device=x.device)
        step = 1.0
    y = torch.batch_norm(x, weight, bias, mean, var, True, step, eps, _cudnn())
    if n == 1:  # ATen's fused x*a + (b - mean*a) leaves a rounding residue where x - mean is 0
        y = _shift_only(x, weight, bias)
    if instances > 1:
        mean, var = mean.view(instances, -1).mean(0), var.view(instances, -1).mean(0)
    if aten_update:
        return y, mean, var
    batch_var = var if unbiased_running_var else _biased(var, n)
    new_mean = _updated(running_mean.detach(), mean, momentum)
    new_var = _updated(running_var.detach(), batch_var, momentum)
    return y, new_mean, new_var


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The spec's batch norm (:func:`normkit.hookspecs.normkit_batch_norm`) on ATen."""
    cdt = compute_dtype(x)
    weight, bias = _parameters(x, weight, bias, x.shape[axis], running_mean is not None)
    view, original_shape = _channels_at_1(x, axis)
    if not training:
        y = torch.batch_norm(
            view, weight, bias, _as(running_mean, cdt), _as(running_var, cdt), False, 0.0, eps, _cudnn()
        )
        return _restore(y, axis, original_shape), running_mean, running_var
    if x.numel() == 0:  # ATen returns an empty output and leaves the statistics alone
        y = torch.batch_norm(view, weight, bias, None, None, True, 0.0, eps, _cudnn())
        return _restore(y, axis, original_shape), running_mean, running_var
    n = x.numel() // x.shape[axis]
    if running_mean is not None:
        capture.check_no_update("batch norm")
    y, new_mean, new_var = _normalize_and_update(
        view, weight, bias, running_mean, running_var, momentum, eps, unbiased_running_var, n
    )
    return _restore(y, axis, original_shape), new_mean, new_var


def batch_norm_biased_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    n: int,
) -> Tensor:
    r"""Training batch norm (channels at dimension 1) that updates ``running_mean`` and
    ``running_var`` **in place** with the biased batch variance, the drop-in layers' path for
    the keras/flax/onnx presets: the same operations as :func:`batch_norm`'s (ATen's batch
    statistics by ``momentum=1`` into zeros, :math:`\frac{n-1}{n}` times the variance,
    :math:`r \leftarrow r + m\,(b - r)` by ``lerp``), so the same bits, without its copies.

    The caller guarantees what :func:`aten_takes_as_is` checks (every tensor in the compute
    dtype), ``n > 1`` values per channel, and that no graph is being captured: under
    ``torch.export`` :func:`batch_norm` refuses an update for the dynamo ONNX exporter
    (:func:`capture.check_no_update`), and under ``torch.jit.trace`` its form is the one the
    TorchScript exporter writes correctly (measured: with two ``zeros_like`` buffers, as here,
    or indexed views of one ``zeros``, onnxruntime's ``BatchNormalization(training_mode=1)``
    gave a wrong output; the kernel unpacks one ``zeros``, which costs about 10 µs more per
    call on a (2, 8, 8, 8) input).
    :returns: the output.
    """
    mean, var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
    y = torch.batch_norm(x, weight, bias, mean, var, True, 1.0, eps, _cudnn())
    running_mean.lerp_(mean, momentum)
    # not var.mul_: ATen saved the statistics' tensors for the backward pass, and changing
    # them in place would fail it
    running_var.lerp_(var * ((n - 1) / n), momentum)
    return y


def instance_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The spec's instance norm (:func:`normkit.hookspecs.normkit_instance_norm`) on ATen."""
    if not use_input_stats or x.numel() == 0:
        return batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, axis, False)
    weight, bias = _parameters(x, weight, bias, x.shape[axis], running_mean is not None)
    view = x if axis == 1 else moved(x, (axis,), (1,))
    batch, channels = view.shape[0], view.shape[1]
    n = x.numel() // (batch * channels)
    if running_mean is not None:
        capture.check_no_update("instance norm")
    elif n > 1 and (capture.torch_exporting() or capture.jit_tracing()):
        # exported as InstanceNormalization (normkit_torch.capture)
        y = torch.instance_norm(view, weight, bias, None, None, True, 0.0, eps, _cudnn())
        return (y if axis == 1 else moved(y, (1,), (axis,))), None, None
    flat = view.contiguous().view(1, batch * channels, *view.shape[2:])  # as ATen's instance_norm
    y, new_mean, new_var = _normalize_and_update(
        flat,
        None if weight is None else weight.repeat(batch),
        None if bias is None else bias.repeat(batch),
        running_mean,
        running_var,
        momentum,
        eps,
        unbiased_running_var,
        n,
        instances=batch,
    )
    y = y.view(view.shape)
    return (y if axis == 1 else moved(y, (1,), (axis,))), new_mean, new_var


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    axes: tuple[int, ...],
    eps: float,
) -> Tensor:
    """The spec's layer norm (:func:`normkit.hookspecs.normkit_layer_norm`) on ATen's
    ``F.layer_norm``; γ and β go in x's dtype, or float32 beside float16/bfloat16 input (on a
    GPU, whose kernel takes one dtype, the input is upcast to float32 and the output rounded
    once)."""
    pdt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if weight is not None and weight.dtype not in (x.dtype, pdt):
        weight = weight.to(pdt)
    if bias is not None and bias.dtype not in (x.dtype, pdt):
        bias = bias.to(pdt)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        weight, bias = weight.to(pdt), bias.to(pdt)
    ndim, k = x.dim(), len(axes)
    trailing = tuple(range(ndim - k, ndim))
    xt = x if tuple(axes) == trailing else moved(x, axes, trailing)
    shape = xt.shape[ndim - k :]
    if capture.jit_tracing():
        # the TorchScript exporter needs normalized_shape constant, and a traced size of an
        # input with dynamic axes is not: the parameters' shape, or plain ints
        given = weight if weight is not None else bias
        shape = given.shape if given is not None else tuple(int(d) for d in shape)
    if not x.is_cpu and any(p is not None and p.dtype != x.dtype for p in (weight, bias)):
        # ATen's mixed-type layer norm (half input, float32 γ and β) exists on the CPU only:
        # elsewhere upcast, normalize and round once, the same math
        weight = None if weight is None else weight.to(pdt)
        bias = None if bias is None else bias.to(pdt)
        y = F.layer_norm(xt.to(pdt), shape, weight, bias, eps).to(x.dtype)
    else:
        y = F.layer_norm(xt, shape, weight, bias, eps)
    return y if xt is x else moved(y, trailing, axes)
