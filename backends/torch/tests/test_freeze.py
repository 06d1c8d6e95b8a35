"""normkit.testtime.freeze on PyTorch models: the frozen layers against torchvision's
FrozenBatchNorm2d formula for the same state (bit for bit) and against the float64 affine map,
outputs independent of the batch in training mode, the original model's eval reproduced, γ and
β trainable by choice with the statistics fixed, torchvision's state-dict keys, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit_torch
from normkit.testing.tolerances import agreement_tolerance, centering_gain, output_tolerance
from normkit.testtime import freeze


def torchvision_frozen_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision 0.28.0, torchvision/ops/misc.py, FrozenBatchNorm2d.forward (lines 57-63),
    verbatim but for ``self`` -> ``module``: the semantics freeze promises."""
    w = module.weight.reshape(1, -1, 1, 1)
    b = module.bias.reshape(1, -1, 1, 1)
    rv = module.running_var.reshape(1, -1, 1, 1)
    rm = module.running_mean.reshape(1, -1, 1, 1)
    scale = w * (rv + module.eps).rsqrt()
    bias = b - rm * scale
    return x * scale + bias


def model(affine: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, affine=affine), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 5), normkit_torch.BatchNorm1d(5, preset="keras"),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        m(torch.randn(8, 3, 6, 6, generator=g) * 2 + 1)
    return m


def test_the_frozen_layers_follow_torchvisions_formula_and_the_float64_map() -> None:
    m = model()
    frozen = freeze(m)
    assert isinstance(frozen[1], normkit_torch.FrozenBatchNorm2d) and frozen[1].eps == 1e-3
    assert isinstance(frozen[5], normkit_torch.FrozenBatchNorm1d) and frozen[5].eps == m[5].eps
    x = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * 3
    assert torch.equal(frozen[1](x), torchvision_frozen_forward(frozen[1], x))
    s = m[1].weight.double() / torch.sqrt(m[1].running_var.double() + 1e-3)
    expected = x.double() * s.view(1, -1, 1, 1) + (m[1].bias.double() - m[1].running_mean.double() * s).view(
        1, -1, 1, 1
    )
    gain = centering_gain(m[1].running_mean.detach(), m[1].running_var.detach(), 1e-3, m[1].weight.detach())
    torch.testing.assert_close(
        frozen[1](x).double(), expected, **output_tolerance("float32", centering_gain=gain).kwargs
    )


def test_training_mode_is_batch_independent_and_reproduces_the_models_eval() -> None:
    m = model()
    frozen = freeze(m).train()
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(3)) * 2 + 1
    whole = frozen(x)
    h = frozen[0](x)  # the frozen layer's own input: each sample alone gives the same bits
    for layer in (frozen[1], copy.deepcopy(m[1]).train()):
        alone = torch.cat([layer(h[i : i + 1]) for i in range(len(h))])
        assert torch.equal(layer(h), alone) is (layer is frozen[1])  # batch norm's is batch-dependent
    with torch.no_grad():
        expected = m.eval()(x)
    gains = [
        centering_gain(bn.running_mean, bn.running_var, bn.eps, bn.weight.detach()) for bn in (m[1], m[5])
    ]
    # two implementations of the same eval map (ATen's batch norm, the frozen affine), each
    # output of the model's last layer computed from its own inputs
    torch.testing.assert_close(
        whole.detach(), expected, **agreement_tolerance("float32", centering_gain=max(gains)).kwargs
    )
    assert m.training is False and isinstance(m[1], nn.BatchNorm2d)  # the original is untouched


@pytest.mark.parametrize("trainable", [False, True])
def test_affine_trainable_by_choice_statistics_fixed(trainable: bool) -> None:
    frozen = freeze(model(), trainable=trainable)
    layer = frozen[1]
    names = {name for name, _ in frozen.named_parameters()}
    assert ({"1.weight", "1.bias"} <= names) is trainable
    statistics = (layer.running_mean.clone(), layer.running_var.clone())
    optimizer = torch.optim.SGD(frozen.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    frozen.train()(torch.randn(4, 3, 6, 6)).square().sum().backward()
    optimizer.step()
    assert torch.equal(layer.running_mean, statistics[0]) and torch.equal(layer.running_var, statistics[1])
    assert (not torch.equal(layer.weight.detach(), before)) is trainable
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var"}  # torchvision's keys


def test_a_batch_norm_state_dict_loads_and_half_input_keeps_its_dtype() -> None:
    bn = nn.BatchNorm2d(4)
    bn(torch.randn(8, 4, 3, 3) + 2)
    frozen = normkit_torch.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked dropped, as torchvision does
    assert torch.equal(frozen.running_var, bn.running_var)
    assert frozen(torch.randn(2, 4, 3, 3, dtype=torch.float16)).dtype == torch.float16
    without_affine = freeze(model(affine=False))[1]
    assert torch.equal(without_affine.weight, torch.ones(4)) and torch.equal(
        without_affine.bias, torch.zeros(4)
    )


def test_bad_input_is_refused_and_the_model_is_unchanged() -> None:
    with pytest.raises(ValueError, match="no batch norm; nothing to freeze"):
        freeze(nn.Sequential(nn.Linear(2, 2)))
    stateless = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"\['1'\] have no running statistics"):
        freeze(stateless)
    assert isinstance(stateless[1], nn.BatchNorm1d)
    with pytest.raises(ValueError, match=r"3 channels on dimension 1, expected 4"):
        normkit_torch.FrozenBatchNorm2d(4)(torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"expected 4-D input \(got 2-D input\)"):
        normkit_torch.FrozenBatchNorm2d(4)(torch.ones(1, 4))
    with pytest.raises(ValueError, match="model is a object with no batch norm"):
        freeze(object())
