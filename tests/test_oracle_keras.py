"""normkit's NumPy layers under the keras preset against Keras 3's own layers (the oracle).

Keras (TensorFlow backend) is installed in the test environment as an oracle, not as a backend:
normkit runs on NumPy arrays and every result is compared with the Keras layer on the same data:
20 training steps (``training=True``), then eval; outputs and moving statistics. Then a
torch-preset state converted to the keras preset must give Keras's eval output.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import normkit

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

STEPS = 20
TOLERANCE = {"rtol": 5e-6, "atol": 5e-6}


def random_affine(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.5, 1.5, count).astype(np.float32), rng.normal(0, 0.5, count).astype(np.float32)


def run_both(keras_layer: Any, layer: Any, shape: tuple[int, ...], steps: int = STEPS) -> None:
    rng = np.random.default_rng(7)
    for step in range(steps + 3):
        training = step < steps
        x = rng.normal(-1.0, 1.5, size=shape).astype(np.float32)
        expected = keras.ops.convert_to_numpy(keras_layer(x, training=training))
        got = layer.train(training)(x)
        np.testing.assert_allclose(got, expected, **TOLERANCE, err_msg=f"step {step}")


def test_batch_normalization_matches_keras() -> None:
    rng = np.random.default_rng(1)
    channels = 6
    keras_layer = keras.layers.BatchNormalization()
    keras_layer.build((None, 5, 5, channels))
    gamma, beta = random_affine(channels, rng)
    keras_layer.set_weights([gamma, beta, np.zeros(channels, np.float32), np.ones(channels, np.float32)])
    layer = normkit.BatchNorm(preset="keras")
    layer.load_state_dict(
        {"weight": gamma, "bias": beta, "running_mean": np.zeros(channels, np.float32),
         "running_var": np.ones(channels, np.float32), "num_batches_tracked": 0}
    )  # fmt: skip
    assert (layer.eps, layer.momentum, layer.axis) == (
        keras_layer.epsilon,
        keras_layer.momentum,
        keras_layer.axis,
    )
    run_both(keras_layer, layer, (16, 5, 5, channels))
    np.testing.assert_allclose(
        layer.running_mean, keras.ops.convert_to_numpy(keras_layer.moving_mean), **TOLERANCE
    )
    np.testing.assert_allclose(
        layer.running_var, keras.ops.convert_to_numpy(keras_layer.moving_variance), **TOLERANCE
    )


def test_batch_normalization_with_one_value_per_channel_matches_keras() -> None:
    keras_layer = keras.layers.BatchNormalization(momentum=0.5)
    layer = normkit.BatchNorm(preset="keras", momentum=0.5)
    run_both(
        keras_layer, layer, (1, 4), steps=3
    )  # keras allows it: y = beta, variance 0 pulls the moving variance down
    np.testing.assert_allclose(
        layer.running_var, keras.ops.convert_to_numpy(keras_layer.moving_variance), **TOLERANCE
    )


def test_layer_normalization_matches_keras() -> None:
    rng = np.random.default_rng(2)
    keras_layer = keras.layers.LayerNormalization(axis=[1, 3])
    keras_layer.build((None, 4, 5, 6))
    gamma = rng.uniform(0.5, 1.5, (4, 6)).astype(np.float32)
    beta = rng.normal(0, 0.5, (4, 6)).astype(np.float32)
    keras_layer.set_weights([gamma, beta])
    layer = normkit.LayerNorm(axis=(1, 3), preset="keras")
    layer.load_state_dict({"weight": gamma, "bias": beta})
    run_both(keras_layer, layer, (8, 4, 5, 6))


def test_group_normalization_with_one_channel_per_group_is_keras_instance_norm() -> None:
    rng = np.random.default_rng(3)
    channels = 5
    keras_layer = keras.layers.GroupNormalization(groups=-1)
    keras_layer.build((None, 6, 6, channels))
    gamma, beta = random_affine(channels, rng)
    keras_layer.set_weights([gamma, beta])
    layer = normkit.InstanceNorm(preset="keras")
    layer.load_state_dict({"weight": gamma, "bias": beta})
    run_both(keras_layer, layer, (4, 6, 6, channels))


def test_a_torch_preset_state_converted_to_keras_gives_keras_eval_output() -> None:
    rng = np.random.default_rng(4)
    channels = 4
    trained = normkit.BatchNorm(
        preset="torch", momentum=0.5
    )  # channels-first, unbiased running variance, eps 1e-5
    for _ in range(30):
        trained(
            rng.normal(3.0, 0.05, size=(8, channels, 5, 5)).astype(np.float32)
        )  # small variance: eps matters
    converted = normkit.convert_state_dict(trained.state_dict(), "keras", axis=-1)
    metadata = converted["_metadata"]
    keras_layer = keras.layers.BatchNormalization(
        axis=metadata["axis"], epsilon=metadata["eps"], momentum=metadata["momentum"]
    )
    keras_layer.build((None, 5, 5, channels))
    keras_layer.set_weights([converted[k] for k in ("weight", "bias", "running_mean", "running_var")])

    x_nchw = rng.normal(3.0, 0.05, size=(6, channels, 5, 5)).astype(np.float32)
    x_nhwc = np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1))
    expected = keras.ops.convert_to_numpy(keras_layer(x_nhwc, training=False))
    in_keras_preset = normkit.BatchNorm.from_state_dict(converted).eval()(x_nhwc)
    in_torch_preset = np.moveaxis(trained.eval()(x_nchw), 1, -1)
    np.testing.assert_allclose(in_keras_preset, expected, **TOLERANCE)
    np.testing.assert_allclose(in_torch_preset, expected, **TOLERANCE)
    # keras's own default eps would not do: carrying eps explicitly is what makes them equal
    default_eps = keras.layers.BatchNormalization(axis=-1)
    default_eps.build((None, 5, 5, channels))
    default_eps.set_weights(keras_layer.get_weights())
    assert not np.allclose(
        keras.ops.convert_to_numpy(default_eps(x_nhwc, training=False)), expected, atol=1e-2
    )
