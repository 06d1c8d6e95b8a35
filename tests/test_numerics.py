"""The NumPy backend's numerics against the float64 reference in the hard cases.

Bounds are the suite's (:mod:`normkit.testing.tolerances`), with one sharpening that is the
point of these tests: the NumPy kernels correct the mean by the mean of the residuals (as the
reference does), so their outputs in training lose nothing to the offset (centering gain 0),
and in eval they use the fused ``x*a + b`` only while ``|mean * a| <= FUSED_EVAL_LIMIT``.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.numpy_backend.pure import FUSED_EVAL_LIMIT
from normkit.testing.tolerances import (
    EPS,
    centering_gain,
    output_tolerance,
    reduction_growth,
    statistics_tolerance,
)


def assert_within(got: np.ndarray, expected: np.ndarray, bound: np.ndarray | float, what: str = "") -> None:
    error = np.abs(np.asarray(got, np.float64) - expected)
    assert np.all(error <= bound), f"{what}: error {error.max():.3g}, allowed {np.min(bound):.3g}"


def output_bound(x: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """The suite's bound for x's dtype, centering gain 0 (the corrected two-pass)."""
    return output_tolerance(np.dtype(x.dtype).name).bound(expected, 0.0)


def statistics_bound(x: np.ndarray, statistic: str, expected: np.ndarray) -> np.ndarray:
    return statistics_tolerance(np.dtype(x.dtype).name, statistic, float(np.abs(x).max())).bound(
        expected, 0.0
    )


def torch_preset_reference(
    x: object, running_mean: object, running_var: object, weight: object = None, bias: object = None, *,
    training: bool = True, axis: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:  # fmt: skip
    """The float64 reference with the torch preset's options (momentum 0.1, eps 1e-5, unbiased)."""
    return reference.batch_norm(
        x, weight, bias, running_mean, running_var,
        training=training, momentum=0.1, eps=1e-5, axis=axis, unbiased_running_var=True,
    )  # fmt: skip


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("axis", [1, -1])
def test_large_mean_offset_in_float32_costs_no_accuracy(offset: float, axis: int) -> None:
    rng = np.random.default_rng(5)
    x = (offset + rng.standard_normal((16, 8, 12, 12))).astype(np.float32)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    w, b = rng.uniform(0.5, 2.0, 8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    y, mean, var = normkit.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
    y_ref, mean_ref, var_ref = torch_preset_reference(x, rm, rv, w, b, axis=axis)
    # as at offset 0; subtracting a mean rounded to float32 would cost up to 4e-3 at 1e5
    assert_within(y, y_ref, output_bound(x, y_ref), "y")
    assert_within(mean, mean_ref, statistics_bound(x, "mean", mean_ref), "running mean")
    assert_within(var, var_ref, statistics_bound(x, "var", var_ref), "running var")
    # The batch variance itself (about 1) is right to float32 precision: the corrected two-pass
    # sums d and d² over n = 2304 values per channel (about sqrt(2n) eps), and reading it back
    # from the float32 running variance 0.9 + 0.1 * var adds eps * |running var| / 0.1.
    n = x.size / 8
    batch_var = (var.astype(np.float64) - 0.9) / 0.1 * (n - 1) / n
    eps = EPS["float32"]
    rtol = reduction_growth(2 * int(n)) * eps + eps * float(np.abs(var).max()) / 0.1
    expected = x.astype(np.float64).var(axis=tuple(a for a in range(4) if a != axis % 4))
    np.testing.assert_allclose(batch_var, expected, rtol=rtol)


def test_large_offset_layer_and_instance_norm() -> None:
    rng = np.random.default_rng(6)
    x = (1e5 + rng.standard_normal((8, 4, 32))).astype(np.float32)
    z_ref = reference.layer_norm(x, axes=(2,), eps=1e-5)
    assert_within(normkit.layer_norm(x, 32), z_ref, output_bound(x, z_ref), "layer norm")
    y, _, _ = normkit.instance_norm(x)
    y_ref, _, _ = reference.instance_norm(
        x, use_input_stats=True, momentum=0.1, eps=1e-5, axis=1, unbiased_running_var=True
    )
    assert_within(y, y_ref, output_bound(x, y_ref), "instance norm")


def test_float16_values_beyond_256_give_finite_correct_output() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(3000.0, 400.0, size=(32, 4, 8, 8)).astype(np.float16)  # x*x overflows float16 (max 65504)
    with np.errstate(over="ignore"):
        assert np.isinf(x * x).any()
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y, mean, var = normkit.batch_norm(x, rm, rv, training=True)
    y_ref, mean_ref, var_ref = torch_preset_reference(x, rm, rv)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    assert_within(y, y_ref, output_bound(x, y_ref), "y")  # the float16 rounding of y, mostly
    assert_within(mean, mean_ref, statistics_bound(x, "mean", mean_ref), "running mean")
    assert_within(var, var_ref, statistics_bound(x, "var", var_ref), "running var")
    z = normkit.layer_norm(x, (8, 8))
    z_ref = reference.layer_norm(x, axes=(2, 3), eps=1e-5)
    assert np.isfinite(z).all()
    assert_within(z, z_ref, output_bound(x, z_ref), "layer norm")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_constant_channels_normalize_to_the_shift_exactly(dtype: type) -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 3, 5, 5)).astype(dtype)
    x[:, 1] = dtype(0.1)
    bias = np.array([0.3, 0.7, -1.1], np.float32)
    y, _, var = normkit.batch_norm(
        x, np.zeros(3, np.float32), np.ones(3, np.float32), np.full(3, 5.0, np.float32), bias, training=True
    )
    assert np.all(y[:, 1] == dtype(0.7))
    assert var[1] == np.float32(0.9)  # (1 - 0.1) * 1 + 0.1 * 0: the batch variance is exactly 0
    rows = np.full((4, 16), 123.456, dtype)
    assert np.all(normkit.layer_norm(rows, 16, None, np.full(16, 2.5, np.float32)) == dtype(2.5))


def test_float64_input_computes_in_float64() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(16, 5, 7))
    y, mean, var = normkit.batch_norm(x, np.zeros(5), np.ones(5), training=True)
    y_ref, _mean_ref, var_ref = torch_preset_reference(x, np.zeros(5), np.ones(5))
    assert y.dtype == np.float64 and mean.dtype == np.float64
    assert_within(y, y_ref, output_bound(x, y_ref), "y")
    assert_within(var, var_ref, statistics_bound(x, "var", var_ref), "running var")


def test_eval_with_far_running_mean_uses_the_centred_form() -> None:
    rng = np.random.default_rng(10)
    x = (5e4 + rng.standard_normal((8, 3, 6, 6))).astype(np.float32)
    rm = np.full(3, 5e4, np.float32)
    # not 1: with a = 1/sqrt(1 + eps) the fused form happens to be nearly exact on the float32
    # grid near 5e4 (x*a is x - 0.25), and could not fail the bound
    rv = np.full(3, 0.7, np.float32)
    y, _, _ = normkit.batch_norm(x, rm, rv)
    y_ref, _, _ = torch_preset_reference(x, rm, rv, training=False)
    # The fused x*a + b would lose up to eps * |mean * a| = 6e-8 * 6e4 = 4e-3; the centred form
    # subtracts the given mean exactly, and the fused one is only used for a gain up to the limit.
    gain = min(centering_gain(rm, rv, 1e-5), FUSED_EVAL_LIMIT)
    assert_within(y, y_ref, output_tolerance("float32", centering_gain=gain).bound(y_ref, 0.0), "eval")


def test_inputs_are_never_written() -> None:
    rng = np.random.default_rng(11)
    arrays = [rng.normal(size=(8, 3, 4)).astype(np.float16), np.zeros(3, np.float32), np.ones(3, np.float32),
              np.full(3, 2.0, np.float32), np.full(3, 0.5, np.float32)]  # fmt: skip
    copies = [a.copy() for a in arrays]
    for training in (True, False):
        normkit.batch_norm(*arrays, training=training)
        normkit.instance_norm(*arrays, use_input_stats=training)
    normkit.layer_norm(arrays[0], 4)
    for a, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(a, c)


def test_very_long_rows_keep_float32_accuracy() -> None:
    # 16M values per channel: float32 dot products over such rows drift; runs of 1024 do not
    rng = np.random.default_rng(12)
    x = rng.normal(3.0, 2.0, size=(1, 1, 4096, 4096)).astype(np.float32)
    y, _, var = normkit.batch_norm(x, np.zeros(1, np.float32), np.ones(1, np.float32), training=True)
    y_ref, _, var_ref = torch_preset_reference(x, np.zeros(1), np.ones(1))
    assert_within(var, var_ref, statistics_bound(x, "var", var_ref), "running var")
    assert_within(y, y_ref, output_bound(x, y_ref), "y")
    rows = x.reshape(2, -1)
    z_ref = reference.layer_norm(rows, axes=(1,), eps=1e-5)
    assert_within(normkit.layer_norm(rows), z_ref, output_bound(x, z_ref), "layer norm")


def test_float32_values_whose_squares_overflow() -> None:
    x = np.random.default_rng(13).normal(0.0, 1e19, size=(8, 3, 4, 4)).astype(np.float32)  # x*x > float32 max
    y, _, var = normkit.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=True)
    y_ref, _, var_ref = torch_preset_reference(x, np.zeros(3), np.ones(3))
    assert np.isfinite(y).all()
    assert_within(y, y_ref, output_bound(x, y_ref), "y")
    assert_within(var, var_ref, statistics_bound(x, "var", var_ref), "running var")
