"""normkit's public ops inside ``tf.function`` with dimensions unknown while tracing: the
validation skips what it cannot see and the kernels handle sizes at run time. Checked against
the NumPy backend on the same values."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import normkit
from normkit.testing.tolerances import agreement_tolerance, centering_gain, statistics_tolerance

SPECS = [[None, 3, 4], [None, None, None]]


def traced(function, spec):
    return tf.function(function, input_signature=[tf.TensorSpec(spec, tf.float32)], autograph=False)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_public_ops_trace_with_unknown_dimensions(spec) -> None:
    rm, rv = tf.zeros(3), tf.ones(3)
    x_np = np.random.default_rng(0).normal(2.0, 3.0, size=(5, 3, 4)).astype("float32")
    batch = traced(lambda x: normkit.batch_norm(x, rm, rv, training=True, axis=1), spec)
    layer = traced(lambda x: normkit.layer_norm(x, 4), spec)
    instance = traced(lambda x: normkit.instance_norm(x, axis=1).y, spec)
    y, mean, var = batch(tf.constant(x_np))
    y_np, mean_np, var_np = normkit.batch_norm(
        x_np, np.zeros(3, "float32"), np.ones(3, "float32"), training=True, axis=1
    )
    # two backends on the same input: each within the suite's bound, so within twice it
    x64 = x_np.astype(np.float64)
    for got, expected, axes in (
        (y, y_np, (0, 2)),
        (layer(tf.constant(x_np)), normkit.layer_norm(x_np, 4), (2,)),
        (instance(tf.constant(x_np)), normkit.instance_norm(x_np, axis=1).y, (2,)),
    ):
        gain = centering_gain(x64.mean(axis=axes), x64.var(axis=axes), 1e-5)
        np.testing.assert_allclose(
            got.numpy(), expected, **agreement_tolerance("float32", centering_gain=gain).kwargs
        )
    magnitude = float(np.abs(x_np).max())
    for got, expected, statistic in ((mean, mean_np, "mean"), (var, var_np, "var")):
        tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
        np.testing.assert_allclose(got.numpy(), expected, **tolerance.kwargs)  # var: the n/(n-1) of run time


def test_sizes_only_known_at_run_time_leave_the_statistics_finite() -> None:
    """An empty batch, or one value per channel with the unbiased estimator, reaches the kernel
    of a traced graph unchecked: the running statistics stay as they were (not NaN)."""
    rm, rv = tf.constant([0.5, -1.0, 2.0]), tf.constant([1.5, 2.0, 0.5])
    batch = traced(lambda x: normkit.batch_norm(x, rm, rv, training=True, axis=1)[1:], [None, 3])
    for x in (np.zeros((0, 3), "float32"), np.ones((1, 3), "float32")):
        mean, var = batch(tf.constant(x))
        np.testing.assert_array_equal(mean.numpy(), rm.numpy())
        np.testing.assert_array_equal(var.numpy(), rv.numpy())
