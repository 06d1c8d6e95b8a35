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

Each call chooses its path from the tensors the layer holds at that moment; nothing is cached,
so ``.to()``, ``.half()``, ``load_state_dict(assign=True)`` and changed attributes (the
estimator, RMS norm's ``cast`` and ``weight_offset``) take effect on the next call. Where every
parameter and buffer is in the input's compute dtype (float64 for float64 input, float32
otherwise; the input's own dtype for layer and RMS norm), the layers call ATen's op on their
own tensors exactly as ``torch.nn`` does (``torch.batch_norm`` updating the running statistics
in place, ``torch.instance_norm``, ``torch.layer_norm``, ``torch.rms_norm``): measured on the
tiny inputs of ``normkit bench`` (``(2, 8, 8, 8)``, ``(2, 8, 8)``, 2 threads), at most about
1.5 µs per call over ``torch.nn``, in training and in eval. Two other presets' paths stay near
ATen: the biased running variance of keras/flax/onnx updates the buffers in place around
ATen's batch statistics (:func:`normkit_torch.kernels.batch_norm_biased_update`, about 25 µs
over ``torch.nn.BatchNorm2d`` in training: four more small ops), and RMS norm with an offset
or the cast before the weight calls ``torch.rms_norm`` on :math:`w + o` for float32/float64
input (Gemma about 10 µs over ``torch.nn.RMSNorm``). Everything else goes through the kernels:
a half-precision layer, running statistics of another dtype, one value per channel where the
preset allows it, an empty batch, and capture for export.

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
from normkit_torch import capture, kernels
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


_ATEN, _BIASED, _KERNEL = 0, 1, 2
"""Batch norm's paths (:meth:`_NormkitBatchNorm.forward`)."""


def _all_in(dtype: torch.dtype, *tensors: Tensor | None) -> bool:
    """Whether every tensor given (not ``None``) has ``dtype``."""
    for t in tensors:
        if t is not None and t.dtype != dtype:
            return False
    return True


def _trailing_error(input: Tensor, normalized_shape: tuple[int, ...]) -> ValueError | None:
    """The error for ``input`` whose trailing dimensions are not ``normalized_shape``, or
    ``None`` where they are."""
    shape = input.shape
    k = len(normalized_shape)
    if len(shape) < k or shape[len(shape) - k :] != normalized_shape:
        return ValueError(
            f"input has shape {tuple(shape)}: expected trailing dimensions "
            f"normalized_shape={normalized_shape}"
        )
    return None


def _check_trailing(input: Tensor, normalized_shape: tuple[int, ...]) -> None:
    """Raise unless ``input``'s trailing dimensions are ``normalized_shape``."""
    error = _trailing_error(input, normalized_shape)
    if error is not None:
        raise error


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
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        if (weight is not None or running_mean is not None) and input.shape[1] != self.num_features:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected num_features={self.num_features} "
                f"channels at dim 1, got {input.shape[1]}"
            )
        training = self.training
        counting = training and self.track_running_stats and self.num_batches_tracked is not None
        if training and not self.track_running_stats:
            running_mean = running_var = None  # not tracked: neither used nor updated
        use_batch_stats = training or (running_mean is None and running_var is None)
        updating = training and running_mean is not None
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        if counting and momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)  # the cumulative average
        # the path: ATen on the module's own tensors, as torch.nn (ATen's update in place), the
        # biased estimator's update in place around ATen (kernels.batch_norm_biased_update), or
        # the kernel, which converts dtypes and handles one value per channel and export
        path = _ATEN if kernels.aten_takes_as_is(input, weight, bias, running_mean, running_var) else _KERNEL
        if use_batch_stats:
            numel = input.numel()
            n = numel // input.shape[1] if numel > 0 else 0
            if n == 1:
                self._check_values_per_group(
                    input,
                    n,
                    updating,
                    f"Expected more than 1 value per channel when training, got input size {input.size()}",
                )
                path = _KERNEL  # one value per channel, where the preset allows it: y = beta
            elif n == 0:
                path = _KERNEL  # empty input: the kernel leaves the statistics alone
            elif updating and path == _ATEN:
                # under capture the kernel: it refuses an update under the dynamo ONNX exporter,
                # and its form of the biased update is the one the TorchScript exporter writes
                # correctly (kernels.batch_norm_biased_update)
                if not self.unbiased_running_var:
                    path = _KERNEL if capture.torch_exporting() or capture.jit_tracing() else _BIASED
                elif capture.torch_exporting():
                    path = _KERNEL
        if path == _ATEN:
            # what torch.nn.BatchNorm2d calls
            y = torch.batch_norm(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                use_batch_stats,
                factor,
                self.eps,
                torch.backends.cudnn.enabled,
            )
        elif path == _BIASED:
            y = kernels.batch_norm_biased_update(
                input, weight, bias, running_mean, running_var, factor, self.eps, n
            )
        else:
            y, new_mean, new_var = kernels.batch_norm(
                input,
                weight,
                bias,
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
        running_mean, running_var = self.running_mean, self.running_var
        if running_mean is not None and input.shape[1] != self.num_features:
            raise ValueError(
                f"input has shape {tuple(input.shape)}: expected num_features={self.num_features} "
                f"channels at dim 1 to match running_mean, got {input.shape[1]}"
            )
        use_input_stats = self.training or not self.track_running_stats
        updating = use_input_stats and running_mean is not None
        weight, bias = self.weight, self.bias
        momentum = self.momentum if self.momentum is not None else 0.0  # torch.nn's rule
        numel = input.numel()
        dt = input.dtype
        # the fast paths: what torch.nn calls, on the module's own buffers, where the kernel
        # would compute exactly that (one dtype throughout: ATen's instance_norm rounds the
        # running statistics of half input to the input's dtype, the kernel does not)
        fast = (dt == torch.float32 or dt == torch.float64) and _all_in(
            dt, weight, bias, running_mean, running_var
        )
        if not use_input_stats:
            if fast and running_var is not None and not (capture.torch_exporting() or capture.jit_tracing()):
                # ATen's instance_norm, as torch.nn: the same output as the kernel's batch norm,
                # and torch.nn's gradients (the sums over the repeated weight) bit for bit
                return torch.instance_norm(
                    input,
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    False,
                    0.0,
                    self.eps,
                    torch.backends.cudnn.enabled,
                )
        elif numel > 0:
            n = numel // (input.shape[0] * input.shape[1])
            if n == 1:
                self._check_values_per_group(
                    input,
                    n,
                    updating,
                    f"Expected more than 1 spatial element when training, got input size {input.size()}",
                )
            elif fast and (
                not updating
                or (self.unbiased_running_var and not (capture.torch_exporting() or capture.jit_tracing()))
            ):
                return torch.instance_norm(
                    input,
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    True,
                    momentum,
                    self.eps,
                    torch.backends.cudnn.enabled,
                )
        y, new_mean, new_var = kernels.instance_norm(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            use_input_stats,
            momentum,
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
        normalized_shape = self.normalized_shape
        weight, bias = self.weight, self.bias
        dt = input.dtype
        if (weight is None or weight.dtype == dt) and (bias is None or bias.dtype == dt):
            # what torch.nn.LayerNorm calls; kernels.layer_norm does the same for one dtype. ATen
            # checks the shape: its error is replaced by the module's (explicitly under
            # torch.compile, where ATen's error would surface at tracing)
            if torch.compiler.is_compiling():
                _check_trailing(input, normalized_shape)
            try:
                return torch.layer_norm(
                    input, normalized_shape, weight, bias, self.eps, torch.backends.cudnn.enabled
                )
            except (RuntimeError, ValueError):  # ATen's errors (ValueError: a 0-d input)
                error = _trailing_error(input, normalized_shape)
                if error is None:
                    raise
            raise error
        _check_trailing(input, normalized_shape)
        ndim = input.dim()
        axes = tuple(range(ndim - len(normalized_shape), ndim))
        return kernels.layer_norm(input, weight, bias, axes, self.eps)


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
        self.weight_offset = p.rms_weight_offset if weight_offset is None else weight_offset
        self.cast = p.rms_cast if cast is None else cast
        self._defaults = (p.rms_weight_offset, p.rms_cast)
        self.reset_parameters()  # again, now that the offset is known

    @property
    def weight_offset(self) -> float:
        """The offset :math:`o` of the gain :math:`w + o` (validated when set)."""
        return self._weight_offset

    @weight_offset.setter
    def weight_offset(self, value: float) -> None:
        self._weight_offset = check_weight_offset(value)
        self._paths()

    @property
    def cast(self) -> str:
        """Where a float16/bfloat16 result is rounded, ``"after_weight"`` or ``"before_weight"``
        (validated when set)."""
        return self._cast

    @cast.setter
    def cast(self, value: str) -> None:
        self._cast = presets.check_rms_cast(value)
        self._paths()

    def _paths(self) -> None:
        """``_torch_options``: offset 0 and the cast after the weight, where ``torch.rms_norm``
        with the layer's weight is the spec's computation in every dtype (the fast path of
        :meth:`forward`; ``rms_norm._aten_computes_it``)."""
        offset, cast = getattr(self, "_weight_offset", None), getattr(self, "_cast", None)
        self._torch_options = offset == 0 and cast == "after_weight"

    def __setstate__(self, state: dict) -> None:
        # a layer pickled before weight_offset and cast became properties kept them as attributes
        for name in ("weight_offset", "cast"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)
        if "_torch_options" not in state:
            self._paths()

    def _offset_gain(self, input: Tensor, weight: Tensor | None) -> Tensor | None:
        """The weight to hand ``torch.rms_norm`` where it computes the spec's result with other
        options than torch's, or ``None`` (then :func:`normkit_torch.rms_norm.rms_norm`): for
        float32/float64 input, where the two casts agree, and a weight of its dtype, :math:`w + o`
        (formed in that dtype, as ``rms_norm`` forms it), which gives ``rms_norm``'s written-out
        result and gradients bit for bit (measured); never while ``torch.jit.trace`` records."""
        dt = input.dtype
        if weight is None or weight.dtype != dt or not (dt == torch.float32 or dt == torch.float64):
            return None  # no weight: only while tracing, which takes rms_norm
        if capture.jit_tracing():
            return None
        offset = self._weight_offset
        return weight if offset == 0 else weight + offset

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
        normalized_shape = self.normalized_shape
        weight = self.weight
        if (
            weight is None or (self._torch_options and weight.dtype == input.dtype)
        ) and not capture.jit_tracing():
            gain, aten = weight, True  # torch.nn.RMSNorm's call (eps=None included)
        else:
            gain = self._offset_gain(input, weight)
            aten = gain is not None
        if aten:
            # ATen checks the shape, and its error is replaced by the module's (explicitly under
            # torch.compile, where ATen's error would surface at tracing)
            if torch.compiler.is_compiling():
                _check_trailing(input, normalized_shape)
            try:
                return torch.rms_norm(input, normalized_shape, gain, self.eps)
            except (RuntimeError, ValueError):  # ATen's errors (ValueError: a 0-d input)
                error = _trailing_error(input, normalized_shape)
                if error is None:
                    raise
            raise error
        _check_trailing(input, normalized_shape)
        k = len(normalized_shape)
        eps = self.eps if self.eps is not None else torch.finfo(kernels.compute_dtype(input)).eps
        axes = tuple(range(input.dim() - k, input.dim()))
        return rms_norm(input, weight, axes, eps, self.weight_offset, self.cast == "before_weight")
