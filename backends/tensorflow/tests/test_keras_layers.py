"""The Keras layers against Keras's own (the oracle), the float64 reference, and a .keras file."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import normkit
import normkit_tensorflow as nt
from normkit import reference


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


def data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, size=(64, 8, 8, 3)).astype("float32"), rng.normal(size=(64, 2)).astype(
        "float32"
    )


def test_weights_have_keras_names_and_order() -> None:
    ours, stock = small_model(nt), small_model(keras.layers)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in stock.weights]
    assert [w.trainable for w in ours.weights] == [w.trainable for w in stock.weights]


def test_same_outputs_and_weights_as_keras_after_two_epochs_of_fit() -> None:
    stock, ours = small_model(keras.layers), small_model(nt)
    ours.set_weights(stock.get_weights())
    x, y = data()
    for model in (stock, ours):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for got, expected in zip(ours.get_weights(), stock.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.predict(x, verbose=0), stock.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    training = [m(x[:16], training=True).numpy() for m in (ours, stock)]
    np.testing.assert_allclose(*training, rtol=1e-5, atol=1e-6)


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
    np.testing.assert_allclose(ours.predict(x, verbose=0), stock.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


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
    for _ in range(6):
        x = rng.normal(5.0, 2.0, size=(10, 4, 3))
        y = layer(x, training=True).numpy()
        expected, mean, var = reference.batch_norm(
            x, None, None, mean, var, training=True, momentum=p.update_weight, eps=p.batch_norm_eps, axis=-1,
            unbiased_running_var=p.running_var_estimator == "unbiased",
        )  # fmt: skip
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-13)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-13)


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
    np.testing.assert_allclose(ours(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(x).numpy(), stock(x).numpy(), rtol=1e-5, atol=1e-5)


def test_instance_normalization_follows_the_reference_and_tracks_statistics() -> None:
    layer = nt.InstanceNormalization(track_running_stats=True, dtype="float64")
    rng = np.random.default_rng(9)
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = rng.normal(1.0, 2.0, size=(4, 5, 6, 3))
        expected, mean, var = reference.instance_norm(
            x, None, None, mean, var, use_input_stats=True, momentum=0.01, eps=1e-3, axis=-1,
            unbiased_running_var=False,
        )  # fmt: skip
        np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-13)
    x = rng.normal(1.0, 2.0, size=(2, 5, 6, 3))
    expected, _, _ = reference.instance_norm(
        x, None, None, mean, var, use_input_stats=False, momentum=0.0, eps=1e-3, axis=-1,
        unbiased_running_var=False,
    )  # fmt: skip
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-12, atol=1e-12)
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


def test_state_dict_round_trips_through_normkit_format() -> None:
    layer = nt.BatchNormalization(preset="torch")
    x = np.random.default_rng(10).normal(2.0, 1.0, size=(8, 3)).astype("float32")
    layer(x, training=True)
    state = layer.state_dict()
    assert state["_metadata"]["eps"] == 1e-5 and state["_metadata"]["preset"] == "torch"
    again = nt.BatchNormalization.from_state_dict(state)
    np.testing.assert_array_equal(again(x, training=False).numpy(), layer(x, training=False).numpy())
    core = normkit.BatchNorm.from_state_dict(state).eval()  # the NumPy backend reads it too
    np.testing.assert_allclose(core(x), layer(x, training=False).numpy(), rtol=1e-6, atol=1e-6)


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
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=2e-3, atol=2e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_state_dict_corner_cases() -> None:
    x = np.random.default_rng(12).normal(1.0, 2.0, size=(8, 3)).astype("float32")
    only_shift = nt.BatchNormalization(scale=False)
    only_shift(x, training=True)
    state = only_shift.state_dict()  # normkit keeps γ and β together: γ is exported as 1
    np.testing.assert_array_equal(np.asarray(state["weight"]), np.ones(3))
    core = normkit.BatchNorm.from_state_dict(state).eval()
    np.testing.assert_allclose(core(x), only_shift(x, training=False).numpy(), rtol=1e-6, atol=1e-6)

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
    np.testing.assert_allclose(layer(x).numpy(), state(x), rtol=1e-5, atol=1e-5)
    ours, stock = nt.BatchNormalization(epsilon=0), keras.layers.BatchNormalization(epsilon=0)
    assert ours.epsilon == stock.epsilon == 0.0
    with pytest.raises(ValueError, match="epsilon=-1"):
        nt.LayerNormalization(epsilon=-1)
