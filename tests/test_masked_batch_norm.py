"""Batch norm with a mask (``normkit.batch_norm(..., mask=)`` and ``BatchNorm(x, mask=)``) against
the float64 reference's moments of the unmasked values, on the NumPy backend and through the
composition from the primitives that every backend's masked call uses."""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    centering_gain,
    output_tolerance,
    statistics_tolerance,
)


def data(shape: tuple[int, ...], loc: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Channels-last data and a mask keeping a different share of each channel (the last channel
    keeps one value, so the unbiased rule for a single value applies)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, 2.0, size=shape).astype(np.float32)
    share = np.linspace(0.2, 0.9, shape[-1])
    mask = rng.random(shape) < share
    mask[..., -1] = False
    mask.reshape(-1, shape[-1])[0, -1] = True
    return x, mask


@pytest.mark.parametrize("preset", ["keras", "torch"])
def test_statistics_and_update_follow_each_channels_unmasked_values(preset: str) -> None:
    x, mask = data((6, 5, 4), loc=3.0)
    rm, rv = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    w, b = np.linspace(0.5, 1.5, 4).astype(np.float32), np.linspace(-1, 1, 4).astype(np.float32)
    y, mean, var = normkit.batch_norm(x, rm, rv, w, b, training=True, axis=-1, mask=mask, preset=preset)
    count, mu, m2 = reference.moments(x, (0, 1), mask)
    p = normkit.get_preset(preset)
    eps, m = p.batch_norm_eps, p.update_weight
    y_ref = reference.normalize(
        x, mu, m2 / count, w, b, eps=eps, axis=-1
    )  # every value, with those statistics
    gain = np.abs(mu) * np.abs(w) / np.sqrt(m2 / count + eps)
    bound = output_tolerance("float32").bound(y_ref, 0.0) + CENTERING_FACTOR * EPS["float32"] * gain
    assert np.all(np.abs(y - y_ref) <= bound)
    unbiased = p.running_var_estimator == "unbiased"
    stored = np.where(count > 1, m2 / np.maximum(count - 1, 1), rv) if unbiased else m2 / count
    expected_var = np.where(count > (1 if unbiased else 0), (1 - m) * rv + m * stored, rv)
    expected_mean = (1 - m) * rm + m * mu
    magnitude = float(np.abs(x).max())
    np.testing.assert_allclose(
        mean, expected_mean, **statistics_tolerance("float32", "mean", magnitude).kwargs
    )
    np.testing.assert_allclose(var, expected_var, **statistics_tolerance("float32", "var", magnitude).kwargs)
    if unbiased:  # one unmasked value: the mean moves, the variance stays
        assert count[-1] == 1 and var[-1] == rv[-1] and mean[-1] != rm[-1]


def test_a_fully_masked_channel_and_batch_keep_their_running_statistics() -> None:
    x, mask = data((6, 5, 4), loc=3.0)
    mask[..., 1] = False
    rm, rv = np.array([0.5, 0.25, 1.0, 2.0], np.float32), np.array([2.0, 3.0, 1.0, 0.5], np.float32)
    _, mean, var = normkit.batch_norm(x, rm, rv, training=True, axis=-1, mask=mask, preset="keras")
    assert mean[1] == rm[1] and var[1] == rv[1]
    assert mean[0] != rm[0]
    _, mean, var = normkit.batch_norm(
        x, rm, rv, training=True, axis=-1, mask=np.zeros_like(mask), preset="keras"
    )
    np.testing.assert_array_equal(mean, rm)
    np.testing.assert_array_equal(var, rv)


def test_each_statistic_keeps_its_own_dtype() -> None:
    x, mask = data((6, 5, 4), loc=0.0)
    _, mean, var = normkit.batch_norm(
        x, np.zeros(4), np.ones(4, np.float32), training=True, axis=-1, mask=mask, preset="keras"
    )
    assert (mean.dtype, var.dtype) == (np.float64, np.float32)


def test_the_first_cumulative_batch_stores_a_tiny_variance_exactly() -> None:
    """momentum=None's first batch has weight 1: the running variance becomes the batch's, even
    when it is 1e10 times smaller than the initial 1 (an update r + m (b - r) in float32 would
    round b - r to -r and store 0)."""
    x = np.random.default_rng(1).normal(0.0, 1e-5, size=(64, 3)).astype(np.float32)
    layer = normkit.BatchNorm(3, momentum=None)
    layer(x, mask=np.ones(x.shape, bool))
    count, _, m2 = reference.moments(x, (0,))
    tolerance = statistics_tolerance("float32", "var", float(np.abs(x).max()))
    np.testing.assert_allclose(layer.running_var, m2 / (count - 1), **tolerance.kwargs)
    assert np.all(layer.running_var > 0)


def test_eval_ignores_the_mask() -> None:
    x, mask = data((6, 5, 4), loc=1.0)
    layer = normkit.BatchNorm(preset="keras")
    layer(x, mask=mask)
    layer.eval()
    np.testing.assert_array_equal(layer(x, mask=mask), layer(x))


def test_a_mask_of_all_true_gives_the_unmasked_result() -> None:
    x, _ = data((6, 5, 4), loc=2.0)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    plain = normkit.batch_norm(x, rm, rv, training=True, axis=-1, preset="keras")
    masked = normkit.batch_norm(
        x, rm, rv, training=True, axis=-1, preset="keras", mask=np.ones((6, 5, 1), bool)
    )
    for got, expected in zip(masked, plain, strict=True):
        gain = centering_gain(x.mean(axis=(0, 1)), x.var(axis=(0, 1)), 1e-3)
        bound = (
            output_tolerance("float32", centering_gain=gain)
            .pairwise()
            .bound(np.asarray(expected, np.float64), 0.0)
        )
        assert np.all(np.abs(np.asarray(got, np.float64) - expected) <= bound)
