"""normkit.testtime.recalibrate on PyTorch models: the stored statistics against the float64
statistics of each batch norm's input over all batches (captured by independent hooks), dropout
provably off, modes and counters restored, update_bn's rule reproduced, bad input refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from capture import captured_inputs
from torch import nn

import normkit_torch
from normkit.testing.tolerances import statistics_tolerance
from normkit.testtime import recalibrate


def model(dropout: float = 0.5, bn: type = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), bn(4), nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(4, 5, 1), bn(5), nn.Flatten()
    )


def batches(sizes: tuple[int, ...], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) * 2 + 3 for n in sizes]


def trained(m: nn.Sequential) -> nn.Sequential:
    m.train()
    for x in batches((8,) * 4, seed=2):
        m(x)
    return m


def assert_population(m: nn.Sequential, inputs: dict[str, np.ndarray]) -> None:
    modules = dict(m.named_modules())
    for name, values in inputs.items():
        magnitude = float(np.abs(values).max())
        for key, expected, statistic in (
            ("running_mean", values.mean(0), "mean"),
            ("running_var", values.var(0, ddof=1), "var"),
        ):
            got = getattr(modules[name], key).double().numpy()
            np.testing.assert_allclose(
                got, expected, **statistics_tolerance("float32", statistic, magnitude).kwargs
            )


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, normkit_torch.BatchNorm2d], ids=["torch.nn", "drop-in"])
def test_population_statistics_over_unequal_batches_with_dropout_off(bn: type) -> None:
    m = trained(model(bn=bn))
    data = batches((2, 5, 1, 11))
    recalibrate(m, data)
    assert_population(m, captured_inputs(m, data, dropout_on=False))
    with pytest.raises(AssertionError):  # had dropout been on, the second layer's input differs
        assert_population(m, captured_inputs(m, data, dropout_on=True))


def test_modes_momenta_counters_and_buffer_objects_are_kept() -> None:
    m = trained(model())
    m[3].eval()  # a mixed state, kept as it was
    modes = [module.training for module in m.modules()]
    counters = [m[1].num_batches_tracked.item(), m[5].num_batches_tracked.item()]
    buffers = [m[1].running_mean, m[5].running_var]
    momenta = [m[1].momentum, m[5].momentum]
    parameters = [p.detach().clone() for p in m.parameters()]
    recalibrate(m, [(x, torch.zeros(len(x))) for x in batches((4, 6))])
    assert [module.training for module in m.modules()] == modes
    assert [m[1].num_batches_tracked.item(), m[5].num_batches_tracked.item()] == counters
    assert m[1].running_mean is buffers[0] and m[5].running_var is buffers[1]
    assert [m[1].momentum, m[5].momentum] == momenta
    for before, after in zip(parameters, m.parameters(), strict=True):
        assert torch.equal(before, after)


def test_batch_average_is_update_bn() -> None:
    """On a model without dropout (update_bn puts the whole model in train mode)."""
    m = trained(model(dropout=0.0))
    theirs = copy.deepcopy(m)
    data = batches((2, 3, 7, 4))
    recalibrate(m, data, estimator="batch-average")
    torch.optim.swa_utils.update_bn(data, theirs)
    inputs = captured_inputs(theirs, data, dropout_on=False)  # each layer's largest input value
    for name, ours, reference in (("1", m[1], theirs[1]), ("5", m[5], theirs[5])):
        magnitude = float(np.abs(inputs[name]).max())
        for key, statistic in (("running_mean", "mean"), ("running_var", "var")):
            tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
            torch.testing.assert_close(getattr(ours, key), getattr(reference, key), **tolerance.kwargs)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize(
    ("make", "data", "error", "message"),
    [
        (lambda: nn.Sequential(nn.Linear(3, 3)), [torch.ones(2, 3)], ValueError, "no batch norm"),
        (lambda: trained(model()), [], ValueError, "batches is empty"),
        (lambda: trained(model()), [*batches((4,)), torch.ones(4, 5, 6, 6)], RuntimeError, "channels"),
        (
            lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)),
            [*batches((4,)), torch.ones(4, 5, 6, 6)],
            ValueError,
            r"batch 2: layer '0' got an input of shape \(4, 5, 6, 6\) with 5 channels on axis 1; expected 3",
        ),
    ],
    ids=["no-batch-norm", "empty", "channel-count-at-a-conv", "channel-count-at-a-batch-norm"],
)
def test_bad_input_is_refused_and_the_model_is_unchanged(make, data, error, message) -> None:
    m = make()
    before, modes = state(m), [module.training for module in m.modules()]
    with pytest.raises(error, match=message):
        recalibrate(m, data)
    after = state(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [module.training for module in m.modules()] == modes
    assert not any(module._forward_pre_hooks for module in m.modules())


def instance_model(instance_norm: type) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), instance_norm(4, affine=True, track_running_stats=True), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5),
    )  # fmt: skip


@pytest.mark.parametrize(
    "instance_norm", [nn.InstanceNorm2d, normkit_torch.InstanceNorm2d], ids=["torch.nn", "drop-in"]
)
def test_instance_norm_with_running_statistics_averages_every_samples_statistics(instance_norm: type) -> None:
    """update_bn skips instance norms; recalibrate sets their running statistics to the average
    over every sample of the sample's mean and unbiased variance (what their training updates
    average), from float64 inputs captured by this test's hooks."""
    m = trained(instance_model(instance_norm))
    data = batches((2, 5, 3))
    with torch.no_grad():  # the instance norm's input: the first convolution's output
        per_sample = [m[0](x).double().numpy() for x in data]
    values = np.concatenate(per_sample)  # (samples, C, H, W)
    counter = m[1].num_batches_tracked.clone()
    merged = recalibrate(m, data, progress=False)
    magnitude = float(np.abs(values).max())
    expected = {
        "running_mean": values.mean(axis=(2, 3)).mean(0),
        "running_var": values.var(axis=(2, 3), ddof=1).mean(0),
    }
    for key, statistic in (("running_mean", "mean"), ("running_var", "var")):
        tolerance = statistics_tolerance("float32", statistic, magnitude)
        np.testing.assert_allclose(getattr(m[1], key).double().numpy(), expected[key], **tolerance.kwargs)
    assert torch.equal(m[1].num_batches_tracked, counter)
    np.testing.assert_array_equal(merged["1"].count, [10 * 16] * 4)  # every value, pooled
    np.testing.assert_allclose(
        merged["1"].mean,
        values.mean(axis=(0, 2, 3)),
        **statistics_tolerance("float32", "mean", magnitude).kwargs,
    )


def test_instance_norm_batch_average_is_torchs_cumulative_average() -> None:
    """estimator='batch-average' on an instance norm equals the layer's own training updates
    averaged cumulatively over the batches (momentum 1/k at batch k) from reset statistics."""
    m = trained(instance_model(nn.InstanceNorm2d))
    data = batches((2, 5, 3))
    oracle = copy.deepcopy(m[1])
    oracle.reset_running_stats()
    oracle.train()
    with torch.no_grad():
        for k, x in enumerate(data, start=1):
            # the cumulative average; momentum=None is no such thing for torch's instance norms:
            # _InstanceNorm.forward passes it on as 0.0, so their statistics would never move
            oracle.momentum = 1.0 / k
            oracle(m[0](x))
    recalibrate(m, data, estimator="batch-average", progress=False)
    with torch.no_grad():
        magnitude = float(max(m[0](x).abs().max() for x in data))
    for key, statistic in (("running_mean", "mean"), ("running_var", "var")):
        tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
        torch.testing.assert_close(getattr(m[1], key), getattr(oracle, key), **tolerance.kwargs)


def test_a_data_loader_of_inputs_and_labels() -> None:
    """A DataLoader yields [x, y] lists: the first element is the input, and the statistics
    are those of every input, the last batch shorter."""
    from torch.utils.data import DataLoader, TensorDataset

    m = trained(model(dropout=0.0))
    x = torch.cat(batches((13,)))
    loader = DataLoader(TensorDataset(x, torch.zeros(13)), batch_size=4)
    recalibrate(m, loader, progress=False)
    inputs = captured_inputs(m, [x], dropout_on=False)["1"]
    np.testing.assert_allclose(
        m[1].running_mean.double().numpy(),
        inputs.mean(0),
        **statistics_tolerance("float32", "mean", float(np.abs(inputs).max())).kwargs,
    )


def test_a_last_batch_of_one_sample_is_refused_with_what_to_do() -> None:
    """torch's BatchNorm1d cannot normalize one value per channel with batch statistics: the
    message names the batch and the remedy (drop_last), and the model is unchanged."""
    from torch.utils.data import DataLoader, TensorDataset

    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = state(m)
    loader = DataLoader(TensorDataset(torch.randn(9, 3)), batch_size=4)
    with pytest.raises(ValueError, match=r"batch 3: layer '1' gets one value per channel .* drop_last=True"):
        recalibrate(m, loader, progress=False)
    after = state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    recalibrate(m, DataLoader(TensorDataset(torch.randn(9, 3)), batch_size=4, drop_last=True), progress=False)
