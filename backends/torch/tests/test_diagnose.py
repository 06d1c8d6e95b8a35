"""normkit.testtime.diagnose on PyTorch models: each batch norm's data statistics, mean shift,
log variance ratio and KL against a float64 computation from its input captured by hooks of
this test (the batch norms normalizing with batch statistics, dropout off), in model order;
the model unchanged afterwards (buffers, buffer objects, modes, momenta, counters, hooks); bad
input refused with the model unchanged. The float64 oracle and its bounds are
:func:`normkit.testing.testtime.assert_shift_matches`'s."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from capture import captured_inputs
from torch import nn

import normkit_torch
from normkit.testing.testtime import assert_shift_matches
from normkit.testtime.diagnose import diagnose


def model(bn: type = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), bn(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 5, 1), bn(5), nn.Flatten()
    )


def batches(
    sizes: tuple[int, ...], loc: float = 0.0, scale: float = 1.0, seed: int = 1
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) * scale + loc for n in sizes]


def trained(m: nn.Sequential) -> nn.Sequential:
    m.train()
    for x in batches((8,) * 6, seed=2):
        m(x)
    return m


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_unchanged(m: nn.Module, before: dict[str, torch.Tensor], modes: list[bool]) -> None:
    after = state(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [module.training for module in m.modules()] == modes
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in m.modules())


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, normkit_torch.BatchNorm2d], ids=["torch.nn", "drop-in"])
def test_every_batch_norm_against_the_float64_statistics_of_its_input(bn: type) -> None:
    m = trained(model(bn))
    data = batches((2, 5, 1, 11), loc=1.0, scale=2.0)  # a shifted, wider domain, unequal batches
    report = diagnose(m, [(x, torch.zeros(len(x))) for x in data], progress=False)
    assert [layer.name for layer in report.layers] == ["1", "5"]
    inputs = captured_inputs(m, data)
    for layer in report.layers:
        bn = m.get_submodule(layer.name)  # torch stores the unbiased variance
        assert_shift_matches(
            layer, inputs[layer.name], bn.running_mean.double().numpy(), bn.running_var.double().numpy(),
            float(bn.eps), ddof=1,
        )  # fmt: skip
    assert report.layers[0].mean_kl > 0.1  # the shift shows


def test_the_model_is_unchanged_modes_momenta_counters_and_buffer_objects() -> None:
    m = trained(model())
    m[5].eval()  # a mixed state, kept
    m[1].momentum = None
    before, modes = state(m), [module.training for module in m.modules()]
    buffers = [m[1].running_mean, m[1].running_var, m[5].num_batches_tracked]
    diagnose(m, batches((4, 6), loc=3.0), progress=False)
    assert_unchanged(m, before, modes)
    assert all(
        a is b
        for a, b in zip(buffers, [m[1].running_mean, m[1].running_var, m[5].num_batches_tracked], strict=True)
    )
    assert (m[1].momentum, m[5].momentum) == (None, 0.1)


@pytest.mark.parametrize(
    ("make", "data", "error", "message"),
    [
        (lambda: nn.Sequential(nn.Linear(3, 3)), [torch.ones(2, 3)], ValueError, "no batch norm"),
        (lambda: nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), [torch.ones(2, 3)], ValueError, "no batch norm"),
        (lambda: trained(model()), [], ValueError, "batches is empty"),
        (lambda: trained(model()), [*batches((4,)), torch.ones(4, 5, 6, 6)], RuntimeError, "channels"),
    ],
    ids=["no-batch-norm", "no-running-statistics", "empty", "channel-count"],
)  # fmt: skip
def test_bad_input_is_refused_and_the_model_is_unchanged(
    make: Any, data: list[Any], error: type, message: str
) -> None:
    m = make()
    before, modes = state(m), [module.training for module in m.modules()]
    with pytest.raises(error, match=re.escape(message)):
        diagnose(m, data, progress=False)
    assert_unchanged(m, before, modes)


def test_an_uninitialized_lazy_batch_norm_is_refused_by_name_and_stays_lazy() -> None:
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=re.escape("layer '1' has no running statistics yet")):
        diagnose(m, [torch.ones(2, 3, 2, 2)], progress=False)
    assert type(m[1]) is nn.LazyBatchNorm2d and torch.nn.parameter.is_lazy(m[1].running_mean)
