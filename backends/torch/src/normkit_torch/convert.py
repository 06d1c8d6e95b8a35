"""Swap the stock ``torch.nn`` normalization layers of a model for normkit's, keeping the state.

Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers share the old layers'
parameters (so an optimizer built before the conversion keeps working) and buffers, and take
their configuration (``eps``, ``momentum``, ``affine``, ``track_running_stats``,
``num_groups``, ``normalized_shape``, ``elementwise_affine``) and training mode. ``preset`` sets
only conventions that ``torch.nn`` hard-codes and that leave what a trained layer computes as it
was: the running-variance estimator and the one-value rule (batch, instance and group norm), and
where RMS norm rounds a float16/bfloat16 result (its cast order). It never changes a layer's
``eps`` (an RMS norm's ``eps=None`` stays the machine epsilon of the compute dtype) nor gives an
RMS norm a weight offset: under ``preset="gemma"`` that would read the stock weight :math:`w`
as :math:`1 + w`. See :mod:`normkit_torch.modules`.
"""

from __future__ import annotations

import torch
from torch import nn

from normkit import presets
from normkit_torch import modules

__all__ = ["convert_norm_layers"]

_CHANNEL_NORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
    nn.InstanceNorm1d: modules.InstanceNorm1d,
    nn.InstanceNorm2d: modules.InstanceNorm2d,
    nn.InstanceNorm3d: modules.InstanceNorm3d,
}


CHANNEL_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
"""A batch or instance norm's parameters and buffers."""


def sharing_state(new: nn.Module, module: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """``new`` holding ``module``'s named Parameters and buffers (the same objects, not copies:
    an optimizer built before keeps working), in its training mode, with its ``qconfig``."""
    with torch.no_grad():
        for name in names:
            setattr(new, name, getattr(module, name))
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def rebuilt_channel_norm(kind: type[nn.Module], module: nn.Module, **kwargs: object) -> nn.Module:
    """A ``kind`` batch or instance norm with ``module``'s configuration (``kwargs`` added: a
    preset, a process group), sharing its Parameters and buffers."""
    new = kind(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
        bias=module.bias is not None or not module.affine,
        **kwargs,
    )
    return sharing_state(new, module, CHANNEL_STATE)


def _converted(module: nn.Module, preset: str | presets.Preset) -> nn.Module:
    """normkit's counterpart of one stock layer (``module`` itself for any other module)."""
    kind = type(module)  # exact types only: a subclass may have changed what forward does
    if kind in _CHANNEL_NORMS:
        return rebuilt_channel_norm(_CHANNEL_NORMS[kind], module, preset=preset)
    if kind is nn.GroupNorm:
        new = modules.GroupNorm(
            module.num_groups,
            module.num_channels,
            eps=module.eps,
            affine=module.affine,
            device="meta",
            bias=module.bias is not None or not module.affine,
            preset=preset,
        )
        names = ("weight", "bias")
    elif kind is nn.RMSNorm:
        new = modules.RMSNorm(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            device="meta",
            preset=preset,
            weight_offset=0.0,  # the stock weight multiplies as it is: w, not w + o
        )
        new.eps = module.eps  # None (the machine epsilon) stays None whatever the preset's eps
        names = ("weight",)
    elif kind is nn.LayerNorm:
        new = modules.LayerNorm(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None or not module.elementwise_affine,
            device="meta",
            preset=preset,
        )
        names = ("weight", "bias")
    else:
        return module
    return sharing_state(new, module, names)


def convert_norm_layers(module: nn.Module, preset: str | presets.Preset = "torch") -> nn.Module:
    """Replace every ``torch.nn`` ``BatchNorm1d/2d/3d``, ``InstanceNorm1d/2d/3d``,
    ``LayerNorm``, ``GroupNorm`` and ``RMSNorm`` in ``module`` (recursively) by the normkit layer
    of the same name.

    Only those exact types are replaced (a subclass may have changed what ``forward`` does), so
    normkit's layers, which subclass them, are left as they are: converting twice changes nothing.

    :param module: a model, or a single normalization layer.
    :param preset: the conventions of the new layers; ``"torch"`` (default) keeps every output
        and ``state_dict`` bit-for-bit what it was (group norm: on channels-first memory; on
        channels-last memory normkit's statistics are two-pass where ``torch.nn``'s CPU kernel
        is one-pass). Another preset keeps each layer's ``eps``, ``momentum`` and parameters, and
        sets the running-variance estimator, the one-value rule and RMS norm's cast order.
    :returns: the converted module: ``module`` itself with its children replaced, or a new
        layer if ``module`` is itself a normalization layer.

    >>> import torch, normkit_torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = normkit_torch.convert_norm_layers(model)
    >>> model[1]
    BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    >>> type(model[1]).__module__
    'normkit_torch.modules'
    """
    presets.get_preset(preset)  # fail early on an unknown name
    result = _converted(module, preset)
    for name, child in module.named_children():
        result.add_module(name, convert_norm_layers(child, preset))
    return result
