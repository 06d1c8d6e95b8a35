r"""The PyTorch implementation of :func:`normkit.testtime.fold`: every eval-mode batch norm folded
into the ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` before it.

The model is copied and traced with ``torch.fx`` (batch norms, the ``normkit_torch`` drop-ins
among them, kept as modules). Every batch norm (a ``torch.nn.modules.batchnorm._BatchNorm``,
or a frozen one, ``normkit_torch.FrozenBatchNorm``, whatever its mode)
must be called on the output of one of those layers, an output nothing else uses, of a layer
called only once; its scale :math:`s = \gamma/\sqrt{\sigma^2+\epsilon}` and shift then go into
that layer's weight and bias (:func:`normkit.testtime.fold.fold_weights`, in float64, cast to
the weight's dtype, in the weight's memory format; a layer without bias gets one, in the
weight's dtype), and the batch norm leaves the graph. The result is a ``torch.fx.GraphModule``
in eval mode with no batch norm left; the model passed in is never changed.

Where the rank of a batch norm's input decides which axis it normalizes, and the graph does not
say it (``Linear`` or ``Conv1d`` before a ``BatchNorm1d``, which takes 2-D and 3-D input: a
``Linear`` on ``(N, L, F)`` input feeds a ``BatchNorm1d`` that normalizes ``L``, not the
linear's features), the folded graph checks the rank where the batch norm was and raises for
the input that would have been normalized along another axis.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from normkit.testtime.fold import fold_weights
from normkit_torch.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

__all__ = ["RankCheck", "fold_model"]

_ABSORBING = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
_FOLDABLE = (_BatchNorm, FrozenBatchNorm)
"""What folds: every batch norm, and the frozen ones (fixed affine maps already)."""
_NORMALIZATIONS = (*_FOLDABLE, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
_FUNCTIONAL_NORMS = {
    torch.nn.functional.batch_norm,
    torch.batch_norm,
    torch.native_batch_norm,
    torch._native_batch_norm_legit_no_training,
}


def _base(module: nn.Module) -> type[nn.Module] | None:
    """The ``torch.nn`` class among :data:`_ABSORBING` whose forward ``module`` runs unchanged."""
    for base in _ABSORBING:
        if isinstance(module, base):
            same_forward = type(module).forward is base.forward
            if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
                same_forward = same_forward and type(module)._conv_forward is base._conv_forward
            return base if same_forward else None
    return None


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, keeping every normalization layer (the ``normkit_torch`` drop-ins,
    which fx cannot trace through, included) and every subclass of an absorbing layer that runs
    its base class's forward as modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            super().is_leaf_module(m, module_qualified_name)
            or isinstance(m, _NORMALIZATIONS)
            or _base(m) is not None
        )


def _accepted_ranks(bn: nn.Module) -> set[int] | None:
    """The input ranks a batch norm accepts (None: not known, a custom subclass)."""
    for cls, ranks in ((nn.BatchNorm1d, {2, 3}), (nn.BatchNorm2d, {4}), (nn.BatchNorm3d, {5})):
        if isinstance(bn, cls) and type(bn)._check_input_dim is cls._check_input_dim:
            return ranks
    for cls in (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d):
        if isinstance(bn, cls) and type(bn).forward is FrozenBatchNorm.forward:
            return set(cls._ranks or ())
    return None


def _describe(node: object, modules: dict[str, nn.Module]) -> str:
    """What produced a node's value, in words."""
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    if node.op == "call_module":
        return f"{node.target!r} ({type(modules[str(node.target)]).__name__})"
    if node.op == "get_attr":
        return f"the attribute {node.target!r}"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    name = getattr(node.target, "__name__", str(node.target))
    return f"a call of {name}()" if name[:1].islower() else f"a {name}"


class RankCheck(nn.Module):
    """Where a batch norm was folded into ``layer``: passes its input through, and raises
    unless it has ``ndim`` dimensions, the only rank at which dim 1, the dim the batch norm
    normalized, holds the layer's output channels. (A module, not a function, so that the
    folded ``GraphModule`` pickles: unpickling re-traces it, keeping modules whole.)"""

    def __init__(self, ndim: int, batch_norm: str, layer: str) -> None:
        super().__init__()
        self.ndim, self.batch_norm, self.layer = ndim, batch_norm, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim:
            raise ValueError(
                f"{self.batch_norm!r} was folded into {self.layer!r} for {self.ndim}-D input, where "
                f"dim 1 holds the layer's output channels; this input has shape {tuple(x.shape)}, on "
                f"which the batch norm normalized dim 1, another axis: the folded model cannot "
                f"compute it (run the unfolded model)"
            )
        return x

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, batch_norm={self.batch_norm!r}, layer={self.layer!r}"


@dataclass
class _Fold:
    """One batch-norm call and the layer it folds into."""

    batch_norm: fx.Node
    producer: fx.Node
    guard_rank: int | None


def _check_batch_norm(name: str, bn: nn.Module) -> None:
    if isinstance(bn, FrozenBatchNorm):  # the same map in training and eval
        if bn._forward_hooks or bn._forward_pre_hooks:
            raise ValueError(f"{name!r}: the batch norm has forward hooks, which folding would drop")
        return
    if bn.training:
        raise ValueError(
            f"{name!r}: the batch norm is in training mode, where it normalizes with batch "
            f"statistics; fold uses the running statistics (eval semantics): call model.eval() first"
        )
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{name!r}: the batch norm has no running statistics (track_running_stats=False), so "
            f"it normalizes with each batch's statistics even in eval mode: nothing fixed to fold"
        )
    if bn._forward_hooks or bn._forward_pre_hooks:
        raise ValueError(f"{name!r}: the batch norm has forward hooks, which folding would drop")


def _plan(gm: fx.GraphModule, original: str) -> list[_Fold]:
    """Every batch-norm call in the traced graph, checked, with the layer it folds into."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    attributes: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            attributes.append(str(node.target))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_NORMS:
            raise ValueError(
                f"{original}: the forward calls {node.target.__name__}() itself ({node.name!r}); fold "
                f"folds batch-norm modules, not functional calls"
            )
    sharing: dict[int, list[str]] = {}
    for full, parameter in gm.named_parameters(remove_duplicate=False):
        sharing.setdefault(id(parameter), []).append(full)
    plan = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], _FOLDABLE):
            continue
        name, bn = str(node.target), modules[str(node.target)]
        _check_batch_norm(name, bn)
        used = [a for a in attributes if a == name or a.startswith(name + ".")]
        if used:
            raise ValueError(f"{name!r}: the forward also reads {used[0]!r}, which folding would remove")
        if len(node.args) != 1 or node.kwargs:
            raise ValueError(
                f"{name!r}: called with {len(node.args)} arguments and {dict(node.kwargs)}, expected one input"
            )
        source = node.args[0]
        layer = (
            modules.get(str(source.target))
            if isinstance(source, fx.Node) and source.op == "call_module"
            else None
        )
        base = None if layer is None else _base(layer)
        if base is None:
            raise ValueError(
                f"{name!r}: its input comes from {_describe(source, modules)}, not a convolution or "
                f"linear layer that can absorb it (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear)"
            )
        producer = str(source.target)
        assert isinstance(source, fx.Node) and layer is not None
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{name!r}: {producer!r} is a lazy layer not yet initialized: run the model once first"
            )
        if parametrize.is_parametrized(layer) or layer._forward_hooks or layer._forward_pre_hooks:
            raise ValueError(
                f"{name!r}: its input comes from {producer!r}, whose weight is computed by a "
                f"parametrization or a hook: folding into the stored weight would not reach it"
            )
        users = [user.name for user in source.users if user is not node]
        if users:
            raise ValueError(
                f"{name!r}: the output of {producer!r} is also used by {', '.join(users)}; folding "
                f"the batch norm into {producer!r} would change what they see"
            )
        if calls[producer] > 1 or any(a == producer or a.startswith(producer + ".") for a in attributes):
            raise ValueError(
                f"{name!r}: {producer!r} is used more than once in the forward; folding the batch "
                f"norm into it would change its other uses"
            )
        for parameter in (layer.weight, layer.bias):
            others = (
                []
                if parameter is None
                else [p for p in sharing[id(parameter)] if not p.startswith(producer + ".")]
            )
            if others:
                raise ValueError(
                    f"{name!r}: {producer!r} shares its parameters with {others[0]!r}, which folding would change"
                )
        channels = layer.out_features if base is nn.Linear else layer.out_channels
        if bn.num_features not in (channels, 1):
            raise ValueError(
                f"{name!r}: num_features={bn.num_features}, but {producer!r} ({base.__name__}) has "
                f"{channels} output channels"
            )
        guard = None
        if bn.num_features > 1:  # a single channel is one scale: any axis is the same
            valid = 2 if base is nn.Linear else len(layer.kernel_size) + 2
            possible = {valid - 1, valid} if base is not nn.Linear else set(range(1, 9))
            accepted = _accepted_ranks(bn)
            if accepted is not None and valid not in accepted:
                raise ValueError(
                    f"{name!r}: {type(bn).__name__} takes input of rank {sorted(accepted)}, but "
                    f"{producer!r} ({base.__name__}) has its output channels on dim 1 only at rank "
                    f"{valid}: the batch norm normalizes another axis, which cannot be folded into it"
                )
            if accepted is None or len(possible & accepted) > 1:
                guard = valid
        plan.append(_Fold(node, source, guard))
    return plan


def _absorb(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``layer``'s weight and bias, in float64, cast to their dtypes."""
    weight = layer.weight
    transposed = isinstance(layer, _ConvTransposeNd)
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

    def vector(t: torch.Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        values = t.detach().to("cpu", torch.float64).numpy()
        return np.broadcast_to(values, (channels,)) if values.shape == (1,) else values

    kernel, bias = fold_weights(
        weight.detach().to("cpu", torch.float64).numpy(),
        vector(layer.bias),
        vector(bn.running_mean),
        vector(bn.running_var),
        vector(bn.weight),
        vector(bn.bias),
        float(bn.eps),
        layout="torch-transposed" if transposed else "out-first",
        groups=layer.groups if transposed else 1,
    )
    with torch.no_grad():
        weight.copy_(torch.from_numpy(kernel))  # rounds once to the weight's dtype, keeps its strides
        if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(bias))
        else:
            new = torch.from_numpy(bias).to(device=weight.device, dtype=weight.dtype)
            layer.bias = nn.Parameter(new, requires_grad=weight.requires_grad)


def fold_model(model: nn.Module) -> fx.GraphModule:
    r"""A ``torch.fx.GraphModule`` computing ``model``'s eval outputs with every batch norm folded
    into the convolution or linear layer before it (see :mod:`normkit_torch.fold` and
    :func:`normkit.testtime.fold`), in eval mode; ``model`` is not changed.

    :raises ValueError: for a model without batch norm, one ``torch.fx`` cannot trace, and any
        batch norm that cannot be folded (the message names it and says why).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}: expected a torch.nn.Module")
    described = f"model ({type(model).__name__})"
    if isinstance(model, _FOLDABLE):
        raise ValueError(f"{described} is itself a batch norm: there is no layer before it to fold it into")
    batch_norms = [(name, m) for name, m in model.named_modules() if isinstance(m, _FOLDABLE)]
    if not batch_norms:
        raise ValueError(
            f"{described} has no batch norm (no torch.nn.modules.batchnorm._BatchNorm or "
            f"normkit_torch.FrozenBatchNorm) to fold"
        )
    for name, bn in batch_norms:
        _check_batch_norm(name, bn)
    folded = copy.deepcopy(model).eval()
    tracer = _Tracer()
    try:
        graph = tracer.trace(folded)
    except Exception as error:
        raise ValueError(
            f"{described} cannot be traced by torch.fx ({type(error).__name__}: {error}); fold needs "
            f"a forward without control flow that depends on the input's values"
        ) from error
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    for fold in _plan(gm, described):
        bn_name, layer_name = str(fold.batch_norm.target), str(fold.producer.target)
        try:
            _absorb(gm.get_submodule(layer_name), gm.get_submodule(bn_name))
        except ValueError as error:  # a statistic or parameter fold_weights refuses
            raise ValueError(f"{bn_name!r} (folded into {layer_name!r}): {error}") from None
        replacement = fold.producer
        if fold.guard_rank is not None:
            target, k = f"{bn_name}_rank_check", 1
            while target in dict(gm.named_modules()):
                target, k = f"{bn_name}_rank_check{k}", k + 1
            gm.add_submodule(target, RankCheck(fold.guard_rank, bn_name, layer_name))
            with gm.graph.inserting_after(fold.producer):
                replacement = gm.graph.call_module(target, (fold.producer,))
        fold.batch_norm.replace_all_uses_with(replacement)
        gm.graph.erase_node(fold.batch_norm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    left = [name for name, m in gm.named_modules() if isinstance(m, _FOLDABLE)]
    if left:  # every batch-norm call was folded or refused above
        raise AssertionError(f"batch norms left after folding: {left}")
    return gm.eval()
