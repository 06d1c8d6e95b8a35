r"""Drop-in ``torch.nn`` normalization layers that run normkit's kernels.

``normkit_torch.BatchNorm2d`` is a ``torch.nn.BatchNorm2d``: the same constructor arguments,
attributes, ``extra_repr``, parameters, buffers, ``state_dict`` keys (``num_batches_tracked``
included) and ``load_state_dict`` behaviour, and, under the default ``preset="torch"``,
bit-for-bit the same outputs, gradients and running statistics for float32 and float64 layers
(and for float16/bfloat16 input to a float32 layer, as under autocast). A layer converted to
float16 or bfloat16 itself (``.half()``) computes its statistics in float32, where ATen's
half-precision path keeps the batch mean in the half dtype: its outputs are closer to exact
than ``torch.nn``'s, and so not bit-identical to them. Each class subclasses its ``torch.nn``
namesake, so code that tests ``isinstance(m, nn.BatchNorm2d)`` (weight-decay exclusions,
freezing, ``SyncBatchNorm.convert_sync_batchnorm``) keeps working.

``preset=`` chooses normkit's conventions (:mod:`normkit.presets`) for everything ``torch.nn``
does not let you choose:

* the running-variance estimator (``keras``, ``flax``, ``onnx``: biased :math:`\sigma^2`);
* whether one value per channel is allowed in training (then :math:`y = \beta`);
* the default ``eps``, ``momentum`` and instance-norm ``affine``.

``momentum`` is always PyTorch's convention, the weight of the new batch,
:math:`r \leftarrow (1-m)\,r + m\,b`, whatever the preset: ``preset="keras"`` defaults it to
``0.01`` (Keras's ``momentum=0.99``). Input is channels-first, as in ``torch.nn``; store it
channels-last with ``memory_format=torch.channels_last`` and the kernels keep that layout.

Where ``torch.nn`` itself has quirks they are kept, so that ``state_dict``s stay identical:
batch norm counts an empty batch in ``num_batches_tracked``; instance norm never counts, and
with ``momentum=None`` its running statistics do not move. One deliberate difference: a call
that fails (say, one value per channel in training) raises before ``num_batches_tracked`` is
incremented, so a failed call changes no state.

Tools that recognise layers by exact type or trace them symbolically do not know these
classes: ``torch.fx.symbolic_trace`` (the forward branches on the input's shape),
``torch.jit.script`` and ``torch.ao.quantization.fuse_modules`` reject them, and
``SyncBatchNorm.convert_sync_batchnorm`` turns them into plain ``SyncBatchNorm`` (PyTorch's
conventions: the preset is lost). ``torch.compile``, ``torch.export`` and ``torch.onnx.export``
work (:mod:`normkit_torch.capture`).

``GroupNorm`` and ``RMSNorm`` (spec version 2) follow the same design. ``GroupNorm`` is
bit-for-bit ``torch.nn.GroupNorm`` on channels-first memory (both run ATen's kernel there); on
channels-last memory it computes its statistics two-pass, where ``torch.nn.GroupNorm``'s CPU
kernel takes :math:`E[x^2] - E[x]^2` (error 3.5 at mean 1000 in float32), so there it is more
accurate than ``torch.nn`` and not bit-identical to it (:mod:`normkit_torch.group_norm`).
``RMSNorm`` is bit-for-bit ``torch.nn.RMSNorm`` under the torch preset and adds the choices
``torch.nn`` hard-codes: ``weight_offset`` (Gemma's :math:`1 + w`) and ``cast`` (where a
float16/bfloat16 result is rounded: ``"after_weight"``, torch's, or ``"before_weight"``,
Llama's); ``preset="llama"`` and ``"gemma"`` set them with their eps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normkit import presets
from normkit.functional.rms import check_weight_offset
from normkit_torch import kernels
from normkit_torch.group_norm import group_norm
from normkit_torch.rms_norm import rms_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
]


def _torch_momentum(momentum: object, preset: presets.Preset) -> float | None:
    """The weight of the new batch: the preset's default, ``None`` (cumulative), or ``momentum``."""
    if momentum is presets.DEFAULT:
        return round(preset.update_weight, 12)  # 0.01 for keras's 0.99, not 0.010000000000000009
    if momentum is None:
        return None
    presets.check_momentum(momentum)
    return momentum  # as given, so that extra_repr prints it as torch.nn does (``momentum=1``)


def _eps(eps: object, default: float) -> float:
    """``eps`` (default: the preset's): a finite number >= 0. ``torch.nn`` accepts 0, so do the
    drop-in layers (normkit's own ops require eps > 0); it is returned as given."""
    if eps is None:
        return default
    if eps == 0 and not isinstance(eps, bool):
        return eps  # type: ignore[return-value]
    presets.check_eps(eps)
    return eps  # type: ignore[return-value]


def _preset_repr(module: nn.Module, base: str) -> str:
    return base if module.preset == "torch" else f"{base}, preset={module.preset!r}"


class _PresetOptions:
    """The choices a preset makes that ``torch.nn`` hard-codes (set by ``__init__``)."""

    preset: str
    unbiased_running_var: bool
    """Store :math:`\\frac{n}{n-1}\\sigma^2` (torch) or :math:`\\sigma^2` in ``running_var``."""
    allow_single_value: bool
    """Allow one value per channel when normalizing with batch statistics (then ``y = bias``)."""

    def _set_preset(self, preset: presets.Preset) -> None:
        self.preset = preset.name
        self.unbiased_running_var = preset.running_var_estimator == "unbiased"
        self.allow_single_value = preset.allow_single_value

    def _store_running_stats(self, mean: Tensor, var: Tensor) -> None:
        """Copy the kernel's new running statistics into the buffers (in place, as torch.nn)."""
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)

    def _check_values_per_group(self, input: Tensor, n: int, updating: bool, message: str) -> None:
        if n == 1 and not self.allow_single_value:
            raise ValueError(message)
        if n == 1 and updating and self.unbiased_running_var:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: an unbiased running variance needs at least "
                f"2 values per channel (set unbiased_running_var=False)"
            )


class _NormkitBatchNorm(_PresetOptions, _BatchNorm):
    """The one batch-norm implementation behind ``BatchNorm1d``/``2d``/``3d``."""

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | presets._Default | None = presets.DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        preset: str | presets.Preset = "torch",
    ) -> None:
        p = presets.get_preset(preset)
        super().__init__(
            num_features,
            _eps(eps, p.batch_norm_eps),
            _torch_momentum(momentum, p),
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self._set_preset(p)

    def extra_repr(self) -> str:
        return _preset_repr(self, super().extra_repr())

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        has_state = self.weight is not None or self.running_mean is not None
        if has_state and input.shape[1] != self.num_features:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected num_features={self.num_features} "
                f"channels at dim 1, got {input.shape[1]}"
            )
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        tracked = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        updating = self.training and running_mean is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if counting and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)  # the cumulative average
        if use_batch_stats and input.numel() > 0:
            self._check_values_per_group(
                input,
                input.numel() // input.shape[1],
                updating,
                f"Expected more than 1 value per channel when training, got input size {input.size()}",
            )
        y, new_mean, new_var = kernels.batch_norm(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            use_batch_stats,
            factor,
            self.eps,
            1,
            self.unbiased_running_var,
        )
        if updating:
            self._store_running_stats(new_mean, new_var)
        if counting:
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_NormkitBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on normkit's kernels: input ``(N, C)`` or ``(N, C, L)``."""


class BatchNorm2d(_NormkitBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on normkit's kernels: input ``(N, C, H, W)``."""


class BatchNorm3d(_NormkitBatchNorm, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on normkit's kernels: input ``(N, C, D, H, W)``."""


class _NormkitInstanceNorm(_PresetOptions, _InstanceNorm):
    """The one instance-norm implementation behind ``InstanceNorm1d``/``2d``/``3d``.

    ``torch.nn``'s ``forward`` is kept (input checks, unbatched input); the normalization is
    normkit's kernel.
    """

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | presets._Default | None = presets.DEFAULT,
        affine: bool | None = None,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        preset: str | presets.Preset = "torch",
    ) -> None:
        p = presets.get_preset(preset)
        super().__init__(
            num_features,
            _eps(eps, p.instance_norm_eps),
            _torch_momentum(momentum, p),
            p.instance_norm_affine if affine is None else affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self._set_preset(p)

    def extra_repr(self) -> str:
        return _preset_repr(self, super().extra_repr())

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        if self.running_mean is not None and input.shape[1] != self.num_features:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected num_features={self.num_features} "
                f"channels at dim 1 to match running_mean, got {input.shape[1]}"
            )
        use_input_stats = self.training or not self.track_running_stats
        updating = use_input_stats and self.running_mean is not None
        if use_input_stats and input.numel() > 0:
            self._check_values_per_group(
                input,
                input.numel() // (input.shape[0] * input.shape[1]),
                updating,
                f"Expected more than 1 spatial element when training, got input size {input.size()}",
            )
        y, new_mean, new_var = kernels.instance_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            use_input_stats,
            self.momentum if self.momentum is not None else 0.0,  # torch.nn's rule
            self.eps,
            1,
            self.unbiased_running_var,
        )
        if updating:
            self._store_running_stats(new_mean, new_var)
        return y


class InstanceNorm1d(_NormkitInstanceNorm, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` on normkit's kernels: input ``(N, C, L)`` or ``(C, L)``."""


class InstanceNorm2d(_NormkitInstanceNorm, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` on normkit's kernels: input ``(N, C, H, W)`` or ``(C, H, W)``."""


class InstanceNorm3d(_NormkitInstanceNorm, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` on normkit's kernels: input ``(N, C, D, H, W)`` or ``(C, D, H, W)``."""


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` on normkit's kernels: normalizes over the trailing
    ``normalized_shape`` dimensions; ``preset`` sets the default ``eps``."""

    def __init__(
        self,
        normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        preset: str | presets.Preset = "torch",
    ) -> None:
        p = presets.get_preset(preset)
        eps = _eps(eps, p.layer_norm_eps)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.preset = p.name

    def extra_repr(self) -> str:
        return _preset_repr(self, super().extra_repr())

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if input.dim() < k or tuple(input.shape[input.dim() - k :]) != self.normalized_shape:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected trailing dimensions "
                f"normalized_shape={self.normalized_shape}"
            )
        axes = tuple(range(input.dim() - k, input.dim()))
        return kernels.layer_norm(input, self.weight, self.bias, axes, self.eps)


class GroupNorm(nn.GroupNorm):
    r"""``torch.nn.GroupNorm`` on normkit's kernels: input ``(N, C, *)``, the ``C`` channels in
    ``num_groups`` contiguous blocks, each sample's block normalized by its own mean and biased
    variance, then a per-channel affine:
    :math:`y = \gamma_c (x - \mu_{n,g})/\sqrt{\sigma^2_{n,g} + \epsilon} + \beta_c`.

    Same arguments, defaults, attributes, parameters and ``state_dict`` as ``torch.nn.GroupNorm``;
    ``preset`` sets the default ``eps`` and whether ``torch.nn``'s one-value check applies (an
    error, under the torch preset, only where the whole batch holds one value per group, as in
    ``torch.nn``; elsewhere such a group normalizes to β). On channels-first memory it runs ATen's
    kernel, as ``torch.nn.GroupNorm`` does: bit-for-bit the same outputs and gradients. On
    channels-last memory (``memory_format=torch.channels_last``) ATen's CPU kernel computes
    :math:`E[x^2] - E[x]^2` and loses the variance of data far from 0 (error 3.5 at mean 1000
    and std 1 in float32, 155 at std 0.1); this layer computes its statistics two-pass there,
    so it is more accurate than ``torch.nn.GroupNorm`` on such input and keeps the layout.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float | None = None,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        preset: str | presets.Preset = "torch",
    ) -> None:
        p = presets.get_preset(preset)
        super().__init__(
            num_groups,
            num_channels,
            _eps(eps, p.group_norm_eps),
            affine,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.preset = p.name
        self.allow_single_value = p.allow_single_value

    def extra_repr(self) -> str:
        return _preset_repr(self, super().extra_repr())

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected (N, C, *) with at least 2 dimensions"
            )
        if input.shape[1] != self.num_channels:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected num_channels={self.num_channels} "
                f"channels at dim 1, got {input.shape[1]}"
            )
        # torch.nn's check (F.group_norm's _verify_batch_size), kept as it is: N * C/G * spatial
        # values, so it fires only where the whole batch holds one value per group
        if input.numel() == self.num_groups and not self.allow_single_value:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, 1)


class RMSNorm(nn.RMSNorm):
    r"""``torch.nn.RMSNorm`` on normkit's kernels: normalizes over the trailing
    ``normalized_shape`` dimensions, :math:`y = x/\sqrt{\overline{x^2} + \epsilon}\,(w + o)`,
    computed in float32 for float16/bfloat16 input.

    Same arguments, defaults, attributes, parameter and ``state_dict`` as ``torch.nn.RMSNorm``;
    ``eps=None`` is the machine epsilon of the compute dtype, as in ``torch.nn`` (float32's for
    float16, bfloat16 and float32 input, float64's for float64). Keyword-only additions:

    * ``preset``: the default ``eps``, ``weight_offset`` and ``cast`` (:mod:`normkit.presets`:
      ``llama`` eps 1e-6 and the cast before the weight; ``gemma`` eps 1e-6 and offset 1);
    * ``weight_offset`` :math:`o`: the layer multiplies by :math:`w + o` (Gemma's :math:`1 + w`
      is 1); the weight is initialized to :math:`1 - o`, so that a new layer scales by 1;
    * ``cast``: ``"after_weight"`` (torch, Gemma, Keras) rounds :math:`\hat x\,(w + o)` to a
      float16/bfloat16 input's dtype once; ``"before_weight"`` (Llama, ONNX) rounds
      :math:`\hat x` first, multiplies in float32 and rounds again.

    Under the torch preset it runs ``torch.rms_norm`` as ``torch.nn.RMSNorm`` does: bit-for-bit
    the same outputs and gradients.
    """

    def __init__(
        self,
        normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        preset: str | presets.Preset = "torch",
        weight_offset: float | None = None,
        cast: str | None = None,
    ) -> None:
        p = presets.get_preset(preset)
        super().__init__(
            normalized_shape,
            p.rms_norm_eps if eps is None else _eps(eps, 0.0),
            elementwise_affine,
            device=device,
            dtype=dtype,
        )
        self.preset = p.name
        self.weight_offset = check_weight_offset(
            p.rms_weight_offset if weight_offset is None else weight_offset
        )
        self.cast = p.rms_cast if cast is None else presets.check_rms_cast(cast)
        self._defaults = (p.rms_weight_offset, p.rms_cast)
        self.reset_parameters()  # again, now that the offset is known

    def reset_parameters(self) -> None:
        """The weight to :math:`1 - o` (ones without an offset, as ``torch.nn``), so that the
        layer starts scaling by 1."""
        if self.elementwise_affine:
            with torch.no_grad():
                self.weight.fill_(1.0 - getattr(self, "weight_offset", 0.0))

    def extra_repr(self) -> str:
        text = _preset_repr(self, super().extra_repr())
        offset, cast = self._defaults
        if self.weight_offset != offset:
            text += f", weight_offset={self.weight_offset!r}"
        if self.cast != cast:
            text += f", cast={self.cast!r}"
        return text

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if input.dim() < k or tuple(input.shape[input.dim() - k :]) != self.normalized_shape:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected trailing dimensions "
                f"normalized_shape={self.normalized_shape}"
            )
        eps = self.eps if self.eps is not None else torch.finfo(kernels.compute_dtype(input)).eps
        axes = tuple(range(input.dim() - k, input.dim()))
        return rms_norm(input, self.weight, axes, eps, self.weight_offset, self.cast == "before_weight")
