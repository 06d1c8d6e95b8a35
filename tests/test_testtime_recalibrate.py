"""normkit.testtime.recalibrate on normkit's own layers: the stored statistics against the float64
statistics of every layer's input over all batches (replayed with the reference), modes and
counters restored, and bad input refused with the layers unchanged."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.testing.tolerances import statistics_tolerance
from normkit.testtime import recalibrate

W = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)


class TwoLayerModel:
    """x (N, 3) -> bn1 -> tanh -> @W -> bn2: the second layer's input depends on the first's
    training-mode output, as in a network during PreciseBN."""

    def __init__(self) -> None:
        self.bn1 = normkit.BatchNorm(3)
        self.bn2 = normkit.BatchNorm(4, preset="keras", axis=1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.bn2(np.tanh(self.bn1(x)) @ W)


def batches(sizes: tuple[int, ...], loc: float = 3.0, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(loc, 2.0, size=(n, 3)).astype(np.float32) for n in sizes]


def trained() -> TwoLayerModel:
    model = TwoLayerModel()
    for x in batches((16,) * 5, loc=0.0, seed=2):
        model(x)
    return model


def replay(data: list[np.ndarray], model: TwoLayerModel) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each layer's inputs, batch by batch, in float64 with the reference (layers in training
    mode: batch statistics, the layers' own weights)."""
    first, second = [], []
    for x in data:
        x64 = x.astype(np.float64)
        first.append(x64)
        y1, _, _ = reference.batch_norm(
            x64, model.bn1.weight, model.bn1.bias, training=True, momentum=0.0, eps=model.bn1.eps,
            axis=1, unbiased_running_var=True,
        )  # fmt: skip
        second.append(np.tanh(y1) @ W.astype(np.float64))
    return first, second


def assert_statistics(layer: Any, mean: np.ndarray, var: np.ndarray, magnitude: float) -> None:
    for got, expected, statistic in ((layer.running_mean, mean, "mean"), (layer.running_var, var, "var")):
        np.testing.assert_allclose(
            got, expected, **statistics_tolerance("float32", statistic, magnitude).kwargs
        )


def test_population_statistics_of_every_layers_input_over_unequal_batches() -> None:
    model = trained()
    weights_before = (model.bn1.weight.copy(), model.bn2.bias.copy())
    data = batches((2, 7, 3, 30, 5))
    merged = recalibrate(model, data, forward=model)
    first, second = replay(data, model)
    x1, x2 = np.concatenate(first), np.concatenate(second)
    # bn1 (torch preset) stores the unbiased variance of all 47 values, bn2 (keras) the biased one
    assert_statistics(model.bn1, x1.mean(0), x1.var(0, ddof=1), float(np.abs(x1).max()))
    assert_statistics(model.bn2, x2.mean(0), x2.var(0), float(np.abs(x2).max()))
    np.testing.assert_array_equal(merged["bn1"].count, [47, 47, 47])
    np.testing.assert_array_equal(model.bn1.weight, weights_before[0])
    np.testing.assert_array_equal(model.bn2.bias, weights_before[1])


def test_batch_average_is_update_bns_average_of_batch_statistics() -> None:
    model = trained()
    data = batches((2, 2, 2, 2))
    recalibrate(model, data, forward=model, estimator="batch-average")
    first, _ = replay(data, model)
    mean = np.mean([x.mean(0) for x in first], axis=0)
    var = np.mean([x.var(0, ddof=1) for x in first], axis=0)
    assert_statistics(model.bn1, mean, var, float(np.abs(np.concatenate(first)).max()))


def test_small_correlated_batches_separate_the_estimators() -> None:
    """Batches of 2 whose samples share an offset: the average of batch variances misses the
    spread between batches that the population variance keeps (the reason fvcore changed)."""
    rng = np.random.default_rng(4)
    data = [
        (rng.normal(0, 3.0, size=(1, 3)) + rng.normal(0, 0.5, size=(2, 3))).astype(np.float32)
        for _ in range(60)
    ]
    population, average = normkit.BatchNorm(3), normkit.BatchNorm(3)
    recalibrate(population, data, forward=population)
    recalibrate(average, data, forward=average, estimator="batch-average")
    pooled = np.concatenate(data).astype(np.float64).var(0, ddof=1)
    assert_statistics(
        population, np.concatenate(data).mean(0), pooled, float(np.abs(np.concatenate(data)).max())
    )
    assert np.all(average.running_var < 0.5 * pooled)


def test_mode_momentum_and_counter_are_restored_and_tuples_give_their_first_element() -> None:
    model = trained()
    model.bn1.eval()
    counters = (model.bn1.num_batches_tracked, model.bn2.num_batches_tracked)
    momenta = (model.bn1.momentum, model.bn2.momentum)
    data = [(x, "label") for x in batches((4, 6))]
    recalibrate(model, data, forward=model)
    assert (model.bn1.training, model.bn2.training) == (False, True)
    assert (model.bn1.num_batches_tracked, model.bn2.num_batches_tracked) == counters
    assert (model.bn1.momentum, model.bn2.momentum) == momenta
    first, _ = replay([x for x, _ in data], model)
    x1 = np.concatenate(first)
    assert_statistics(model.bn1, x1.mean(0), x1.var(0, ddof=1), float(np.abs(x1).max()))


def snapshot(model: TwoLayerModel) -> list[Any]:
    return [
        (
            layer.training,
            {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in layer.state_dict().items()},
        )
        for layer in (model.bn1, model.bn2)
    ]


def same(a: list[Any], b: list[Any]) -> bool:
    for (mode_a, state_a), (mode_b, state_b) in zip(a, b, strict=True):
        if mode_a != mode_b or state_a.keys() != state_b.keys():
            return False
        for key in state_a:
            equal = (
                np.array_equal(state_a[key], state_b[key])
                if isinstance(state_a[key], np.ndarray)
                else state_a[key] == state_b[key]
            )
            if not equal:
                return False
    return True


@pytest.mark.parametrize(
    ("model", "data", "options", "message"),
    [
        ("no-norm", batches((4,)), {}, "with no batch norm that tracks running statistics"),
        ("model", [], {}, "batches is empty"),
        (
            "model",
            [*batches((4, 3)), np.ones((4, 5), np.float32)],
            {},
            "5 channels on axis 1, but this layer has 3",
        ),
        ("model", batches((4,)), {"estimator": "mean"}, "estimator='mean'"),
        ("model", batches((4,)), {"forward_skips_bn2": True}, "no batch reached the layer(s) ['bn2']"),
    ],
    ids=["no-normalization-layer", "empty-batches", "channel-count", "estimator", "unreached-layer"],
)
def test_bad_input_is_refused_and_the_layers_are_unchanged(
    model: str, data: list[Any], options: dict[str, Any], message: str
) -> None:
    trained_model = trained()
    before = snapshot(trained_model)
    target: object = object() if model == "no-norm" else trained_model
    forward = (lambda x: trained_model.bn1(x)) if options.pop("forward_skips_bn2", False) else trained_model
    with pytest.raises(ValueError, match=re.escape(message)):
        recalibrate(target, data, forward=forward, **options)
    assert same(before, snapshot(trained_model))
    assert getattr(trained_model.bn1, "_input_observers", ()) == ()


def test_a_progress_bar_appears_on_long_runs_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from normkit.testtime import recording

    model = trained()
    recalibrate(model, batches((4, 4)), forward=model)
    assert capsys.readouterr().err == ""  # a quick run stays quiet
    monkeypatch.setattr(recording, "PROGRESS_AFTER_S", 0.0)
    recalibrate(model, batches((4, 4, 4, 4)), forward=model)
    err = capsys.readouterr().err
    assert "recalibrate [####################] 4/4 batches" in err and err.endswith("\n")
    recalibrate(model, iter(batches((4, 4))), forward=model)  # no length: a count
    assert "recalibrate  2 batches" in capsys.readouterr().err
    recalibrate(model, batches((4,)), forward=model, progress=False)
    assert capsys.readouterr().err == ""


def test_instance_norm_with_running_statistics_averages_every_samples_statistics() -> None:
    """normkit's InstanceNorm with running statistics (as torch's, whose running statistics
    average each sample's mean and unbiased variance): recalibrated to that average over every
    sample of every batch, in float64 from the data."""
    layer = normkit.InstanceNorm(3, track_running_stats=True)
    rng = np.random.default_rng(4)
    for _ in range(3):
        layer(rng.normal(size=(4, 3, 5)).astype(np.float32))
    data = [rng.normal(2.0, 3.0, size=(n, 3, 5)).astype(np.float32) for n in (1, 6, 2)]
    recalibrate(layer, data, forward=layer)
    values = np.concatenate(data).astype(np.float64)
    assert_statistics(
        layer, values.mean(axis=2).mean(0), values.var(axis=2, ddof=1).mean(0), float(np.abs(values).max())
    )
    assert layer.num_batches_tracked == 3


def test_one_array_for_batches_is_refused_and_a_failing_batch_is_named() -> None:
    model = trained()
    before = snapshot(model)
    with pytest.raises(
        TypeError, match=re.escape("batches is one array of shape (4, 3); expected an iterable")
    ):
        recalibrate(model, batches((4,))[0], forward=model)
    with pytest.raises(ValueError, match="channels on axis 1") as raised:
        recalibrate(model, [*batches((4, 3)), np.ones((2, 5), np.float32)], forward=model)
    assert any("raised by batch 3, whose input has shape (2, 5)" in note for note in raised.value.__notes__)
    assert same(before, snapshot(model))
