"""normkit.testtime on Keras models: recalibrate's stored statistics against the float64
statistics of each BatchNormalization's input over unequal batches (captured by a separate
model of this test), dropout provably off, trainable flags and calls restored; prior_mixing's
eval outputs against the float64 formula for N in {0, 16, inf} and n in {1, 2, 64}; bad input
refused with the model unchanged."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import normkit_tensorflow
from normkit.testing.testtime import prior_mixed_reference, prior_mixing_bound
from normkit.testing.tolerances import assert_within, statistics_tolerance
from normkit.testtime import prior_mixing, recalibrate


def model(dropout: float = 0.5) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.Dropout(dropout, name="dropout")(h)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(5, 1, name="conv1x1")(h)
    h = normkit_tensorflow.BatchNormalization(preset="torch", name="bn2")(h)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    m = keras.Model(inputs, outputs)
    rng = np.random.default_rng(2)
    for _ in range(3):
        m(rng.normal(size=(8, 6, 6, 3)).astype(np.float32), training=True)
    return m


def batches(sizes: tuple[int, ...], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(3.0, 2.0, size=(n, 6, 6, 3))).astype(np.float32) for n in sizes]


def captured_inputs(m: keras.Model, data: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each BatchNormalization's inputs over all batches, (values, channels) in float64, from a
    copy of the model whose dropout is the identity, run in training mode (batch statistics)
    with every output of interest exposed."""
    clone = keras.models.clone_model(m)
    clone.set_weights(m.get_weights())
    clone.get_layer("dropout").rate = 0.0
    for layer in clone.layers:  # batch statistics even where the model's layer is frozen
        layer.trainable = True
    names = ("bn1", "bn2")
    probe = keras.Model(clone.input, [clone.get_layer(name).input for name in names])
    seen: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for x in data:
        for name, value in zip(names, probe(x, training=True), strict=True):
            value = np.asarray(value, np.float64)
            seen[name].append(value.reshape(-1, value.shape[-1]))
    return {name: np.concatenate(parts) for name, parts in seen.items()}


def test_recalibrate_stores_the_population_statistics_with_dropout_off() -> None:
    m = model()
    bn1, bn2 = m.get_layer("bn1"), m.get_layer("bn2")
    bn1.trainable = False  # kept, though recording runs the layer with batch statistics
    data = batches((2, 7, 3, 30))
    inputs = captured_inputs(m, data)
    weights = [w.copy() for w in m.get_layer("conv1x1").get_weights()]
    merged = recalibrate(m, [(x, np.zeros(len(x))) for x in data])
    assert sorted(merged) == ["bn1", "bn2"]
    np.testing.assert_array_equal(np.asarray(merged["bn1"].count), [42 * 16] * 4)
    # bn1 (Keras) stores the biased variance, bn2 (normkit, torch preset) the unbiased one
    for layer, values, ddof in ((bn1, inputs["bn1"], 0), (bn2, inputs["bn2"], 1)):
        magnitude = float(np.abs(values).max())
        for got, expected, statistic in (
            (layer.moving_mean, values.mean(0), "mean"),
            (layer.moving_variance, values.var(0, ddof=ddof), "var"),
        ):
            np.testing.assert_allclose(
                np.asarray(got), expected, **statistics_tolerance("float32", statistic, magnitude).kwargs
            )
    assert bn1.trainable is False and bn2.trainable is True
    assert "call" not in bn1.__dict__ and "call" not in bn2.__dict__
    for before, after in zip(weights, m.get_layer("conv1x1").get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_dropout_on_would_change_the_statistics() -> None:
    """The check above can fail: with the dropout active, bn1's input variance is another."""
    m = model()
    data = batches((16, 16))
    inputs = captured_inputs(m, data)["bn1"]
    dropped = [keras.layers.Dropout(0.5)(m.get_layer("conv")(x), training=True) for x in data]
    values = np.concatenate([np.asarray(d, np.float64).reshape(-1, 4) for d in dropped])
    tolerance = statistics_tolerance("float32", "var", float(np.abs(values).max()))
    assert not np.allclose(values.var(0), inputs.var(0), **tolerance.kwargs)


def test_batch_average_and_bad_input_leave_no_trace() -> None:
    m = model()
    state = [w.copy() for w in m.get_weights()]
    with pytest.raises(ValueError, match=r"batches is empty"):
        recalibrate(m, [])
    with pytest.raises(ValueError, match=r"incompatible with the layer: expected shape=\(None, 6, 6, 3\)"):
        recalibrate(m, [*batches((4,)), np.ones((4, 6, 6, 5), np.float32)])
    no_bn = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no batch norm"):
        recalibrate(no_bn, batches((2,)))
    for before, after in zip(state, m.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert not any("call" in layer.__dict__ for layer in m.layers)


def eval_capturing(m: keras.Model, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = ("bn1", "bn2")
    probe = keras.Model(
        m.input, [t for name in names for t in (m.get_layer(name).input, m.get_layer(name).output)]
    )
    values = [np.asarray(v, np.float64) for v in probe(x, training=False)]
    return {name: (values[2 * i], values[2 * i + 1]) for i, name in enumerate(names)}


@pytest.mark.parametrize("N", [0, 16, math.inf])
@pytest.mark.parametrize("n", [1, 2, 64])
def test_prior_mixing_follows_the_formula(N: float, n: int) -> None:
    m = model()
    x = batches((n,), seed=n)[0]
    plain = np.asarray(m(x, training=False))
    with prior_mixing(m, N):
        seen = eval_capturing(m, x)
        mixed = np.asarray(m(x, training=False))
    if math.isinf(N):
        np.testing.assert_array_equal(mixed, plain)
    for name, (layer_input, layer_output) in seen.items():
        layer = m.get_layer(name)
        arrays = [
            np.asarray(v, np.float64)
            for v in (layer.moving_mean, layer.moving_variance, layer.gamma, layer.beta)
        ]
        ref, mean, var = prior_mixed_reference(layer_input, *arrays, eps=layer.epsilon, axis=-1, N=N)
        bound = prior_mixing_bound(layer_input, ref, mean, var, arrays[2], eps=layer.epsilon, axis=-1, N=N)
        assert_within(np.abs(layer_output - ref), bound, f"{name}, N={N}, n={n}")
    np.testing.assert_array_equal(np.asarray(m(x, training=False)), plain)


def test_prior_mixing_refuses_one_value_per_channel_and_a_bad_prior() -> None:
    m = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    m(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32), training=True)
    with prior_mixing(m, 16), pytest.raises(ValueError, match="1 value per channel"):
        m(np.ones((1, 3), np.float32), training=False)
    with pytest.raises(ValueError, match=r"N=-2: expected a number >= 0"):
        prior_mixing(m, -2)
    assert "call" not in m.layers[0].__dict__
