r"""Freezing: every batch norm of a model becomes a fixed per-channel affine map with the
layer's own eps (torchvision's ``FrozenBatchNorm2d`` semantics),

.. math::

   y = x\,s + t, \qquad s = \frac{\gamma}{\sqrt{\sigma^2_{\text{running}} + \epsilon}}, \qquad
   t = \beta - \mu_{\text{running}}\,s ,

the same in training and eval and independent of the batch — for fine-tuning with batches too
small for batch statistics (detection backbones: one or two images per device). γ and β stay
trainable or not, by choice; the running statistics never change.

PyTorch models get ``normkit_torch.FrozenBatchNorm1d/2d/3d`` (torchvision's state-dict keys);
Keras models ``normkit_tensorflow.FrozenBatchNormalization``; normkit's own layers
:class:`~normkit.FrozenBatchNorm`.
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Any

from normkit.layers.channel_norm import BatchNorm, FrozenBatchNorm
from normkit.testtime.sites import find_batch_norms, framework_module

__all__ = ["freeze"]


def _freeze_normkit(model: Any) -> Any:
    """A copy of normkit layers (one layer, a mapping, list or tuple of them, or an object
    holding them as attributes) with every tracking :class:`~normkit.BatchNorm` frozen."""
    found = find_batch_norms(model)
    if not found:
        raise ValueError(
            f"model is a {type(model).__name__} with no batch norm that tracks running statistics; nothing to freeze"
        )
    stateless = [name or "the layer" for name, layer in found.items() if layer._state is None]
    if stateless:
        raise ValueError(
            f"batch norm(s) {stateless} have no running statistics yet: nothing to freeze them with"
        )
    copied = copy.deepcopy(model)
    frozen = {
        name: FrozenBatchNorm.from_batch_norm(layer) for name, layer in find_batch_norms(copied).items()
    }
    if isinstance(copied, BatchNorm):
        return frozen[""]
    if isinstance(copied, tuple):
        return type(copied)(frozen.get(str(i), item) for i, item in enumerate(copied))
    for name, layer in frozen.items():
        if isinstance(copied, (MutableMapping, list)):
            key: Any = int(name) if isinstance(copied, list) else next(k for k in copied if str(k) == name)
            copied[key] = layer
        else:
            setattr(copied, name, layer)
    return copied


def freeze(model: Any, *, trainable: bool = False) -> Any:
    """A copy of ``model`` whose batch norms are frozen affine maps (module docstring); the
    original is unchanged.

    :param model: a PyTorch module, a Keras model (Sequential or functional), or normkit
        :class:`~normkit.BatchNorm` layers (one layer, a mapping, list or tuple of them, or an
        object holding them as attributes), which become :class:`~normkit.FrozenBatchNorm`.
    :param trainable: keep γ and β trainable (parameters) instead of constants (PyTorch and
        Keras; normkit's arrays are the caller's to update either way).
    :raises ValueError: for a model without batch norm, or a batch norm without running
        statistics.
    :raises TypeError: for a model of a framework without an implementation installed.
    """
    implementation = framework_module(model, "frozen", "freeze it")
    if implementation is None:
        return _freeze_normkit(model)
    return implementation.freeze_model(model, trainable=trainable)
