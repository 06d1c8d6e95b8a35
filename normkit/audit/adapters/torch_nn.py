"""``torch.nn``'s own layers, with contiguous and with channels-last input.

* ``BatchNorm{1,2,3}d(C, eps, momentum, affine, track_running_stats)``: PyTorch's momentum is
  normkit's (the weight of the batch; ``None`` is the cumulative average); the running variance
  is always the unbiased one, so a biased-estimator case is ``n/a``.
* ``InstanceNorm{1,2,3}d`` likewise (its running variance is unbiased too).
* ``LayerNorm(shape, eps, elementwise_affine, bias)`` and ``RMSNorm(shape, eps,
  elementwise_affine)`` over trailing axes; RMS norm multiplies by the weight in float32 and
  then casts (normkit's ``after_weight``) and has no weight offset.
* ``GroupNorm(G, C, eps, affine)``.
* ``torch.var_mean(x, dim, correction=0)`` for ``moments``.

A channels-last case (channel axis -1) is moved to ``(N, C, ...)`` with ``movedim``, which is
a view with channels-last strides; the contiguous variant copies it to contiguous memory, the
channels-last variant to ``torch.channels_last`` (4-D) or ``torch.channels_last_3d`` (5-D),
which selects different CPU kernels. Parameters and running statistics keep the case's state
dtype (float32 for half-precision input: PyTorch's mixed-precision layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported

__all__ = ["TorchNN", "adapters"]


def _tensor(array: np.ndarray) -> Any:
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _Module:
    """A ``torch.nn`` module fed channels-first tensors in the adapter's memory format."""

    def __init__(self, module: Any, config: Config, channels_last_memory: bool) -> None:
        self.module = module
        self.config = config
        self.channels_last_memory = channels_last_memory

    def _to_module_layout(self, x: Any) -> Any:
        import torch

        if self.config.op in ("layer_norm", "rms_norm"):
            return x.contiguous()
        if self.config.channels_last and x.ndim > 2:
            x = x.movedim(-1, 1)
        if self.channels_last_memory:
            format = {4: torch.channels_last, 5: torch.channels_last_3d}[x.ndim]
            return x.contiguous(memory_format=format)
        return x.contiguous()

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        import torch

        self.module.train(training)
        with torch.no_grad():
            y = self.module(self._to_module_layout(_tensor(x)))
        if self.config.op not in ("layer_norm", "rms_norm") and self.config.channels_last and y.ndim > 2:
            y = y.movedim(1, -1)
        return _numpy(y.contiguous())

    def running_stats(self) -> dict[str, np.ndarray]:
        return {
            "running_mean": _numpy(self.module.running_mean),
            "running_var": _numpy(self.module.running_var),
        }


class TorchNN(Adapter):
    """``torch.nn`` layers; ``channels_last=True`` feeds 4-D and 5-D input in channels-last
    memory."""

    ops = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "moments")
    requires = ("torch",)

    def __init__(self, channels_last: bool = False) -> None:
        self.channels_last_memory = channels_last
        self.name = "torch.nn (channels_last)" if channels_last else "torch.nn"

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Any:
        import torch

        ndim = len(config.shape)
        if self.channels_last_memory and (
            ndim not in (4, 5) or config.op in ("layer_norm", "rms_norm", "moments")
        ):
            raise Unsupported("channels-last memory exists for 4-D and 5-D channel-first layers only")
        if config.op == "moments":
            axes = config.axes

            def moments(x: np.ndarray, training: bool) -> tuple[np.ndarray, np.ndarray]:
                var, mean = torch.var_mean(_tensor(x), dim=axes, correction=0)
                return _numpy(mean), _numpy(var)

            return moments
        module = self._module(config, ndim)
        dtype = {"float64": torch.float64}.get(config.dtype, torch.float32)
        module = module.to(dtype)
        with torch.no_grad():
            for key, value in state.items():
                target = getattr(module, key, None)
                if target is None:
                    raise Unsupported(f"torch.nn has no {key} for this configuration")
                target.copy_(_tensor(value))
        return _Module(module, config, self.channels_last_memory)

    def _module(self, config: Config, ndim: int) -> Any:
        from torch import nn

        c = config
        if c.op in ("batch_norm", "instance_norm"):
            if not c.native_defaults and not c.unbiased and c.track_running_stats:
                raise Unsupported("torch.nn stores the unbiased running variance only")
            lowest = 2 if c.op == "batch_norm" else 3
            if not lowest <= ndim <= 5:
                raise Unsupported(f"no torch.nn layer for {ndim}-D input")
            if not c.native_defaults and c.axis != 1 and not c.channels_last:
                raise Unsupported("torch.nn takes the channel axis 1 (or a moved last axis)")
            d = max(ndim - 2, 1)
            cls = {"batch_norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}.get(
                c.op, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
            )[d - 1]
            if c.native_defaults:
                return cls(c.shape[1])
            return cls(
                c.num_channels,
                eps=c.eps,
                momentum=c.momentum,
                affine=c.affine,
                track_running_stats=c.track_running_stats,
            )
        if c.op == "group_norm":
            if not c.native_defaults and c.axis != 1 and not c.channels_last:
                raise Unsupported("torch.nn.GroupNorm takes the channel axis 1")
            if c.native_defaults:
                return nn.GroupNorm(c.groups, c.shape[1])
            return nn.GroupNorm(c.groups, c.num_channels, eps=c.eps, affine=c.affine)
        if not c.trailing_axes and not c.native_defaults:
            raise Unsupported("torch.nn normalizes trailing axes only")
        shape = c.normalized_shape if not c.native_defaults else (c.shape[-1],)
        if c.op == "layer_norm":
            if c.native_defaults:
                return nn.LayerNorm(shape)
            return nn.LayerNorm(shape, eps=c.eps, elementwise_affine=c.affine, bias=c.bias)
        if c.native_defaults:
            return nn.RMSNorm(shape)
        if c.weight_offset:
            raise Unsupported("torch.nn.RMSNorm has no weight offset")
        if c.cast_before_weight and c.dtype in ("float16", "bfloat16") and c.affine:
            raise Unsupported("torch.nn.RMSNorm rounds after the weight")
        return nn.RMSNorm(shape, eps=c.eps, elementwise_affine=c.affine)


def adapters() -> list[Adapter]:
    """``torch.nn`` with contiguous input, and with channels-last memory."""
    return [TorchNN(), TorchNN(channels_last=True)]
