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
from normkit.testing.tolerances import (
    agreement_tolerance,
    assert_within,
    centering_gain,
    statistics_effect,
    statistics_tolerance,
)

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

STEPS = 20


def random_affine(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.5, 1.5, count).astype(np.float32), rng.normal(0, 0.5, count).astype(np.float32)


def as64(value: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64)


def run_both(
    keras_layer: Any,
    layer: Any,
    shape: tuple[int, ...],
    axes: tuple[int, ...],
    steps: int = STEPS,
    groups: int | None = None,
) -> float:
    """Train both for ``steps`` calls, then three in eval; each output within the bound for two
    implementations (:func:`agreement_tolerance`, with the centering gain of the statistics
    used) plus, in eval from moving statistics, how far the output moves when the two layers'
    moving statistics differ within twice :func:`statistics_tolerance`. Statistics over
    ``axes`` (or, with ``groups``, per sample and block of channels on the last axis); returns the
    largest input magnitude seen in training."""
    rng = np.random.default_rng(7)
    magnitude = 0.0
    for step in range(steps + 3):
        training = step < steps
        x = rng.normal(-1.0, 1.5, size=shape).astype(np.float32)
        expected = keras.ops.convert_to_numpy(keras_layer(x, training=training))
        got = layer.train(training)(x)
        x64 = x.astype(np.float64)
        gamma = float(np.abs(as64(keras_layer.gamma)).max())
        if training or not hasattr(keras_layer, "moving_mean"):
            magnitude = max(magnitude, float(np.abs(x).max())) if training else magnitude
            if groups is not None:  # channels last: (N, ..., G, C/G) blocks
                blocks = x64.reshape(shape[0], -1, groups, shape[-1] // groups)
                mean, var = blocks.mean(axis=(1, 3)), blocks.var(axis=(1, 3))
            else:
                mean, var = x64.mean(axis=axes), x64.var(axis=axes)
            gain = centering_gain(mean, var, keras_layer.epsilon, gamma)
            bound = agreement_tolerance("float32", centering_gain=gain).bound(expected, 0.0)
        else:
            mean, var = as64(keras_layer.moving_mean), as64(keras_layer.moving_variance)  # channels last
            statistics = [statistics_tolerance("float32", s, magnitude).pairwise() for s in ("mean", "var")]
            moved = statistics_effect(
                x64, mean, var, keras_layer.epsilon, gamma,
                mean_error=statistics[0].bound(mean, 0.0), var_error=statistics[1].bound(var, 0.0),
            )  # fmt: skip
            gain = centering_gain(mean, var, keras_layer.epsilon, gamma)
            bound = agreement_tolerance("float32", centering_gain=gain).bound(expected, 0.0) + moved
        error = np.abs(got.astype(np.float64) - expected)
        assert_within(error, bound, f"step {step}")
    return magnitude


def assert_same_moving_statistics(keras_layer: Any, layer: Any, magnitude: float) -> None:
    for ours, theirs, statistic in (
        (layer.running_mean, keras_layer.moving_mean, "mean"),
        (layer.running_var, keras_layer.moving_variance, "var"),
    ):
        tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
        np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(theirs), **tolerance.kwargs)


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
    magnitude = run_both(keras_layer, layer, (16, 5, 5, channels), axes=(0, 1, 2))
    assert_same_moving_statistics(keras_layer, layer, magnitude)


def test_batch_normalization_with_one_value_per_channel_matches_keras() -> None:
    keras_layer = keras.layers.BatchNormalization(momentum=0.5)
    layer = normkit.BatchNorm(preset="keras", momentum=0.5)
    # keras allows it: y = beta, variance 0 pulls the moving variance down
    magnitude = run_both(keras_layer, layer, (1, 4), axes=(0,), steps=3)
    assert_same_moving_statistics(keras_layer, layer, magnitude)


def test_layer_normalization_matches_keras() -> None:
    rng = np.random.default_rng(2)
    keras_layer = keras.layers.LayerNormalization(axis=[1, 3])
    keras_layer.build((None, 4, 5, 6))
    gamma = rng.uniform(0.5, 1.5, (4, 6)).astype(np.float32)
    beta = rng.normal(0, 0.5, (4, 6)).astype(np.float32)
    keras_layer.set_weights([gamma, beta])
    layer = normkit.LayerNorm(axis=(1, 3), preset="keras")
    layer.load_state_dict({"weight": gamma, "bias": beta})
    run_both(keras_layer, layer, (8, 4, 5, 6), axes=(1, 3))


def test_group_normalization_with_one_channel_per_group_is_keras_instance_norm() -> None:
    rng = np.random.default_rng(3)
    channels = 5
    keras_layer = keras.layers.GroupNormalization(groups=-1)
    keras_layer.build((None, 6, 6, channels))
    gamma, beta = random_affine(channels, rng)
    keras_layer.set_weights([gamma, beta])
    layer = normkit.InstanceNorm(preset="keras")
    layer.load_state_dict({"weight": gamma, "bias": beta})
    run_both(keras_layer, layer, (4, 6, 6, channels), axes=(1, 2))


@pytest.mark.parametrize(("groups", "shape"), [(2, (4, 6, 6, 6)), (3, (8, 5, 12)), (1, (4, 3, 3, 4))])
def test_group_normalization_matches_keras(groups: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    channels = shape[-1]
    keras_layer = keras.layers.GroupNormalization(groups=groups)
    keras_layer.build((None, *shape[1:]))
    gamma, beta = random_affine(channels, rng)
    keras_layer.set_weights([gamma, beta])
    layer = normkit.GroupNorm(groups, preset="keras")
    layer.load_state_dict({"weight": gamma, "bias": beta})
    assert (layer.eps, layer.axis) == (keras_layer.epsilon, keras_layer.axis)
    run_both(keras_layer, layer, shape, axes=(), steps=2, groups=groups)


@pytest.mark.parametrize("axis", [-1, (1, 2)])
def test_rms_normalization_matches_keras(axis: int | tuple[int, ...]) -> None:
    """Keras's RMSNormalization (epsilon 1e-6, a ``scale`` weight) against normkit's keras
    preset; RMS norm subtracts no mean, so the bound has no centering term."""
    rng = np.random.default_rng(5)
    shape = (6, 4, 8)
    keras_layer = keras.layers.RMSNormalization(axis=list(axis) if isinstance(axis, tuple) else axis)
    keras_layer.build((None, *shape[1:]))
    scale_shape = tuple(keras.ops.shape(keras_layer.scale))
    scale = rng.uniform(0.5, 1.5, scale_shape).astype(np.float32)
    keras_layer.set_weights([scale])
    layer = normkit.RMSNorm(axis=axis, preset="keras")
    assert layer.eps == keras_layer.epsilon
    layer.load_state_dict({"weight": scale.reshape([shape[a] for a in ((2,) if axis == -1 else axis)])})
    for step in range(3):
        x = rng.normal(-1.0, 1.5, size=shape).astype(np.float32)
        expected = keras.ops.convert_to_numpy(keras_layer(x))
        got = layer(x)
        bound = agreement_tolerance("float32").bound(expected.astype(np.float64), 0.0)
        assert_within(np.abs(got.astype(np.float64) - expected), bound, f"call {step}")


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
    # the same state evaluated by two implementations; the centering gain is large here (the
    # running mean is 3, the running std 0.05)
    statistics = [np.asarray(converted[k], np.float64) for k in ("running_mean", "running_var", "weight")]
    gain = centering_gain(*statistics[:2], metadata["eps"], statistics[2])
    tolerance = agreement_tolerance("float32", centering_gain=gain)
    np.testing.assert_allclose(in_keras_preset, expected, **tolerance.kwargs)
    np.testing.assert_allclose(in_torch_preset, expected, **tolerance.kwargs)
    # keras's own default eps would not do: carrying eps explicitly is what makes them equal
    default_eps = keras.layers.BatchNormalization(axis=-1)
    default_eps.build((None, 5, 5, channels))
    default_eps.set_weights(keras_layer.get_weights())
    difference = np.abs(keras.ops.convert_to_numpy(default_eps(x_nhwc, training=False)) - expected)
    assert np.any(difference > tolerance.bound(expected, 0.0))
