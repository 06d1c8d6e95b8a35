"""What the test-time tests compare with: each batch norm's input, captured by this suite's own
forward pre-hooks on a copy of the model (not by normkit's recording)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def captured_inputs(
    m: nn.Module, data: list[torch.Tensor], dropout_on: bool = False
) -> dict[str, np.ndarray]:
    """Each batch norm's inputs over all batches, ``(values, channels)`` in float64, by name: a
    copy of ``m`` runs in eval mode but for its batch norms, which normalize with batch
    statistics (momentum 0 leaves their buffers alone), and its dropout if ``dropout_on``."""
    m = copy.deepcopy(m)
    m.eval()
    seen: dict[str, list[np.ndarray]] = {}
    for name, module in m.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0

            def grab(mod: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = inputs[0].double().transpose(0, 1).reshape(inputs[0].shape[1], -1).T
                seen.setdefault(name, []).append(x.numpy())

            module.register_forward_pre_hook(grab)
        if isinstance(module, nn.Dropout) and dropout_on:
            module.train()
    with torch.no_grad():
        for x in data:
            m(x)
    return {name: np.concatenate(parts) for name, parts in seen.items()}
