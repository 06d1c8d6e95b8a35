"""normkit.testtime.diagnose on a Keras model: each BatchNormalization's data statistics, mean
shift, log variance ratio and KL against a float64 replay of the model written here from its
weights (the batch norms normalizing with batch statistics), in both variance conventions
(Keras's biased, normkit's torch preset's unbiased); the model unchanged afterwards. The float64
oracle and its bounds are :func:`normkit.testing.testtime.assert_shift_matches`'s."""

from __future__ import annotations

import keras
import numpy as np

import normkit_tensorflow
from normkit.testing.testtime import assert_shift_matches
from normkit.testtime.diagnose import diagnose


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, name="dense1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dense(3, name="dense2")(h)
    outputs = normkit_tensorflow.BatchNormalization(preset="torch", name="bn2")(h)
    m = keras.Model(inputs, outputs)
    rng = np.random.default_rng(2)
    for _ in range(5):
        m(rng.normal(size=(16, 5)).astype(np.float32), training=True)
    return m


def replay(m: keras.Model, data: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each batch norm's inputs over all batches in float64: dense1, bn1 with each batch's
    mean and biased variance (training normalization), ReLU, dense2."""
    w1, b1 = (np.asarray(w, np.float64) for w in m.get_layer("dense1").get_weights())
    w2, b2 = (np.asarray(w, np.float64) for w in m.get_layer("dense2").get_weights())
    bn1 = m.get_layer("bn1")
    gamma, beta = np.asarray(bn1.gamma, np.float64), np.asarray(bn1.beta, np.float64)
    first, second = [], []
    for x in data:
        h = x.astype(np.float64) @ w1 + b1
        y = gamma * (h - h.mean(0)) / np.sqrt(h.var(0) + bn1.epsilon) + beta
        first.append(h)
        second.append(np.maximum(y, 0.0) @ w2 + b2)
    return {"bn1": np.concatenate(first), "bn2": np.concatenate(second)}


def test_every_batch_norm_against_a_float64_replay_and_the_model_is_unchanged() -> None:
    m = model()
    bn1, bn2 = m.get_layer("bn1"), m.get_layer("bn2")
    bn1.trainable = False  # kept, though recording normalizes with batch statistics
    weights = [w.copy() for w in m.get_weights()]
    rng = np.random.default_rng(1)
    data = [(rng.normal(1.0, 2.0, size=(n, 5))).astype(np.float32) for n in (3, 8, 20)]
    report = diagnose(m, [(x, np.zeros(len(x))) for x in data], progress=False)
    assert [layer.name for layer in report.layers] == ["bn1", "bn2"]
    inputs = replay(m, data)
    # bn1 (Keras) stores the biased variance, bn2 (normkit, torch preset) the unbiased one
    for layer, bn, ddof in zip(report.layers, (bn1, bn2), (0, 1), strict=True):
        assert_shift_matches(
            layer, inputs[layer.name], np.asarray(bn.moving_mean, np.float64),
            np.asarray(bn.moving_variance, np.float64), float(bn.epsilon), ddof=ddof,
        )  # fmt: skip
    assert report.layers[0].mean_kl > 0.1  # the shift shows
    for before, after in zip(weights, m.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert bn1.trainable is False and bn2.trainable is True
    assert "call" not in bn1.__dict__ and "call" not in bn2.__dict__
