"""normkit.testtime.prior_mixing on PyTorch models: each batch norm's eval output against the
float64 formula (normkit.testing.testtime) on its own input, captured by hooks of this test,
for N in {0, 16, inf} and n in {1, 2, 64}; N=inf bit-identical to standard eval; training
mode, buffers and removal; bad input refused with the model unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import normkit_torch
from normkit.testing.testtime import prior_mixed_reference, prior_mixing_bound
from normkit.testing.tolerances import assert_within
from normkit.testtime import prior_mixing


def model(bn: type = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.ReLU(), nn.Conv2d(4, 5, 1), bn(5, affine=False))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
        m[1].bias.copy_(torch.tensor([0.25, 0.0, -0.5, 1.0]))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        m(torch.randn(8, 3, 6, 6, generator=g))
    return m.eval()


def run_capturing(m: nn.Module, x: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each batch norm's (input, output) in this call, by name, from forward hooks."""
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    handles = []
    for name, module in m.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def grab(
                mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, name: str = name
            ) -> None:
                seen[name] = (inputs[0].detach().double().numpy(), output.detach().double().numpy())

            handles.append(module.register_forward_hook(grab))
    with torch.no_grad():
        m(x)
    for handle in handles:
        handle.remove()
    return seen


def numpy_or_none(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, normkit_torch.BatchNorm2d], ids=["torch.nn", "drop-in"])
@pytest.mark.parametrize("N", [0, 16, math.inf])
@pytest.mark.parametrize("n", [1, 2, 64])
def test_every_batch_norm_follows_the_formula(bn: type, N: float, n: int) -> None:
    m = model(bn)
    x = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(n)) * 3 + 2  # a shifted domain
    with torch.no_grad():
        plain = m(x)
    with prior_mixing(m, N):
        seen = run_capturing(m, x)
        with torch.no_grad():
            mixed = m(x)
    if math.isinf(N):
        assert torch.equal(mixed, plain)  # standard eval, bit for bit
    modules = dict(m.named_modules())
    for name, (layer_input, layer_output) in seen.items():
        layer = modules[name]
        weight = numpy_or_none(layer.weight)
        ref, mean, var = prior_mixed_reference(
            layer_input, numpy_or_none(layer.running_mean), numpy_or_none(layer.running_var), weight,
            numpy_or_none(layer.bias), eps=layer.eps, axis=1, N=N,
        )  # fmt: skip
        bound = prior_mixing_bound(layer_input, ref, mean, var, weight, eps=layer.eps, axis=1, N=N)
        assert_within(np.abs(layer_output - ref), bound, f"layer {name}, N={N}, n={n}")
    with torch.no_grad():
        assert torch.equal(m(x), plain)  # removed on leaving the block


def test_buffers_training_mode_and_gradients() -> None:
    m, reference = model(), model()
    buffers = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    handle = prior_mixing(m, 16)
    m(x).sum().backward()  # eval mixing is differentiable in γ and β (test-time adaptation)
    assert m[1].weight.grad is not None and torch.isfinite(m[1].weight.grad).all()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in buffers.items())  # eval updates nothing
    m.train(), reference.train()
    assert torch.equal(m(x), reference(x))  # training is unchanged
    assert torch.equal(m[1].running_mean, reference[1].running_mean)
    handle.remove()
    assert "forward" not in m[1].__dict__


@pytest.mark.parametrize(
    ("make", "N", "message"),
    [
        (lambda: nn.Sequential(nn.Linear(3, 3)), 0, "no batch norm that tracks running statistics"),
        (lambda: nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), 0, "no batch norm"),
        (model, -1, r"N=-1: expected a number >= 0"),
        (model, float("nan"), r"N=nan: expected a number >= 0"),
    ],
    ids=["no-batch-norm", "no-running-stats", "negative", "nan"],
)
def test_bad_input_is_refused_and_the_model_is_unchanged(make, N: float, message: str) -> None:
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prior_mixing(m, N)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not any("forward" in module.__dict__ for module in m.modules())


def test_one_sample_of_batchnorm1d_has_no_batch_variance() -> None:
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(8, 3))
    bn.eval()
    with prior_mixing(bn, 16), pytest.raises(ValueError, match="1 value per channel"):
        bn(torch.randn(1, 3))
    with prior_mixing(bn, math.inf):
        bn(torch.randn(1, 3))
