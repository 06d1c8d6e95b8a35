"""The two-stage reduction plans (:mod:`normkit_cupy.plans`), on the CPU: which view and stages
each layout gets, and the kernels through every stage (runs, rows with and without a tail,
memory orders other than C) against normkit's float64 reference, with NumPy standing in for
CuPy (the same glue; the CUDA expressions replaced term for term)."""

from __future__ import annotations

import numpy as np
import pytest

from normkit import reference
from normkit.testing.tolerances import output_tolerance, statistics_tolerance
from normkit_cupy import kernels
from normkit_cupy.plans import MIN_RUN, ROWS_PER_BLOCK, plan_reduction


def _plan(array: np.ndarray, axes: tuple[int, ...]):
    return plan_reduction(array.shape, array.strides, array.itemsize, axes)


def _gain(x: np.ndarray, axes: tuple[int, ...], weight: np.ndarray | float = 1.0) -> float:
    """The centering gain max |mu| |gamma| / sqrt(var + eps) of the output tolerance."""
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    return float(np.max(np.abs(mean) * np.abs(weight) / np.sqrt(var + 1e-5)))


def _channels_last(shape: tuple[int, ...], seed: int = 0, loc: float = 3.0) -> np.ndarray:
    """A logically channels-first float32 array stored channels-last (as a torch
    ``channels_last`` tensor arrives through DLPack)."""
    n, c, *spatial = shape
    data = np.random.default_rng(seed).normal(loc, 2.0, size=(n, *spatial, c)).astype(np.float32)
    return data.transpose(0, data.ndim - 1, *range(1, data.ndim - 1))


@pytest.mark.parametrize(
    ("shape", "axes", "view", "stages"),
    [
        ((32, 64, 56, 56), (0, 2, 3), (1, 32, 64, 3136), "runs"),  # batch norm, channels-first
        ((32, 56, 56, 64), (0, 1, 2), (1, 100352, 64, 1), "rows"),  # batch norm, channels-last
        ((4096, 1024), (0,), (1, 4096, 1024, 1), "rows"),  # batch norm (N, C)
        ((4096, 1024), (1,), (1, 1, 4096, 1024), "single"),  # layer norm
        ((16, 64, 64, 64), (2, 3), (1, 1, 1024, 4096), "single"),  # instance norm, channels-first
        ((16, 64, 64, 64), (1, 2), (16, 4096, 64, 1), "rows"),  # instance norm, channels-last
        ((8, 4096, 32, 16), (1, 3), (8, 4096, 32, 16), "rows"),  # group norm, channels-last, viewed
        ((4, 3, 5, 6), (0, 2, 3), (1, 4, 3, 30), "single"),  # short runs, few rows
        ((3, 4, 40), (0, 2), (1, 3, 4, 40), "runs"),
    ],
)
def test_each_layout_gets_its_view_and_stages(shape, axes, view, stages) -> None:
    plan = _plan(np.empty(shape, np.float32), axes)
    assert plan is not None and plan.view == view and plan.stages == stages
    assert plan.count == view[1] * view[3]
    if stages == "rows":
        assert plan.blocks * plan.rows + plan.tail == view[1] and 0 < plan.rows <= 2 * ROWS_PER_BLOCK


def test_memory_order_is_followed_and_unsupported_layouts_fall_back() -> None:
    x = _channels_last((8, 16, 6, 6))
    plan = _plan(x, (0, 2, 3))  # batch norm of a channels-last tensor: rows of C in memory
    assert plan is not None and plan.order == (0, 2, 3, 1) and plan.view == (1, 288, 16, 1)
    assert _plan(np.empty((8, 16, 6, 6), np.float32)[:, :, ::2], (0, 2, 3)) is None  # strided
    assert _plan(np.empty((4, 6, 8, 5), np.float32), (0, 2)) is None  # reduced, kept, reduced, kept
    assert _plan(np.empty((4, 6, 8), np.float32), (0, 1, 2)) is None  # nothing kept
    assert _plan(np.empty((4, 6, 8), np.float32), ()) is None
    assert _plan(np.empty((0, 6), np.float32), (0,)) is None
    # kept axes whose memory order is not their logical order: their values would come out transposed
    assert _plan(np.empty((6, 4, 5), np.float32).transpose(1, 0, 2), (2,)) is None


@pytest.mark.parametrize(
    "rows", [ROWS_PER_BLOCK * 4, ROWS_PER_BLOCK * 4 + 45, 300, 2 * ROWS_PER_BLOCK, 2 * ROWS_PER_BLOCK + 1]
)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_batch_norm_over_rows_with_and_without_a_tail(rows, dtype) -> None:
    rng = np.random.default_rng(rows)
    x = rng.normal(1000.0, 0.5, size=(rows, 7)).astype(dtype)  # far from 0: the shift matters
    plan = _plan(x, (0,))
    assert plan is not None and plan.stages == "rows"
    rm, rv = np.zeros(7, np.float32), np.ones(7, np.float32)
    y, m, v = kernels.batch_norm(x, None, None, rm, rv, True, 0.1, 1e-5, 1, True)
    y_ref, m_ref, v_ref = reference.batch_norm(
        x, None, None, rm, rv, training=True, momentum=0.1, eps=1e-5, axis=1, unbiased_running_var=True
    )
    x64 = x.astype(np.float64)
    gain = float((np.abs(x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)).max())
    bound = output_tolerance(dtype, centering_gain=gain).bound(y_ref, 0.0)
    assert np.all(np.abs(y.astype(np.float64) - y_ref) <= bound)
    magnitude = float(np.abs(x.astype(np.float64)).max())
    for got, expected, statistic in ((m, m_ref, "mean"), (v, v_ref, "var")):
        bound = statistics_tolerance("float32", statistic, magnitude).bound(expected, 0.0)
        assert np.all(np.abs(got.astype(np.float64) - expected) <= bound), statistic


@pytest.mark.parametrize("loc", [0.0, 1e4])
def test_batch_norm_over_runs_and_channels_last_memory(loc) -> None:
    rng = np.random.default_rng(3)
    runs = rng.normal(loc, 1.0, size=(3, 5, MIN_RUN + 8)).astype(np.float32)
    stored_last = _channels_last((2, 5, 6, 6), seed=4, loc=loc)  # 72 rows: one stage
    assert _plan(runs, (0, 2)).stages == "runs" and _plan(stored_last, (0, 2, 3)).stages == "single"
    stored_last_rows = _channels_last((4, 5, 12, 12), seed=5, loc=loc)  # 576 rows of 5 in memory
    assert _plan(stored_last_rows, (0, 2, 3)).stages == "rows"
    for x in (runs, stored_last, stored_last_rows):
        axes = (0, 2) if x.ndim == 3 else (0, 2, 3)
        w = rng.normal(size=5).astype(np.float32)
        y, _, _ = kernels.batch_norm(x, w, None, None, None, True, 0.1, 1e-5, 1, False)
        y_ref, _, _ = reference.batch_norm(
            x, w, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1, unbiased_running_var=False
        )
        gain = _gain(x, axes, w.reshape(1, -1, 1, 1) if x.ndim == 4 else w.reshape(1, -1, 1))
        assert np.all(np.abs(y - y_ref) <= output_tolerance("float32", centering_gain=gain).bound(y_ref, 0.0))


def test_instance_group_layer_rms_norm_and_moments_through_every_stage() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(50.0, 2.0, size=(2, 160, 6, 8)).astype(np.float32)  # group norm channels-last: rows
    assert _plan(x.reshape(2, 160, 6, 4, 2), (1, 2, 4)).stages == "rows"
    w, b = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    y = kernels.group_norm(x.reshape(2, 960, 8), 4, w, b, 1e-5, 2).reshape(x.shape)
    y_ref = reference.group_norm(x.reshape(2, 960, 8), 4, w, b, eps=1e-5, axis=2).reshape(x.shape)
    gain = _gain(x.reshape(2, 960, 4, 2), (1, 3)) * float(np.abs(w).max())
    assert np.all(np.abs(y - y_ref) <= output_tolerance("float32", centering_gain=gain).bound(y_ref, 0.0))
    xi = _channels_last((3, 4, 16, 16), seed=8)  # instance norm of channels-last memory: rows
    assert _plan(xi, (2, 3)).stages == "rows"
    yi, _, _ = kernels.instance_norm(xi, None, None, None, None, True, 0.1, 1e-5, 1, False)
    yi_ref, _, _ = reference.instance_norm(
        xi,
        None,
        None,
        None,
        None,
        use_input_stats=True,
        momentum=0.1,
        eps=1e-5,
        axis=1,
        unbiased_running_var=False,
    )
    gain = _gain(xi, (2, 3))
    assert np.all(np.abs(yi - yi_ref) <= output_tolerance("float32", centering_gain=gain).bound(yi_ref, 0.0))
    xr = rng.normal(0.0, 3.0, size=(3, 200, 5)).astype(np.float32)
    assert _plan(xr, (1,)).stages == "rows"  # (3, 200, 5, 1): blocks of rows, and a tail
    yr = kernels.rms_norm(xr, None, (1,), 1e-6, 0.0, False)
    yr_ref = reference.rms_norm(xr, None, axes=(1,), eps=1e-6)
    assert np.all(np.abs(yr - yr_ref) <= output_tolerance("float32").bound(yr_ref, 0.0))
    count, mean, m2 = kernels.moments(xr, (1,), None, None, None)
    x64 = xr.astype(np.float64)
    np.testing.assert_array_equal(count, np.full((3, 5), 200))
    mean_ref, m2_ref = x64.mean(axis=1), ((x64 - x64.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    magnitude = float(np.abs(x64).max())
    assert np.all(
        np.abs(mean - mean_ref) <= statistics_tolerance("float32", "mean", magnitude).bound(mean_ref, 0.0)
    )
    var_bound = statistics_tolerance("float32", "var", magnitude).bound(m2_ref / 200, 0.0)
    assert np.all(np.abs(m2 / 200 - m2_ref / 200) <= var_bound)
