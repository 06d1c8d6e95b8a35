"""``normkit_jax.collectives.moments_across``: the moments of every device's unmasked values,
merged exactly under a named axis, equal the float64 moments of the concatenated data.

Oracles: :func:`normkit.reference.moments` of the concatenated unmasked data (float64), and
Flax's own ``axis_name`` statistics (``flax.nnx.BatchNorm``), which average the devices' masked
means (google/flax#2417) and must miss them. Four CPU devices come from ``XLA_FLAGS`` in
``conftest.py``, set before JAX is imported.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import normkit
from normkit import reference
from normkit.testing import tolerances
from normkit.testing.primitives import moments_bounds
from normkit_jax.collectives import global_moments, moments_across
from normkit_jax.flax_cases import (
    CHANNELS,
    COUNTED_ROWS,
    DEVICES,
    EMPTY_DEVICE_ROWS,
    ROWS,
    device_data,
    device_mesh,
    merged_under_shard_map,
    nnx_under_shard_map,
    row_mask,
)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    try:
        return device_mesh("d")
    except RuntimeError as error:  # too few devices: a failure, not a skip
        pytest.fail(f"{error} (conftest.py sets it)")


def merged(mesh: Mesh, x: np.ndarray, mask: np.ndarray) -> normkit.Moments:
    """``moments_across`` of each device's masked moments over axis 0, under ``jax.shard_map``."""
    return merged_under_shard_map(mesh, x, mask, from_data=False)


MEAN_ROUNDINGS = 5
r"""Roundings of the merged mean in the merge itself, in units of :math:`\epsilon|\mu|`: the
product :math:`n_i\mu_i`, its sum over four devices (three additions) and the division by
:math:`N`."""
M2_ROUNDINGS = 8
r"""Roundings of the merged :math:`M_2` in the merge itself, relative: the deviation
:math:`d_i = \mu_i - \mu` (twice: it is squared), the products :math:`n_i d_i` and
:math:`(n_i d_i)\,d_i`, the addition of :math:`M_{2,i}`, and the sum over four devices (three
additions)."""


def merge_bounds(
    x: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""``(count, mean, m2, mean_bound, m2_bound)``: the float64 moments over axis 0 of ``x``'s
    unmasked values, and how far the float32 merge of its parts of ``ROWS`` rows (one per
    device) may be from them, derived from what is computed.

    Each part's moments are within :func:`normkit.testing.primitives.moments_bounds`
    (:math:`e_i` for its mean, :math:`e_{2,i}` for its :math:`M_2`). The merged mean is off by
    at most :math:`\max_i e_i` plus the merge's roundings, :math:`e_\mu`. :math:`M_2 =
    \sum_i M_{2,i} + n_i d_i^2` with :math:`d_i = \mu_i - \mu`: an error of the merged mean
    cancels to first order (:math:`\sum_i n_i d_i = 0`), but each part's own mean error enters
    through the spread of the means, :math:`2 n_i |d_i| e_i`, plus
    :math:`n_i (e_i + e_\mu)^2` and the merge's roundings. At :math:`|\mu| = 10^4` in float32
    the :math:`e_i` are :math:`\epsilon|\mu_i| pprox 6 	imes 10^{-4}` (a float32 mean), so the
    first-order term dominates as soon as the devices' means differ."""
    eps = tolerances.EPS["float32"]
    parts = [
        moments_bounds(x[start : start + ROWS], (0,), mask[start : start + ROWS], "float32")
        for start in range(0, len(x), ROWS)
    ]
    count, mean, m2 = reference.moments(x, (0,), mask)
    mean_bound = np.max([e_mean for *_, e_mean, _ in parts], axis=0) + MEAN_ROUNDINGS * eps * np.abs(mean)
    m2_bound = M2_ROUNDINGS * eps * m2
    for n, part_mean, _, e_mean, e_m2 in parts:
        deviation = np.where(n > 0, part_mean - mean, 0.0)
        m2_bound = m2_bound + e_m2 + 2 * n * np.abs(deviation) * e_mean + n * (e_mean + mean_bound) ** 2
    return count, mean, m2, mean_bound, m2_bound


def assert_matches_reference(result: normkit.Moments, x: np.ndarray, mask: np.ndarray) -> None:
    """Counts exact; mean and :math:`M_2` within :func:`merge_bounds` of the float64 reference."""
    count, mean, m2, mean_bound, m2_bound = merge_bounds(x, mask)
    np.testing.assert_array_equal(np.asarray(result.count), count)
    tolerances.assert_within(np.abs(np.asarray(result.mean, np.float64) - mean), mean_bound, "merged mean")
    tolerances.assert_within(np.abs(np.asarray(result.m2, np.float64) - m2), m2_bound, "merged m2")


def test_unequal_masked_counts_equal_the_concatenated_data(mesh: Mesh) -> None:
    x, mask = device_data(COUNTED_ROWS)
    result = merged(mesh, x, mask)
    assert result.count.shape == (CHANNELS,)
    assert_matches_reference(result, x, mask)


def test_a_device_with_nothing_counted_is_the_identity(mesh: Mesh) -> None:
    x, mask = device_data(EMPTY_DEVICE_ROWS, seed=1)
    assert not mask[2 * ROWS : 3 * ROWS].any()
    assert_matches_reference(merged(mesh, x, mask), x, mask)


def test_nothing_counted_anywhere_gives_zeros(mesh: Mesh) -> None:
    x, _ = device_data((0, 0, 0, 0))
    result = merged(mesh, x, np.zeros(x.shape, bool))
    for field in result:
        np.testing.assert_array_equal(np.asarray(field), 0)


def test_stable_at_a_mean_of_1e4_std_1(mesh: Mesh) -> None:
    """The float32 merge at |mean|/std = 1e4, the devices' means 3 to 9 std apart (device i at
    1e4 + 3i, std 1; whole rows counted, unequally): the variance stays within 1e-3 relative of
    float64, and within the derived tolerance. A merged mean off by a fraction of the spread
    between the devices' means would move the variance by far more."""
    x, _ = device_data(COUNTED_ROWS, offset=1e4, std_grows=False, seed=2)
    mask = np.broadcast_to(row_mask(COUNTED_ROWS), x.shape)
    result = merged(mesh, x, mask)
    assert_matches_reference(result, x, mask)
    _, _, m2 = reference.moments(x, axes=(0,), mask=mask)
    relative = np.abs(np.asarray(result.m2, np.float64) - m2) / m2
    assert relative.max() < 1e-3


def test_flax_axis_name_statistics_are_a_mean_of_means(mesh: Mesh) -> None:
    """The oracle that the case matters: Flax's ``axis_name`` BatchNorm (stable variance) with
    the same masks returns the mean of the devices' masked means, off by far more than the
    tolerance (google/flax#2417), while the exact merge is within it."""
    x, _ = device_data(COUNTED_ROWS)
    # whole rows (no device without a value: Flax's mean of an empty part is NaN)
    mask = np.broadcast_to(row_mask(COUNTED_ROWS), x.shape)
    layer = nnx.BatchNorm(CHANNELS, momentum=0.0, axis_name="d", use_fast_variance=False, rngs=nnx.Rngs(0))
    _, flax_state = nnx_under_shard_map(layer, mesh)(x, mask)
    ours = merged(mesh, x, mask)
    count, mean, m2 = reference.moments(x, axes=(0,), mask=mask)
    magnitude = float(np.abs(x).max())
    bound = tolerances.statistics_tolerance("float32", "mean", magnitude).bound(mean, 0.0)
    flax_error = np.abs(np.asarray(flax_state["mean"][...], np.float64) - mean)
    our_error = np.abs(np.asarray(ours.mean, np.float64) - mean)
    tolerances.assert_within(our_error, bound, "exact merge")
    assert (flax_error > 100 * bound).all(), (flax_error, bound)
    flax_var_error = np.abs(np.asarray(flax_state["var"][...], np.float64) - m2 / count)
    var_bound = tolerances.statistics_tolerance("float32", "var", magnitude).bound(m2 / count, 0.0)
    assert (flax_var_error > 100 * var_bound).all(), (flax_var_error, var_bound)


def test_flax_axis_name_with_an_empty_device_is_nan(mesh: Mesh) -> None:
    """Flax's mean of an empty device's values is 0/0: its ``axis_name`` statistics, and every
    device's output, are NaN (the exact merge treats the device as the identity)."""
    x, _ = device_data(EMPTY_DEVICE_ROWS)
    mask = np.broadcast_to(row_mask(EMPTY_DEVICE_ROWS), x.shape)
    layer = nnx.BatchNorm(CHANNELS, momentum=0.0, axis_name="d", use_fast_variance=False, rngs=nnx.Rngs(0))
    y, flax_state = nnx_under_shard_map(layer, mesh)(x, mask)
    assert np.isnan(np.asarray(flax_state["mean"][...])).all() and np.isnan(np.asarray(y)).all()
    assert_matches_reference(merged(mesh, x, mask), x, mask)


def test_axis_index_groups_merge_within_each_group() -> None:
    """Under ``jax.pmap`` (which supports ``axis_index_groups``), devices 0-1 and 2-3 merge
    separately: each pair gets the float64 moments of its own two parts."""
    x, mask = device_data(COUNTED_ROWS, seed=3)
    per_device_x = x.reshape(DEVICES, ROWS, CHANNELS)
    per_device_mask = mask.reshape(DEVICES, ROWS, CHANNELS)
    groups = [[0, 1], [2, 3]]

    def per_device(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(moments_across(normkit.moments(x, axis=1, mask=mask), "d", groups))

    counts, means, m2s = jax.pmap(per_device, axis_name="d", devices=jax.devices()[:DEVICES])(
        jnp.asarray(per_device_x), jnp.asarray(per_device_mask)
    )
    for group in groups:
        part_x = np.concatenate([per_device_x[i] for i in group])
        part_mask = np.concatenate([per_device_mask[i] for i in group])
        for i in group:
            result = normkit.Moments(counts[i], means[i], m2s[i])
            assert_matches_reference(result, part_x, part_mask)


TWO_PASS_ROUNDINGS = 6
r"""Roundings of :func:`global_moments`' :math:`M_2` beyond its local sums, relative: the deviation
:math:`x - \mu` (twice: it is squared), the square, and the sum over four devices (three
additions)."""


def two_pass_bounds(
    x: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""``(count, mean, m2, mean_bound, m2_bound)`` for :func:`global_moments`: the mean as the
    merge's (:func:`merge_bounds`); :math:`M_2` a two-pass over every device's values around that
    mean, whose error :math:`\delta` enters only as :math:`N\delta^2`, with each device's local
    sum of ``ROWS`` squares (:func:`~normkit.testing.tolerances.reduction_growth`) and
    ``TWO_PASS_ROUNDINGS``."""
    count, mean, m2, mean_bound, _ = merge_bounds(x, mask)
    growth = tolerances.reduction_growth(ROWS)
    m2_bound = (TWO_PASS_ROUNDINGS + growth) * tolerances.EPS["float32"] * m2 + count * mean_bound**2
    return count, mean, m2, mean_bound, m2_bound


@pytest.mark.parametrize(
    ("counted_rows", "data", "rows_only"),
    [
        (COUNTED_ROWS, {}, False),
        (EMPTY_DEVICE_ROWS, {"seed": 1}, False),
        (COUNTED_ROWS, {"offset": 1e4, "std_grows": False, "seed": 2}, True),
        ((8, 8, 8, 8), {"offset": 1e4, "std_grows": False, "seed": 2}, True),
    ],
    ids=["unequal", "empty-device", "1e4-unequal", "1e4-every-row"],
)
def test_global_moments_equal_the_concatenated_data(
    mesh: Mesh, counted_rows: tuple[int, ...], data: dict[str, Any], rows_only: bool
) -> None:
    """``global_moments`` (the layers' merge: the two-pass across devices) against the float64
    moments of the concatenated unmasked data, within :func:`two_pass_bounds`; at |mean|/std =
    1e4 with every row counted, the merge of the devices' moments alone (``moments_across``),
    whose rounded means enter at first order, is outside that bound: the oracle that the second
    pass over the data matters."""
    x, mask = device_data(counted_rows, **data)
    if rows_only:
        mask = np.broadcast_to(row_mask(counted_rows), x.shape)
    result = merged_under_shard_map(mesh, x, mask, from_data=True)
    count, mean, m2, mean_bound, m2_bound = two_pass_bounds(x, mask)
    np.testing.assert_array_equal(np.asarray(result.count), count)
    tolerances.assert_within(np.abs(np.asarray(result.mean, np.float64) - mean), mean_bound, "mean")
    tolerances.assert_within(np.abs(np.asarray(result.m2, np.float64) - m2), m2_bound, "m2")
    if counted_rows == (8, 8, 8, 8):
        from_moments = np.asarray(merged(mesh, x, mask).m2, np.float64)
        assert (np.abs(from_moments - m2) > m2_bound).any()


def test_global_moments_select_masked_values_away() -> None:
    r"""NaN and inf where the mask is False reach neither the statistics nor their gradient
    (exactly 0 there), and the gradient of :math:`M_2` elsewhere is its closed form
    :math:`2 m_j (x_j - \mu)`; ``jax.vmap(axis_name=...)`` binds the name."""
    x, mask = device_data(COUNTED_ROWS, seed=5)
    clean = np.where(mask, x, 0.0).astype(np.float32)
    poisoned = np.where(mask, x, np.where(np.arange(x.size).reshape(x.shape) % 2, np.nan, np.inf)).astype(
        np.float32
    )
    parts = {
        name: jnp.asarray(v.reshape(DEVICES, ROWS, CHANNELS))
        for name, v in (("clean", clean), ("poisoned", poisoned))
    }
    part_mask = jnp.asarray(mask.reshape(DEVICES, ROWS, CHANNELS))

    def m2_of_the_whole(parts: jax.Array, mask: jax.Array) -> jax.Array:
        """Sum of the merged M2 (every part holds the same copy: part 0's), of all parts' values."""
        per_part = jax.vmap(lambda x, m: global_moments(x, 0, "parts", mask=m).m2, axis_name="parts")
        return jnp.sum(per_part(parts, mask)[0])

    results = {name: jax.value_and_grad(m2_of_the_whole)(value, part_mask) for name, value in parts.items()}
    (value, grad), (clean_value, clean_grad) = results["poisoned"], results["clean"]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(clean_value))
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(clean_grad))
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(part_mask)], 0.0)
    # dM2/dx_j = 2 m_j (x_j - mu) (the mean's own derivative multiplies sum_j m_j (x_j - mu) = 0):
    # off by twice the error of the mean, twice again through that sum, and the rounding of x - mu
    _, mean, _, mean_bound, _ = two_pass_bounds(x, mask)
    deviation = np.where(mask, x - mean, 0.0)
    bound = 4 * mean_bound + 4 * tolerances.EPS["float32"] * np.abs(deviation)
    got = np.asarray(grad, np.float64).reshape(x.shape)
    tolerances.assert_within(np.abs(got - 2 * deviation), np.where(mask, bound, 0.0), "gradient")


def test_vmap_axis_name_gives_the_same_merge() -> None:
    """``jax.vmap(axis_name=...)`` binds the name too: the merge needs no devices."""
    x, mask = device_data(EMPTY_DEVICE_ROWS, seed=4)

    def per_part(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(moments_across(normkit.moments(x, axis=1, mask=mask), "parts"))

    counts, means, m2s = jax.vmap(per_part, axis_name="parts")(
        jnp.asarray(x.reshape(DEVICES, ROWS, CHANNELS)), jnp.asarray(mask.reshape(DEVICES, ROWS, CHANNELS))
    )
    assert_matches_reference(normkit.Moments(counts[3], means[3], m2s[3]), x, mask)


def test_unbound_axis_name_is_a_clear_error() -> None:
    stats = normkit.moments(jnp.ones((4, 3)), axis=1)
    with pytest.raises(ValueError, match=r"axis_name='batch' is not bound"):
        moments_across(stats, "batch")


def test_axis_index_groups_under_shard_map_is_a_clear_error(mesh: Mesh) -> None:
    def per_device(x: jax.Array) -> jax.Array:
        return moments_across(normkit.moments(x, axis=1), "d", [[0, 1], [2, 3]]).mean

    with pytest.raises(ValueError, match="axis_index_groups"):
        jax.shard_map(per_device, mesh=mesh, in_specs=P("d"), out_specs=P())(jnp.ones((8, 3)))


@pytest.mark.parametrize(
    ("moments", "error", "match"),
    [
        ((jnp.ones(3), jnp.ones(3), jnp.ones(3)), TypeError, "count has dtype float32; expected an integer"),
        ((jnp.ones(3, int), jnp.ones(2), jnp.ones(3)), ValueError, r"mean has shape \(2,\)"),
        ((jnp.ones(3, int), jnp.ones(3, int), jnp.ones(3)), TypeError, "mean has dtype int32"),
        ((jnp.ones(3, int), jnp.ones(3)), ValueError, "has 2 fields"),
    ],
)
def test_bad_moments_are_refused(moments: tuple[jax.Array, ...], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        moments_across(moments, "d")
