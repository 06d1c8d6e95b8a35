"""Eager calls on Keras's TensorFlow backend as one traced ``tf.function``
(:mod:`normkit_keras._eager`): ``BatchNormalization``, ``InstanceNormalization`` and
``GroupNormalization`` give the op-by-op path's outputs and moving statistics bit for bit, follow
Keras's own layers and the float64 reference over several steps and batch sizes, pass gradients
to ``tf.GradientTape`` (against central differences of the reference), change no state when a
call fails, trace once per configuration whatever the batch size, and step aside (run op by op)
where the traced function would not be the same computation: inside ``tf.function``, with a
mask, in a ``StatelessScope``, under a ``tf.distribute`` strategy. Under Keras's other backends
the path is never taken. A configuration's first eager call runs op by op and its later ones
traced, so each test calls a layer at least twice per configuration."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, numpy

import normkit_keras as nk
from normkit import reference
from normkit.testing.tolerances import (
    agreement_tolerance,
    centering_gain,
    central_differences,
    normalization_gradient_tolerances,
    normalized_by,
    output_tolerance,
    statistics_tolerance,
)
from normkit_keras import _eager

tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="the traced path is TensorFlow's")


@contextmanager
def op_by_op(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The layers' op-by-op path: :func:`normkit_keras._eager.run` declines every call."""
    with monkeypatch.context() as patch:
        patch.setattr(_eager, "run", lambda *args, **kwargs: None)
        yield


def traces(layer: keras.layers.Layer) -> int:
    """How many functions the layer's traced path has traced, over its configurations (one each)."""
    return len(_eager.traced_functions(layer))


def twins(make: Callable[[], keras.layers.Layer], shape: tuple[int, ...], seed: int) -> tuple:
    """Two layers from ``make`` with the same random γ, β and moving statistics."""
    a, b = make(), make()
    a.build(shape)
    b.build(shape)
    rng = np.random.default_rng(seed)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        name = wa.path.split("/")[-1]
        value = (
            rng.uniform(0.5, 2.0, wa.shape)
            if name in ("gamma", "moving_variance")
            else rng.normal(size=wa.shape)
        )
        wa.assign(value.astype(wa.dtype))
        wb.assign(value.astype(wb.dtype))
    return a, b


CONFIGS = {
    "bn": (lambda: nk.BatchNormalization(), True),
    "bn-torch-no-beta": (lambda: nk.BatchNormalization(preset="torch", center=False, momentum=0.7), True),
    "bn-channels-first": (lambda: nk.BatchNormalization(axis=1), True),
    "bn-float64": (lambda: nk.BatchNormalization(dtype="float64"), True),
    "bn-float16": (lambda: nk.BatchNormalization(dtype="float16"), True),
    "bn-mixed-float16": (lambda: nk.BatchNormalization(dtype="mixed_float16"), True),
    "in": (lambda: nk.InstanceNormalization(), False),  # no moving statistics: one mode
    "in-tracked": (lambda: nk.InstanceNormalization(track_running_stats=True, preset="torch"), True),
    "gn": (lambda: nk.GroupNormalization(groups=4), False),
    "gn-torch": (lambda: nk.GroupNormalization(groups=2, preset="torch", scale=False), False),
    "gn-instance": (lambda: nk.GroupNormalization(groups=-1, dtype="float64"), False),
}


@tensorflow_only
@pytest.mark.parametrize("config", list(CONFIGS))
def test_traced_calls_give_the_op_by_op_results_bit_for_bit(config: str, monkeypatch) -> None:
    make, two_modes = CONFIGS[config]
    channels_first = config == "bn-channels-first"
    shape = (3, 8, 5, 4) if channels_first else (3, 5, 4, 8)
    traced, stepped = twins(make, shape, seed=1)
    rng = np.random.default_rng(2)
    for batch, training in ((3, True), (5, True), (2, True), (4, False), (6, False)):
        x = rng.normal(40.0, 3.0, size=(batch, *shape[1:])).astype(traced.compute_dtype)
        y = numpy(traced(x, training=training))
        with op_by_op(monkeypatch):
            expected = numpy(stepped(x, training=training))
        np.testing.assert_array_equal(y, expected, err_msg=f"output, batch {batch}, training={training}")
        for wa, wb in zip(traced.weights, stepped.weights, strict=True):
            np.testing.assert_array_equal(numpy(wa), numpy(wb), err_msg=wa.path)
    assert _eager.traced_functions(traced) and not _eager.traced_functions(stepped)
    # one trace per mode (training and eval where they differ), whatever the batch sizes
    assert traces(traced) == (2 if two_modes else 1)


@tensorflow_only
def test_one_trace_per_mode_whatever_the_batch_and_spatial_sizes() -> None:
    layers = (nk.BatchNormalization(), nk.InstanceNormalization(), nk.GroupNormalization(groups=2))
    rng = np.random.default_rng(13)
    for batch, height, width in ((2, 3, 3), (5, 3, 3), (3, 7, 2), (9, 1, 4), (4, 6, 6), (1, 2, 5), (7, 4, 1)):
        x = rng.normal(size=(batch, height, width, 4)).astype("float32")
        for layer in layers:
            layer(x, training=True)
            layer(x, training=False)
    assert [traces(layer) for layer in layers] == [2, 1, 1]


def test_layer_and_rms_norm_always_run_op_by_op() -> None:
    """Their traced graphs are not bit-identical to their ops (TensorFlow's arithmetic optimizer
    reorders their broadcast products), and op by op they cost less than Keras's own layers."""
    x = np.random.default_rng(14).normal(size=(3, 4, 8)).astype("float32")
    for layer in (nk.LayerNormalization(), nk.RMSNormalization()):
        layer(x, training=True)
        layer(x)
        assert not _eager.traced_functions(layer)


@tensorflow_only
def test_traced_group_norm_is_keras_group_norm_bit_for_bit() -> None:
    """The ``keras`` preset runs Keras's own group norm: traced, the swap still changes no bit
    (Keras's layer called eagerly, op by op, is the oracle)."""
    ours, stock = nk.GroupNormalization(groups=4), keras.layers.GroupNormalization(groups=4)
    x = np.random.default_rng(3).normal(5.0, 2.0, size=(3, 6, 5, 8)).astype("float32")
    ours.build(x.shape)
    stock.build(x.shape)
    weights = [
        np.random.default_rng(4).normal(1.0, 0.5, size=w.shape).astype("float32") for w in stock.weights
    ]
    ours.set_weights(weights)
    stock.set_weights(weights)
    for batch in (3, 1, 2):
        np.testing.assert_array_equal(numpy(ours(x[:batch])), numpy(stock(x[:batch])))
    assert traces(ours) == 1


@tensorflow_only
@pytest.mark.parametrize("preset", ["keras", "torch"])
def test_traced_batch_norm_follows_keras_and_the_reference_over_several_steps(preset: str) -> None:
    ours = nk.BatchNormalization(preset=preset, momentum=0.8)
    stock = keras.layers.BatchNormalization(momentum=0.8, epsilon=ours.epsilon)
    rng = np.random.default_rng(5)
    mean, var = np.zeros(6), np.ones(6)
    unbiased = ours.unbiased_running_var
    magnitude = 0.0
    for batch in (4, 7, 3, 5):
        x = rng.normal(3.0, 2.0, size=(batch, 3, 6)).astype("float32")
        magnitude = max(magnitude, float(np.abs(x).max()))
        y, expected_stock = numpy(ours(x, training=True)), numpy(stock(x, training=True))
        expected, mean, var = reference.batch_norm(
            x, None, None, mean, var, training=True, momentum=0.2, eps=ours.epsilon, axis=-1,
            unbiased_running_var=unbiased,
        )  # fmt: skip
        gain = centering_gain(x.mean(axis=(0, 1)), x.var(axis=(0, 1)), ours.epsilon)
        np.testing.assert_allclose(y, expected, **output_tolerance("float32", centering_gain=gain).kwargs)
        np.testing.assert_allclose(
            y, expected_stock, **agreement_tolerance("float32", centering_gain=gain).kwargs
        )
        for got, want, statistic in ((ours.moving_mean, mean, "mean"), (ours.moving_variance, var, "var")):
            np.testing.assert_allclose(
                numpy(got), want, **statistics_tolerance("float32", statistic, magnitude).kwargs
            )
    if preset == "keras":  # Keras stores the biased variance too: the moving statistics agree
        for got, want in (
            (ours.moving_mean, stock.moving_mean),
            (ours.moving_variance, stock.moving_variance),
        ):
            np.testing.assert_allclose(
                numpy(got), numpy(want), **statistics_tolerance("float32", "var", magnitude).pairwise().kwargs
            )
    x = rng.normal(3.0, 2.0, size=(2, 3, 6)).astype("float32")
    expected, _, _ = reference.batch_norm(
        x, None, None, mean, var, training=False, momentum=0.0, eps=ours.epsilon, axis=-1,
        unbiased_running_var=unbiased,
    )  # fmt: skip
    gain = centering_gain(mean, var, ours.epsilon)
    for _ in range(2):  # op by op, then traced
        np.testing.assert_allclose(
            numpy(ours(x, training=False)),
            expected,
            **output_tolerance("float32", centering_gain=gain).kwargs,
        )
    assert traces(ours) == 2


def test_instance_norm_traced_is_keras_group_norm_with_one_group_per_channel() -> None:
    x = np.random.default_rng(6).normal(-4.0, 2.0, size=(3, 5, 6, 4)).astype("float32")
    ours, stock = nk.InstanceNormalization(), keras.layers.GroupNormalization(groups=-1)
    ours.build(x.shape)
    stock.build(x.shape)
    weights = [
        np.random.default_rng(7).normal(1.0, 0.5, size=w.shape).astype("float32") for w in stock.weights
    ]
    ours.set_weights(weights)
    stock.set_weights(weights)
    gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-3, np.abs(weights[0]).max())
    for training in (True, False, True):
        np.testing.assert_allclose(
            numpy(ours(x, training=training)), numpy(stock(x)),
            **agreement_tolerance("float32", centering_gain=gain).kwargs,
        )  # fmt: skip
    assert traces(ours) == (1 if BACKEND == "tensorflow" else 0)  # no moving statistics: one mode


STEP = 1e-6  # central differences in float64; their error bound: normalization_gradient_tolerances


def _finite_differences(loss: Callable[..., float], arrays: list[np.ndarray]) -> list[np.ndarray]:
    return central_differences(loss, arrays, STEP)


@tensorflow_only
@pytest.mark.parametrize(
    ("op", "training"), [("batch_norm", True), ("batch_norm", False), ("instance_norm", True)]
)
def test_gradients_through_the_traced_path_match_finite_differences_of_the_reference(
    op: str, training: bool
) -> None:
    import tensorflow as tf

    eps, shape = 1e-3, (4, 3, 2)
    rng = np.random.default_rng(8)
    make = (
        nk.BatchNormalization
        if op == "batch_norm"
        else lambda **kw: nk.InstanceNormalization(track_running_stats=True, **kw)
    )
    layer = make(dtype="float64", epsilon=eps)
    layer.build(shape)
    w, b = rng.normal(1.0, 0.3, size=2), rng.normal(size=2)
    rm, rv = rng.normal(size=2), rng.uniform(0.5, 2.0, size=2)
    state = (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
    for variable, value in zip(state, (w, b, rm, rv), strict=True):
        variable.assign(value)
    x, g = rng.normal(0.3, 1.5, size=shape), rng.normal(size=shape)
    xt = tf.constant(x)
    layer(xt, training=training)  # a configuration's first call runs op by op: the taped one is traced
    for variable, value in zip(state, (w, b, rm, rv), strict=True):
        variable.assign(value)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=training)
        loss = tf.reduce_sum(tf.constant(g) * y)
    got = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    assert traces(layer) == 1  # the gradients came through the traced function

    flag = "training" if op == "batch_norm" else "use_input_stats"
    reference_op = getattr(reference, op)

    def ref(x, w, b):
        return reference_op(
            x, w, b, rm, rv, **{flag: training}, momentum=0.01, eps=eps, axis=-1, unbiased_running_var=False
        )[0]

    by = normalized_by(op, x, w, b, axis=2, training=training, running_mean=rm, running_var=rv, eps=eps)
    gain = centering_gain(by.mean, by.std**2, 0.0, np.abs(by.weight).max())
    np.testing.assert_allclose(
        numpy(y), ref(x, w, b), **output_tolerance("float64", centering_gain=gain).kwargs
    )
    numeric = _finite_differences(lambda *a: float(np.sum(g * ref(*a))), [x, w, b])
    tolerances = normalization_gradient_tolerances(
        x, by.weight, by.bias, g, by.mean, by.std, batch_statistics=by.batch_statistics, step=STEP
    )
    for name, grad, expected, (rtol, atol) in zip(
        ("x", "gamma", "beta"), got, numeric, tolerances, strict=True
    ):
        assert np.abs(expected).max() > 1e-2, name  # a gradient worth comparing
        np.testing.assert_allclose(grad.numpy(), expected, rtol=rtol, atol=atol, err_msg=name)
    if training:  # the moving statistics moved under the tape as in any training call
        _, mean, _ = reference_op(
            x, w, b, rm, rv, **{flag: True}, momentum=0.01, eps=eps, axis=-1, unbiased_running_var=False
        )
        np.testing.assert_allclose(
            numpy(layer.moving_mean), mean, **statistics_tolerance("float64", "mean", np.abs(x).max()).kwargs
        )


@tensorflow_only
def test_a_failed_call_changes_no_state_and_caches_nothing() -> None:
    layer = nk.BatchNormalization()
    x = np.random.default_rng(9).normal(2.0, 1.0, size=(4, 3)).astype("float32")
    layer(x, training=True)
    layer(x, training=True)  # traced from a configuration's second call
    before = [numpy(w) for w in layer.weights]
    cached = _eager.traced_functions(layer)
    assert len(cached) == 1
    layer.momentum = 1.5  # invalid: normkit refuses it, op by op and while the function is traced
    messages = []
    for _ in range(2):  # a new configuration: its first call runs op by op, its second traces it
        with pytest.raises(ValueError, match=r"momentum=1\.5: expected a number in \[0, 1\]") as error:
            layer(x, training=True)
        messages.append(str(error.value))
    assert messages[0] == messages[1]  # the traced path raises the op-by-op path's error
    for w, value in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(numpy(w), value, err_msg=w.path)
    assert _eager.traced_functions(layer).keys() == cached.keys()
    layer.momentum = 0.5  # valid again, and another configuration: op by op, then traced anew
    layer(x, training=True)
    layer(x, training=True)
    # Keras's momentum weighs the old value: two updates with this batch's mean
    expected = 0.25 * before[2] + 0.75 * x.mean(axis=0)
    np.testing.assert_allclose(
        numpy(layer.moving_mean), expected, **statistics_tolerance("float32", "mean", np.abs(x).max()).kwargs
    )
    assert len(_eager.traced_functions(layer)) == 2


@tensorflow_only
def test_edge_cases_run_op_by_op_with_their_errors() -> None:
    layer = nk.BatchNormalization(preset="torch")
    one = np.ones((1, 1, 3), "float32")
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel"):
        layer(one, training=True)
    np.testing.assert_array_equal(numpy(layer.moving_variance), np.ones(3))
    empty = np.ones((0, 2, 3), "float32")
    assert numpy(layer(empty, training=True)).shape == (0, 2, 3)
    np.testing.assert_array_equal(numpy(layer.moving_mean), np.zeros(3))
    assert not _eager.traced_functions(layer)


@tensorflow_only
def test_graphs_masks_stateless_calls_and_strategies_run_op_by_op() -> None:
    import tensorflow as tf

    x = np.random.default_rng(10).normal(1.0, 2.0, size=(4, 5, 3)).astype("float32")
    layer = nk.BatchNormalization()
    layer(x, training=True)  # the first eager call of this configuration: op by op, the next traced
    # inside tf.function: a graph already
    y = tf.function(lambda t: layer(t, training=True))(tf.constant(x))
    mask = np.array([[True] * 5, [True] * 3 + [False] * 2] * 2)
    layer(x, training=True, mask=mask)
    tf.config.run_functions_eagerly(True)  # debugging: every op as written
    try:
        layer(x, training=True)
    finally:
        tf.config.run_functions_eagerly(False)
    assert not _eager.traced_functions(layer)
    # stateless_call: the assignments go to the scope and come back as values, the layer unchanged
    before = [numpy(w) for w in layer.weights]
    y_stateless, updated = layer.stateless_call(
        layer.trainable_variables, layer.non_trainable_variables, tf.constant(x), training=True
    )  # (stateless_call hands its input to call as it is)
    assert not _eager.traced_functions(layer)
    for w, value in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(numpy(w), value)
    y = numpy(layer(x, training=True))  # the traced path, from the same state
    np.testing.assert_array_equal(numpy(y_stateless), y)
    for value, w in zip(updated, layer.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(numpy(value), numpy(w))
    assert traces(layer) == 1
    # a tf.distribute strategy: in its scope, and its (mirrored) variables outside it
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = nk.BatchNormalization()
        mirrored(x, training=True)
        assert not _eager.traced_functions(mirrored)
    mirrored(x, training=True)
    assert not _eager.traced_functions(mirrored)


@tensorflow_only
def test_the_cache_does_not_keep_layers_alive_nor_reach_saved_models(tmp_path) -> None:
    x = np.random.default_rng(11).normal(size=(4, 6, 6, 3)).astype("float32")
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), nk.BatchNormalization(), nk.GroupNormalization(groups=3)]
    )
    for _ in range(2):  # op by op, then traced
        model(x, training=True)
        y = numpy(model(x, training=False))
    assert all(_eager.traced_functions(layer) for layer in model.layers)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(numpy(loaded(x, training=False)), y)
    model.export(tmp_path / "saved", format="tf_saved_model", verbose=False)  # a SavedModel too
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_array_equal(served.serve(tf.constant(x)).numpy(), y)
    probe = weakref.ref(model.layers[0])
    del model, loaded, served
    gc.collect()
    assert probe() is None


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the traced path is TensorFlow's")
def test_other_backends_never_take_the_traced_path() -> None:
    x = np.random.default_rng(12).normal(size=(4, 5, 6, 4)).astype("float32")
    for layer in (nk.BatchNormalization(), nk.InstanceNormalization(), nk.GroupNormalization(groups=2)):
        layer(x, training=True)
        layer(x, training=False)
        assert not _eager.traced_functions(layer)
