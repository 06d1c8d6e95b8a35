r"""Freezing: every batch norm of a model becomes a fixed per-channel affine map with the
layer's own eps (torchvision's ``FrozenBatchNorm2d`` semantics),

.. math::

   y = x\,s + t, \qquad s = \frac{\gamma}{\sqrt{\sigma^2_{\text{running}} + \epsilon}}, \qquad
   t = \beta - \mu_{\text{running}}\,s ,

the same in training and eval and independent of the batch — for fine-tuning with batches too
small for batch statistics (detection backbones: one or two images per device). γ and β stay
trainable or not, by choice; the running statistics never change.

PyTorch models get ``normkit_torch.FrozenBatchNorm1d/2d/3d`` (torchvision's state-dict keys);
Keras models ``normkit_tensorflow.FrozenBatchNormalization``.
"""

from __future__ import annotations

import importlib
from typing import Any

from normkit.testtime.sites import _framework

__all__ = ["freeze"]

FREEZERS = {
    "torch": ("normkit_torch.frozen", "normkit-torch"),
    "keras": ("normkit_tensorflow.frozen", "normkit-tensorflow"),
    "tensorflow": ("normkit_tensorflow.frozen", "normkit-tensorflow"),
}
"""Where each framework's implementation lives, and the distribution that provides it."""


def freeze(model: Any, *, trainable: bool = False) -> Any:
    """A copy of ``model`` whose batch norms are frozen affine maps (module docstring); the
    original is unchanged.

    :param model: a PyTorch module or a Keras model (Sequential or functional).
    :param trainable: keep γ and β trainable (parameters) instead of constants.
    :raises ValueError: for a model without batch norm, or a batch norm without running
        statistics.
    :raises TypeError: for a model of another kind (normkit's own layers: use
        ``BatchNorm.eval()``, which is the same map).
    """
    framework = _framework(model)
    if framework not in FREEZERS:
        raise TypeError(
            f"model is a {type(model).__module__}.{type(model).__qualname__}; freeze takes a PyTorch module or "
            f"a Keras model (a normkit BatchNorm in eval mode is already this affine map)"
        )
    module, distribution = FREEZERS[framework]
    try:
        implementation = importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise TypeError(
            f"model is a {framework} model; install {distribution} to freeze it ({error})"
        ) from None
    return implementation.freeze_model(model, trainable=trainable)
