"""Gradients through ``tf.GradientTape`` to x, γ and β, against central finite differences of
normkit's float64 reference (an independent oracle), eagerly and inside ``tf.function``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf

from normkit import reference
from normkit.testing.tolerances import (
    centering_gain,
    central_differences,
    normalization_gradient_tolerances,
    normalized_by,
    output_tolerance,
    training_tolerance,
)
from normkit_tensorflow import kernels

EPS = 1e-5
STEP = 1e-6  # central differences in float64; their error bound: normalization_gradient_tolerances

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
) -> tuple[Callable, Callable, tuple, np.ndarray | None, np.ndarray | None]:
    """``(reference(x, w, b) -> y, kernel(x, w, b) -> y, parameter shape, running mean,
    running variance)`` for one case."""
    if op == "layer_norm":
        pshape = tuple(shape[a] for a in axis)
        return (
            lambda x, w, b: reference.layer_norm(x, w, b, axes=axis, eps=EPS),
            lambda x, w, b: kernels.layer_norm(x, w, b, axis, EPS),
            pshape,
            None,
            None,
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
        rm,
        rv,
    )


def _finite_differences(loss: Callable[..., float], arrays: list[np.ndarray]) -> list[np.ndarray]:
    return central_differences(loss, arrays, STEP)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize(("op", "shape", "axis", "mode", "unbiased"), CASES)
def test_tape_gradients_match_finite_differences_of_the_reference(
    op, shape, axis, mode, unbiased, traced
) -> None:
    rng = np.random.default_rng(len(shape) * 7 + sum(shape))
    ref, kernel, pshape, rm, rv = _functions(op, shape, axis, mode, unbiased, rng)
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
    by = normalized_by(op, x, w, b, axis=axis, training=mode, running_mean=rm, running_var=rv, eps=EPS)
    gain = centering_gain(by.mean, by.std**2, 0.0, np.abs(by.weight).max())
    np.testing.assert_allclose(
        y.numpy(), ref(x, w, b), **output_tolerance("float64", centering_gain=gain).kwargs
    )
    numeric = _finite_differences(lambda *a: float(np.sum(g * ref(*a))), [x, w, b])
    tolerances = normalization_gradient_tolerances(
        x, by.weight, by.bias, g, by.mean, by.std, batch_statistics=by.batch_statistics, step=STEP
    )
    for name, got, expected, (rtol, atol) in zip(
        ("x", "weight", "bias"), autograd, numeric, tolerances, strict=True
    ):
        assert np.abs(expected).max() > 1e-2, name  # a gradient worth comparing
        np.testing.assert_allclose(got.numpy(), expected, rtol=rtol, atol=atol, err_msg=name)


def test_gradients_flow_to_variables_and_from_half_precision_input() -> None:
    x = tf.Variable(np.random.default_rng(0).normal(2.0, 1.0, size=(6, 3)).astype(np.float16))
    w, b = tf.Variable(tf.ones(3)), tf.Variable(tf.zeros(3))
    with tf.GradientTape() as tape:
        y, _, _ = kernels.batch_norm(x, w, b, None, None, True, 0.1, EPS, 1, True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.constant([1.0, 2.0, 3.0]))
    grads = tape.gradient(loss, [x, w, b])
    assert y.dtype == tf.float16 and grads[0].dtype == tf.float16
    # d loss / d beta_c = sum over the batch of the upstream weight: 6 * (1, 2, 3), a sum of small
    # integers, exact in any order and any float dtype
    np.testing.assert_array_equal(grads[2].numpy(), [6.0, 12.0, 18.0])


def _analytic_gradients(x, w, g, axes, eps, batch_stats, rm=None, rv=None):
    """The textbook gradients of y = w * (x - mean) / sqrt(var + eps) + b in float64 NumPy,
    with ``u = g * w``: with batch statistics ``dx = (u - mean(u) - xhat * mean(u * xhat)) / s``;
    with fixed statistics ``dx = u / s``; ``dw = sum(g * xhat)`` and ``db = sum(g)`` over the
    axes w does not vary along."""
    if batch_stats:
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    else:
        mean, var = rm, rv
    s = np.sqrt(var + eps)
    xhat = (x - mean) / s
    u = g * w
    if batch_stats:
        dx = (u - u.mean(axis=axes, keepdims=True) - xhat * (u * xhat).mean(axis=axes, keepdims=True)) / s
    else:
        dx = u / s
    other = tuple(a for a in range(x.ndim) if w.shape[a] == 1)
    return dx, (g * xhat).sum(axis=other).reshape(-1), g.sum(axis=other).reshape(-1)


def _gradient_scales(x, w, g, axes, eps, batch_stats, rm=None, rv=None) -> list[float]:
    """The largest magnitude of the terms each of the textbook gradients sums (the formulas
    above on absolute values): what their rounding is relative to."""
    if batch_stats:
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    else:
        mean, var = rm, rv
    s = np.sqrt(var + eps)
    xhat = np.abs((x - mean) / s)
    u = np.abs(g * w)
    dx = (u + u.mean(axis=axes, keepdims=True) + xhat * (u * xhat).mean(axis=axes, keepdims=True)) / s
    other = tuple(a for a in range(x.ndim) if w.shape[a] == 1)
    return [
        float(dx.max()),
        float((np.abs(g) * xhat).sum(axis=other).max()),
        float(np.abs(g).sum(axis=other).max()),
    ]


@pytest.mark.parametrize(
    ("op", "training"),
    [("batch_norm", True), ("batch_norm", False), ("instance_norm", True), ("layer_norm", True)],
)
def test_tape_gradients_match_the_textbook_formulas(op: str, training: bool) -> None:
    rng = np.random.default_rng(11)
    x, g = rng.normal(0.5, 2.0, size=(5, 3, 4)), rng.normal(size=(5, 3, 4))
    if op == "layer_norm":
        w, b, shape, axes = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), (1, 3, 4), (1, 2)
    else:
        w, b, shape = rng.normal(size=3), rng.normal(size=3), (1, 3, 1)
        axes = (0, 2) if op == "batch_norm" else (2,)
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    tx, tw, tb = tf.constant(x), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([tx, tw, tb])
        if op == "layer_norm":
            y = kernels.layer_norm(tx, tw, tb, axes, EPS)
        else:
            kernel = getattr(kernels, op)
            y = kernel(tx, tw, tb, tf.constant(rm), tf.constant(rv), training, 0.1, EPS, 1, True)[0]
        loss = tf.reduce_sum(tf.constant(g) * y)
    got = [t.numpy().reshape(-1) if i else t.numpy() for i, t in enumerate(tape.gradient(loss, [tx, tw, tb]))]
    arguments = (x, w.reshape(shape), g, axes, EPS, training, rm.reshape(1, 3, 1), rv.reshape(1, 3, 1))
    expected = _analytic_gradients(*arguments)
    # two float64 computations of one gradient: the statistics' two passes and the backward
    # pass's two sums, over at most x.size terms each, relative to the terms summed
    terms = 4 * x.size
    for name, a, e, scale in zip(
        ("x", "weight", "bias"), got, expected, _gradient_scales(*arguments), strict=True
    ):
        tolerance = training_tolerance("float64", steps=0, reduction_size=terms, scale=scale)
        np.testing.assert_allclose(a, e, **tolerance.kwargs, err_msg=name)
