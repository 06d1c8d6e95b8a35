"""Under the ``mixed_float16`` policy, under this run's Keras backend, every normkit layer takes a
float32 input as it is (``autocast = False``): values above float16's largest (65504) are
normalized in float32, and the output, cast to float16, is finite and within the suite's bound of
the float64 reference; batch norm's moving statistics, above 65504 too, stay float32 and are used
in float32 in eval. Keras's own ``BatchNormalization`` and ``RMSNormalization`` autocast the
input to float16 first, to infinity, and return non-finite values; its layer and group norm do
not autocast and stay finite."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
import numpy as np
import pytest
from keras_helpers import numpy

import normkit_keras as nk
from normkit import reference
from normkit.testing.tolerances import (
    assert_within,
    centering_gain,
    output_tolerance,
    statistics_effect,
    statistics_tolerance,
)

SHAPE = (4, 5, 5, 8)
BIG = 1e5  # above float16's largest finite value, 65504


@pytest.fixture(autouse=True)
def mixed_float16() -> Iterator[None]:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def data(seed: int) -> np.ndarray:
    """float32 values around 1e5 with standard deviation 1e3 (``|mean|/std = 100``)."""
    return (BIG + 1e3 * np.random.default_rng(seed).normal(size=SHAPE)).astype("float32")


def gain(x: np.ndarray, axes: tuple[int, ...], eps: float) -> float:
    wide = x.astype(np.float64)
    return centering_gain(wide.mean(axis=axes), wide.var(axis=axes), eps)


def grouped_gain(x: np.ndarray, groups: int, eps: float) -> float:
    blocks = np.moveaxis(x.astype(np.float64), -1, 1).reshape(x.shape[0], groups, -1)
    return centering_gain(blocks.mean(axis=2), blocks.var(axis=2), eps)


def instance_norm(x: np.ndarray) -> np.ndarray:
    return reference.instance_norm(
        x,
        None,
        None,
        None,
        None,
        use_input_stats=True,
        momentum=0.0,
        eps=1e-3,
        axis=3,
        unbiased_running_var=False,
    )[0]


CASES: dict[str, tuple[Callable[[], keras.layers.Layer], Callable[[], keras.layers.Layer], Callable]] = {
    # name: (normkit layer, Keras's layer, (x) -> (float64 reference output, centering gain))
    "batch": (
        nk.BatchNormalization,
        keras.layers.BatchNormalization,
        lambda x: (
            reference.normalize(x, x.mean((0, 1, 2)), x.var((0, 1, 2)), eps=1e-3, axis=3),
            gain(x, (0, 1, 2), 1e-3),
        ),
    ),
    "layer": (
        nk.LayerNormalization,
        keras.layers.LayerNormalization,
        lambda x: (reference.layer_norm(x, axes=(3,), eps=1e-3), gain(x, (3,), 1e-3)),
    ),
    "instance": (
        nk.InstanceNormalization,
        lambda: keras.layers.GroupNormalization(groups=-1),
        lambda x: (instance_norm(x), gain(x, (1, 2), 1e-3)),
    ),
    "group": (
        lambda: nk.GroupNormalization(groups=4),
        lambda: keras.layers.GroupNormalization(groups=4),
        lambda x: (reference.group_norm(x, 4, eps=1e-3, axis=3), grouped_gain(x, 4, 1e-3)),
    ),
    "rms": (
        nk.RMSNormalization,
        keras.layers.RMSNormalization,
        lambda x: (reference.rms_norm(x, axes=(3,), eps=1e-6), 0.0),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_input_above_65504_gives_finite_correct_float16_output(name: str) -> None:
    make, make_stock, exact = CASES[name]
    x = data(1)
    assert np.abs(x).min() > np.finfo(np.float16).max
    ours = make()
    assert ours.autocast is False and ours.compute_dtype == "float16"
    y = ours(x, training=True) if name in ("batch", "instance") else ours(x)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert all(w.dtype == "float32" for w in ours.weights)
    got = numpy(y)
    assert np.isfinite(got).all()
    expected, centering = exact(x.astype(np.float64))
    # float32 statistics of the float32 input, one rounding to float16 at the end
    np.testing.assert_allclose(got, expected, **output_tolerance("float16", centering_gain=centering).kwargs)
    stock = make_stock()
    stock_y = numpy(stock(x, training=True) if name == "batch" else stock(x))
    if name in ("batch", "rms"):  # Keras autocasts these inputs to float16: inf, then NaN
        assert stock.autocast and not np.isfinite(stock_y).all()
    else:
        assert not stock.autocast and np.isfinite(stock_y).all()


def test_the_batch_norm_moving_statistics_stay_float32_and_correct() -> None:
    x = data(2)
    layer = nk.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    wide = x.astype(np.float64)
    magnitude = float(np.abs(x).max())
    for got, expected, statistic in (
        (layer.moving_mean, wide.mean((0, 1, 2)), "mean"),
        (layer.moving_variance, wide.var((0, 1, 2)), "var"),
    ):
        assert got.dtype == "float32"
        tolerance = statistics_tolerance("float32", statistic, magnitude)
        np.testing.assert_allclose(numpy(got), expected, **tolerance.kwargs)


def test_batch_norm_eval_uses_moving_statistics_above_65504_in_float32() -> None:
    """Trained on float32 data around 1e5 (momentum 0: the moving statistics are the batch's),
    the float32 moving mean is above float16's largest value; eval normalizes a new float32
    batch with it in float32: a finite float16 output within the suite's float16 bound of the
    reference's eval output, widened by how far the stored statistics may move it. Keras's own
    layer autocasts the input to float16 (infinity) and its eval output is not finite."""
    x, new = data(3), data(4)
    layer = nk.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    wide = x.astype(np.float64)
    mean, var = wide.mean((0, 1, 2)), wide.var((0, 1, 2))
    assert (numpy(layer.moving_mean) > np.finfo(np.float16).max).all()
    magnitude = float(np.abs(x).max())
    tolerances = {
        statistic: statistics_tolerance("float32", statistic, magnitude) for statistic in ("mean", "var")
    }
    np.testing.assert_allclose(numpy(layer.moving_mean), mean, **tolerances["mean"].kwargs)
    np.testing.assert_allclose(numpy(layer.moving_variance), var, **tolerances["var"].kwargs)
    y = layer(new, training=False)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    got = numpy(y).astype(np.float64)
    assert np.isfinite(got).all()
    expected = reference.normalize(new.astype(np.float64), mean, var, eps=1e-3, axis=3)
    moved = statistics_effect(
        new, mean, var, 1e-3,
        mean_error=tolerances["mean"].bound(mean, 0.0), var_error=tolerances["var"].bound(var, 0.0),
    )  # fmt: skip
    tolerance = output_tolerance("float16", centering_gain=centering_gain(mean, var, 1e-3))
    assert_within(np.abs(got - expected), tolerance.bound(expected, 0.0) + moved, "eval under mixed_float16")
    stock = keras.layers.BatchNormalization(momentum=0.0)
    stock(x, training=True)
    assert not np.isfinite(numpy(stock(new, training=False))).all()
