"""``normkit_jax.linen`` layers against ``flax.linen``'s own (created with
``use_fast_variance=False``) and the float64 reference; tolerances from
:mod:`normkit.testing.tolerances` (see ``test_nnx.py``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from normkit import reference
from normkit.testing import tolerances
from normkit_jax import linen as nkl
from normkit_jax.flax_cases import offset_data

F32 = "float32"
KEY = jax.random.key(0)


def statistics(
    x: np.ndarray, reduced: tuple[int, ...], mask: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """float64 ``(count, mean, biased var)`` over ``reduced``, keepdims."""
    count, mean, m2 = reference.moments(x, reduced, mask)
    safe = np.where(count > 0, count, 1)
    return tuple(np.expand_dims(v, reduced) for v in (count, mean, np.where(count > 0, m2 / safe, 0.0)))


def agree(got: Any, expected: Any, dtype: str, centering_gain: float, what: str) -> None:
    expected64 = np.asarray(expected, np.float64)
    bound = tolerances.agreement_tolerance(dtype, centering_gain=centering_gain).bound(expected64, 0.0)
    tolerances.assert_within(np.abs(np.asarray(got, np.float64) - expected64), bound, what)


# (name, attributes, input shape, reduced axes of the statistics)
CASES = [
    ("BatchNorm", {"use_running_average": False, "momentum": 0.9}, (16, 3, 4), (0, 1)),
    ("LayerNorm", {}, (4, 3, 12), (2,)),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": (1, 2)}, (4, 3, 12), (1, 2)),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": -1}, (4, 3, 12), (1, 2)),
    ("RMSNorm", {}, (4, 3, 12), (2,)),
    ("GroupNorm", {"num_groups": 3}, (2, 4, 5, 12), None),
    ("InstanceNorm", {}, (2, 4, 5, 12), (1, 2)),
]


def case_gain(
    name: str, x: np.ndarray, reduced: tuple[int, ...] | None, mask: np.ndarray | None, eps: float
) -> float:
    if name == "GroupNorm":
        grouped = x.reshape(*x.shape[:-1], 3, -1)
        blocks = (*range(1, x.ndim - 1), x.ndim)  # every axis but the batch and the group's
        _, mean, var = statistics(grouped, blocks, None if mask is None else mask.reshape(grouped.shape))
    else:
        _, mean, var = statistics(x, reduced, mask)
        if name == "RMSNorm":
            mean, var = np.zeros_like(mean), var + mean**2
    return tolerances.centering_gain(mean, var, eps)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(("name", "attributes", "shape", "reduced"), CASES)
def test_variables_and_training_match_flax(
    name: str,
    attributes: dict[str, Any],
    shape: tuple[int, ...],
    reduced: tuple[int, ...] | None,
    masked: bool,
) -> None:
    """``init`` gives Flax's variable tree (names, shapes, dtypes, values); three ``apply`` steps
    with ``mutable=['batch_stats']`` give Flax's outputs and statistics. Masks are integer arrays
    here: linen casts them to bool."""
    rng = np.random.default_rng(0)
    ours, flax = getattr(nkl, name)(**attributes), getattr(nn, name)(use_fast_variance=False, **attributes)
    first = jnp.asarray(rng.normal(5.0, 2.0, shape), jnp.float32)
    variables, flax_variables = ours.init(KEY, first), flax.init(KEY, first)
    assert jax.tree.map(lambda v: (v.shape, v.dtype), variables) == jax.tree.map(
        lambda v: (v.shape, v.dtype), flax_variables
    )
    jax.tree.map(np.testing.assert_array_equal, variables, flax_variables)
    eps = ours.epsilon
    magnitude = 0.0
    for _ in range(3):
        x = rng.normal(5.0, 2.0, shape).astype(np.float32)
        magnitude = max(magnitude, float(np.abs(x).max()))
        mask = (rng.random(shape) > 0.3).astype(np.int32) if masked else None
        m = None if mask is None else jnp.asarray(mask)
        y, updates = ours.apply(variables, jnp.asarray(x), mask=m, mutable=["batch_stats"])
        y_flax, flax_updates = flax.apply(flax_variables, jnp.asarray(x), mask=m, mutable=["batch_stats"])
        variables, flax_variables = {**variables, **updates}, {**flax_variables, **flax_updates}
        agree(
            y, y_flax, F32, case_gain(name, x, reduced, None if mask is None else mask > 0, eps), f"{name} y"
        )
        assert jax.tree.structure(updates) == jax.tree.structure(flax_updates)
        for stat in ("mean", "var") if name == "BatchNorm" else ():
            expected = np.asarray(flax_updates["batch_stats"][stat], np.float64)
            bound = tolerances.statistics_tolerance(F32, stat, magnitude).pairwise().bound(expected, 0.0)
            tolerances.assert_within(np.abs(np.asarray(updates["batch_stats"][stat]) - expected), bound, stat)


def test_batch_norm_eval_and_merge_param() -> None:
    """Eval (``use_running_average=True`` at the call) needs no ``mutable`` and matches Flax;
    ``nn.merge_param``: the mode at construction and call both, or neither, is an error; training
    without ``mutable=['batch_stats']`` is Flax's error."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(3.0, 2.0, (16, 4)), jnp.float32)
    stats = {
        "mean": jnp.asarray(rng.normal(size=4), jnp.float32),
        "var": jnp.asarray(rng.random(4) + 0.5, jnp.float32),
    }
    variables = {
        "params": {"scale": jnp.asarray(rng.normal(size=4), jnp.float32), "bias": jnp.zeros(4)},
        "batch_stats": stats,
    }
    y = nkl.BatchNorm().apply(variables, x, use_running_average=True)
    y_flax = nn.BatchNorm(use_fast_variance=False).apply(variables, x, use_running_average=True)
    gain = tolerances.centering_gain(stats["mean"], stats["var"], 1e-5) * float(
        jnp.abs(variables["params"]["scale"]).max()
    )
    agree(y, y_flax, F32, gain, "eval y")
    with pytest.raises(ValueError, match="use_running_average"):
        nkl.BatchNorm().apply(variables, x)
    with pytest.raises(ValueError, match="use_running_average"):
        nkl.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)
    with pytest.raises(Exception, match='collection "batch_stats" is immutable'):
        nkl.BatchNorm(use_running_average=False).apply(variables, x)


def test_init_does_not_update_the_statistics_nor_reduce_over_axis_name() -> None:
    """``init`` in training mode leaves ``mean = 0``, ``var = 1`` (``is_initializing()``) and
    ignores ``axis_name``, so it runs outside the mapped function, as Flax's does."""
    x = jnp.asarray(np.random.default_rng(2).normal(7.0, 2.0, (8, 3)), jnp.float32)
    variables = nkl.BatchNorm(use_running_average=False, axis_name="d").init(KEY, x)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))


def test_axis_name_under_shard_map() -> None:
    """Initialized outside, applied under ``jax.shard_map`` on 4 devices with unequal masks: the
    statistics are those of the concatenated unmasked data (float64 reference)."""
    devices = jax.devices()
    assert len(devices) >= 4, "conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4"
    mesh = Mesh(np.array(devices[:4]), ("d",))
    rng = np.random.default_rng(3)
    device = np.repeat(np.arange(4), 6)[:, None]
    x = (2.0 * device + rng.standard_normal((24, 3))).astype(np.float32)
    mask = np.concatenate([np.arange(6) < c for c in (1, 6, 3, 0)])[:, None] & np.ones((24, 3), bool)
    layer = nkl.BatchNorm(use_running_average=False, momentum=0.0, axis_name="d")
    variables = layer.init(KEY, jnp.asarray(x))

    def per_device(variables: dict[str, Any], x: jax.Array, mask: jax.Array) -> tuple[jax.Array, Any]:
        return layer.apply(variables, x, mask=mask, mutable=["batch_stats"])

    run = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=(P("d"), P()))
    y, updates = run(variables, jnp.asarray(x), jnp.asarray(mask))
    _, mean, var = statistics(x, (0,), mask)
    magnitude = float(np.abs(x).max())
    for stat, expected in (("mean", mean.reshape(-1)), ("var", var.reshape(-1))):
        bound = tolerances.statistics_tolerance(F32, stat, magnitude).bound(expected, 0.0)
        tolerances.assert_within(np.abs(np.asarray(updates["batch_stats"][stat]) - expected), bound, stat)
    expected_y = (x - mean) / np.sqrt(var + 1e-5)
    bound = tolerances.output_tolerance(F32, centering_gain=tolerances.centering_gain(mean, var, 1e-5)).bound(
        expected_y, 0
    )
    tolerances.assert_within(np.abs(np.asarray(y, np.float64) - expected_y), bound, "y")


@pytest.mark.parametrize(
    ("name", "input_dtype", "dtype", "expected"),
    [
        ("BatchNorm", jnp.bfloat16, None, jnp.float32),
        ("BatchNorm", jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        ("LayerNorm", jnp.float16, None, jnp.float32),
        ("LayerNorm", jnp.float32, jnp.bfloat16, jnp.bfloat16),
        ("GroupNorm", jnp.bfloat16, None, jnp.float32),
        ("RMSNorm", jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    ],
)
def test_output_dtype_is_flaxs(name: str, input_dtype: Any, dtype: Any, expected: Any) -> None:
    """Flax's rule: the result type of ``x``, ``scale`` and ``bias`` (float32 parameters lift
    half-precision input), unless ``dtype`` is given; values agree with Flax's within the
    output dtype's tolerance."""
    attributes: dict[str, Any] = {"dtype": dtype}
    if name == "BatchNorm":
        attributes["use_running_average"] = False
    if name == "GroupNorm":
        attributes["num_groups"] = 3
    # at mean 200, std 1 a bfloat16 rounding of x before the statistics (nnx's rule, not linen's)
    # moves y by up to 0.5 std: far outside the bfloat16 tolerance
    x = jnp.asarray(np.random.default_rng(4).normal(200.0, 1.0, (4, 5, 6)), input_dtype)
    ours, flax = getattr(nkl, name)(**attributes), getattr(nn, name)(use_fast_variance=False, **attributes)
    variables = ours.init(KEY, x)
    y, _ = ours.apply(variables, x, mutable=["batch_stats"])
    y_flax, _ = flax.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == y_flax.dtype == expected
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    reduced = {"BatchNorm": (0, 1), "LayerNorm": (2,), "RMSNorm": (2,)}.get(name)
    agree(y, y_flax, jnp.dtype(expected).name, case_gain(name, x64, reduced, None, ours.epsilon), f"{name} y")


# (name, attributes, input shape, the groups' shape, the axes of one group in it)
OFFSET_CASES = [
    ("BatchNorm", {"momentum": 0.0}, (256, 4), (256, 4), (0,)),
    ("LayerNorm", {}, (4, 256), (4, 256), (1,)),
    ("GroupNorm", {"num_groups": 2}, (2, 8, 8, 8), (2, 8, 8, 2, 4), (1, 2, 4)),
    ("InstanceNorm", {}, (2, 16, 16, 4), (2, 16, 16, 4), (1, 2)),
]


def train_once(layer: nn.Module, x: jax.Array, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``init`` then one training ``apply`` (``mutable=['batch_stats']``): ``(y, batch_stats)``."""
    mode = {"use_running_average": False} if name == "BatchNorm" else {}
    variables = layer.init(KEY, x, **mode)
    y, updates = layer.apply(variables, x, mutable=["batch_stats"], **mode)
    return np.asarray(y, np.float64), updates.get("batch_stats", {})


@pytest.mark.parametrize(("name", "attributes", "shape", "group_shape", "reduced"), OFFSET_CASES)
def test_mean_1e4_std_1_in_float32(
    name: str,
    attributes: dict[str, Any],
    shape: tuple[int, ...],
    group_shape: tuple[int, ...],
    reduced: tuple[int, ...],
) -> None:
    """At |mean|/std = 1e4 in float32 (the data of ``test_nnx`` and ``bench/flax_statistics.py``):
    each group's output std (and batch norm's stored variance) within 1e-3 relative of the
    float64 reference, and the output within the derived output tolerance;
    ``flax.linen``'s default (``use_fast_variance=True``) misses both."""
    x = offset_data(shape)
    ours, flax_default = getattr(nkl, name)(**attributes), getattr(nn, name)(**attributes)
    _, mean, var = statistics(x.reshape(group_shape), reduced)
    expected = ((x.reshape(group_shape) - mean) / np.sqrt(var + ours.epsilon)).reshape(shape)
    expected_std = expected.reshape(group_shape).std(axis=reduced)
    bound = tolerances.output_tolerance(
        F32, centering_gain=tolerances.centering_gain(mean, var, ours.epsilon)
    ).bound(expected, 0.0)
    y, stats = train_once(ours, jnp.asarray(x), name)
    y_flax, flax_stats = train_once(flax_default, jnp.asarray(x), name)
    assert np.abs(y.reshape(group_shape).std(axis=reduced) / expected_std - 1).max() <= 1e-3
    tolerances.assert_within(np.abs(y - expected), bound, f"{name} y at mean 1e4")
    flax_relative = np.abs(y_flax.reshape(group_shape).std(axis=reduced) / expected_std - 1)
    assert flax_relative.max() > 1e-3, flax_relative
    assert (np.abs(y_flax - expected) > bound).any()
    if name == "BatchNorm":  # momentum 0: the stored variance is the batch variance
        var_flat = var.reshape(-1)
        assert np.abs(np.asarray(stats["var"], np.float64) / var_flat - 1).max() <= 1e-3
        assert np.abs(np.asarray(flax_stats["var"], np.float64) / var_flat - 1).max() > 1e-3


def test_rms_norm_at_mean_1e4_subtracts_no_mean() -> None:
    """RMSNorm at |mean|/std = 1e4: no mean is subtracted, so nothing cancels and
    ``use_fast_variance`` changes nothing; this layer and Flax's default are both within the
    output tolerance of the float64 reference (``x / sqrt(mean(x^2) + eps)``)."""
    x = offset_data((4, 256))
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6)
    bound = tolerances.output_tolerance(F32).bound(expected, 0.0)
    for label, layer in (("normkit", nkl.RMSNorm()), ("flax", nn.RMSNorm())):
        y, _ = train_once(layer, jnp.asarray(x), "RMSNorm")
        tolerances.assert_within(np.abs(y - expected), bound, f"{label} RMSNorm y at mean 1e4")


def test_keyword_only_where_flaxs_first_field_is_epsilon() -> None:
    """``flax.linen.LayerNorm(12)`` silently sets ``epsilon=12``; here it is refused. BatchNorm
    and GroupNorm keep Flax's positional order."""
    assert nn.LayerNorm(12).epsilon == 12
    for name in ("LayerNorm", "RMSNorm", "InstanceNorm"):
        with pytest.raises(TypeError):
            getattr(nkl, name)(12)
    assert nkl.GroupNorm(8).num_groups == 8
    assert nkl.BatchNorm(True).use_running_average is True


def test_instance_norm_running_statistics() -> None:
    """``InstanceNorm(track_running_stats=True)``: ``batch_stats/{mean, var}`` created at ``init``
    (not updated there), updated in training by the decay toward the mean over samples of the
    per-sample statistics (normkit's float64 reference), used in eval."""
    rng = np.random.default_rng(6)
    x = rng.normal(1.0, 2.0, (4, 5, 6, 3)).astype(np.float32)
    layer = nkl.InstanceNorm(track_running_stats=True, momentum=0.6)
    variables = layer.init(KEY, jnp.asarray(x), use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
    _, updates = layer.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    _, mean, var = reference.instance_norm(
        x, None, None, np.zeros(3), np.ones(3), use_input_stats=True, momentum=0.4, eps=1e-6, axis=-1,
        unbiased_running_var=False,
    )  # fmt: skip
    for stat, expected in (("mean", mean), ("var", var)):
        bound = tolerances.statistics_tolerance(F32, stat, float(np.abs(x).max())).bound(expected, 0.0)
        tolerances.assert_within(np.abs(np.asarray(updates["batch_stats"][stat]) - expected), bound, stat)
    variables = {**variables, **updates}
    y = layer.apply(variables, jnp.asarray(x), use_running_average=True)
    expected_y = reference.normalize(x, mean, var, eps=1e-6, axis=-1)
    gain = tolerances.centering_gain(mean, var, 1e-6)
    bound = tolerances.output_tolerance(F32, centering_gain=gain).bound(expected_y, 0.0)
    tolerances.assert_within(np.abs(np.asarray(y, np.float64) - expected_y), bound, "eval y")


def test_partitioned_initializers_keep_their_metadata() -> None:
    """``nn.with_partitioning`` initializers work as with Flax: the boxed parameter comes back."""
    init = nn.with_partitioning(nn.initializers.ones, ("model",))
    variables = nkl.LayerNorm(scale_init=init).init(KEY, jnp.ones((2, 4)))
    assert isinstance(variables["params"]["scale"], meta.Partitioned)


@pytest.mark.parametrize(
    ("layer", "error", "match"),
    [
        (
            nkl.GroupNorm(num_groups=None, group_size="2"),
            TypeError,
            "group_size='2': expected a positive int, got str",
        ),
        (nkl.GroupNorm(num_groups=2.0), TypeError, r"num_groups=2\.0: expected a positive int, got float"),
        (nkl.GroupNorm(num_groups=None, group_size=0), ValueError, "group_size=0: expected a positive int"),
        (
            nkl.GroupNorm(num_groups=3),
            ValueError,
            r"num_groups=3 does not divide the 4 channels of x with shape \(2, 4\)",
        ),
        (nkl.GroupNorm(num_groups=2, group_size=2), ValueError, "give exactly one of them"),
        (
            nkl.BatchNorm(use_running_average=False, axis=1.5),
            TypeError,
            r"axis=1\.5: expected an int or a sequence of ints, got float",
        ),
        (
            nkl.BatchNorm(use_running_average=False, axis=(0, 1)),
            ValueError,
            r"axis=\(0, 1\): BatchNorm takes one channel axis",
        ),
        (
            nkl.LayerNorm(reduction_axes=(0.5,)),
            TypeError,
            r"reduction_axes=\(0\.5,\): expected an int or a sequence of ints, got float",
        ),
        (
            nkl.RMSNorm(feature_axes=2),
            ValueError,
            "feature_axes=2: axis 2 is out of range for an input with 2 dimensions",
        ),
    ],
)
def test_bad_attributes_name_the_argument(layer: nn.Module, error: type, match: str) -> None:
    """A bad attribute is an error at ``init`` that names it, what it got and what was expected."""
    with pytest.raises(error, match=match):
        layer.init(KEY, jnp.ones((2, 4)))
