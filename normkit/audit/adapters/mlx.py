r"""MLX's normalization layers (``mlx.nn``) on the CPU.

Native semantics (mlx 0.32, ``mlx/nn/layers/normalization.py``); every layer is channels-last:

* ``BatchNorm(C, eps, momentum, affine, track_running_stats)``: ``momentum`` is PyTorch's
  (the weight of the batch), passed unchanged; the running variance is the **unbiased** one
  (``mx.var(..., ddof=1)``), so ``config.unbiased=False`` is ``n/a``, and there is no
  cumulative average (``momentum=None`` is ``n/a``). Statistics in ``x``'s dtype; training on
  one value per channel raises. It takes 2- to 4-D input: a channel-first case is moved to
  channels-last and a 5-D one has its spatial axes merged into one (pure data movement).
* ``InstanceNorm(C, eps, affine)``: ``mx.fast.layer_norm`` over the spatial axes; no running
  statistics (a tracked case is ``n/a``); at least 3-D input.
* ``LayerNorm(D, eps, affine, bias)`` and ``RMSNorm(D, eps)`` are ``mx.fast.layer_norm`` and
  ``mx.fast.rms_norm`` over the last axis: the case's ``axes`` are moved to the end and merged
  into one (their weight flattened to match), and moved back. ``RMSNorm`` always has a weight;
  a case without one calls ``mx.fast.rms_norm(x, None, eps)``, which ``RMSNorm`` wraps. No
  weight offset; a half-precision case rounding *before* the weight is ``n/a`` (the fused
  kernel applies the weight first).
* ``GroupNorm(G, C, eps, affine, pytorch_compatible=False)``: by default the groups are
  **interleaved** (channel ``c`` in group ``c % G``) and mean and variance computed in ``x``'s
  dtype; ``pytorch_compatible=True`` takes contiguous groups (normkit's and PyTorch's) through
  ``mx.fast.layer_norm``. The default adapter audits the default, which is what users get; a
  second adapter audits ``pytorch_compatible=True`` (group norm only).

State: weights and running statistics are loaded as ``mx.array``\ s of the case's state dtype
(float32, or float64 for a float64 case: MLX has float64 on the CPU only). Half-precision input
with float32 weights is promoted by MLX to a float32 output: the audit reports it. Outputs come
back as NumPy arrays of MLX's dtype (bfloat16 as ``ml_dtypes.bfloat16``). Everything runs on
``mx.cpu``.

``native_defaults``: sizes, groups and affine flags only (eps 1e-5, momentum 0.1), channels
last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported, refuse_fixed_choices

__all__ = ["MLXLayer", "adapters"]

_HALF = ("float16", "bfloat16")


def _check(config: Config) -> None:
    c = config
    if c.op == "batch_norm" and len(c.shape) > 5:
        raise Unsupported(
            f"mlx.nn.BatchNorm takes 2- to 4-D input (5-D with its spatial axes merged); got {len(c.shape)}-D"
        )
    if c.op == "instance_norm" and len(c.shape) < 3:
        raise Unsupported(f"mlx.nn.InstanceNorm takes input of at least 3 dimensions; got {len(c.shape)}")
    if c.op == "instance_norm" and c.track_running_stats:
        raise Unsupported("mlx.nn.InstanceNorm keeps no running statistics")
    refuse_fixed_choices(c, "mlx.nn", running_var="unbiased")


def _array(value: np.ndarray) -> Any:
    """An ``mx.array`` of ``value``'s dtype (``mx.array`` would make float64 float32)."""
    import mlx.core as mx

    dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32, "float64": mx.float64}
    return mx.array(np.ascontiguousarray(value), dtype=dtype[value.dtype.name])


def _numpy(array: Any) -> np.ndarray:
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        import ml_dtypes

        return np.array(array.astype(mx.float32)).astype(ml_dtypes.bfloat16)
    return np.array(array)


class _Layer:
    """A built ``mlx.nn`` module fed channels-last (or axes-last) arrays on the CPU."""

    def __init__(self, config: Config, module: Any, call: Any) -> None:
        self.config = config
        self.module = module
        self.call = call

    def _layout(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """``x`` in the module's layout, and the function that undoes it."""
        c = self.config
        if c.op in ("layer_norm", "rms_norm"):
            axes = (x.ndim - 1,) if c.native_defaults else c.axes
            order = tuple(a for a in range(x.ndim) if a not in axes) + tuple(axes)
            moved = np.transpose(x, order)
            kept = moved.shape[: x.ndim - len(axes)]
            rows = moved.reshape(*kept, math.prod(moved.shape[len(kept) :]))
            return rows, lambda y: np.transpose(y.reshape(moved.shape), np.argsort(order))
        axis = x.ndim - 1 if c.native_defaults else c.axis
        moved = np.moveaxis(x, axis, -1)
        if c.op == "batch_norm" and x.ndim == 5:
            merged = moved.reshape(moved.shape[0], math.prod(moved.shape[1:4]), moved.shape[4])
            return merged, lambda y: np.moveaxis(y.reshape(moved.shape), -1, axis)
        return moved, lambda y: np.moveaxis(y, -1, axis)

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        import mlx.core as mx

        moved, restore = self._layout(x)
        with mx.stream(mx.cpu):
            self.module.train(training)
            y = self.call(_array(moved))
            mx.eval(y)
        return restore(_numpy(y))

    def running_stats(self) -> dict[str, np.ndarray]:
        return {
            "running_mean": _numpy(self.module.running_mean),
            "running_var": _numpy(self.module.running_var),
        }


class MLXLayer(Adapter):
    """``mlx.nn`` layers on the CPU; ``pytorch_compatible`` is ``GroupNorm``'s."""

    requires: ClassVar[tuple[str, ...]] = ("mlx",)

    def __init__(self, pytorch_compatible: bool = False) -> None:
        self.pytorch_compatible = pytorch_compatible
        if pytorch_compatible:
            self.name = "mlx (cpu, GroupNorm pytorch_compatible=True)"
            self.ops = ("group_norm",)
        else:
            self.name = "mlx (cpu)"
            self.ops = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm")
        self.description = f"mlx.nn layers on mx.cpu, GroupNorm pytorch_compatible={pytorch_compatible}"

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> _Layer:
        if config.op not in self.ops:
            raise Unsupported(f"{self.name} has no {config.op}")
        _check(config)
        import mlx.core as mx

        with mx.stream(mx.cpu):
            module, call = self._module(config)
            for key, value in state.items():
                if key in module:
                    module[key] = _array(value.reshape(-1))
        return _Layer(config, module, call)

    def _module(self, config: Config) -> tuple[Any, Any]:
        import mlx.core as mx
        from mlx import nn

        c = config
        native = c.native_defaults
        channels = c.shape[-1] if native else c.num_channels
        eps = {} if native else {"eps": c.eps}
        if c.op == "batch_norm":
            options = {} if native else {"momentum": c.momentum, "track_running_stats": c.track_running_stats}
            module = nn.BatchNorm(channels, affine=c.affine, **eps, **options)
        elif c.op == "instance_norm":
            module = nn.InstanceNorm(channels, affine=c.affine, **eps)
        elif c.op == "group_norm":
            module = nn.GroupNorm(
                c.groups, channels, affine=c.affine, pytorch_compatible=self.pytorch_compatible, **eps
            )
        else:
            size = c.shape[-1] if native else math.prod(c.normalized_shape)
            if c.op == "layer_norm":
                module = nn.LayerNorm(size, affine=c.affine, bias=c.affine and c.bias, **eps)
            elif c.affine:
                module = nn.RMSNorm(size, **eps)
            else:
                module = nn.Module()
                epsilon = 1e-5 if native else c.eps
                return module, lambda x: mx.fast.rms_norm(x, None, epsilon)
        return module, module


def adapters() -> list[Adapter]:
    """``mlx.nn`` as it comes (interleaved groups), and ``GroupNorm(pytorch_compatible=True)``."""
    return [MLXLayer(), MLXLayer(pytorch_compatible=True)]
