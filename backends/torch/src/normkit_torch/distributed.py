r"""Synchronized batch norm on ``torch.distributed``: gloo on CPU, NCCL on GPU, under DDP.

:class:`SyncBatchNorm` is a drop-in for ``torch.nn.SyncBatchNorm`` (the same arguments,
``process_group`` included, the same ``state_dict``, ``convert_sync_batchnorm``) that also
runs on CPU, where ``torch.nn.SyncBatchNorm`` refuses the input and DDP refuses the module. In
training, with ``torch.distributed`` initialized and more than one rank in its group, every rank
normalizes its part of the global batch with the global batch's statistics:

1. each rank computes its per-channel moments :math:`(n_r, \mu_r, M_{2,r})`,
   :math:`M_2 = \sum (x - \mu)^2`, with normkit's corrected two-pass kernel
   (:func:`normkit_torch.statistics.moments`; an empty rank has :math:`(0, 0, 0)`);
2. one all-gather of those :math:`2C + 1` numbers (:class:`TorchCommunicator`), merged with
   Chan's formula in rank order in float64 (:func:`normkit.distributed.synchronized_moments`),
   so that every rank holds bit-identical :math:`(N, \mu, M_2)`, exact for unequal and empty
   ranks and stable far from 0 — no :math:`E[x^2] - E[x]^2`, no variance rebuilt from
   :math:`1/\sqrt{\sigma^2 + \epsilon}`;
3. :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` with the biased
   :math:`\sigma^2 = M_2/N`, :math:`y = \gamma \hat x + \beta`;
4. the running statistics move with the global count: :math:`M_2/(N - 1)` for the unbiased
   running variance (the torch preset), :math:`N = 0` leaves them unchanged.

The backward pass (:class:`SyncBatchNormFunction`) is one all-reduce (sum) of the per-channel
:math:`[\sum dy, \sum dy\,(x - \mu)]` over the ranks, then, with the global count :math:`N`,

.. math::

   \frac{\partial L}{\partial x} = \frac{\gamma}{\sigma}\Big(dy - \frac{1}{N}\sum dy
       - \hat x\,\frac{1}{N}\sum dy\,\hat x\Big), \qquad
   \frac{\partial L}{\partial \gamma} = \sum_{\text{local}} dy\,\hat x, \qquad
   \frac{\partial L}{\partial \beta} = \sum_{\text{local}} dy ,

the sums in the last two over this rank's part only, as ``torch.nn.SyncBatchNorm`` returns them:
DDP averages parameter gradients over the ranks itself.

Eval never communicates; with ``torch.distributed`` not initialized, or one rank, the layer is
normkit's local batch norm (:class:`normkit_torch.BatchNorm2d`'s kernel, bit-for-bit
``torch.nn`` under the torch preset). Faults are errors, not hangs: the first synchronizing call
of a layer checks, in one small collective, that every rank has the same channel count and
dtype (:func:`normkit.distributed.check_layout`: a ``ValueError`` on every rank otherwise); a
global batch of one value per channel is a ``ValueError`` on every rank under the torch preset;
a collective that fails (a rank that skipped it, past the process group's ``timeout``) raises
:class:`normkit.distributed.CommunicatorError` naming the layer and the engine.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import presets
from normkit._registry import backend_for
from normkit.distributed import CommunicatorError, check_layout, synchronized_moments
from normkit.functional.masked import running_update
from normkit.functional.statistics import Moments
from normkit_torch import modules, statistics
from normkit_torch.convert import rebuilt_channel_norm
from normkit_torch.kernels import compute_dtype

__all__ = [
    "BatchNormXd",
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "TorchCommunicator",
    "revert_sync_batchnorm",
]

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _wide(device: torch.device) -> torch.dtype:
    """float64, or float32 on a device without float64 (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class TorchCommunicator:
    """The :class:`normkit.distributed.Communicator` protocol over ``torch.distributed``.

    :param process_group: the group to synchronize over (default: the whole world).
    :param device: where the layout check's integers travel (default: the current CUDA device
        for a group whose only backend is NCCL, else the CPU); :meth:`all_gather` uses its
        arrays' device.
    :raises RuntimeError: if ``torch.distributed`` is not initialized.

    ``engine`` is ``"torch.distributed (<backend>)"``, ``rank`` and ``size`` are this process's
    rank in the group and the group's size.
    """

    def __init__(
        self, process_group: dist.ProcessGroup | None = None, *, device: torch.device | None = None
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group first "
                "(torchrun sets the environment it reads)"
            )
        self.process_group = process_group
        self.backend = str(dist.get_backend(process_group))
        self.engine = f"torch.distributed ({self.backend})"
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)
        if device is None:
            nccl_only = self.backend == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl_only else torch.device("cpu")
        self.device = torch.device(device)

    def _gather_flat(self, flat: Tensor) -> list[Tensor]:
        """Every rank's ``flat`` (one 1-D tensor, the same size everywhere), in rank order, by
        one collective: ``all_gather_into_tensor`` on NCCL, the list form elsewhere (gloo has
        no ``all_gather_into_tensor``)."""
        if flat.is_cuda and "nccl" in self.backend:
            out = torch.empty(self.size * flat.numel(), dtype=flat.dtype, device=flat.device)
            dist.all_gather_into_tensor(out, flat, group=self.process_group)
            return list(out.view(self.size, flat.numel()).unbind(0))
        parts = [torch.empty_like(flat) for _ in range(self.size)]
        dist.all_gather(parts, flat, group=self.process_group)
        return parts

    def all_gather(self, arrays: Sequence[Tensor]) -> list[tuple[Tensor, ...]]:
        """Every rank's ``arrays``, in rank order, in ONE collective: they are packed into one
        flat float64 tensor (float32 on a device without float64) on their device, gathered,
        and unpacked per rank into each array's shape and dtype. Integers travel exactly up to
        :math:`2^{53}` (counts, here)."""
        if not arrays:
            return [() for _ in range(self.size)]
        if all(isinstance(a, np.ndarray) for a in arrays):  # small host statistics (recalibration)
            tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]
            return [tuple(t.cpu().numpy() for t in part) for part in self.all_gather(tensors)]
        device = arrays[0].device
        wide = _wide(device)
        flat = torch.cat([a.detach().reshape(-1).to(device=device, dtype=wide) for a in arrays])
        gathered = self._gather_flat(flat)
        sizes = [a.numel() for a in arrays]
        result = []
        for part in gathered:
            pieces = part.split(sizes)
            result.append(tuple(p.view(a.shape).to(a.dtype) for p, a in zip(pieces, arrays, strict=True)))
        return result

    def all_gather_ints(self, values: Sequence[int]) -> list[tuple[int, ...]]:
        """Every rank's few integers (an int64 tensor on :attr:`device`), in rank order."""
        mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        return [tuple(int(v) for v in part.tolist()) for part in self._gather_flat(mine)]

    def all_reduce_sum(self, tensor: Tensor, *, layer: str) -> None:
        """Sum ``tensor`` over the ranks, in place (the backward pass's one collective; never
        ``ReduceOp.AVG``, which gloo gets wrong: pytorch/pytorch#162338).

        :raises CommunicatorError: if the collective fails (a timeout included), naming the layer.
        """
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        except Exception as error:
            raise CommunicatorError(
                f"layer {layer!r}: the all-reduce of the gradient sums over {self.engine} failed on rank "
                f"{self.rank} of {self.size} ({type(error).__name__}: {error})"
            ) from error


def _broadcast_shape(x: Tensor) -> list[int]:
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    return shape


class SyncBatchNormFunction(torch.autograd.Function):
    r"""Training-mode batch norm over the ranks of a :class:`TorchCommunicator`, differentiable
    with respect to ``input``, ``weight`` and ``bias`` (channels at dimension 1).

    ``apply(input, weight, bias, eps, comm, layer, single_value_error)`` returns
    ``(y, count, mean, m2)``: the output, and the global moments (int64 count, float64 mean and
    :math:`M_2`, bit-identical on every rank; not differentiable) for the running update. If the
    global count is 1 and ``single_value_error`` is a message, it raises that ``ValueError`` (on
    every rank: they all hold the same count).

    Forward: local moments (corrected two-pass, compute dtype), one all-gather, Chan's merge in
    rank order in float64; :math:`\mu` and :math:`1/\sqrt{M_2/N + \epsilon}` (computed in float64)
    are rounded to the compute dtype (float32 for float16/bfloat16/float32 input), and
    :math:`y = (x - \mu)\,s\,\gamma + \beta` is computed there and rounded once to the input's
    dtype. With ``eps = 0`` a channel whose global batch is one constant value is 0/0 (NaN), as
    in ``torch.nn`` and the local path; a rank whose part is constant is exact (its
    :math:`M_2 = 0` travels as it is). Backward: see the module docstring; the local sums are
    taken in the compute dtype and all-reduced in float64.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        comm: TorchCommunicator,
        layer: str,
        single_value_error: str | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cdt = compute_dtype(input)
        reduced = tuple(a for a in range(input.dim()) if a != 1)
        local = Moments(*statistics.moments(input.detach(), reduced, None, None, None))
        total = synchronized_moments(local, comm, layer=layer)
        count = int(total.count[0]) if total.count.numel() else 0  # one count per channel without a mask
        if count == 1 and single_value_error is not None:
            raise ValueError(single_value_error)
        var = total.m2 / max(count, 1)  # biased: M2 / N
        invstd = (var + eps).rsqrt()
        mean_c, invstd_c = total.mean.to(cdt), invstd.to(cdt)
        shape = _broadcast_shape(input)
        y = (input.to(cdt) - mean_c.view(shape)) * invstd_c.view(shape)
        if weight is not None:
            y = y * weight.to(cdt).view(shape)
        if bias is not None:
            y = y + bias.to(cdt).view(shape)
        ctx.save_for_backward(input, weight, bias, mean_c, invstd_c)
        ctx.comm, ctx.layer, ctx.count = comm, layer, count  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(total.count, total.mean, total.m2)
        return y.to(input.dtype), total.count, total.mean, total.m2

    @staticmethod
    @once_differentiable  # the all-reduce has no derivative here: a double backward is an error
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_output: Tensor, *unused: Tensor
    ) -> tuple[Tensor | None, ...]:
        input, weight, bias, mean, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
        comm: TorchCommunicator = ctx.comm  # type: ignore[attr-defined]
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        cdt = mean.dtype
        reduced = tuple(a for a in range(input.dim()) if a != 1)
        shape = _broadcast_shape(input)
        dy = grad_output.to(cdt)
        xmu = input.to(cdt) - mean.view(shape)
        sum_dy = dy.sum(reduced)
        sum_dy_xmu = (dy * xmu).sum(reduced)
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            # the one collective: [sum dy, sum dy (x - mu)] over the ranks (an empty rank sends 0s)
            wide = _wide(input.device)
            combined = torch.cat([sum_dy, sum_dy_xmu]).to(wide)
            comm.all_reduce_sum(combined, layer=ctx.layer)  # type: ignore[attr-defined]
            total_dy, total_dy_xmu = combined.split(input.shape[1])
            n = max(ctx.count, 1)  # type: ignore[attr-defined]
            s = invstd.to(wide)
            scale = s if weight is None else s * weight.to(wide)  # gamma / sigma
            mean_dy = (total_dy / n).to(cdt).view(shape)
            projection = (total_dy_xmu * s * s / n).to(cdt).view(shape)  # sum dy x^ / N, over sigma
            grad_input = ((dy - mean_dy - xmu * projection) * scale.to(cdt).view(shape)).to(input.dtype)
        # gamma and beta: this rank's partial sums, as torch.nn.SyncBatchNorm's backward returns
        # them (zeros, not None, on an empty rank, so that DDP's gradient hooks fire on every rank)
        if weight is not None and needs_weight:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if bias is not None and needs_bias:
            grad_bias = sum_dy.to(bias.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(modules._NormkitBatchNorm):
    r"""``torch.nn.SyncBatchNorm`` on normkit's exact merge, on CPU (gloo) and GPU (NCCL).

    Same arguments as ``torch.nn.SyncBatchNorm`` (``process_group`` included), attributes,
    parameters, buffers and ``state_dict`` keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``); input ``(N, C, *)`` of any rank >= 2.
    ``eps`` and ``momentum`` default to the preset's (1e-5 and 0.1 under ``preset="torch"``, as
    ``torch.nn``); ``momentum=None`` is the cumulative average. The algorithm, its backward pass
    and its errors: :mod:`normkit_torch.distributed`.

    It is not a subclass of ``torch.nn.SyncBatchNorm``: DDP on CPU refuses any module that is
    one ("SyncBatchNorm layers only work with GPU modules"). It is a ``_BatchNorm``, as
    ``torch.nn``'s layers are.

    Differences from ``torch.nn.SyncBatchNorm`` (see ``docs/distributed.md``): it runs on CPU;
    each rank's variance travels as :math:`M_2`, never rebuilt from :math:`1/\sqrt{\sigma^2 +
    \epsilon}`; every rank holds bit-identical running statistics; a global count of 0 leaves
    them unchanged (``torch.nn`` decays them toward 0); a global count of 1 is an error on every
    rank under the torch preset (``torch.nn`` stores NaN); the layout is checked once; and
    ``preset=`` chooses the conventions (:mod:`normkit_torch.modules`). Like ``torch.nn``, every
    call in training counts in ``num_batches_tracked``, an empty batch too, on every rank.

    :param layer_name: keyword-only: how errors name the layer (``convert_sync_batchnorm`` sets
        each layer's qualified name in the model; default ``"SyncBatchNorm(<C>)"``).
    """

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | presets._Default | None = presets.DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        preset: str | presets.Preset = "torch",
        layer_name: str | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
            preset=preset,
        )
        self.process_group = process_group
        self.layer_name = layer_name if layer_name is not None else f"SyncBatchNorm({num_features})"
        self._layout_checked = False
        self._source_class: type[nn.Module] | None = None  # what convert_sync_batchnorm converted

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _communicator(self, input: Tensor) -> TorchCommunicator | None:
        """The communicator to synchronize over, or ``None`` for a local call: in eval, with
        ``torch.distributed`` absent or not initialized, or with one rank in the group."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        if dist.get_world_size(self.process_group) < 2:
            return None
        return TorchCommunicator(self.process_group, device=input.device)

    def forward(self, input: Tensor) -> Tensor:
        comm = self._communicator(input)
        if comm is None:
            return super().forward(input)
        return self._synchronized(input, comm)

    def _synchronized(self, input: Tensor, comm: TorchCommunicator) -> Tensor:
        self._check_input_dim(input)
        channels = input.shape[1]
        if channels == 0:
            raise ValueError(f"input has shape {tuple(input.shape)}: expected at least one channel at dim 1")
        layer = self.layer_name
        has_state = self.weight is not None or self.running_mean is not None
        # before any local check that could leave the other ranks waiting: once per layer, and
        # on every call of a layer without parameters or buffers (its channels may change)
        if not self._layout_checked or not has_state:
            check_layout(comm, channels=channels, dtype=_dtype_name(input.dtype), layer=layer)
            self._layout_checked = True
        if has_state and channels != self.num_features:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected num_features={self.num_features} "
                f"channels at dim 1, got {channels}"
            )
        counting = self.track_running_stats and self.num_batches_tracked is not None
        updating = self.track_running_stats and self.running_mean is not None and self.running_var is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if counting and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)  # the cumulative average
        single_value_error = None
        what = f"layer {layer!r}: the global batch over {comm.engine} has 1 value per channel"
        if not self.allow_single_value:
            single_value_error = (
                f"{what}; Expected more than 1 value per channel when training (input size "
                f"{tuple(input.shape)} on rank {comm.rank} of {comm.size})"
            )
        elif updating and self.unbiased_running_var:
            single_value_error = f"{what}: an unbiased running variance needs at least 2 values per channel"
        y, count, mean, m2 = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, comm, layer, single_value_error
        )
        if updating:
            info = backend_for(mean).info
            new_mean, new_var = running_update(
                info,
                Moments(count, mean, m2),
                self.running_mean,
                self.running_var,
                factor,
                self.unbiased_running_var,
            )
            self._store_running_stats(new_mean, new_var)
        if counting:
            self.num_batches_tracked.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> nn.Module:
        """Replace every batch norm in ``module`` (recursively) by a :class:`SyncBatchNorm`, as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: the new layers share the old
        ones' Parameters and buffers (an optimizer built before keeps working), take their
        ``eps``, ``momentum``, ``affine``, ``track_running_stats``, training mode and
        ``qconfig``, and synchronize over ``process_group`` (default: the whole world).

        Converted: ``torch.nn`` ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, normkit's
        drop-ins (keeping their ``preset``), this class (re-grouped), and any other
        ``_BatchNorm`` subclass that keeps ``_BatchNorm``'s ``forward``. A subclass that
        overrides ``forward`` (timm's ``BatchNormAct2d``, say) is left as it is, with a
        ``RuntimeWarning``: rebuilding it would silently drop what its ``forward`` adds
        (pytorch/pytorch#187298). Each new layer records the class it came from, for
        :func:`revert_sync_batchnorm`, and its qualified name in ``module``, for its errors.

        :returns: ``module`` with its children replaced, or a new layer if ``module`` is itself
            a batch norm.
        """
        return _convert(cls, module, process_group, "")

    @staticmethod
    def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
        """:func:`revert_sync_batchnorm`."""
        return revert_sync_batchnorm(module)


class BatchNormXd(modules._NormkitBatchNorm):
    """normkit's local batch norm for input ``(N, C, *)`` of any rank >= 2: what
    :func:`revert_sync_batchnorm` gives a synchronized layer whose dimension it does not know
    (mmcv's ``_BatchNormXd``; pytorch/pytorch#41081). Otherwise :class:`normkit_torch.BatchNorm2d`
    (the same kernel, state and ``preset``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_KNOWN_FORWARDS = (
    _BatchNorm.forward,
    modules._NormkitBatchNorm.forward,
    nn.SyncBatchNorm.forward,
    SyncBatchNorm.forward,
)


def _convert(
    cls: type[SyncBatchNorm], module: nn.Module, process_group: dist.ProcessGroup | None, name: str
) -> nn.Module:
    output = module
    if isinstance(module, _BatchNorm):
        if type(module).forward not in _KNOWN_FORWARDS:
            warnings.warn(
                f"convert_sync_batchnorm: {name or 'the module'} ({type(module).__name__}) overrides "
                f"forward and is left unsynchronized; convert it yourself",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            preset = getattr(module, "preset", "torch")
            output = rebuilt_channel_norm(
                cls, module, preset=preset, process_group=process_group, layer_name=name or None
            )
            if isinstance(module, SyncBatchNorm):
                output._source_class = module._source_class
            elif not isinstance(module, nn.SyncBatchNorm):
                output._source_class = type(module)
    for child_name, child in module.named_children():
        output.add_module(
            child_name, _convert(cls, child, process_group, f"{name}.{child_name}" if name else child_name)
        )
    return output


_TORCH_BY_RANK = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_NORMKIT_BY_RANK = {1: modules.BatchNorm1d, 2: modules.BatchNorm2d, 3: modules.BatchNorm3d}


def _reverted(module: SyncBatchNorm | nn.SyncBatchNorm) -> _BatchNorm:
    source = getattr(module, "_source_class", None)
    preset = getattr(module, "preset", "torch")
    rank = next(
        (r for r, kind in _TORCH_BY_RANK.items() if source is not None and issubclass(source, kind)), None
    )
    if rank is None:
        return rebuilt_channel_norm(BatchNormXd, module, preset=preset)
    if source is _TORCH_BY_RANK[rank] and preset == "torch":
        return rebuilt_channel_norm(_TORCH_BY_RANK[rank], module)
    return rebuilt_channel_norm(_NORMKIT_BY_RANK[rank], module, preset=preset)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every synchronized batch norm in ``module`` (recursively; this module's
    :class:`SyncBatchNorm` and ``torch.nn.SyncBatchNorm``) by a local one sharing its
    Parameters and buffers (for single-process inference, export, or CPU use of a model trained
    with ``torch.nn.SyncBatchNorm``).

    A synchronized layer does not know its input's rank, so the class comes from what
    :meth:`SyncBatchNorm.convert_sync_batchnorm` recorded: a converted ``torch.nn.BatchNorm2d``
    becomes a ``torch.nn.BatchNorm2d`` again (a normkit ``BatchNorm2d`` under another preset),
    a converted normkit ``BatchNorm1d/2d/3d`` the same class with its preset. A layer with no
    record (built directly, or ``torch.nn.SyncBatchNorm``) becomes :class:`BatchNormXd`, which
    accepts any rank >= 2, as mmcv's ``revert_sync_batchnorm`` does (pytorch/pytorch#41081).

    :returns: ``module`` with its children replaced, or a new layer if ``module`` is itself one.
    """
    output = module
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        output = _reverted(module)
    for name, child in module.named_children():
        output.add_module(name, revert_sync_batchnorm(child))
    return output
