"""The Keras layers against Keras's own (the oracle), the float64 reference, and a .keras file."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import normkit
import normkit_tensorflow as nt
from normkit import reference
from normkit.testing.tolerances import (
    Tolerance,
    agreement_tolerance,
    centering_gain,
    output_tolerance,
    statistics_tolerance,
    training_tolerance,
)


def small_model(library: object, seed: int = 0) -> keras.Model:
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> dense -> LayerNorm -> dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(6, 3, padding="same"),
            library.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(6, 3, padding="same"),
            library.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(8),
            library.LayerNormalization(),
            keras.layers.Dense(2),
        ]
    )


# Terms summed per value along small_model's forward pass on a batch of 16 8x8 images: the convs
# 3*3*3 and 3*3*6, the pooling 8*8, the dense layers 6 and 8, layer norm's two passes over 8;
# in training also each batch norm's two passes over 16*8*8 and the loss's mean over 16*2.
EVAL_TERMS = 27 + 54 + 64 + 6 + 8 + 2 * 8
TRAIN_TERMS = EVAL_TERMS + 2 * (2 * 16 * 8 * 8) + 16 * 2
# A training step's backward pass sums about as many again, plus the conv kernels' gradients
# over the 16*8*8 positions.
STEP_TERMS = 2 * TRAIN_TERMS + 2 * 16 * 8 * 8


def data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, size=(64, 8, 8, 3)).astype("float32"), rng.normal(size=(64, 2)).astype(
        "float32"
    )


def test_weights_have_keras_names_and_order() -> None:
    ours, stock = small_model(nt), small_model(keras.layers)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in stock.weights]
    assert [w.trainable for w in ours.weights] == [w.trainable for w in stock.weights]


class LargestStep(keras.callbacks.Callback):
    """The largest change one training step makes to any weight (moving statistics included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0.0
        self.before: list[np.ndarray] = []

    def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
        self.before = [keras.ops.convert_to_numpy(w) for w in self.model.weights]

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        for w, before in zip(self.model.weights, self.before, strict=True):
            self.largest = max(self.largest, float(np.abs(keras.ops.convert_to_numpy(w) - before).max()))


def fit_side_by_side(ours_library: object = nt) -> tuple[keras.Model, keras.Model, int, float]:
    """Keras's model and ours, from the same weights, after two epochs of SGD on the same
    batches; the number of steps taken and the largest change one step made to a weight."""
    stock, ours = small_model(keras.layers), small_model(ours_library)
    ours.set_weights(stock.get_weights())
    x, y = data()
    batch_size, epochs = 16, 2
    largest = LargestStep()
    for model, callbacks in ((stock, [largest]), (ours, [])):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return stock, ours, epochs * -(-len(x) // batch_size), largest.largest


def assert_same_after_fit(stock: keras.Model, ours: keras.Model, steps: int, largest_step: float) -> None:
    """Weights, predictions and training-mode outputs within :func:`training_tolerance`: ``steps``
    steps of STEP_TERMS terms each, relative to the largest single step for the weights and to
    the largest output for the outputs."""

    def tolerance(scale: float) -> Tolerance:
        return training_tolerance("float32", steps=steps, reduction_size=STEP_TERMS, scale=scale)

    x, _ = data()
    for w, got, expected in zip(stock.weights, ours.get_weights(), stock.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, **tolerance(largest_step).kwargs, err_msg=w.path)
    predictions = [m.predict(x, verbose=0) for m in (ours, stock)]
    training = [m(x[:16], training=True).numpy() for m in (ours, stock)]
    for got, expected in (predictions, training):
        np.testing.assert_allclose(got, expected, **tolerance(float(np.abs(expected).max())).kwargs)


def test_same_outputs_and_weights_as_keras_after_two_epochs_of_fit() -> None:
    assert_same_after_fit(*fit_side_by_side())


class _EpsilonOf1e5:
    """normkit's Keras layers with batch norm's epsilon 1e-5 instead of Keras's 1e-3."""

    LayerNormalization = nt.LayerNormalization

    @staticmethod
    def BatchNormalization(**kwargs: object) -> keras.layers.Layer:
        return nt.BatchNormalization(epsilon=1e-5, **kwargs)


def test_the_two_epoch_comparison_fails_for_another_epsilon() -> None:
    """The bound of the test above is far below a semantic difference: epsilon 1e-5 instead of
    Keras's 1e-3 leaves it."""
    with pytest.raises(AssertionError):
        assert_same_after_fit(*fit_side_by_side(_EpsilonOf1e5))


def test_a_model_round_trips_through_a_keras_file(tmp_path) -> None:
    model = small_model(nt)
    model.compile(optimizer="sgd", loss="mse")
    x, y = data()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], nt.BatchNormalization)
    assert loaded.layers[1].get_config() == model.layers[1].get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_stock_keras_weights_load_into_the_normkit_layer(tmp_path) -> None:
    stock, ours = small_model(keras.layers, seed=3), small_model(nt, seed=4)
    x, y = data(2)
    stock.compile(optimizer="sgd", loss="mse")
    stock.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = tmp_path / "stock.weights.h5"
    stock.save_weights(path)
    ours.load_weights(path)
    expected = stock.predict(x, verbose=0)
    # one forward pass in eval (steps=0), relative to the outputs' magnitude
    tolerance = training_tolerance(
        "float32", steps=0, reduction_size=EVAL_TERMS, scale=np.abs(expected).max()
    )
    np.testing.assert_allclose(ours.predict(x, verbose=0), expected, **tolerance.kwargs)


def test_a_frozen_layer_normalizes_with_its_moving_statistics_even_in_training() -> None:
    layer = nt.BatchNormalization()
    x = np.random.default_rng(5).normal(3.0, 2.0, size=(16, 4)).astype("float32")
    layer(x, training=True)
    moving = [layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()]
    layer.trainable = False
    frozen = layer(x, training=True).numpy()
    np.testing.assert_array_equal(frozen, layer(x, training=False).numpy())
    np.testing.assert_array_equal(moving[0], layer.moving_mean.numpy())
    np.testing.assert_array_equal(moving[1], layer.moving_variance.numpy())
    batch_statistics = nt.BatchNormalization()(x, training=True).numpy()
    assert np.abs(frozen - batch_statistics).max() > 0.1  # not what training would have given


@pytest.mark.parametrize("preset", ["keras", "torch"])
def test_batch_normalization_follows_the_reference_under_each_preset(preset: str) -> None:
    p = normkit.get_preset(preset)
    layer = nt.BatchNormalization(preset=preset, dtype="float64")
    assert layer.epsilon == p.batch_norm_eps and layer.momentum == pytest.approx(1 - p.update_weight)
    mean, var = np.zeros(3), np.ones(3)
    rng = np.random.default_rng(6)
    magnitude = 0.0
    for _ in range(6):
        x = rng.normal(5.0, 2.0, size=(10, 4, 3))
        magnitude = max(magnitude, float(np.abs(x).max()))
        y = layer(x, training=True).numpy()
        expected, mean, var = reference.batch_norm(
            x, None, None, mean, var, training=True, momentum=p.update_weight, eps=p.batch_norm_eps, axis=-1,
            unbiased_running_var=p.running_var_estimator == "unbiased",
        )  # fmt: skip
        # the suite's bound against the reference, with the centering term of these statistics
        gain = centering_gain(x.mean(axis=(0, 1)), x.var(axis=(0, 1)), p.batch_norm_eps)
        np.testing.assert_allclose(y, expected, **output_tolerance("float64", centering_gain=gain).kwargs)
    for got, expected, statistic in ((layer.moving_mean, mean, "mean"), (layer.moving_variance, var, "var")):
        tolerance = statistics_tolerance("float64", statistic, magnitude)
        np.testing.assert_allclose(got.numpy(), expected, **tolerance.kwargs)


def test_one_value_per_channel_is_allowed_under_keras_and_an_error_under_torch() -> None:
    x = np.array([[1.0, 2.0, 3.0]], dtype="float32")
    np.testing.assert_array_equal(nt.BatchNormalization()(x, training=True).numpy(), np.zeros((1, 3)))
    with pytest.raises(
        ValueError, match=r"inputs has shape \(1, 3\): expected more than 1 value per channel"
    ):
        nt.BatchNormalization(preset="torch")(x, training=True)


def test_layer_normalization_over_several_axes_matches_keras_and_the_reference() -> None:
    x = np.random.default_rng(7).normal(-2.0, 3.0, size=(4, 5, 6)).astype("float32")
    ours, stock = nt.LayerNormalization(axis=[1, -1]), keras.layers.LayerNormalization(axis=[1, -1])
    ours.build(x.shape)
    stock.build(x.shape)
    weights = [np.random.default_rng(8).normal(size=w.shape).astype("float32") for w in stock.weights]
    assert weights[0].shape == (6, 5)  # Keras orders γ by the sorted axes as given: -1, then 1
    stock.set_weights(weights)
    ours.set_weights(weights)
    gamma, beta = (w.reshape(5, 6) for w in weights)  # and reshapes it onto axes (1, 2)
    expected = reference.layer_norm(x, gamma, beta, axes=(1, 2), eps=1e-3)
    gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-3, np.abs(gamma).max())
    np.testing.assert_allclose(
        ours(x).numpy(), expected, **output_tolerance("float32", centering_gain=gain).kwargs
    )
    np.testing.assert_allclose(
        ours(x).numpy(), stock(x).numpy(), **agreement_tolerance("float32", centering_gain=gain).kwargs
    )


def test_instance_normalization_follows_the_reference_and_tracks_statistics() -> None:
    layer = nt.InstanceNormalization(track_running_stats=True, dtype="float64")
    rng = np.random.default_rng(9)
    mean, var = np.zeros(3), np.ones(3)
    magnitude = 0.0
    for _ in range(3):
        x = rng.normal(1.0, 2.0, size=(4, 5, 6, 3))
        magnitude = max(magnitude, float(np.abs(x).max()))
        expected, mean, var = reference.instance_norm(
            x, None, None, mean, var, use_input_stats=True, momentum=0.01, eps=1e-3, axis=-1,
            unbiased_running_var=False,
        )  # fmt: skip
        gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-3)
        tolerance = output_tolerance("float64", centering_gain=gain)
        np.testing.assert_allclose(layer(x, training=True).numpy(), expected, **tolerance.kwargs)
    tolerance = statistics_tolerance("float64", "var", magnitude)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, **tolerance.kwargs)
    x = rng.normal(1.0, 2.0, size=(2, 5, 6, 3))
    expected, _, _ = reference.instance_norm(
        x, None, None, mean, var, use_input_stats=False, momentum=0.0, eps=1e-3, axis=-1,
        unbiased_running_var=False,
    )  # fmt: skip
    tolerance = output_tolerance("float64", centering_gain=centering_gain(mean, var, 1e-3))
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, **tolerance.kwargs)
    untracked = nt.InstanceNormalization()
    assert [w.path.split("/")[-1] for w in (untracked.build((None, 5, 6, 3)) or untracked.weights)] == [
        "gamma",
        "beta",
    ]


def test_gradients_reach_gamma_and_beta_through_a_model() -> None:
    model = small_model(nt)
    x, y = data()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x[:8], training=True) - y[:8]) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    names = [w.path for w in model.trainable_weights]
    assert all(g is not None for g in grads), names
    assert any("batch_normalization" in n and n.endswith("gamma") for n in names)


def eval_agreement(state: dict) -> Tolerance:
    """Two backends' eval outputs for one batch-norm state: :func:`agreement_tolerance` with the
    centering gain of its running statistics."""
    arrays = {k: np.asarray(state[k], np.float64) for k in ("weight", "running_mean", "running_var")}
    gain = centering_gain(
        arrays["running_mean"], arrays["running_var"], state["_metadata"]["eps"], arrays["weight"]
    )
    return agreement_tolerance("float32", centering_gain=gain)


def test_state_dict_round_trips_through_normkit_format() -> None:
    layer = nt.BatchNormalization(preset="torch")
    x = np.random.default_rng(10).normal(2.0, 1.0, size=(8, 3)).astype("float32")
    layer(x, training=True)
    state = layer.state_dict()
    assert state["_metadata"]["eps"] == 1e-5 and state["_metadata"]["preset"] == "torch"
    again = nt.BatchNormalization.from_state_dict(state)
    np.testing.assert_array_equal(again(x, training=False).numpy(), layer(x, training=False).numpy())
    core = normkit.BatchNorm.from_state_dict(state).eval()  # the NumPy backend reads it too
    np.testing.assert_allclose(core(x), layer(x, training=False).numpy(), **eval_agreement(state).kwargs)


def test_mixed_precision_policy_behaves_as_keras() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = np.random.default_rng(11).normal(2.0, 3.0, size=(8, 5, 5, 4)).astype("float32")
        for ours, stock in (
            (nt.BatchNormalization(), keras.layers.BatchNormalization()),
            (nt.LayerNormalization(), keras.layers.LayerNormalization()),
        ):
            got, expected = ours(x, training=True), stock(x, training=True)
            assert got.dtype == expected.dtype == tf.float16
            assert all(w.dtype == "float32" for w in ours.weights)
            # float16 input, statistics in float32 (γ = 1): both round to float16 at the end
            axes = (0, 1, 2) if isinstance(ours, nt.BatchNormalization) else (3,)
            x16 = x.astype(np.float16).astype(np.float64)
            gain = centering_gain(x16.mean(axis=axes), x16.var(axis=axes), ours.epsilon)
            tolerance = agreement_tolerance("float16", centering_gain=gain)
            np.testing.assert_allclose(got.numpy(), expected.numpy(), **tolerance.kwargs)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_state_dict_corner_cases() -> None:
    x = np.random.default_rng(12).normal(1.0, 2.0, size=(8, 3)).astype("float32")
    only_shift = nt.BatchNormalization(scale=False)
    only_shift(x, training=True)
    state = only_shift.state_dict()  # normkit keeps γ and β together: γ is exported as 1
    np.testing.assert_array_equal(np.asarray(state["weight"]), np.ones(3))
    core = normkit.BatchNorm.from_state_dict(state).eval()
    np.testing.assert_allclose(core(x), only_shift(x, training=False).numpy(), **eval_agreement(state).kwargs)

    untracked = normkit.BatchNorm(3, track_running_stats=False, preset="keras")
    untracked(x)
    with pytest.raises(normkit.StateDictError, match="tracks no running statistics"):
        nt.BatchNormalization.from_state_dict(untracked.state_dict())

    overridden = normkit.BatchNorm(3, preset="torch", running_var_estimator="biased")
    overridden(x)
    assert not nt.BatchNormalization.from_state_dict(overridden.state_dict()).unbiased_running_var

    wrong = nt.BatchNormalization.from_state_dict(overridden.state_dict())
    with pytest.raises(ValueError, match=r"the state's moving_mean has shape \(3,\), but this input gives"):
        wrong(np.zeros((2, 5), "float32"))


def test_layer_norm_state_over_several_trailing_axes_and_epsilon_zero() -> None:
    state = normkit.LayerNorm((5, 6), preset="torch")
    x = np.random.default_rng(13).normal(size=(2, 5, 6)).astype("float32")
    state(x)
    layer = nt.LayerNormalization.from_state_dict(state.state_dict())  # axis from normalized_shape
    gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-5)
    np.testing.assert_allclose(
        layer(x).numpy(), state(x), **agreement_tolerance("float32", centering_gain=gain).kwargs
    )
    ours, stock = nt.BatchNormalization(epsilon=0), keras.layers.BatchNormalization(epsilon=0)
    assert ours.epsilon == stock.epsilon == 0.0
    with pytest.raises(ValueError, match="epsilon=-1"):
        nt.LayerNormalization(epsilon=-1)
