"""At ``|mean|/std = 1e4`` in float32, under this run's Keras backend, every normkit layer stays
within the suite's bound of the float64 reference (with the centering term of the data), in
training, and batch and instance norm in eval with the moving statistics they learned there;
Keras's own ``BatchNormalization`` does too in training on TensorFlow and JAX, whose
``ops.moments`` are two-pass, and returns NaN on torch, whose are ``E[x^2] - E[x]^2``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, numpy

import normkit_keras as nk
from normkit import reference
from normkit.testing.tolerances import (
    assert_within,
    centering_gain,
    output_tolerance,
    statistics_effect,
    statistics_tolerance,
)

OFFSET = 1e4


def shifted(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return (OFFSET + np.random.default_rng(seed).normal(size=shape)).astype("float32")


def test_batch_norm_follows_the_reference_where_keras_on_torch_returns_nan() -> None:
    """64 channels: Keras's torch variance :math:`E[x^2] - E[x]^2` is off by several units of
    ``ulp(1e8) = 8`` in each, so some go negative and their outputs are NaN (its other channels
    are wrong by orders of magnitude); normkit's output and moving statistics are within the
    suite's bounds. Keras's own layer on TensorFlow and JAX is finite (its fused output rounds
    at the size of the centering allowance)."""
    x = shifted((64, 64), 1)
    channels = x.shape[1]
    layer = nk.BatchNormalization(momentum=0.5)
    y = numpy(layer(x, training=True))
    expected, mean, var = reference.batch_norm(
        x, None, None, np.zeros(channels), np.ones(channels), training=True, momentum=0.5, eps=1e-3, axis=-1,
        unbiased_running_var=False,
    )  # fmt: skip
    gain = centering_gain(x.mean(axis=0), x.var(axis=0), 1e-3)
    np.testing.assert_allclose(y, expected, **output_tolerance("float32", centering_gain=gain).kwargs)
    magnitude = float(np.abs(x).max())
    for got, want, statistic in ((layer.moving_mean, mean, "mean"), (layer.moving_variance, var, "var")):
        np.testing.assert_allclose(
            numpy(got), want, **statistics_tolerance("float32", statistic, magnitude).kwargs
        )
    assert (numpy(layer.moving_variance) > 0).all()
    stock = keras.layers.BatchNormalization(momentum=0.5)
    stock_y = numpy(stock(x, training=True))
    if BACKEND == "torch":
        assert np.isnan(stock_y).any(), "Keras's torch BatchNormalization no longer returns NaN here"
    else:
        np.testing.assert_allclose(
            stock_y, expected, **output_tolerance("float32", centering_gain=gain).kwargs
        )


@pytest.mark.parametrize("name", ["layer", "instance", "group-keras", "group-torch", "rms"])
def test_the_other_layers_follow_the_reference(name: str) -> None:
    x = shifted((4, 6, 6, 8), 2)
    if name == "layer":
        layer, axes = nk.LayerNormalization(), (3,)
        expected = reference.layer_norm(x, axes=axes, eps=1e-3)
    elif name == "instance":
        layer, axes = nk.InstanceNormalization(), (1, 2)
        expected = reference.instance_norm(
            x, None, None, None, None, use_input_stats=True, momentum=0.0, eps=1e-3, axis=-1,
            unbiased_running_var=False,
        )[0]  # fmt: skip
    elif name.startswith("group"):
        layer = nk.GroupNormalization(groups=4, epsilon=1e-3, preset=name.split("-")[1])
        axes = None
        expected = reference.group_norm(x, 4, eps=1e-3, axis=3)
    else:
        layer = nk.RMSNormalization()
        expected = reference.rms_norm(x, axes=(3,), eps=1e-6)
    y = numpy(layer(x, training=True))
    if name == "rms":
        gain = 0.0  # no mean is subtracted
    elif axes is None:
        blocks = x.reshape(4, 36, 4, 2).transpose(0, 2, 1, 3).reshape(4, 4, -1).astype(np.float64)
        gain = centering_gain(blocks.mean(axis=2), blocks.var(axis=2), 1e-3)
    else:
        wide = x.astype(np.float64)
        gain = centering_gain(wide.mean(axis=axes), wide.var(axis=axes), 1e-3)
    np.testing.assert_allclose(y, expected, **output_tolerance("float32", centering_gain=gain).kwargs)


@pytest.mark.parametrize("name", ["batch", "instance"])
def test_eval_with_the_moving_statistics_learned_at_1e4_follows_the_reference(name: str) -> None:
    """Four training steps on new batches at ``|mean|/std = 1e4`` (momentum 0.5), then an eval
    call on another: the moving statistics are the float64 reference's within
    :func:`statistics_tolerance`, and the eval output is within the suite's bound of the
    reference's eval output (computed with the reference's moving statistics), widened by how far
    statistics off by that tolerance move it (:func:`statistics_effect`)."""
    batch = name == "batch"
    shape = (64, 8) if batch else (4, 6, 6, 8)
    if batch:
        layer = nk.BatchNormalization(momentum=0.5)
    else:
        layer = nk.InstanceNormalization(track_running_stats=True, momentum=0.5)
    exact = reference.batch_norm if batch else reference.instance_norm
    mode = "training" if batch else "use_input_stats"
    mean, var = np.zeros(8), np.ones(8)
    magnitude = 0.0
    for step in range(4):
        x = shifted(shape, 10 + step)
        magnitude = max(magnitude, float(np.abs(x).max()))
        layer(x, training=True)
        _, mean, var = exact(
            x,
            None,
            None,
            mean,
            var,
            **{mode: True},
            momentum=0.5,
            eps=1e-3,
            axis=-1,
            unbiased_running_var=False,
        )
    tolerances = {
        statistic: statistics_tolerance("float32", statistic, magnitude) for statistic in ("mean", "var")
    }
    np.testing.assert_allclose(numpy(layer.moving_mean), mean, **tolerances["mean"].kwargs)
    np.testing.assert_allclose(numpy(layer.moving_variance), var, **tolerances["var"].kwargs)
    x = shifted(shape, 20)
    y = numpy(layer(x, training=False))
    expected = exact(
        x, None, None, mean, var, **{mode: False}, momentum=0.0, eps=1e-3, axis=-1, unbiased_running_var=False
    )[0]
    moved = statistics_effect(
        x, mean, var, 1e-3,
        mean_error=tolerances["mean"].bound(mean, 0.0), var_error=tolerances["var"].bound(var, 0.0),
    )  # fmt: skip
    tolerance = output_tolerance("float32", centering_gain=centering_gain(mean, var, 1e-3))
    assert_within(np.abs(y - expected), tolerance.bound(expected, 0.0) + moved, f"{name} norm in eval")
