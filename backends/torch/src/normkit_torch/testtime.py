r"""The PyTorch adapter of :mod:`normkit.testtime`: a model's batch norms as sites.

Every ``torch.nn`` batch norm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the ``normkit_torch``
drop-ins, anything subclassing ``torch.nn.modules.batchnorm._BatchNorm``) and every instance
norm (``InstanceNorm1d/2d/3d``, drop-ins included) that tracks running statistics is a site;
an instance norm records each sample's moments (its running statistics average them). While recording, the model is in eval mode (dropout and every other
training-only behaviour off) except the sites, which normalize with batch statistics as in
training, under ``torch.no_grad()``; a forward pre-hook records the moments of each site's input
(channels on dimension 1) with normkit's torch kernels. Afterwards every module's mode, each
site's momentum and ``num_batches_tracked`` are as before, and the new statistics are copied
into the existing buffers (references to them stay valid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normkit.testtime.sites import EvalForward, LayerView, Recorder

__all__ = ["ADAPTER", "TorchAdapter", "TorchSite"]


class TorchSite:
    """One ``torch.nn`` batch norm, or instance norm, with running statistics."""

    def __init__(self, name: str, module: _BatchNorm | _InstanceNorm) -> None:
        self.name, self.module = name, module
        self.per_instance = isinstance(module, _InstanceNorm)
        self.unbiased = getattr(module, "running_var_estimator", "unbiased") == "unbiased"
        self.eps = float(module.eps)
        self.channels = int(module.num_features)
        self._saved: dict[str, Any] = {}
        self._hook: Any = None

    def running(self) -> tuple[np.ndarray, np.ndarray] | None:
        if nn.parameter.is_lazy(self.module.running_mean):  # a Lazy* layer before its first input
            return None
        saved = self._saved or {
            "running_mean": self.module.running_mean,
            "running_var": self.module.running_var,
        }
        return self.to_numpy(saved["running_mean"]), self.to_numpy(saved["running_var"])

    def attach(self, recorder: Recorder) -> None:
        module = self.module
        recorder.channels = self.channels
        self._saved = {  # the modes are the adapter's to restore (TorchAdapter.running)
            "running_mean": module.running_mean.detach().clone(),
            "running_var": module.running_var.detach().clone(),
            "num_batches_tracked": None
            if module.num_batches_tracked is None
            else module.num_batches_tracked.detach().clone(),
        }

        def record(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            single = x.dim() >= 2 and x.numel() == x.shape[1]
            if single and not self.per_instance and not getattr(self.module, "allow_single_value", False):
                raise ValueError(
                    f"batch {recorder.batch}: layer {self.name!r} gets one value per channel (input of shape "
                    f"{tuple(x.shape)}), which a batch norm cannot normalize with batch statistics; "
                    f"drop such batches (a DataLoader's drop_last=True)"
                )
            recorder(x, 1)

        self._hook = module.register_forward_pre_hook(record)
        module.train()

    def _detach_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _put_back(self) -> None:
        module, saved = self.module, self._saved
        with torch.no_grad():
            module.running_mean.copy_(saved["running_mean"])
            module.running_var.copy_(saved["running_var"])
            if saved["num_batches_tracked"] is not None:
                module.num_batches_tracked.copy_(saved["num_batches_tracked"])

    def commit(self, mean: np.ndarray, var: np.ndarray) -> None:
        self._detach_hook()
        self._put_back()
        buffers = self.module.running_mean, self.module.running_var
        with torch.no_grad():
            for buffer, value in zip(buffers, (mean, var), strict=True):
                buffer.copy_(torch.from_numpy(np.asarray(value, np.float64)).to(buffer.dtype))
        self._saved = {}

    def restore(self) -> None:
        self._detach_hook()
        if self._saved:
            self._put_back()
            self._saved = {}

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array.detach().cpu().double().numpy(), np.float64)

    def substitute(self, forward: EvalForward | None) -> None:
        module = self.module
        if forward is None:
            module.__dict__.pop("forward", None)  # the class's forward again
            return
        own = type(module).forward.__get__(module)

        def eval_forward(x: torch.Tensor) -> torch.Tensor:
            if module.training:
                return own(x)
            view = LayerView(
                1, float(module.eps), module.running_mean, module.running_var, module.weight, module.bias
            )
            return forward(x, view)

        module.forward = eval_forward

    @property
    def substituted(self) -> bool:
        return "forward" in self.module.__dict__


class TorchAdapter:
    """PyTorch modules: the sites are their batch norms; the model runs as ``model(x)``."""

    def sites(self, model: object) -> dict[str, TorchSite]:
        assert isinstance(model, nn.Module)
        return {
            name: TorchSite(name, module)
            for name, module in model.named_modules()
            if isinstance(module, (_BatchNorm, _InstanceNorm))
            and module.track_running_stats
            and module.running_mean is not None
        }

    @contextlib.contextmanager
    def running(self, model: object) -> Iterator[Callable[[Any], object]]:
        assert isinstance(model, nn.Module)
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            for module, mode in modes.items():
                module.training = mode


ADAPTER = TorchAdapter()
