"""Keras masks in ``normkit_tensorflow.BatchNormalization``: statistics over the unmasked
positions, as Keras's own layer computes them (the oracle: stock ``keras.layers.BatchNormalization``
given the same masked batches) and as the float64 reference does; eval ignores the mask; a batch
with nothing unmasked leaves the moving statistics unchanged, where Keras's pulls them toward 0."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_keras_layers import LargestStep

import normkit_tensorflow as nt
from normkit import reference
from normkit.testing.tolerances import (
    EPS,
    agreement_tolerance,
    centering_gain,
    statistics_tolerance,
    training_tolerance,
)

VOCABULARY, LENGTH, WIDTH, BATCH = 12, 10, 6, 8


def tokens(seed: int, samples: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of unequal lengths (1 to LENGTH tokens from 1..VOCABULARY-1), padded with 0,
    and regression targets."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, LENGTH + 1, size=samples)
    ids = rng.integers(1, VOCABULARY, size=(samples, LENGTH))
    ids[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
    return ids.astype("int32"), rng.normal(size=(samples, 1)).astype("float32")


def text_model(library: object, *, mask_zero: bool = True, seed: int = 0) -> keras.Model:
    """Embedding(mask_zero) -> BatchNormalization -> masked average pooling -> Dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCABULARY, WIDTH, mask_zero=mask_zero),
            library.BatchNormalization(momentum=0.9),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )


# Terms summed per value along one training step on a batch: batch norm's two passes over the
# BATCH*LENGTH positions and the pooling over LENGTH, the dense layer's WIDTH, the loss's mean over
# BATCH; backward about as many again, plus the embedding's gradient (a sum over the positions
# that hold a token) and the dense kernel's over the batch.
STEP_TERMS = 2 * (2 * BATCH * LENGTH + LENGTH + WIDTH + BATCH) + BATCH * LENGTH + BATCH

KERAS_EPSILON = keras.config.epsilon()
"""Keras's masked moments divide by ``count + epsilon()`` (1e-7), a relative bias of
``epsilon / count`` in its mean and variance that the comparison allows for."""


def fit(m: keras.Model, callbacks: list | None = None, jit_compile: bool | str = "auto") -> keras.Model:
    x, y = tokens(1)
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    m.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=callbacks or [])
    return m


@pytest.mark.parametrize("jit_compile", [False, True], ids=["function", "xla"])
def test_after_embedding_mask_zero_fit_matches_keras_masked_statistics(jit_compile: bool) -> None:
    """Both models start from the same weights and train on the same batches in ``fit`` (normkit's
    in a ``tf.function``, Keras's default on a CPU, or compiled by XLA, its default with an
    accelerator); every weight, the moving statistics included, and the predictions agree within
    :func:`training_tolerance`, widened by Keras's own bias (``epsilon / count``). Keras's model
    with the padding counted (no mask) ends far outside that bound: the masks mattered."""
    stock, ours, unmasked = (
        text_model(keras.layers),
        text_model(nt),
        text_model(keras.layers, mask_zero=False),
    )
    ours.set_weights(stock.get_weights())
    unmasked.set_weights(stock.get_weights())
    largest = LargestStep()
    fit(stock, [largest])
    fit(ours, jit_compile=jit_compile)
    assert ours.jit_compile == jit_compile
    steps = 2 * (48 // BATCH)
    smallest_count = 1 * BATCH  # every sequence has at least one token
    bias = KERAS_EPSILON / smallest_count

    def tolerance(scale: float) -> dict[str, float]:
        t = training_tolerance("float32", steps=steps, reduction_size=STEP_TERMS, scale=scale)
        return {"rtol": t.rtol + bias, "atol": t.atol + bias * scale}

    for w, got, expected in zip(stock.weights, ours.get_weights(), stock.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, **tolerance(largest.largest), err_msg=w.path)
    x, _ = tokens(2)
    expected = stock.predict(x, verbose=0)
    np.testing.assert_allclose(
        ours.predict(x, verbose=0), expected, **tolerance(float(np.abs(expected).max()))
    )

    fit(unmasked)
    index = [w.path.split("/")[-1] for w in ours.weights].index("moving_mean")
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(
            ours.get_weights()[index], unmasked.get_weights()[index], **tolerance(largest.largest)
        )


@pytest.mark.parametrize("unbiased", [False, True], ids=["keras", "torch"])
def test_one_masked_training_call_follows_the_float64_reference(unbiased: bool) -> None:
    """The moving statistics after masked batches: the reference's masked moments (count, mean,
    M2) per channel, Keras's update with momentum on the old value, biased variance (``keras``)
    or unbiased (``torch``); the output normalized with the masked statistics everywhere."""
    preset = "torch" if unbiased else "keras"
    layer = nt.BatchNormalization(preset=preset, momentum=0.8, dtype="float64")
    rng = np.random.default_rng(3)
    mean, var = np.zeros(WIDTH), np.ones(WIDTH)
    magnitude = 0.0
    for _ in range(3):
        x = rng.normal(4.0, 2.0, size=(BATCH, LENGTH, WIDTH))
        mask = rng.random((BATCH, LENGTH)) < 0.5
        magnitude = max(magnitude, float(np.abs(x).max()))
        y = layer(x, training=True, mask=tf.constant(mask)).numpy()
        count, batch_mean, m2 = reference.moments(x, (0, 1), mask[..., None])
        batch_var = m2 / count
        expected = reference.normalize(x, batch_mean, batch_var, eps=layer.epsilon, axis=2)
        gain = centering_gain(batch_mean, batch_var, layer.epsilon)
        np.testing.assert_allclose(y, expected, **agreement_tolerance("float64", centering_gain=gain).kwargs)
        stored = m2 / (count - 1) if unbiased else batch_var
        mean, var = 0.8 * mean + 0.2 * batch_mean, 0.8 * var + 0.2 * stored
    for got, expected, statistic in ((layer.moving_mean, mean, "mean"), (layer.moving_variance, var, "var")):
        np.testing.assert_allclose(
            got.numpy(), expected, **statistics_tolerance("float64", statistic, magnitude).kwargs
        )


def test_counts_per_channel_when_the_mask_varies_along_the_channels() -> None:
    """With ``axis=1`` Keras's mask (``inputs.shape[:-1]``, broadcast over the last axis) differs
    from channel to channel: each channel has its own count; one with none keeps its moving
    statistics, where stock Keras moves them; the others agree with stock Keras."""
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, size=(5, 3, 7)).astype("float32")
    mask = rng.random((5, 3)) < np.array([0.0, 0.5, 0.9])  # channel 0: nothing unmasked
    mask[0, 1] = mask[0, 2] = True
    ours, stock = nt.BatchNormalization(axis=1), keras.layers.BatchNormalization(axis=1)
    ours(x, training=True, mask=tf.constant(mask))
    stock(x, training=True, mask=tf.constant(mask))
    np.testing.assert_array_equal(ours.moving_mean.numpy()[0], 0.0)
    np.testing.assert_array_equal(ours.moving_variance.numpy()[0], 1.0)
    assert stock.moving_variance.numpy()[0] == pytest.approx(0.99)  # pulled toward 0 by Keras
    magnitude = float(np.abs(x).max())
    count = mask.sum(axis=0) * 7
    for got, expected, statistic in (
        (ours.moving_mean, stock.moving_mean, "mean"),
        (ours.moving_variance, stock.moving_variance, "var"),
    ):
        tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
        bias = KERAS_EPSILON / count[1:].min()
        np.testing.assert_allclose(
            got.numpy()[1:], expected.numpy()[1:], rtol=tolerance.rtol + bias, atol=tolerance.atol
        )


def test_a_fully_masked_batch_leaves_the_moving_statistics_unchanged_where_keras_moves_them() -> None:
    x, _ = tokens(5, samples=BATCH)
    ours, stock = text_model(nt), text_model(keras.layers)
    ours.set_weights(stock.get_weights())
    for m in (ours, stock):  # one ordinary batch first, so the statistics are not the initial ones
        m(x, training=True)
    padding = np.zeros_like(x)  # every position is padding: the mask is all False
    before = {id(m): [v.numpy().copy() for v in m.layers[1].non_trainable_weights] for m in (ours, stock)}
    for m in (ours, stock):
        m(padding, training=True)
    ours_mean, ours_var = (v.numpy() for v in ours.layers[1].non_trainable_weights)
    np.testing.assert_array_equal(ours_mean, before[id(ours)][0])
    np.testing.assert_array_equal(ours_var, before[id(ours)][1])
    # Keras: mean = 0 / (0 + 1e-7) = 0 and variance 0, so r <- 0.9 r (Keras's float32 arithmetic)
    stock_mean, stock_var = (v.numpy() for v in stock.layers[1].non_trainable_weights)
    for got, old in zip((stock_mean, stock_var), before[id(stock)], strict=True):
        np.testing.assert_allclose(got, 0.9 * old, rtol=2 * EPS["float32"])
        assert np.all(np.abs(got - old) > 0)


def test_eval_ignores_the_mask_and_a_bad_mask_is_refused() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(2.0, 1.0, size=(4, 5, 3)).astype("float32")
    mask = tf.constant(rng.random((4, 5)) < 0.5)
    layer = nt.BatchNormalization()
    layer(x, training=True, mask=mask)
    np.testing.assert_array_equal(
        layer(x, training=False, mask=mask).numpy(), layer(x, training=False).numpy()
    )
    frozen = nt.BatchNormalization()
    frozen(x, training=True)
    frozen.trainable = False  # a frozen layer normalizes with its moving statistics: no mask used
    moving = frozen.moving_mean.numpy().copy()
    np.testing.assert_array_equal(
        frozen(x, training=True, mask=mask).numpy(), frozen(x, training=False).numpy()
    )
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), moving)
    with pytest.raises(
        ValueError, match=r"mask has shape \(4, 5, 3\): expected one dimension less than inputs"
    ):
        layer(x, training=True, mask=tf.ones((4, 5, 3), tf.bool))


def test_masked_training_inside_tf_function_and_xla() -> None:
    """The layer's masked path traced with unknown batch and length, and compiled by XLA, gives
    the eager result's moving statistics."""
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, size=(6, 5, 4)).astype("float32")
    mask = rng.random((6, 5)) < 0.6
    results = []
    for kind in ("eager", "function", "xla"):
        layer = nt.BatchNormalization()
        layer.build(x.shape)

        def step(x, m, layer=layer):
            return layer(x, training=True, mask=m)

        if kind == "function":
            signature = [tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None], tf.bool)]
            step = tf.function(step, input_signature=signature)
        elif kind == "xla":
            step = tf.function(step, jit_compile=True)
        y = step(tf.constant(x), tf.constant(mask))
        results.append((y.numpy(), layer.moving_mean.numpy(), layer.moving_variance.numpy()))
    _, batch_mean, m2 = reference.moments(x, (0, 1), mask[..., None])
    gain = centering_gain(batch_mean, m2 / mask.sum(), 1e-3)  # every channel counts mask.sum() values
    for y, mean, var in results[1:]:
        np.testing.assert_allclose(
            y, results[0][0], **agreement_tolerance("float32", centering_gain=gain).kwargs
        )
        magnitude = float(np.abs(x).max())
        for got, expected, statistic in ((mean, results[0][1], "mean"), (var, results[0][2], "var")):
            tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
            np.testing.assert_allclose(got, expected, **tolerance.kwargs)
