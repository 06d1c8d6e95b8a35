r"""Frozen batch norm: batch norm with its statistics and affine fixed, a constant per-channel
affine map in training and eval alike (torchvision's ``FrozenBatchNorm2d``, detectron2's
``FrozenBatchNorm2d``), for fine-tuning with batches too small for batch statistics.

.. math::

   s = \gamma\,(\sigma^2_{\text{running}} + \epsilon)^{-1/2}, \qquad
   t = \beta - \mu_{\text{running}}\,s, \qquad y = x\,s + t

per channel (channels on dimension 1), computed as torchvision computes it, in the buffers'
dtype. The state dict has torchvision's keys (``weight``, ``bias``, ``running_mean``,
``running_var``; a ``num_batches_tracked`` in a loaded state is dropped), and ``eps`` is the
frozen layer's own (torchvision's default changed from none to 0 to 1e-5 over its history:
:func:`FrozenBatchNorm.from_batch_norm` takes the layer's, so eval outputs do not change).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_model",
]


class FrozenBatchNorm(nn.Module):
    r""":math:`y = x\,s + t` with :math:`s = \gamma/\sqrt{\sigma^2+\epsilon}`,
    :math:`t = \beta - \mu s` per channel on dimension 1, for input of any rank >= 2.

    :param num_features: channels ``C``.
    :param eps: ε, added to the running variance (default 1e-5, torchvision's).
    :param trainable: γ and β as parameters (fine-tuned; the statistics stay fixed) instead of
        buffers.
    """

    _ranks: ClassVar[tuple[int, ...] | None] = None  # any rank >= 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        trainable: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features={num_features!r}: expected a positive int")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps={eps!r}: expected a number >= 0")
        self.num_features, self.eps, self.trainable = num_features, float(eps), bool(trainable)
        options = {"device": device, "dtype": dtype}
        weight, bias = torch.ones(num_features, **options), torch.zeros(num_features, **options)
        if trainable:
            self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        self.register_buffer("running_mean", torch.zeros(num_features, **options))
        self.register_buffer("running_var", torch.ones(num_features, **options))

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, *, trainable: bool = False) -> FrozenBatchNorm:
        """The frozen form of ``bn`` (any ``torch.nn`` batch norm with running statistics): its
        eps, running statistics, γ and β (1 and 0 without affine), dtype and device."""
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"bn is a {type(bn).__name__}; expected a torch.nn batch norm")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"bn is a {type(bn).__name__} without running statistics (track_running_stats=False): "
                f"nothing to freeze"
            )
        frozen = cls(
            bn.num_features,
            float(bn.eps),
            trainable=trainable,
            device=bn.running_mean.device,
            dtype=bn.running_mean.dtype,
        )
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a batch norm's state loads
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or (self._ranks is not None and x.dim() not in self._ranks):
            expected = "at least 2-D" if self._ranks is None else " or ".join(f"{r}-D" for r in self._ranks)
            raise ValueError(f"expected {expected} input (got {x.dim()}-D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"input has shape {tuple(x.shape)}: {x.shape[1]} channels on dimension 1, "
                f"expected {self.num_features} (num_features)"
            )
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w, b = self.weight.reshape(shape), self.bias.reshape(shape)
        rv, rm = self.running_var.reshape(shape), self.running_mean.reshape(shape)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        if x.dtype != scale.dtype and x.dtype.is_floating_point:  # half input, float32 state
            return (x * scale + shift).to(x.dtype)
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (", trainable=True" if self.trainable else "")


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input."""

    _ranks = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, H, W)`` input: torchvision's ``FrozenBatchNorm2d``."""

    _ranks = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, D, H, W)`` input."""

    _ranks = (5,)


def _frozen_class(bn: _BatchNorm) -> type[FrozenBatchNorm]:
    for base, frozen in (
        (nn.BatchNorm1d, FrozenBatchNorm1d),
        (nn.BatchNorm2d, FrozenBatchNorm2d),
        (nn.BatchNorm3d, FrozenBatchNorm3d),
    ):
        if isinstance(bn, base):
            return frozen
    return FrozenBatchNorm  # SyncBatchNorm and other batch norms: any rank


def freeze_model(model: nn.Module, *, trainable: bool = False) -> nn.Module:
    """A copy of ``model`` with every batch norm replaced by its :class:`FrozenBatchNorm`
    (``BatchNorm2d`` → :class:`FrozenBatchNorm2d`, and so on); ``model`` is unchanged.

    :raises ValueError: for a model without batch norm, or with one that has no running
        statistics (named).
    """
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
    if not found:
        raise ValueError(f"model is a {type(model).__name__} with no batch norm; nothing to freeze")
    stateless = [name or "model" for name, module in found if module.running_mean is None]
    if stateless:
        raise ValueError(
            f"batch norm(s) {stateless} have no running statistics (track_running_stats=False): "
            f"there is nothing to freeze them with"
        )
    frozen_model = copy.deepcopy(model)
    if isinstance(frozen_model, _BatchNorm):
        return _frozen_class(frozen_model).from_batch_norm(frozen_model, trainable=trainable)
    for name, module in list(frozen_model.named_modules()):
        if isinstance(module, _BatchNorm):
            parent_name, _, child = name.rpartition(".")
            parent = frozen_model.get_submodule(parent_name)
            setattr(parent, child, _frozen_class(module).from_batch_norm(module, trainable=trainable))
    return frozen_model
