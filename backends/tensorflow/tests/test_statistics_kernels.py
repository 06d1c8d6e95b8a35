"""The spec-v2 kernels (moments, normalize, group norm, RMS norm, masked batch norm) against the
float64 reference (:mod:`normkit.reference`), eagerly, inside ``tf.function`` (also with every
dimension unknown while tracing) and under XLA; gradients against finite differences of the
reference or the textbook formulas; the backend's ``astype``; and the traced backends of
:mod:`normkit_tensorflow.testing` serving every op natively.

Every bound is the conformance runner's: for an output, :meth:`Tolerance.bound` of
:func:`output_tolerance` with the case's conditioning (how far the reference moves when each input
is perturbed by one unit of the compute dtype) plus the centering term; for a statistic,
:func:`statistics_tolerance` likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from normkit import reference
from normkit._registry import backend_for, backend_named, load_backend
from normkit.functional.masked import masked_batch_norm
from normkit.numpy_backend import numpy_dtype
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    assert_within,
    central_differences,
    compute_dtype,
    normalization_gradient_tolerances,
    output_tolerance,
    statistics_tolerance,
    training_tolerance,
)
from normkit_tensorflow import kernels
from normkit_tensorflow.testing import register_function_backends

DTYPES = ("float16", "bfloat16", "float32", "float64")
MODES = ("eager", "function", "unknown-shapes", "xla")
"""How a kernel runs: eagerly; in ``tf.function``; in ``tf.function`` traced with every dimension
of ``x`` unknown (``None``); compiled by XLA."""

# (shape, reduced axes of batch norm), channels on axis 1 and on the last axis
LAYOUTS = {"channels-first": ((6, 4, 3, 5), 1), "channels-last": ((6, 3, 5, 4), 3)}


def run(function: Callable[[tf.Tensor], Any], x: tf.Tensor, mode: str) -> Any:
    """``function(x)`` in ``mode`` (see :data:`MODES`); every other argument is closed over."""
    if mode == "eager":
        return function(x)
    if mode == "unknown-shapes":
        spec = tf.TensorSpec([None] * len(x.shape), x.dtype)
        return tf.function(function, input_signature=[spec], autograph=False)(x)
    return tf.function(function, jit_compile=mode == "xla", autograph=False)(x)


def sample(shape: tuple[int, ...], dtype: str, seed: int, loc: float = 1.5, scale: float = 2.0) -> np.ndarray:
    """Normal values rounded to ``dtype`` (the reference then sees exactly the kernel's input)."""
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(numpy_dtype(dtype))


def tensor(array: np.ndarray) -> tf.Tensor:
    return tf.constant(array)


def as64(t: Any) -> np.ndarray:
    return np.asarray(t.numpy() if hasattr(t, "numpy") else t).astype(np.float64)


def perturbed(x: np.ndarray, dtype: str, seed: int) -> np.ndarray:
    """``x`` in float64 with every value moved by up to one unit of the compute dtype."""
    x64 = x.astype(np.float64)
    u = np.random.default_rng([seed, 7]).uniform(-1.0, 1.0, size=x64.shape)
    return x64 * (1.0 + EPS[compute_dtype(dtype)] * u)


def output_bound(dtype: str, expected: np.ndarray, moved: np.ndarray, gain: np.ndarray | float) -> np.ndarray:
    """The runner's bound on an output: :func:`output_tolerance` with the conditioning
    ``max|expected - moved|`` plus ``CENTERING_FACTOR * eps_c * gain`` per element."""
    conditioning = float(np.abs(expected - moved).max()) if expected.size else 0.0
    eps_c = EPS[compute_dtype(dtype)]
    return output_tolerance(dtype).bound(expected, conditioning) + CENTERING_FACTOR * eps_c * np.asarray(gain)


def check_moments(
    got: tuple[tf.Tensor, tf.Tensor, tf.Tensor],
    x: np.ndarray,
    axes: tuple[int, ...],
    mask: np.ndarray | None,
    dtype: str,
    seed: int,
    what: str,
) -> None:
    """``(count, mean, m2)`` against :func:`reference.moments`: the counts exactly (int64), the mean
    and M2/n within :func:`statistics_tolerance` (M2 bounded as n times the variance's bound), an
    empty group exactly ``(0, 0, 0)``."""
    count, mean, m2 = got
    assert count.dtype == tf.int64, what
    assert mean.dtype == m2.dtype == tf.as_dtype(compute_dtype(dtype)), what
    ref_count, ref_mean, ref_m2 = reference.moments(x, axes, mask)
    _, moved_mean, moved_m2 = reference.moments(perturbed(x, dtype, seed), axes, mask)
    assert count.shape == ref_count.shape, what
    np.testing.assert_array_equal(count.numpy(), ref_count, err_msg=what)
    magnitude = float(np.abs(x.astype(np.float64)).max())
    n = np.maximum(ref_count, 1)
    for name, values, expected, moved, statistic, n_or_1 in (
        ("mean", as64(mean), ref_mean, moved_mean, "mean", 1.0),
        ("m2", as64(m2), ref_m2, moved_m2, "var", n),  # M2 = n var: n times the variance's bound
    ):
        conditioning = float(np.abs((expected - moved) / n_or_1).max())
        bound = n_or_1 * statistics_tolerance(dtype, statistic, magnitude).bound(
            expected / n_or_1, conditioning
        )
        assert_within(np.abs(values - expected), bound, f"{what}: {name}")
        np.testing.assert_array_equal(
            values[ref_count == 0], 0.0, err_msg=f"{what}: {name} of an empty group"
        )


def unequal_mask(shape: tuple[int, ...], axis: int, seed: int) -> np.ndarray:
    """A mask whose share of true values grows along ``axis`` from 0 (one channel fully masked,
    count 0) to 0.9, so every channel has its own count."""
    share = np.linspace(0.0, 0.9, shape[axis]).reshape(
        [shape[axis] if a == axis else 1 for a in range(len(shape))]
    )
    return np.random.default_rng([seed, 3]).random(shape) < share


# -- moments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_match_the_reference(dtype: str, layout: str, masked: bool, mode: str) -> None:
    shape, axis = LAYOUTS[layout]
    axes = tuple(a for a in range(len(shape)) if a != axis)
    seed = DTYPES.index(dtype) * 10 + len(layout)
    x = sample(shape, dtype, seed)
    mask = unequal_mask(shape, axis, seed) if masked else None
    constant = None if mask is None else tensor(mask)
    got = run(lambda t: kernels.moments(t, axes, constant, None, None), tensor(x), mode)
    check_moments(got, x, axes, mask, dtype, seed, f"{dtype} {layout} {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moments_at_an_offset_of_1e4_sigma_in_float32(layout: str, mode: str) -> None:
    """|mean|/std = 1e4: E[x^2] - E[x]^2 would lose every digit of M2 (ε₃₂·1e8 ≫ 1)."""
    shape, axis = LAYOUTS[layout]
    axes = tuple(a for a in range(len(shape)) if a != axis)
    x = sample(shape, "float32", 41, loc=1e4, scale=1.0)
    for mask in (None, np.random.default_rng(5).random(shape) < 0.5):
        constant = None if mask is None else tensor(mask)
        got = run(lambda t, c=constant: kernels.moments(t, axes, c, None, None), tensor(x), mode)
        check_moments(got, x, axes, mask, "float32", 41, f"{layout} {mode} masked={mask is not None}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moments_of_channel_groups_pool_contiguous_blocks(layout: str, groups: int, mode: str) -> None:
    """``group_axis``/``num_groups``: channel ``c`` is in block ``c // (C/G)``; the reference
    sees the channel axis reshaped into ``(G, C/G)`` with the ``C/G`` sub-axis reduced. A mask
    broadcast along the channels (size 1 there) is split too."""
    shape, axis = LAYOUTS[layout]
    x = sample(shape, "float32", 50 + groups, loc=-3.0)
    axes = tuple(a for a in range(1, len(shape)) if a != axis)  # group norm's: per sample
    split = (*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])
    split_axes = tuple(sorted([a + 1 if a > axis else a for a in axes] + [axis + 1]))
    mask_shape = tuple(1 if a == axis else s for a, s in enumerate(shape))
    mask = np.random.default_rng(groups).random(mask_shape) < 0.6
    for m in (None, mask):
        constant = None if m is None else tensor(m)
        got = run(lambda t, c=constant: kernels.moments(t, axes, c, axis, groups), tensor(x), mode)
        full = None if m is None else np.broadcast_to(m, shape).reshape(split)
        check_moments(got, x.reshape(split), split_axes, full, "float32", 50 + groups, f"G={groups} {mode}")


@pytest.mark.parametrize("mode", MODES)
def test_empty_groups_and_empty_input_are_the_identity_of_the_merge(mode: str) -> None:
    for shape, axes, mask in (
        ((0, 3), (0,), None),  # no values at all: three empty groups
        ((2, 3), (0,), np.zeros((2, 1), bool)),  # everything masked
        ((4, 0, 2), (1,), None),  # empty reduced axis
    ):
        constant = None if mask is None else tensor(mask)
        count, mean, m2 = run(
            lambda t, c=constant, a=axes: kernels.moments(t, a, c, None, None), tf.ones(shape), mode
        )
        kept = tuple(s for i, s in enumerate(shape) if i not in axes)
        for value, dtype in ((count, tf.int64), (mean, tf.float32), (m2, tf.float32)):
            assert value.dtype == dtype and tuple(value.shape) == kept
            np.testing.assert_array_equal(value.numpy(), np.zeros(kept), err_msg=f"{shape} {mode}")


def test_a_nan_under_the_mask_reaches_neither_the_statistics_nor_the_gradient() -> None:
    x = np.array([[1.0, np.nan], [3.0, np.inf], [np.nan, 6.0]])
    mask = np.isfinite(x)
    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        count, mean, m2 = kernels.moments(t, (0,), tf.constant(mask), None, None)
        loss = tf.reduce_sum(mean) + tf.reduce_sum(m2)
    gradient = tape.gradient(loss, t).numpy()
    np.testing.assert_array_equal(count.numpy(), [2, 1])
    np.testing.assert_array_equal(mean.numpy(), [2.0, 6.0])  # exact: small integers
    np.testing.assert_array_equal(m2.numpy(), [2.0, 0.0])
    # d(mean + m2)/dx = mask (1/n + 2 (x - mean)): exact here
    np.testing.assert_array_equal(gradient, [[0.5 - 2.0, 0.0], [0.5 + 2.0, 0.0], [0.0, 1.0]])


def test_moments_gradients_match_the_textbook_formula() -> None:
    """L = Σ a·mean + Σ b·M2 has dL/dx = m (a/n + 2 b (x - mean)) per group (masked values: 0)."""
    rng = np.random.default_rng(60)
    shape, axes = (5, 3, 4), (0, 2)
    x = rng.normal(2.0, 1.5, size=shape)
    mask = unequal_mask(shape, 1, 60) | (np.arange(3) == 0).reshape(1, 3, 1)  # channel 0 all counted
    a, b = rng.normal(size=3), rng.normal(size=3)
    t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(t)
        _, mean, m2 = kernels.moments(t, axes, tf.constant(mask), None, None)
        loss = tf.reduce_sum(tf.constant(a) * mean) + tf.reduce_sum(tf.constant(b) * m2)
    got = tape.gradient(loss, t).numpy()
    count, ref_mean, _ = reference.moments(x, axes, mask)
    n = np.maximum(count, 1).reshape(1, 3, 1)
    deviation = x - ref_mean.reshape(1, 3, 1)
    expected = mask * (a.reshape(1, 3, 1) / n + 2 * b.reshape(1, 3, 1) * deviation)
    # the float64 sums along the way (the two passes and the backward sums, 4 x.size terms),
    # relative to the terms summed: |a|/n and 2|b| (|x - mean| + the mean |x - mean|)
    scale = float(np.max(np.abs(a) / n.reshape(-1)) + 2 * np.max(np.abs(b)) * 2 * np.abs(deviation).max())
    tolerance = training_tolerance("float64", steps=0, reduction_size=4 * x.size, scale=scale)
    np.testing.assert_allclose(got, expected, **tolerance.kwargs)


# -- normalize --------------------------------------------------------------------------------


def centering_gain(
    mean: np.ndarray, var: np.ndarray, eps: float, weight: np.ndarray | float = 1.0
) -> np.ndarray:
    return np.abs(mean) * np.abs(weight) / np.sqrt(var + eps)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_per_channel_matches_the_reference(dtype: str, layout: str, mode: str) -> None:
    shape, axis = LAYOUTS[layout]
    axes = tuple(a for a in range(len(shape)) if a != axis)
    seed = 70 + DTYPES.index(dtype)
    x = sample(shape, dtype, seed)
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    mean, var = rng.normal(1.5, 0.5, size=channels), rng.uniform(2.0, 6.0, size=channels)
    weight, bias = rng.normal(1.0, 0.5, size=channels), rng.normal(size=channels)
    stat = "float64" if dtype == "float64" else "float32"  # statistics as moments returns them
    args = [tf.constant(v.astype(stat)) for v in (mean, var, weight, bias)]
    y = run(lambda t: kernels.normalize(t, *args, 1e-3, axes, (axis,)), tensor(x), mode)
    assert y.dtype == tf.as_dtype(dtype) and tuple(y.shape) == shape
    mean, var, weight, bias = (as64(a) for a in args)
    expected = reference.normalize(x, mean, var, weight, bias, eps=1e-3, axis=axis)
    moved = reference.normalize(perturbed(x, dtype, seed), mean, var, weight, bias, eps=1e-3, axis=axis)
    gain = centering_gain(mean, var, 1e-3, weight).reshape(
        [-1 if a == axis else 1 for a in range(len(shape))]
    )
    assert_within(np.abs(as64(y) - expected), output_bound(dtype, expected, moved, gain), f"{dtype} {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_normalize_with_group_statistics_is_group_norm(layout: str, mode: str) -> None:
    """Statistics with ``G`` entries on the channel axis (and the batch axis kept): block ``g``
    of ``C/G`` channels takes statistic ``g`` and γ, β stay per channel; with the reference's
    group statistics this is :func:`reference.group_norm`."""
    shape, axis = LAYOUTS[layout]
    groups = 2
    x = sample(shape, "float32", 80)
    axes = tuple(a for a in range(1, len(shape)) if a != axis)
    rng = np.random.default_rng(80)
    weight, bias = rng.normal(1.0, 0.5, size=shape[axis]), rng.normal(size=shape[axis])
    split = (*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])
    split_axes = tuple(sorted([a + 1 if a > axis else a for a in axes] + [axis + 1]))
    count, mean, m2 = reference.moments(x.reshape(split), split_axes)
    var = m2 / count
    args = [tf.constant(v.astype("float32")) for v in (mean, var, weight, bias)]
    y = run(lambda t: kernels.normalize(t, *args, 1e-5, axes, (axis,)), tensor(x), mode)
    mean, var, weight, bias = (as64(a) for a in args)
    expected = reference.group_norm(x, groups, weight, bias, eps=1e-5, axis=axis)
    moved = reference.group_norm(perturbed(x, "float32", 80), groups, weight, bias, eps=1e-5, axis=axis)
    gain = np.max(centering_gain(mean, var, 1e-5)) * np.abs(weight).max()
    assert_within(np.abs(as64(y) - expected), output_bound("float32", expected, moved, gain), mode)


@pytest.mark.parametrize("mode", MODES)
def test_normalize_over_layer_norm_axes_with_elementwise_affine(mode: str) -> None:
    """``param_axes = axes``: γ and β element-wise over the normalized axes (layer norm)."""
    x = sample((3, 4, 5), "float32", 90)
    rng = np.random.default_rng(90)
    weight, bias = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    _, mean, m2 = reference.moments(x, (1, 2))
    var = m2 / 20
    args = [tf.constant(v.astype("float32")) for v in (mean, var, weight, bias)]
    y = run(lambda t: kernels.normalize(t, *args, 1e-5, (1, 2), (1, 2)), tensor(x), mode)
    weight, bias = as64(args[2]), as64(args[3])
    expected = reference.layer_norm(x, weight, bias, axes=(1, 2), eps=1e-5)
    moved = reference.layer_norm(perturbed(x, "float32", 90), weight, bias, axes=(1, 2), eps=1e-5)
    gain = np.max(centering_gain(mean, var, 1e-5)) * np.abs(weight).max()
    assert_within(np.abs(as64(y) - expected), output_bound("float32", expected, moved, gain), mode)


def test_float64_statistics_centre_float32_input_beyond_its_own_precision() -> None:
    """At |mean|/std = 1e4 a float32 mean is off by up to ε₃₂·1e4/2 ≈ 6e-4 σ, which the output
    inherits; given the statistics in float64, the kernel centres at the rounded mean (x minus a
    nearby float32 is exact) and puts the rounding back, so the output is within the bound
    without the centering term."""
    x = sample((64, 3), "float32", 95, loc=1e4, scale=1.0)
    _, mean, m2 = reference.moments(x, (0,))
    var = m2 / 64
    y = kernels.normalize(tf.constant(x), tf.constant(mean), tf.constant(var), None, None, 1e-5, (0,), (1,))
    expected = reference.normalize(x, mean, var, eps=1e-5, axis=1)
    moved = reference.normalize(perturbed(x, "float32", 95), mean, var, eps=1e-5, axis=1)
    assert_within(
        np.abs(as64(y) - expected), output_bound("float32", expected, moved, 0.0), "float64 statistics"
    )
    rounded = kernels.normalize(
        tf.constant(x), tf.constant(mean.astype("float32")), tf.constant(var), None, None, 1e-5, (0,), (1,)
    )
    assert np.abs(as64(rounded) - expected).max() > 10 * np.abs(as64(y) - expected).max()  # what it saves


def test_normalize_gradients_match_finite_differences_of_the_reference() -> None:
    rng = np.random.default_rng(100)
    x, g = rng.normal(0.3, 1.5, size=(4, 3, 2)), rng.normal(size=(4, 3, 2))
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    w, b = rng.normal(size=3), rng.normal(size=3)
    step, eps = 1e-6, 1e-5

    def loss(x, w, b):
        return float(np.sum(g * reference.normalize(x, mean, var, w, b, eps=eps, axis=1)))

    tx, tw, tb = tf.constant(x), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([tx, tw, tb])
        y = kernels.normalize(tx, tf.constant(mean), tf.constant(var), tw, tb, eps, (0, 2), (1,))
        total = tf.reduce_sum(tf.constant(g) * y)
    got = tape.gradient(total, [tx, tw, tb])
    shape = (1, 3, 1)
    tolerances = normalization_gradient_tolerances(
        x, w.reshape(shape), b.reshape(shape), g, mean.reshape(shape), np.sqrt(var + eps).reshape(shape),
        batch_statistics=False, step=step,
    )  # fmt: skip
    numerics = central_differences(loss, [x, w, b], step)
    for name, grad, numeric, (rtol, atol) in zip(
        ("x", "weight", "bias"), got, numerics, tolerances, strict=True
    ):
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=rtol, atol=atol, err_msg=name)


# -- group norm -------------------------------------------------------------------------------


def group_statistics(x: np.ndarray, groups: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-element mean and variance of the element's (sample, group), float64."""
    moved = np.moveaxis(x.astype(np.float64), axis, 1)
    blocks = moved.reshape(moved.shape[0], groups, -1)
    mean = np.broadcast_to(blocks.mean(axis=2, keepdims=True), blocks.shape).reshape(moved.shape)
    var = np.broadcast_to(blocks.var(axis=2, keepdims=True), blocks.shape).reshape(moved.shape)
    return np.moveaxis(mean, 1, axis), np.moveaxis(var, 1, axis)


# (dtype, groups, loc): one group, two, one per channel, for every dtype; |mean|/std = 1e4 in
# float32 and float64 only (a half-precision value at 1e4 has a spacing of 8 or 64)
GROUP_CASES = [(d, g, 1.5) for d in DTYPES for g in (1, 2, 4)] + [(d, 2, 1e4) for d in ("float32", "float64")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("dtype", "groups", "loc"), GROUP_CASES, ids=[f"{d}-G{g}-offset-{loc:g}" for d, g, loc in GROUP_CASES]
)
def test_group_norm_matches_the_reference(
    dtype: str, groups: int, loc: float, layout: str, mode: str
) -> None:
    """One group (layer norm over all but the batch axis with per-channel affine), ``C`` groups
    (instance norm), and |mean|/std = 1e4."""
    shape, axis = LAYOUTS[layout]
    seed = 110 + 10 * DTYPES.index(dtype) + groups
    x = sample(shape, dtype, seed, loc=loc, scale=1.0 if loc > 100 else 2.0)
    rng = np.random.default_rng(seed)
    stat = "float64" if dtype == "float64" else "float32"
    w, b = (tf.constant(v.astype(stat)) for v in (rng.normal(1.0, 0.5, size=4), rng.normal(size=4)))
    y = run(lambda t: kernels.group_norm(t, groups, w, b, 1e-5, axis), tensor(x), mode)
    assert y.dtype == tf.as_dtype(dtype) and tuple(y.shape) == shape
    weight, bias = as64(w), as64(b)
    expected = reference.group_norm(x, groups, weight, bias, eps=1e-5, axis=axis)
    moved = reference.group_norm(perturbed(x, dtype, seed), groups, weight, bias, eps=1e-5, axis=axis)
    mean, var = group_statistics(x, groups, axis)
    gain = centering_gain(mean, var, 1e-5) * np.abs(weight).max()
    assert_within(np.abs(as64(y) - expected), output_bound(dtype, expected, moved, gain), f"{dtype} {mode}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_constant_group_normalizes_to_beta_exactly(layout: str, mode: str) -> None:
    """The shift by the group's first value leaves a constant group's deviations exactly 0,
    so its output is β exactly, also at an offset where a rounded mean would leave ε|μ|/√ε."""
    shape, axis = LAYOUTS[layout]
    x = sample(shape, "float32", 120)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, 2)  # group 0 of 2: channels 0 and 1
    x[tuple(index)] = np.float32(1234.567)
    bias = np.arange(4, dtype=np.float32)
    y = run(lambda t: kernels.group_norm(t, 2, tf.ones(4), tf.constant(bias), 1e-5, axis), tensor(x), mode)
    beta = np.broadcast_to(bias.reshape([-1 if a == axis else 1 for a in range(len(shape))]), shape)
    np.testing.assert_array_equal(y.numpy()[tuple(index)], beta[tuple(index)])


def test_group_norm_gradients_match_finite_differences_of_the_reference() -> None:
    rng = np.random.default_rng(130)
    shape, axis, groups, eps, step = (2, 4, 3), 1, 2, 1e-5, 1e-6
    x, g = rng.normal(0.3, 1.5, size=shape), rng.normal(size=shape)
    w, b = rng.normal(size=4), rng.normal(size=4)

    def loss(x, w, b):
        return float(np.sum(g * reference.group_norm(x, groups, w, b, eps=eps, axis=axis)))

    tx, tw, tb = tf.constant(x), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([tx, tw, tb])
        total = tf.reduce_sum(tf.constant(g) * kernels.group_norm(tx, groups, tw, tb, eps, axis))
    got = tape.gradient(total, [tx, tw, tb])
    mean, var = group_statistics(x, groups, axis)
    tolerances = normalization_gradient_tolerances(
        x,
        w.reshape(1, 4, 1),
        b.reshape(1, 4, 1),
        g,
        mean,
        np.sqrt(var + eps),
        batch_statistics=True,
        step=step,
    )
    numerics = central_differences(loss, [x, w, b], step)
    for name, grad, numeric, (rtol, atol) in zip(
        ("x", "weight", "bias"), got, numerics, tolerances, strict=True
    ):
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=rtol, atol=atol, err_msg=name)


# -- RMS norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("axes", "offset"), [((3,), 0.0), ((2, 3), 0.0), ((1,), 1.0)], ids=["last", "last-two", "axis1-gemma"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_the_reference(dtype: str, axes: tuple[int, ...], offset: float, mode: str) -> None:
    shape = (3, 4, 5, 6)
    seed = 140 + DTYPES.index(dtype) + 10 * len(axes)
    x = sample(shape, dtype, seed, loc=0.5)
    weight = np.random.default_rng(seed).normal(
        0.0 if offset else 1.0, 0.5, size=tuple(shape[a] for a in axes)
    )
    stat = "float64" if dtype == "float64" else "float32"
    w = tf.constant(weight.astype(stat))
    for cast_before_weight in (False, True):
        y = run(
            lambda t, c=cast_before_weight: kernels.rms_norm(t, w, axes, 1e-6, offset, c), tensor(x), mode
        )
        assert y.dtype == tf.as_dtype(dtype) and tuple(y.shape) == shape
        expected = reference.rms_norm(x, as64(w), axes=axes, eps=1e-6, weight_offset=offset)
        moved = reference.rms_norm(
            perturbed(x, dtype, seed), as64(w), axes=axes, eps=1e-6, weight_offset=offset
        )
        assert_within(
            np.abs(as64(y) - expected),
            output_bound(dtype, expected, moved, 0.0),
            f"{dtype} {mode} {cast_before_weight}",
        )
    unweighted = run(lambda t: kernels.rms_norm(t, None, axes, 1e-6, offset, True), tensor(x), mode)
    expected = reference.rms_norm(x, axes=axes, eps=1e-6)  # no weight: the offset is ignored
    moved = reference.rms_norm(perturbed(x, dtype, seed), axes=axes, eps=1e-6)
    assert_within(np.abs(as64(unweighted) - expected), output_bound(dtype, expected, moved, 0.0), "no weight")


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype(numpy_dtype(dtype)).astype(np.float64)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rms_cast_orders_round_where_the_spec_says(dtype: str, mode: str) -> None:
    r"""For half-precision input, ``cast_before_weight=False`` gives
    :math:`\mathrm{round}(\hat x\,(w+o))` and ``True`` gives
    :math:`\mathrm{round}(\mathrm{round}(\hat x)\,(w+o))`, rounding to the input dtype.

    With :math:`\hat x` and the product from the float64 reference, both are exact predictions,
    except where the kernel's float32 value (within the relative part of
    :func:`output_tolerance` of float32 of the exact one) could round to the other neighbour: those elements are left out, and the rest
    must be bit-equal. The two orders differ on many of the rest, so the test tells them apart."""
    shape, axes, offset = (16, 64), (1,), 1.0
    x = sample(shape, dtype, 150, loc=0.0, scale=3.0)
    weight = np.random.default_rng(151).normal(0.0, 0.7, size=64).astype(np.float32)
    w = tf.constant(weight)
    z = reference.rms_norm(x, axes=axes, eps=1e-6)  # exact x̂
    scale = weight.astype(np.float64) + offset
    r = output_tolerance("float32").rtol

    def ambiguous(exact: np.ndarray) -> np.ndarray:
        """Where a float32 value within r|v| of ``exact`` may round to another value (the
        kernel's float32 x̂ and product carry relative errors: a mean, a square root, products)."""
        slack = r * np.abs(exact)
        return rounded(exact - slack, dtype) != rounded(exact + slack, dtype)

    after = rounded(z * scale, dtype)
    before = rounded(rounded(z, dtype) * scale, dtype)
    unclear = ambiguous(z * scale) | ambiguous(z) | ambiguous(rounded(z, dtype) * scale)
    assert unclear.mean() < 0.2
    got = {
        c: as64(run(lambda t, c=c: kernels.rms_norm(t, w, axes, 1e-6, offset, c), tensor(x), mode))
        for c in (False, True)
    }
    clear = ~unclear
    np.testing.assert_array_equal(got[False][clear], after[clear])
    np.testing.assert_array_equal(got[True][clear], before[clear])
    assert (after[clear] != before[clear]).sum() > 0.05 * clear.sum()


def test_rms_norm_gradients_match_the_textbook_formulas() -> None:
    r"""With :math:`r = \sqrt{\overline{x^2} + \epsilon}` over each group of n values and
    :math:`L = \sum g\,y`, :math:`y = (w + o)\,x/r`:
    :math:`\partial L/\partial x_k = u_k/r - x_k \sum_i u_i x_i/(n r^3)` with :math:`u = g (w + o)`,
    and :math:`\partial L/\partial w_k = \sum g_k x_k / r` over the groups."""
    rng = np.random.default_rng(160)
    x, g = rng.normal(0.5, 1.5, size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
    w, offset, eps = rng.normal(size=(3, 5)), 1.0, 1e-6
    tx, tw = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([tx, tw])
        total = tf.reduce_sum(tf.constant(g) * kernels.rms_norm(tx, tw, (1, 2), eps, offset, False))
    got_x, got_w = (t.numpy() for t in tape.gradient(total, [tx, tw]))
    n = 15
    r = np.sqrt((x**2).mean(axis=(1, 2), keepdims=True) + eps)
    u = g * (w + offset)
    expected_x = u / r - x * (u * x).sum(axis=(1, 2), keepdims=True) / (n * r**3)
    expected_w = (g * x / r).sum(axis=0)
    # float64 sums along the way (the mean square, the backward sums: 4 x.size terms), relative
    # to the terms they sum
    scale_x = float(
        np.max(np.abs(u) / r + np.abs(x) * (np.abs(u * x)).sum(axis=(1, 2), keepdims=True) / (n * r**3))
    )
    scale_w = float(np.max((np.abs(g * x) / r).sum(axis=0)))
    for got, expected, scale in ((got_x, expected_x, scale_x), (got_w, expected_w, scale_w)):
        tolerance = training_tolerance("float64", steps=0, reduction_size=4 * x.size, scale=scale)
        np.testing.assert_allclose(got, expected, **tolerance.kwargs)


# -- masked batch norm ------------------------------------------------------------------------


def masked_reference(x, mask, weight, bias, running_mean, running_var, *, momentum, eps, axis, unbiased):
    """Masked batch norm from the float64 reference's moments and normalize, the running update
    per channel only where it has the values it needs (count > 0, > 1 for unbiased)."""
    x = np.asarray(x, np.float64)
    axes = tuple(a for a in range(x.ndim) if a != axis)
    count, mean, m2 = reference.moments(x, axes, mask)
    var = m2 / np.maximum(count, 1)
    y = reference.normalize(x, mean, var, weight, bias, eps=eps, axis=axis)
    stored = m2 / np.maximum(count - 1, 1) if unbiased else var
    new_mean = np.where(count > 0, (1 - momentum) * running_mean + momentum * mean, running_mean)
    new_var = np.where(count > int(unbiased), (1 - momentum) * running_var + momentum * stored, running_var)
    return y, new_mean, new_var, mean, var


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_masked_batch_norm_follows_the_reference_per_channel(unbiased: bool, mode: str) -> None:
    """normkit's masked batch norm (the composition the Keras layer calls) on TensorFlow's
    kernels, eagerly, in tf.function and under XLA. Unequal counts per channel (mask along the channel axis): channel 0 has no value counted
    and keeps its running statistics; channel 1 has one (the unbiased variance keeps its own)."""
    shape, axis = (6, 4, 5), 1
    x = sample(shape, "float32", 170)
    mask = unequal_mask(shape, axis, 170)
    mask[:, 1] = False
    mask[2, 1, 3] = True
    rng = np.random.default_rng(170)
    weight, bias = rng.normal(1.0, 0.3, size=4), rng.normal(size=4)
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    args = [tf.constant(v.astype("float32")) for v in (weight, bias, rm, rv)]
    y, new_mean, new_var = run(
        lambda t: masked_batch_norm(
            backend_for(t), t, tf.constant(mask), axis, *args, 0.1, 1e-3, unbiased, None
        ),
        tensor(x),
        mode,
    )
    weight, bias, rm, rv = (as64(a) for a in args)
    expected_y, expected_mean, expected_var, mean, var = masked_reference(
        x, mask, weight, bias, rm, rv, momentum=0.1, eps=1e-3, axis=axis, unbiased=unbiased
    )
    moved = masked_reference(
        perturbed(x, "float32", 170),
        mask,
        weight,
        bias,
        rm,
        rv,
        momentum=0.1,
        eps=1e-3,
        axis=axis,
        unbiased=unbiased,
    )
    gain = centering_gain(mean, var, 1e-3, weight).reshape(1, 4, 1)
    assert_within(np.abs(as64(y) - expected_y), output_bound("float32", expected_y, moved[0], gain), "y")
    magnitude = float(np.abs(x).max())
    for name, got, expected, other, statistic in (
        ("mean", new_mean, expected_mean, moved[1], "mean"),
        ("var", new_var, expected_var, moved[2], "var"),
    ):
        tolerance = statistics_tolerance("float32", statistic, magnitude)
        assert_within(
            np.abs(as64(got) - expected),
            tolerance.bound(expected, float(np.abs(expected - other).max())),
            name,
        )
    np.testing.assert_array_equal(as64(new_mean)[0], rm[0])  # nothing counted: kept exactly
    np.testing.assert_array_equal(as64(new_var)[0], rv[0])
    if unbiased:
        np.testing.assert_array_equal(as64(new_var)[1], rv[1])  # one value: no unbiased variance
    assert as64(new_mean)[1] != rm[1]


def test_masked_batch_norm_gradients_match_finite_differences_of_the_reference() -> None:
    """Masked values are normalized with statistics that do not depend on them; the counted
    values' gradients carry the statistics' derivatives."""
    rng = np.random.default_rng(180)
    shape, axis, eps, step = (5, 3, 2), 1, 1e-5, 1e-6
    x, g = rng.normal(0.3, 1.5, size=shape), rng.normal(size=shape)
    w, b = rng.normal(size=3), rng.normal(size=3)
    mask = rng.random((5, 3, 1)) < 0.6
    mask[0, :, 0] = mask[1, :, 0] = True  # at least two values per channel

    def loss(x, w, b):
        y = masked_reference(
            x, mask, w, b, np.zeros(3), np.ones(3), momentum=0.1, eps=eps, axis=axis, unbiased=False
        )[0]
        return float(np.sum(g * y))

    tx, tw, tb = tf.constant(x), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([tx, tw, tb])
        y, _, _ = masked_batch_norm(
            backend_for(tx), tx, tf.constant(mask), axis, tw, tb, None, None, 0.1, eps, False, None
        )
        total = tf.reduce_sum(tf.constant(g) * y)
    got = tape.gradient(total, [tx, tw, tb])
    _, mean, m2 = reference.moments(x, (0, 2), mask)
    count = reference.moments(x, (0, 2), mask)[0]
    shape1 = (1, 3, 1)
    std = np.sqrt(m2 / count + eps).reshape(shape1)
    tolerances = normalization_gradient_tolerances(
        x,
        w.reshape(shape1),
        b.reshape(shape1),
        g,
        mean.reshape(shape1),
        std,
        batch_statistics=True,
        step=step,
    )
    numerics = central_differences(loss, [x, w, b], step)
    for name, grad, numeric, (rtol, atol) in zip(
        ("x", "weight", "bias"), got, numerics, tolerances, strict=True
    ):
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=rtol, atol=atol, err_msg=name)


# -- the backend's astype and the traced backends -------------------------------------------------


def test_astype_converts_to_every_named_dtype_and_keeps_gradients() -> None:
    info = load_backend("tensorflow")
    assert info.astype is not None
    t = tf.constant([[-1.5, 0.0], [2.0, 3.25]])
    for name in ("float16", "bfloat16", "float32", "float64", "int64", "bool"):
        converted = info.astype(t, name)
        assert info.dtype_name(converted) == name
    np.testing.assert_array_equal(info.astype(t, "int64").numpy(), [[-1, 0], [2, 3]])
    np.testing.assert_array_equal(info.astype(t, "bool").numpy(), [[True, False], [True, True]])
    np.testing.assert_array_equal(info.astype(tf.constant([3, 0]), "float64").numpy(), [3.0, 0.0])
    v = tf.Variable([1.0, 2.0])
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(info.astype(v, "float64") * tf.constant([3.0, 4.0], tf.float64))
    np.testing.assert_array_equal(tape.gradient(total, v).numpy(), [3.0, 4.0])


@pytest.mark.parametrize("name", ["tensorflow", "tensorflow-function", "tensorflow-xla"])
def test_every_backend_serves_every_op_natively(name: str) -> None:
    """The plugin and its traced variants implement every hook, so normkit composes none."""
    with register_function_backends():
        backend = backend_named(name, tf.constant([1.0]))
        assert backend.composed == frozenset()
        x = sample((3, 4, 5), "float32", 190)
        count, mean, m2 = backend.moments(tf.constant(x), (0, 2), None, 1, 2)
        check_moments((count, mean, m2), x.reshape(3, 2, 2, 5), (0, 2, 3), None, "float32", 190, name)
