"""``normkit_jax.collectives.moments_across``: the moments of every device's unmasked values,
merged exactly under a named axis, equal the float64 moments of the concatenated data.

Oracles: :func:`normkit.reference.moments` of the concatenated unmasked data (float64), and
Flax's own ``axis_name`` statistics (``flax.nnx.BatchNorm``), which average the devices' masked
means (google/flax#2417) and must miss them. Four CPU devices come from ``XLA_FLAGS`` in
``conftest.py``, set before JAX is imported.
"""

from __future__ import annotations

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
from normkit_jax.collectives import moments_across

DEVICES = 4
ROWS = 8  # rows per device
CHANNELS = 5


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    devices = jax.devices()
    if len(devices) < DEVICES:
        pytest.fail(
            f"{len(devices)} JAX device(s): these tests need {DEVICES}; XLA_FLAGS="
            f"--xla_force_host_platform_device_count={DEVICES} must be set before jax is imported (conftest.py)"
        )
    return Mesh(np.array(devices[:DEVICES]), ("d",))


def device_data(
    counted_rows: tuple[int, ...], *, offset: float = 0.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, mask)`` of shape ``(DEVICES * ROWS, CHANNELS)``: device ``i`` holds rows from
    ``N(offset + 3i, (1 + i)^2)`` of which the first ``counted_rows[i]`` count, and one value in
    five is masked out besides (so each channel has its own count on each device)."""
    rng = np.random.default_rng(seed)
    device = np.repeat(np.arange(DEVICES), ROWS)[:, None]
    x = (offset + 3.0 * device + (1.0 + device) * rng.standard_normal((DEVICES * ROWS, CHANNELS))).astype(
        np.float32
    )
    rows = np.concatenate([np.arange(ROWS) < c for c in counted_rows])[:, None]
    mask = rows & (rng.random(x.shape) > 0.2)
    return x, mask


def merged(mesh: Mesh, x: np.ndarray, mask: np.ndarray) -> normkit.Moments:
    """``moments_across`` of each device's masked moments over axis 0, under ``jax.shard_map``."""

    def per_device(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(moments_across(normkit.moments(x, axis=1, mask=mask), "d"))

    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P()))
    return normkit.Moments(*run(jnp.asarray(x), jnp.asarray(mask)))


def assert_matches_reference(result: normkit.Moments, x: np.ndarray, mask: np.ndarray) -> None:
    """Counts exact; mean and biased variance within the statistics tolerance of float32 data of
    this magnitude (:func:`normkit.testing.tolerances.statistics_tolerance`)."""
    count, mean, m2 = reference.moments(x, axes=(0,), mask=mask)
    np.testing.assert_array_equal(np.asarray(result.count), count)
    magnitude = float(np.abs(x).max())
    got_mean = np.asarray(result.mean, np.float64)
    mean_tolerance = tolerances.statistics_tolerance("float32", "mean", magnitude)
    tolerances.assert_within(np.abs(got_mean - mean), mean_tolerance.bound(mean, 0.0), "merged mean")
    counted = count > 0
    var = np.where(counted, m2 / np.where(counted, count, 1), 0.0)
    got_var = np.asarray(result.m2, np.float64) / np.where(counted, count, 1)
    var_tolerance = tolerances.statistics_tolerance("float32", "var", magnitude)
    tolerances.assert_within(np.abs(got_var - var), var_tolerance.bound(var, 0.0), "merged variance")


def test_unequal_masked_counts_equal_the_concatenated_data(mesh: Mesh) -> None:
    x, mask = device_data((2, 8, 3, 5))
    result = merged(mesh, x, mask)
    assert result.count.shape == (CHANNELS,)
    assert_matches_reference(result, x, mask)


def test_a_device_with_nothing_counted_is_the_identity(mesh: Mesh) -> None:
    x, mask = device_data((2, 8, 0, 5), seed=1)
    assert not mask[2 * ROWS : 3 * ROWS].any()
    assert_matches_reference(merged(mesh, x, mask), x, mask)


def test_nothing_counted_anywhere_gives_zeros(mesh: Mesh) -> None:
    x, _ = device_data((0, 0, 0, 0))
    result = merged(mesh, x, np.zeros(x.shape, bool))
    for field in result:
        np.testing.assert_array_equal(np.asarray(field), 0)


def test_stable_at_a_mean_of_1e4_std_1(mesh: Mesh) -> None:
    """The float32 merge at |mean|/std = 1e4 (the devices' means differ by 3 to 9 std): the
    variance stays within 1e-3 relative of float64, and within the derived tolerance."""
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((DEVICES * ROWS, CHANNELS))).astype(np.float32)
    mask = np.concatenate([np.arange(ROWS) < c for c in (2, 8, 3, 5)])[:, None] & np.ones(x.shape, bool)
    result = merged(mesh, x, mask)
    assert_matches_reference(result, x, mask)
    _, _, m2 = reference.moments(x, axes=(0,), mask=mask)
    relative = np.abs(np.asarray(result.m2, np.float64) - m2) / m2
    assert relative.max() < 1e-3


def test_flax_axis_name_statistics_are_a_mean_of_means(mesh: Mesh) -> None:
    """The oracle that the case matters: Flax's ``axis_name`` BatchNorm (stable variance) with
    the same masks returns the mean of the devices' masked means, off by far more than the
    tolerance (google/flax#2417), while the exact merge is within it."""
    x, _ = device_data((2, 8, 3, 5))
    # whole rows (no device without a value: Flax's mean of an empty part is NaN)
    row_mask = np.concatenate([np.arange(ROWS) < c for c in (2, 8, 3, 5)])[:, None]
    layer = nnx.BatchNorm(CHANNELS, momentum=0.0, axis_name="d", use_fast_variance=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    def per_device(state: nnx.State, x: jax.Array, mask: jax.Array) -> nnx.State:
        module = nnx.merge(graphdef, state)
        module(x, mask=mask)
        return nnx.state(module)

    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P()))
    flax_state = run(state, jnp.asarray(x), jnp.asarray(row_mask))
    ours = merged(mesh, x, np.broadcast_to(row_mask, x.shape))
    count, mean, m2 = reference.moments(x, axes=(0,), mask=np.broadcast_to(row_mask, x.shape))
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
    x, _ = device_data((2, 8, 0, 5))
    row_mask = np.concatenate([np.arange(ROWS) < c for c in (2, 8, 0, 5)])[:, None]
    layer = nnx.BatchNorm(CHANNELS, momentum=0.0, axis_name="d", use_fast_variance=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    def per_device(state: nnx.State, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, nnx.State]:
        module = nnx.merge(graphdef, state)
        return module(x, mask=mask), nnx.state(module)

    run = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=(P("d"), P()))
    )
    y, flax_state = run(state, jnp.asarray(x), jnp.asarray(row_mask))
    assert np.isnan(np.asarray(flax_state["mean"][...])).all() and np.isnan(np.asarray(y)).all()
    assert_matches_reference(
        merged(mesh, x, np.broadcast_to(row_mask, x.shape)), x, np.broadcast_to(row_mask, x.shape)
    )


def test_axis_index_groups_merge_within_each_group() -> None:
    """Under ``jax.pmap`` (which supports ``axis_index_groups``), devices 0-1 and 2-3 merge
    separately: each pair gets the float64 moments of its own two parts."""
    x, mask = device_data((2, 8, 3, 5), seed=3)
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


def test_vmap_axis_name_gives_the_same_merge() -> None:
    """``jax.vmap(axis_name=...)`` binds the name too: the merge needs no devices."""
    x, mask = device_data((2, 8, 0, 5), seed=4)

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
