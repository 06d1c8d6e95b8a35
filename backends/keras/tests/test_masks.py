"""Keras masks in ``BatchNormalization`` under this run's Keras backend: statistics over the
unmasked positions, as Keras's own layer computes them (the oracle: stock
``keras.layers.BatchNormalization`` given the same masked batches) and as the float64 reference
does; eval ignores the mask; a batch with nothing unmasked leaves the moving statistics
unchanged, where Keras's pulls them toward 0."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, WIDEST, LargestStep, numpy

import normkit_keras as nk
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


@pytest.mark.parametrize("jit_compile", ["auto", True], ids=["default", "xla"])
def test_after_embedding_mask_zero_fit_matches_keras_masked_statistics(jit_compile: bool | str) -> None:
    """Both models start from the same weights and train on the same batches in ``fit``; every
    weight, the moving statistics included, and the predictions agree within
    :func:`training_tolerance`, widened by Keras's own bias (``epsilon / count``). Keras's model
    with the padding counted (no mask) ends far outside that bound: the masks mattered."""
    if jit_compile is True and BACKEND != "tensorflow":
        pytest.skip("jit_compile=True is XLA on TensorFlow; JAX's trainer always compiles, torch's is eager")
    stock, ours, unmasked = (
        text_model(keras.layers),
        text_model(nk),
        text_model(keras.layers, mask_zero=False),
    )
    ours.set_weights(stock.get_weights())
    unmasked.set_weights(stock.get_weights())
    largest = LargestStep()
    fit(stock, [largest])
    fit(ours, jit_compile=jit_compile)
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
def test_masked_training_calls_follow_the_float64_reference(unbiased: bool) -> None:
    """The moving statistics after masked batches: the reference's masked moments (count, mean,
    M2) per channel, Keras's update with momentum on the old value, biased variance (``keras``)
    or unbiased (``torch``); the output normalized with the masked statistics everywhere."""
    preset = "torch" if unbiased else "keras"
    layer = nk.BatchNormalization(preset=preset, momentum=0.8, dtype=WIDEST)
    rng = np.random.default_rng(3)
    mean, var = np.zeros(WIDTH), np.ones(WIDTH)
    magnitude = 0.0
    for _ in range(3):
        x = rng.normal(4.0, 2.0, size=(BATCH, LENGTH, WIDTH)).astype(WIDEST)
        mask = rng.random((BATCH, LENGTH)) < 0.5
        magnitude = max(magnitude, float(np.abs(x).max()))
        y = numpy(layer(x, training=True, mask=mask))
        count, batch_mean, m2 = reference.moments(x, (0, 1), mask[..., None])
        batch_var = m2 / count
        expected = reference.normalize(x, batch_mean, batch_var, eps=layer.epsilon, axis=2)
        gain = centering_gain(batch_mean, batch_var, layer.epsilon)
        np.testing.assert_allclose(y, expected, **agreement_tolerance(WIDEST, centering_gain=gain).kwargs)
        stored = m2 / (count - 1) if unbiased else batch_var
        mean, var = 0.8 * mean + 0.2 * batch_mean, 0.8 * var + 0.2 * stored
    for got, expected, statistic in ((layer.moving_mean, mean, "mean"), (layer.moving_variance, var, "var")):
        np.testing.assert_allclose(
            numpy(got), expected, **statistics_tolerance(WIDEST, statistic, magnitude).kwargs
        )


def test_counts_per_channel_when_the_mask_varies_along_the_channels() -> None:
    """With ``axis=1`` Keras's mask (``inputs.shape[:-1]``, broadcast over the last axis) differs
    from channel to channel: each channel has its own count; one with none keeps its moving
    statistics, where stock Keras moves them; the others agree with stock Keras."""
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, size=(5, 3, 7)).astype("float32")
    mask = rng.random((5, 3)) < np.array([0.0, 0.5, 0.9])  # channel 0: nothing unmasked
    mask[0, 1] = mask[0, 2] = True
    ours, stock = nk.BatchNormalization(axis=1), keras.layers.BatchNormalization(axis=1)
    ours(x, training=True, mask=mask)
    stock(x, training=True, mask=keras.ops.convert_to_tensor(mask))
    np.testing.assert_array_equal(numpy(ours.moving_mean)[0], 0.0)
    np.testing.assert_array_equal(numpy(ours.moving_variance)[0], 1.0)
    assert numpy(stock.moving_variance)[0] == pytest.approx(0.99)  # pulled toward 0 by Keras
    magnitude = float(np.abs(x).max())
    count = mask.sum(axis=0) * 7
    for got, expected, statistic in (
        (ours.moving_mean, stock.moving_mean, "mean"),
        (ours.moving_variance, stock.moving_variance, "var"),
    ):
        tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
        bias = KERAS_EPSILON / count[1:].min()
        np.testing.assert_allclose(
            numpy(got)[1:], numpy(expected)[1:], rtol=tolerance.rtol + bias, atol=tolerance.atol
        )


def test_a_fully_masked_batch_leaves_the_moving_statistics_unchanged_where_keras_moves_them() -> None:
    x, _ = tokens(5, samples=BATCH)
    ours, stock = text_model(nk), text_model(keras.layers)
    ours.set_weights(stock.get_weights())
    for m in (ours, stock):  # one ordinary batch first, so the statistics are not the initial ones
        m(x, training=True)
    padding = np.zeros_like(x)  # every position is padding: the mask is all False
    before = {id(m): [numpy(v) for v in m.layers[1].non_trainable_weights] for m in (ours, stock)}
    for m in (ours, stock):
        m(padding, training=True)
    ours_mean, ours_var = (numpy(v) for v in ours.layers[1].non_trainable_weights)
    np.testing.assert_array_equal(ours_mean, before[id(ours)][0])
    np.testing.assert_array_equal(ours_var, before[id(ours)][1])
    # Keras: mean = 0 / (0 + 1e-7) = 0 and variance 0, so r <- 0.9 r (Keras's float32 arithmetic)
    stock_mean, stock_var = (numpy(v) for v in stock.layers[1].non_trainable_weights)
    for got, old in zip((stock_mean, stock_var), before[id(stock)], strict=True):
        np.testing.assert_allclose(got, 0.9 * old, rtol=2 * EPS["float32"])
        assert np.all(np.abs(got - old) > 0)


def test_eval_ignores_the_mask_and_a_frozen_layer_too() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(2.0, 1.0, size=(4, 5, 3)).astype("float32")
    mask = rng.random((4, 5)) < 0.5
    layer = nk.BatchNormalization()
    layer(x, training=True, mask=mask)
    np.testing.assert_array_equal(numpy(layer(x, training=False, mask=mask)), numpy(layer(x, training=False)))
    frozen = nk.BatchNormalization()
    frozen(x, training=True)
    frozen.trainable = False  # a frozen layer normalizes with its moving statistics: no mask used
    moving = numpy(frozen.moving_mean)
    np.testing.assert_array_equal(
        numpy(frozen(x, training=True, mask=mask)), numpy(frozen(x, training=False))
    )
    np.testing.assert_array_equal(numpy(frozen.moving_mean), moving)


def test_masked_training_compiled_gives_the_eager_result() -> None:
    """The masked path compiled as each backend compiles a training step: TensorFlow traced with
    unknown batch and length, and by XLA; JAX ``jax.jit`` over ``stateless_call``. The output and
    moving statistics agree with the eager call's."""
    if BACKEND == "torch":
        pytest.skip("Keras's torch trainer runs eagerly (the eager path is the one tested above)")
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, size=(6, 5, 4)).astype("float32")
    mask = rng.random((6, 5)) < 0.6
    eager = nk.BatchNormalization()
    y = numpy(eager(x, training=True, mask=mask))
    results = [(y, numpy(eager.moving_mean), numpy(eager.moving_variance))]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        signature = [tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None], tf.bool)]
        for options in ({"input_signature": signature}, {"jit_compile": True}):
            layer = nk.BatchNormalization()
            layer.build(x.shape)
            step = tf.function(lambda x, m, layer=layer: layer(x, training=True, mask=m), **options)
            y = step(tf.constant(x), tf.constant(mask))
            results.append((numpy(y), numpy(layer.moving_mean), numpy(layer.moving_variance)))
    else:
        import jax

        layer = nk.BatchNormalization()
        layer.build(x.shape)

        @jax.jit
        def step(trainable: list, non_trainable: list, x: jax.Array, m: jax.Array) -> tuple:
            return layer.stateless_call(trainable, non_trainable, x, training=True, mask=m)

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        y, (mean, var) = step(trainable, non_trainable, x, mask)
        results.append((numpy(y), numpy(mean), numpy(var)))
    _, batch_mean, m2 = reference.moments(x, (0, 1), mask[..., None])
    gain = centering_gain(batch_mean, m2 / mask.sum(), 1e-3)  # every channel counts mask.sum() values
    magnitude = float(np.abs(x).max())
    for y, mean, var in results[1:]:
        np.testing.assert_allclose(
            y, results[0][0], **agreement_tolerance("float32", centering_gain=gain).kwargs
        )
        for got, expected, statistic in ((mean, results[0][1], "mean"), (var, results[0][2], "var")):
            tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
            np.testing.assert_allclose(got, expected, **tolerance.kwargs)
