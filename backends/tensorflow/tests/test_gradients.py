"""Gradients through ``tf.GradientTape`` to x, γ and β, against central finite differences of
normkit's float64 reference (an independent oracle), eagerly and inside ``tf.function``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from normkit import reference
from normkit_tensorflow import kernels

EPS = 1e-5
STEP = 1e-6  # central differences in float64: truncation ~1e-12, rounding ~1e-10
TOLERANCE = 1e-7

CASES = [
    # (op, shape, axis or axes, use batch statistics, unbiased running variance)
    ("batch_norm", (4, 3, 2), 1, True, True),
    ("batch_norm", (4, 3, 2), 1, False, True),
    ("batch_norm", (3, 2, 4), 2, True, False),  # channels last, keras's estimator
    ("instance_norm", (2, 3, 4), 1, True, True),
    ("instance_norm", (2, 4, 3), 2, False, True),
    ("layer_norm", (2, 3, 4), (1, 2), None, None),
    ("layer_norm", (3, 2, 4), (0, 2), None, None),  # not trailing
]


def _functions(
    op: str, shape: tuple[int, ...], axis, mode, unbiased, rng
) -> tuple[Callable, Callable, tuple]:
    """``(reference(x, w, b) -> y, kernel(x, w, b) -> y, parameter shape)`` for one case."""
    if op == "layer_norm":
        pshape = tuple(shape[a] for a in axis)
        return (
            lambda x, w, b: reference.layer_norm(x, w, b, axes=axis, eps=EPS),
            lambda x, w, b: kernels.layer_norm(x, w, b, axis, EPS),
            pshape,
        )
    pshape = (shape[axis],)
    rm, rv = rng.normal(size=pshape), rng.uniform(0.5, 2.0, size=pshape)
    flag = "training" if op == "batch_norm" else "use_input_stats"
    reference_op, kernel = getattr(reference, op), getattr(kernels, op)
    return (
        lambda x, w, b: reference_op(
            x, w, b, rm, rv, **{flag: mode}, momentum=0.1, eps=EPS, axis=axis, unbiased_running_var=unbiased
        )[0],
        lambda x, w, b: kernel(x, w, b, tf.constant(rm), tf.constant(rv), mode, 0.1, EPS, axis, unbiased)[0],
        pshape,
    )


def _finite_differences(loss: Callable[..., float], arrays: list[np.ndarray]) -> list[np.ndarray]:
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for position in np.ndindex(array.shape):
            shifted = [a.copy() for a in arrays]
            shifted[index][position] += STEP
            up = loss(*shifted)
            shifted[index][position] -= 2 * STEP
            grad[position] = (up - loss(*shifted)) / (2 * STEP)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize(("op", "shape", "axis", "mode", "unbiased"), CASES)
def test_tape_gradients_match_finite_differences_of_the_reference(
    op, shape, axis, mode, unbiased, traced
) -> None:
    rng = np.random.default_rng(len(shape) * 7 + sum(shape))
    ref, kernel, pshape = _functions(op, shape, axis, mode, unbiased, rng)
    x, w, b = rng.normal(0.3, 1.5, size=shape), rng.normal(size=pshape), rng.normal(size=pshape)
    g = rng.normal(size=shape)

    def gradients(x, w, b):
        with tf.GradientTape() as tape:
            tape.watch([x, w, b])
            y = kernel(x, w, b)
            loss = tf.reduce_sum(tf.constant(g) * y)
        return y, tape.gradient(loss, [x, w, b])

    run = tf.function(gradients) if traced else gradients
    y, autograd = run(tf.constant(x), tf.constant(w), tf.constant(b))
    np.testing.assert_allclose(y.numpy(), ref(x, w, b), rtol=0, atol=1e-12)
    numeric = _finite_differences(lambda *a: float(np.sum(g * ref(*a))), [x, w, b])
    for name, got, expected in zip(("x", "weight", "bias"), autograd, numeric, strict=True):
        assert np.abs(expected).max() > 1e-2, name  # a gradient worth comparing
        np.testing.assert_allclose(got.numpy(), expected, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


def test_gradients_flow_to_variables_and_from_half_precision_input() -> None:
    x = tf.Variable(np.random.default_rng(0).normal(2.0, 1.0, size=(6, 3)).astype(np.float16))
    w, b = tf.Variable(tf.ones(3)), tf.Variable(tf.zeros(3))
    with tf.GradientTape() as tape:
        y, _, _ = kernels.batch_norm(x, w, b, None, None, True, 0.1, EPS, 1, True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.constant([1.0, 2.0, 3.0]))
    grads = tape.gradient(loss, [x, w, b])
    assert y.dtype == tf.float16 and grads[0].dtype == tf.float16
    # d loss / d beta_c = sum over the batch of the upstream weight: 6 * (1, 2, 3)
    np.testing.assert_allclose(grads[2].numpy(), [6.0, 12.0, 18.0], rtol=1e-6)
