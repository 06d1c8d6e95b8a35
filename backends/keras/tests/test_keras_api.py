"""The Keras contract of every layer, under this run's Keras backend: Keras's weight names and
order (stock Keras's layers are the oracle), ``compute_output_shape``, ``autocast = False``,
``trainable=False`` meaning inference, ``stateless_call`` (under ``jax.jit`` on JAX), one
registration per name, and ``synchronized=True`` where the backend has no replicas."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, numpy, weight_names

import normkit_keras as nk
from normkit import reference
from normkit.testing.tolerances import centering_gain, output_tolerance, statistics_tolerance

LAYERS = (
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
)

SHAPE = (4, 5, 6, 6)


def pairs() -> list[tuple[keras.layers.Layer, keras.layers.Layer]]:
    """Each normkit layer and the stock layer with its weights (instance norm: Keras's group norm
    with one group per channel, which normalizes the same groups)."""
    return [
        (nk.BatchNormalization(), keras.layers.BatchNormalization()),
        (nk.LayerNormalization(axis=[1, -1]), keras.layers.LayerNormalization(axis=[1, -1])),
        (nk.GroupNormalization(groups=3), keras.layers.GroupNormalization(groups=3)),
        (nk.RMSNormalization(axis=[-2, -1]), keras.layers.RMSNormalization(axis=[-2, -1])),
        (nk.InstanceNormalization(), keras.layers.GroupNormalization(groups=-1)),
    ]


def test_weights_have_keras_names_shapes_and_order() -> None:
    for ours, stock in pairs():
        ours.build(SHAPE)
        stock.build(SHAPE)
        got = [
            (name, tuple(w.shape), w.trainable)
            for name, w in zip(weight_names(ours), ours.weights, strict=True)
        ]
        expected = [
            (name, tuple(w.shape), w.trainable)
            for name, w in zip(weight_names(stock), stock.weights, strict=True)
        ]
        assert got == expected, type(ours).__name__
    # instance norm with moving statistics: batch norm's four weights, in batch norm's order
    tracked, stock = nk.InstanceNormalization(track_running_stats=True), keras.layers.BatchNormalization()
    tracked.build(SHAPE)
    stock.build(SHAPE)
    assert [(n, w.trainable) for n, w in zip(weight_names(tracked), tracked.weights, strict=True)] == [
        (n, w.trainable) for n, w in zip(weight_names(stock), stock.weights, strict=True)
    ]


def test_every_layer_leaves_its_input_dtype_alone_and_has_the_output_shape() -> None:
    """``autocast = False`` (the input is not cast to the policy's compute dtype before
    ``call``), and ``compute_output_shape``/symbolic calls give the input's shape."""
    symbolic = keras.KerasTensor((None, 5, 6, 6))
    for ours, _ in pairs():
        assert ours.autocast is False, type(ours).__name__
        assert ours.compute_output_shape((None, 5, 6, 6)) == (None, 5, 6, 6)
        assert ours(symbolic).shape == (None, 5, 6, 6)


def test_a_frozen_batch_norm_normalizes_with_its_moving_statistics_even_in_training() -> None:
    """As Keras's layer: ``trainable=False`` means inference (keras#9965)."""
    x = np.random.default_rng(5).normal(3.0, 2.0, size=(16, 4)).astype("float32")
    layer = nk.BatchNormalization()
    layer(x, training=True)
    moving = [numpy(layer.moving_mean), numpy(layer.moving_variance)]
    layer.trainable = False
    frozen = numpy(layer(x, training=True))
    np.testing.assert_array_equal(frozen, numpy(layer(x, training=False)))
    np.testing.assert_array_equal(moving[0], numpy(layer.moving_mean))
    np.testing.assert_array_equal(moving[1], numpy(layer.moving_variance))
    expected = reference.batch_norm(
        x, None, None, moving[0], moving[1], training=False, momentum=0.0, eps=1e-3, axis=-1,
        unbiased_running_var=False,
    )[0]  # fmt: skip
    gain = centering_gain(moving[0], moving[1], 1e-3)
    np.testing.assert_allclose(frozen, expected, **output_tolerance("float32", centering_gain=gain).kwargs)
    batch_statistics = numpy(nk.BatchNormalization()(x, training=True))
    assert np.abs(frozen - batch_statistics).max() > 0.1  # not what training would have given


def test_stateless_call_returns_the_new_statistics_and_changes_no_variable() -> None:
    """``layer.stateless_call(trainable, non_trainable, x, training=True)`` (how Keras's JAX
    trainer calls a layer; under ``jax.jit`` on JAX): the output and the new moving statistics
    of the float64 reference, the layer's own variables untouched."""
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(8, 5, 3)).astype("float32")
    layer = nk.BatchNormalization(momentum=0.8)
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def step(trainable: list, non_trainable: list, x: object) -> tuple:
        return layer.stateless_call(trainable, non_trainable, x, training=True)

    if BACKEND == "jax":
        import jax

        step = jax.jit(step)
    y, (mean, var) = step(trainable, non_trainable, keras.ops.convert_to_tensor(x))
    expected, expected_mean, expected_var = reference.batch_norm(
        x, None, None, np.zeros(3), np.ones(3), training=True, momentum=0.2, eps=1e-3, axis=-1,
        unbiased_running_var=False,
    )  # fmt: skip
    gain = centering_gain(x.mean(axis=(0, 1)), x.var(axis=(0, 1)), 1e-3)
    np.testing.assert_allclose(numpy(y), expected, **output_tolerance("float32", centering_gain=gain).kwargs)
    magnitude = float(np.abs(x).max())
    for got, want, statistic in ((mean, expected_mean, "mean"), (var, expected_var, "var")):
        np.testing.assert_allclose(
            numpy(got), want, **statistics_tolerance("float32", statistic, magnitude).kwargs
        )
    np.testing.assert_array_equal(numpy(layer.moving_mean), np.zeros(3))
    np.testing.assert_array_equal(numpy(layer.moving_variance), np.ones(3))


def test_synchronized_training_is_refused_where_keras_has_no_replicas_and_local_on_tensorflow() -> None:
    x = np.random.default_rng(2).normal(size=(8, 3)).astype("float32")
    synchronized, local = nk.BatchNormalization(synchronized=True), nk.BatchNormalization()
    assert synchronized.get_config()["synchronized"] is True
    if BACKEND != "tensorflow":
        with pytest.raises(NotImplementedError, match=rf"not supported on Keras's '{BACKEND}' backend"):
            synchronized(x, training=True)
        np.testing.assert_array_equal(numpy(synchronized.moving_mean), np.zeros(3))  # nothing changed
    else:  # outside a tf.distribute strategy: the local layer (the strategy's tests are TensorFlow's)
        np.testing.assert_array_equal(numpy(synchronized(x, training=True)), numpy(local(x, training=True)))
        np.testing.assert_array_equal(numpy(synchronized.moving_variance), numpy(local.moving_variance))
    # eval never communicates: it works on every backend
    np.testing.assert_array_equal(numpy(synchronized(x, training=False)), numpy(local(x, training=False)))


def test_each_name_is_registered_once_to_these_classes() -> None:
    for name in LAYERS:
        assert keras.saving.get_registered_object(f"normkit>{name}") is getattr(nk, name)
        assert keras.saving.get_registered_name(getattr(nk, name)) == f"normkit>{name}"


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"epsilon=0: expected a positive finite number"):
        nk.BatchNormalization(epsilon=0)
    with pytest.raises(ValueError, match="epsilon=-1"):
        nk.LayerNormalization(epsilon=-1)
    with pytest.raises(TypeError, match=r"synchronized='yes': expected True or False"):
        nk.BatchNormalization(synchronized="yes")
    with pytest.raises(NotImplementedError, match=r"renorm=True is not supported"):
        nk.BatchNormalization(renorm=True)
    with pytest.raises(NotImplementedError, match=r"rms_scaling=True is not supported"):
        nk.LayerNormalization(rms_scaling=True)
    with pytest.raises(ValueError, match="axis=0 is the batch axis"):
        nk.InstanceNormalization(axis=0).build((2, 3, 4))
    # Keras's own BatchNormalization turns axis=1.5 into 1 (int(axis)); these name what they got
    for one_axis in (nk.BatchNormalization, nk.InstanceNormalization, nk.GroupNormalization):
        with pytest.raises(TypeError, match=r"axis=1\.5: expected an int \(the channel axis\)"):
            one_axis(axis=1.5)
        with pytest.raises(TypeError, match=r"axis='-1': expected an int \(the channel axis\)"):
            one_axis(axis="-1")
        with pytest.raises(TypeError, match=r"axis=True: expected an int"):
            one_axis(axis=True)
        layer = one_axis(axis=np.int64(1))
        assert layer.axis == 1 and type(layer.axis) is int
    for several_axes in (nk.LayerNormalization, nk.RMSNormalization):
        with pytest.raises(TypeError, match=r"axis=\[1, 2\.0\]: expected an int or a non-empty list of ints"):
            several_axes(axis=[1, 2.0])
        with pytest.raises(TypeError, match=r"axis=1\.5: expected an int or a non-empty list of ints"):
            several_axes(axis=1.5)
        with pytest.raises(ValueError, match=r"axis=\(\): expected an int or a non-empty list of ints"):
            several_axes(axis=())
        assert several_axes(axis=(np.int64(1), -1)).axis == [1, -1]
    with pytest.raises(TypeError, match=r"track_running_stats='no': expected True or False"):
        nk.InstanceNormalization(track_running_stats="no")
    for flagged in (
        nk.BatchNormalization,
        nk.InstanceNormalization,
        nk.GroupNormalization,
        nk.LayerNormalization,
    ):
        with pytest.raises(TypeError, match=r"center=None: expected True or False"):
            flagged(center=None)
        with pytest.raises(TypeError, match=r"scale=1: expected True or False"):
            flagged(scale=1)
        assert flagged(scale=np.bool_(False)).scale is False
    with pytest.raises(
        ValueError, match=r"mask has shape \(4, 5, 3\): expected one dimension less than inputs"
    ):
        nk.BatchNormalization()(np.ones((4, 5, 3), "float32"), training=True, mask=np.ones((4, 5, 3), bool))
