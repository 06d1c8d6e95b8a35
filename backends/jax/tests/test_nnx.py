"""``normkit_jax.nnx`` layers against ``flax.nnx``'s own (created with ``use_fast_variance=False``,
the stable variance) and against the float64 reference (:mod:`normkit.reference`).

Tolerances come from :mod:`normkit.testing.tolerances`: two implementations of one call agree
within :func:`~normkit.testing.tolerances.agreement_tolerance` (with the centering gain of the
statistics used), running statistics within the pairwise
:func:`~normkit.testing.tolerances.statistics_tolerance`, a model trained side by side within
:func:`~normkit.testing.tolerances.training_tolerance`. The one picked number is the issue's
requirement, 1e-3 relative at a mean of 1e4 std, where Flax's default must fail it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

from normkit import reference
from normkit.testing import tolerances
from normkit_jax import nnx as nk
from normkit_jax.flax_cases import CHANNELS, EMPTY_DEVICE_ROWS, device_data, device_mesh, nnx_under_shard_map

F32 = "float32"


def twins(name: str, *args: Any, **kwargs: Any) -> tuple[nnx.Module, nnx.Module]:
    """``(normkit_jax.nnx.<name>, flax.nnx.<name>(use_fast_variance=False))``, same arguments."""
    ours = getattr(nk, name)(*args, rngs=nnx.Rngs(0), **kwargs)
    flax = getattr(nnx, name)(*args, rngs=nnx.Rngs(0), use_fast_variance=False, **kwargs)
    return ours, flax


def statistics(
    x: np.ndarray, reduced: tuple[int, ...], mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ``(count, mean, biased var)`` over ``reduced``, keepdims (0 where nothing counts)."""
    count, mean, m2 = reference.moments(x, reduced, mask)
    safe = np.where(count > 0, count, 1)
    return tuple(np.expand_dims(v, reduced) for v in (count, mean, np.where(count > 0, m2 / safe, 0.0)))


def gain(mean: np.ndarray, var: np.ndarray, eps: float, scale: object = None) -> float:
    """The centering gain ``max |mu| |gamma| / sqrt(var + eps)`` of the statistics used."""
    gamma = 1.0 if scale is None else float(np.abs(np.asarray(scale, np.float64)).max())
    return tolerances.centering_gain(mean, var, eps) * gamma


def assert_agree(got: jax.Array, expected: jax.Array | np.ndarray, bound: np.ndarray, what: str) -> None:
    got64, expected64 = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    tolerances.assert_within(np.abs(got64 - expected64), bound, what)


def agreement_bound(expected: Any, dtype: str, centering_gain: float) -> np.ndarray:
    return tolerances.agreement_tolerance(dtype, centering_gain=centering_gain).bound(
        np.asarray(expected, np.float64), 0.0
    )


LAYERS = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")


def layer_args(name: str) -> dict[str, Any]:
    return {"num_groups": 3} if name == "GroupNorm" else {}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("affine", [True, False])
def test_variables_are_flaxs(name: str, affine: bool) -> None:
    """The same variables as Flax's layer: names, nnx types (``Param``, ``BatchStat``), shapes,
    dtypes and initial values, so checkpoints load either way."""
    switches = {"use_scale": affine} if name == "RMSNorm" else {"use_scale": affine, "use_bias": affine}
    ours, flax = twins(name, 6, **layer_args(name), **switches)
    our_state, flax_state = nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(nnx.state(flax))
    described = [
        [(path, type(v).__name__, v.shape, v.dtype) for path, v in state] for state in (our_state, flax_state)
    ]
    assert described[0] == described[1]
    for (_, a), (_, b) in zip(our_state, flax_state, strict=True):
        np.testing.assert_array_equal(a[...], b[...])


def masked_batches(
    steps: int, shape: tuple[int, ...], seed: int
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Batches from ``N(5, 2^2)``; every other one with an element mask that keeps each channel
    at least 8 values."""
    rng = np.random.default_rng(seed)
    batches = []
    for step in range(steps):
        x = (5.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
        mask = None
        if step % 2:
            mask = rng.random(shape) > 0.4
            assert mask.reshape(-1, shape[-1]).sum(axis=0).min() >= 8
        batches.append((x, mask))
    return batches


def test_batch_norm_training_steps_then_eval_match_flax() -> None:
    """Four training steps (two masked) with decay 0.9, then eval: each step's output and
    ``batch_stats`` agree with ``flax.nnx.BatchNorm(use_fast_variance=False)``, and so does eval."""
    ours, flax = twins("BatchNorm", 4, momentum=0.9, scale_init=nnx.initializers.normal(1.0))
    flax.scale[...] = ours.scale[...]
    magnitude = 0.0
    for x, mask in masked_batches(4, (16, 3, 4), seed=0):
        magnitude = max(magnitude, float(np.abs(x).max()))
        m = None if mask is None else jnp.asarray(mask)
        y, y_flax = ours(jnp.asarray(x), mask=m), flax(jnp.asarray(x), mask=m)
        _, mean, var = statistics(x, (0, 1), mask)
        assert_agree(
            y, y_flax, agreement_bound(y_flax, F32, gain(mean, var, 1e-5, ours.scale[...])), "training y"
        )
        for stat in ("mean", "var"):
            tolerance = tolerances.statistics_tolerance(F32, stat, magnitude).pairwise()
            expected = getattr(flax, stat)[...]
            assert_agree(getattr(ours, stat)[...], expected, tolerance.bound(np.asarray(expected), 0.0), stat)
    ours.eval()
    flax.eval()
    x = jnp.asarray(masked_batches(1, (16, 3, 4), seed=1)[0][0])
    y, y_flax = ours(x), flax(x)
    mean, var = np.asarray(flax.mean[...], np.float64), np.asarray(flax.var[...], np.float64)
    effect = tolerances.statistics_effect(
        x, mean, var, 1e-5, ours.scale[...],
        mean_error=tolerances.statistics_tolerance(F32, "mean", magnitude).pairwise().bound(mean, 0.0),
        var_error=tolerances.statistics_tolerance(F32, "var", magnitude).pairwise().bound(var, 0.0),
    )  # fmt: skip
    assert_agree(
        y, y_flax, agreement_bound(y_flax, F32, gain(mean, var, 1e-5, ours.scale[...])) + effect, "eval y"
    )


class Model(nnx.Module):
    """``Linear(6, 8) -> norm -> relu -> Linear(8, 1)``."""

    def __init__(self, norm: Any, *, rngs: nnx.Rngs) -> None:
        self.inner = nnx.Linear(6, 8, rngs=rngs)
        self.norm = norm
        self.outer = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.outer(nnx.relu(self.norm(self.inner(x))))


MODEL_NORMS = {
    "BatchNorm": {"momentum": 0.9},
    "LayerNorm": {},
    "RMSNorm": {},
    "GroupNorm": {"num_groups": 2},
}


@pytest.mark.parametrize("name", sorted(MODEL_NORMS))
def test_model_trained_with_optax_matches_flax(name: str) -> None:
    """A model with the normalization trained side by side with Flax's (``nnx.jit``, SGD, three
    steps; gradients flow through normkit's JAX kernels), then evaluated: predictions, weights and
    ``batch_stats`` agree within the training tolerance."""
    steps, batch, lr = 3, 32, 0.05
    rng = np.random.default_rng(7)
    data = [
        (jnp.asarray(rng.normal(1.0, 2.0, (batch, 6)), jnp.float32), jnp.asarray(rng.normal(size=(batch, 1)), jnp.float32))
        for _ in range(steps)
    ]  # fmt: skip
    ours_norm, flax_norm = twins(name, 8, **MODEL_NORMS[name])
    models = [Model(norm, rngs=nnx.Rngs(1)) for norm in (ours_norm, flax_norm)]
    optimizers = [nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param) for model in models]

    @nnx.jit
    def step(model: Model, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array) -> jax.Array:
        def loss(model: Model) -> jax.Array:
            return jnp.mean((model(x) - target) ** 2)

        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)
        return jnp.max(jnp.stack([jnp.abs(g).max() for g in jax.tree.leaves(grads)]))

    largest_step = 0.0  # the largest change one step made to a weight (Flax's)
    for x, target in data:
        step(models[0], optimizers[0], x, target)
        largest_step = max(largest_step, lr * float(step(models[1], optimizers[1], x, target)))
    # every term summed along a step: the two layers' products, the statistics, the loss, and
    # their backward sums over the batch, for each example
    terms = batch * (6 + 2 * 8 + 1)
    for model in models:
        model.eval()
    x_eval = jnp.asarray(rng.normal(1.0, 2.0, (batch, 6)), jnp.float32)
    predictions = [np.asarray(model(x_eval), np.float64) for model in models]
    tolerance = tolerances.training_tolerance(
        F32, steps=steps, reduction_size=terms, scale=float(np.abs(predictions[1]).max())
    )
    assert_agree(predictions[0], predictions[1], tolerance.bound(predictions[1], 0.0), "predictions")
    flat = [nnx.to_flat_state(nnx.state(model)) for model in models]
    assert [path for path, _ in flat[0]] == [path for path, _ in flat[1]]
    for (path, ours), (_, theirs) in zip(*flat, strict=True):
        expected = np.asarray(theirs[...], np.float64)
        scale = largest_step if isinstance(ours, nnx.Param) else float(np.abs(expected).max())
        tolerance = tolerances.training_tolerance(F32, steps=steps, reduction_size=terms, scale=scale)
        assert_agree(ours[...], expected, tolerance.bound(expected, 0.0), "/".join(map(str, path)))


# (name, constructor arguments, input shape, reduced axes of the statistics, feature axes)
CASES = [
    ("LayerNorm", {}, (4, 3, 12), (2,), (2,)),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": -1}, (4, 3, 12), (1, 2), (2,)),
    ("RMSNorm", {}, (4, 3, 12), (2,), (2,)),
    ("RMSNorm", {"reduction_axes": (1, 2), "feature_axes": -1}, (4, 3, 12), (1, 2), (2,)),
    ("InstanceNorm", {}, (2, 4, 5, 12), (1, 2), (3,)),
    ("InstanceNorm", {"feature_axes": 1}, (2, 12, 4, 5), (2, 3), (1,)),
    ("GroupNorm", {"num_groups": 3}, (2, 4, 5, 12), None, (3,)),
    ("GroupNorm", {"num_groups": None, "group_size": 6}, (2, 4, 5, 12), None, (3,)),
]


def case_statistics(
    name: str, kwargs: dict[str, Any], x: np.ndarray, reduced: tuple[int, ...] | None, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ``(count, mean, var)`` of the case's groups (group norm: of its channel blocks)."""
    if name != "GroupNorm":
        count, mean, var = statistics(x, reduced, mask)
        if name == "RMSNorm":
            return count, np.zeros_like(mean), var + mean**2
        return count, mean, var
    groups = kwargs["num_groups"] or x.shape[-1] // kwargs["group_size"]
    grouped = x.reshape(*x.shape[:-1], groups, -1)
    grouped_mask = None if mask is None else mask.reshape(grouped.shape)
    return statistics(grouped, (1, 2, 4), grouped_mask)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(("name", "kwargs", "shape", "reduced", "features"), CASES)
def test_layers_match_flax(
    name: str,
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    reduced: tuple[int, ...] | None,
    features: tuple[int, ...],
    masked: bool,
) -> None:
    """Layer, RMS, instance and group norm (decoupled reduction and feature axes, group sizes,
    channels-first features) with and without an element mask agree with Flax's stable layers,
    and every group counted at least 4 values."""
    rng = np.random.default_rng(3)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    mask = rng.random(shape) > 0.3 if masked else None
    ours, flax = twins(name, 12, **kwargs, scale_init=nnx.initializers.normal(1.0))
    flax.scale[...] = ours.scale[...]
    count, mean, var = case_statistics(name, kwargs, x, reduced, mask)
    assert count.min() >= 4
    m = None if mask is None else jnp.asarray(mask)
    y, y_flax = ours(jnp.asarray(x), mask=m), flax(jnp.asarray(x), mask=m)
    assert y.dtype == y_flax.dtype == jnp.float32
    eps = ours.epsilon
    assert_agree(y, y_flax, agreement_bound(y_flax, F32, gain(mean, var, eps, ours.scale[...])), f"{name} y")


def test_group_norm_with_explicit_reduction_axes_matches_the_reference() -> None:
    """``reduction_axes=(2, 3)`` on ``(N, H, W, C)``: statistics per sample, row and block (Flax
    itself repeats the block statistics along axis 1 and cannot take this case)."""
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 3.0, (2, 3, 8, 6)).astype(np.float32)
    layer = nk.GroupNorm(6, num_groups=2, reduction_axes=(2, 3), rngs=nnx.Rngs(0))
    y = layer(jnp.asarray(x))
    grouped = x.reshape(2, 3, 8, 2, 3).astype(np.float64)
    _, mean, var = statistics(grouped, (2, 4))
    expected = ((grouped - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    assert_agree(
        y,
        expected,
        tolerances.output_tolerance(F32, centering_gain=gain(mean, var, 1e-6)).bound(expected, 0),
        "y",
    )


# (name, constructor arguments, input shape, reduced axes of one group)
OFFSET_CASES = [
    ("BatchNorm", {"momentum": 0.0}, (256, 4), (0,)),
    ("LayerNorm", {}, (4, 256), (1,)),
    ("GroupNorm", {"num_groups": 2}, (2, 8, 8, 8), None),
    ("InstanceNorm", {}, (2, 16, 16, 4), (1, 2)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape", "reduced"), OFFSET_CASES)
def test_mean_1e4_std_1_in_float32(
    name: str, kwargs: dict[str, Any], shape: tuple[int, ...], reduced: tuple[int, ...] | None
) -> None:
    """At |mean|/std = 1e4 in float32 each group's output std (and batch norm's stored variance)
    stays within 1e-3 relative of the float64 reference, and the output within normkit's derived
    output tolerance; Flax's default (``use_fast_variance=True``, E[x^2] - E[x]^2) misses both:
    the oracle that shows the case matters."""
    features = 4 if name in ("BatchNorm", "InstanceNorm") else shape[-1]
    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    ours = getattr(nk, name)(features, rngs=nnx.Rngs(0), **kwargs)
    flax_default = getattr(nnx, name)(features, rngs=nnx.Rngs(0), **kwargs)
    if name == "GroupNorm":  # each sample's block of 4 channels is a group
        group_shape, std_axes = (2, 8, 8, 2, 4), (1, 2, 4)
    else:
        group_shape, std_axes = shape, reduced
    _, mean, var = statistics(x.reshape(group_shape), std_axes)
    expected = ((x.reshape(group_shape) - mean) / np.sqrt(var + ours.epsilon)).reshape(shape)

    def grouped(y: Any) -> np.ndarray:
        return np.asarray(y, np.float64).reshape(group_shape)

    expected_std = grouped(expected).std(axis=std_axes)
    bound = tolerances.output_tolerance(F32, centering_gain=gain(mean, var, ours.epsilon)).bound(
        expected, 0.0
    )
    y = ours(jnp.asarray(x))
    relative = np.abs(grouped(y).std(axis=std_axes) / expected_std - 1)
    assert relative.max() <= 1e-3
    assert_agree(y, expected, bound, "y at mean 1e4")
    y_flax = np.asarray(flax_default(jnp.asarray(x)), np.float64)
    flax_relative = np.abs(grouped(y_flax).std(axis=std_axes) / expected_std - 1)
    assert flax_relative.max() > 1e-3, flax_relative
    assert (np.abs(y_flax - expected) > bound).any()
    if name == "BatchNorm":  # momentum 0: the stored variance is the batch variance
        var_flat = var.reshape(-1)
        assert np.abs(np.asarray(ours.var[...], np.float64) / var_flat - 1).max() <= 1e-3
        assert np.abs(np.asarray(flax_default.var[...], np.float64) / var_flat - 1).max() > 1e-3


def test_use_fast_variance_is_accepted_and_ignored() -> None:
    """``use_fast_variance=True`` (Flax's default) gives the two-pass result: at mean 1e4 the
    statistics equal those of the default layer, bit for bit."""
    x = jnp.asarray((1e4 + np.random.default_rng(6).standard_normal((64, 3))).astype(np.float32))
    asked = nk.BatchNorm(3, use_fast_variance=True, momentum=0.0, rngs=nnx.Rngs(0))
    default = nk.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(asked(x), default(x))
    np.testing.assert_array_equal(asked.var[...], default.var[...])
    assert asked.use_fast_variance is False


@pytest.mark.parametrize(
    ("name", "input_dtype", "dtype", "expected"),
    [
        ("BatchNorm", jnp.bfloat16, None, jnp.float32),
        ("BatchNorm", jnp.float32, jnp.bfloat16, jnp.bfloat16),
        ("LayerNorm", jnp.bfloat16, None, jnp.float32),
        ("LayerNorm", jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        ("RMSNorm", jnp.float16, None, jnp.float32),
        ("GroupNorm", jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        ("InstanceNorm", jnp.float16, jnp.float16, jnp.float16),
    ],
)
def test_output_dtype_follows_flaxs_promotion(name: str, input_dtype: Any, dtype: Any, expected: Any) -> None:
    """``promote_dtype``: half-precision input with float32 parameters gives float32 (Flax
    promotes ``x`` too); ``dtype`` forces the result. The values agree with Flax's within the
    tolerance of the output dtype."""
    rng = np.random.default_rng(8)
    shape = (4, 3, 5, 6)
    # at mean 200, std 1 a bfloat16 rounding of x before the statistics (nnx's rule with
    # dtype=bfloat16) moves y by up to 0.5 std: far outside the bfloat16 tolerance
    x = jnp.asarray(rng.normal(200.0, 1.0, shape), input_dtype)
    ours, flax = twins(name, 6, dtype=dtype, **layer_args(name))
    y, y_flax = ours(x), flax(x)
    assert y.dtype == y_flax.dtype == expected
    reduced = {"BatchNorm": (0, 1, 2), "LayerNorm": (3,), "RMSNorm": (3,), "InstanceNorm": (1, 2)}.get(name)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    _, mean, var = case_statistics(name, layer_args(name), x64, reduced, None)
    out = jnp.dtype(expected).name
    assert_agree(y, y_flax, agreement_bound(y_flax, out, gain(mean, var, ours.epsilon)), f"{name} y")


def test_fully_masked_batch_keeps_the_statistics() -> None:
    """A channel with nothing unmasked keeps its running statistics and normalizes with mean 0,
    variance 0 (y = x / sqrt(eps)); Flax stores NaN there. The other channels match Flax's."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(2.0, 1.0, (8, 3)), jnp.float32)
    mask = jnp.asarray(np.array([[True, False, True]]).repeat(8, axis=0))
    ours, flax = twins("BatchNorm", 3, momentum=0.5)
    y, y_flax = ours(x, mask=mask), flax(x, mask=mask)
    assert ours.mean[1] == 0.0 and ours.var[1] == 1.0
    assert np.isnan(flax.mean[1]) and np.isnan(flax.var[1])
    expected = np.asarray(x[:, 1], np.float64) / np.sqrt(1e-5)
    assert_agree(
        y[:, 1], expected, tolerances.output_tolerance(F32).bound(expected, 0.0), "fully masked channel"
    )
    kept = np.array([0, 2])
    bound = tolerances.statistics_tolerance(F32, "mean", 5.0).pairwise()
    assert_agree(
        ours.mean[kept], flax.mean[kept], bound.bound(np.asarray(flax.mean[kept]), 0.0), "other channels"
    )
    before = (ours.mean[...], ours.var[...])
    ours(x, mask=jnp.zeros((8, 3), bool))
    np.testing.assert_array_equal(ours.mean[...], before[0])
    np.testing.assert_array_equal(ours.var[...], before[1])
    assert np.isfinite(np.asarray(y)).all() and np.isnan(np.asarray(y_flax[:, 1])).all()


def test_layer_norm_row_with_nothing_unmasked_is_finite() -> None:
    x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 4)), jnp.float32)
    mask = jnp.asarray([[True, True, False, True], [False, False, False, False]])
    y = nk.LayerNorm(4, rngs=nnx.Rngs(0))(x, mask=mask)
    expected = np.asarray(x[1], np.float64) / np.sqrt(1e-6)
    assert_agree(y[1], expected, tolerances.output_tolerance(F32).bound(expected, 0.0), "fully masked row")
    assert np.isnan(np.asarray(nnx.LayerNorm(4, rngs=nnx.Rngs(0))(x, mask=mask)[1])).all()


def test_modes() -> None:
    """``use_running_average`` at construction and call (the call wins), ``.train()``/``.eval()``,
    ``nnx.view``; a layer with no mode anywhere is an error that says how to give one."""
    x = jnp.asarray(np.random.default_rng(11).normal(3.0, 2.0, (16, 3)), jnp.float32)
    layer = nk.BatchNorm(3, use_running_average=True, rngs=nnx.Rngs(0))
    expected = np.asarray(x, np.float64) / np.sqrt(1 + 1e-5)  # the initial statistics: mean 0, var 1
    assert_agree(layer(x), expected, tolerances.output_tolerance(F32).bound(expected, 0.0), "eval y")
    assert (layer.mean[...] == 0).all()
    layer(x, use_running_average=False)
    assert (layer.mean[...] != 0).all()
    stored = layer.mean[...]
    layer.train()
    layer(x)
    assert (layer.mean[...] != stored).all()
    layer.eval()
    stored = layer.mean[...]
    layer(x)
    np.testing.assert_array_equal(layer.mean[...], stored)
    layer.train()
    view = nnx.view(layer, use_running_average=True)
    assert view.use_running_average and not layer.use_running_average
    view(x)
    np.testing.assert_array_equal(layer.mean[...], stored)
    undecided = nk.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="No `use_running_average`"):
        undecided(x)


def test_updates_under_nnx_jit_and_the_split_merge_pattern() -> None:
    """Three training steps eagerly, under ``nnx.jit``, and through ``nnx.split`` → ``jax.jit``
    (returning the new state) → ``nnx.update`` give the same ``batch_stats``."""
    rng = np.random.default_rng(12)
    batches = [jnp.asarray(rng.normal(4.0, 2.0, (16, 3)), jnp.float32) for _ in range(3)]
    eager, jitted, split = (nk.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0)) for _ in range(3))
    step = nnx.jit(lambda layer, x: layer(x))
    graphdef, _ = nnx.split(split)

    @jax.jit
    def pure_step(state: nnx.State, x: jax.Array) -> tuple[jax.Array, nnx.State]:
        layer = nnx.merge(graphdef, state)
        y = layer(x)
        return y, nnx.state(layer)

    for x in batches:
        eager(x)
        step(jitted, x)
        _, state = pure_step(nnx.state(split), x)
        nnx.update(split, state)
    for stat in ("mean", "var"):
        expected = getattr(eager, stat)[...]
        assert not np.allclose(expected, 0.0 if stat == "mean" else 1.0)
        bound = tolerances.statistics_tolerance(F32, stat, 12.0).pairwise().bound(np.asarray(expected), 0.0)
        for layer in (jitted, split):
            assert_agree(getattr(layer, stat)[...], expected, bound, f"{stat} under jit")


def test_plain_jax_jit_loses_the_update_as_flaxs_does() -> None:
    """``jax.jit`` of a function taking the module (not ``nnx.jit``) drops the statistics update
    without a word, with Flax's layer as with this one (the documented reason for ``nnx.jit`` or
    split/merge); if Flax ever keeps it, this test and docs/flax.md need updating."""
    x = jnp.full((4, 3), 5.0) + jnp.arange(4.0)[:, None]
    for layer in (nk.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))):
        jax.jit(lambda layer, x: layer(x))(layer, x)
        np.testing.assert_array_equal(layer.mean[...], np.zeros(3))


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    try:
        return device_mesh("d")
    except RuntimeError as error:  # too few devices: a failure, not a skip
        pytest.fail(f"{error} (conftest.py sets it)")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_axis_name_under_shard_map_is_the_concatenated_batch(mesh: Mesh, momentum: float) -> None:
    """``BatchNorm(axis_name="d")`` on 4 devices with unequal masks (one device, and one channel,
    with nothing counted): every device's output and the running statistics are those of the
    concatenated unmasked data in float64 (Flax's own are a mean of means: ``test_collectives``);
    the empty channel keeps its running statistics."""
    x, mask = device_data(EMPTY_DEVICE_ROWS, seed=13)
    mask[:, 4] = False  # a channel with nothing counted anywhere keeps its running statistics
    layer = nk.BatchNorm(CHANNELS, momentum=momentum, axis_name="d", rngs=nnx.Rngs(0))
    y, new_state = nnx_under_shard_map(layer, mesh)(x, mask)
    count, mean, var = statistics(x, (0,), mask)
    expected = (x - mean) / np.sqrt(var + 1e-5)  # mean 0, var 0 where nothing counted
    bound = tolerances.output_tolerance(F32, centering_gain=gain(mean, var, 1e-5)).bound(expected, 0.0)
    assert_agree(y, expected, bound, "y")
    magnitude = float(np.abs(x).max())
    counted = count.reshape(-1) > 0
    for stat, batch, start in (("mean", mean, 0.0), ("var", var, 1.0)):
        expected_stat = np.where(counted, momentum * start + (1 - momentum) * batch.reshape(-1), start)
        tolerance = tolerances.statistics_tolerance(F32, stat, magnitude)
        assert_agree(new_state[stat][...], expected_stat, tolerance.bound(expected_stat, 0.0), stat)


def test_layer_norm_axis_name_merges_features_across_parts() -> None:
    """``LayerNorm(axis_name=...)`` with the features split in four parts (``jax.vmap`` binds the
    name): each part is normalized with the statistics of all 20 features of its row."""
    rng = np.random.default_rng(14)
    x = rng.normal(2.0, 3.0, (3, 20)).astype(np.float32)
    layer = nk.LayerNorm(5, axis_name="parts", rngs=nnx.Rngs(0))
    parts = jnp.asarray(x.reshape(3, 4, 5).transpose(1, 0, 2))
    y = jax.vmap(lambda part: layer(part), axis_name="parts")(parts)
    y = np.asarray(y).transpose(1, 0, 2).reshape(3, 20)
    _, mean, var = statistics(x, (1,))
    expected = (x - mean) / np.sqrt(var + 1e-6)
    bound = tolerances.output_tolerance(F32, centering_gain=gain(mean, var, 1e-6)).bound(expected, 0.0)
    assert_agree(y, expected, bound, "y")


def test_instance_norm_running_statistics() -> None:
    """``InstanceNorm(track_running_stats=True)`` (beyond Flax): training updates ``mean``/``var``
    by the decay toward the mean over samples of the per-sample statistics (biased), as
    normkit's float64 reference defines it; eval normalizes with them."""
    rng = np.random.default_rng(15)
    layer = nk.InstanceNorm(3, track_running_stats=True, momentum=0.7, rngs=nnx.Rngs(0))
    running_mean, running_var = np.zeros(3), np.ones(3)
    magnitude = 0.0
    for _ in range(2):
        x = rng.normal(1.0, 2.0, (4, 5, 6, 3)).astype(np.float32)
        magnitude = max(magnitude, float(np.abs(x).max()))
        y = layer(jnp.asarray(x))
        expected, running_mean, running_var = reference.instance_norm(
            x, None, None, running_mean, running_var, use_input_stats=True, momentum=0.3, eps=1e-6, axis=-1,
            unbiased_running_var=False,
        )  # fmt: skip
        _, mean, var = statistics(x, (1, 2))
        assert_agree(
            y,
            expected,
            tolerances.output_tolerance(F32, centering_gain=gain(mean, var, 1e-6)).bound(expected, 0),
            "y",
        )
    for stat, expected_stat in (("mean", running_mean), ("var", running_var)):
        bound = tolerances.statistics_tolerance(F32, stat, magnitude).bound(expected_stat, 0.0)
        assert_agree(getattr(layer, stat)[...], expected_stat, bound, stat)
    layer.eval()
    x = rng.normal(1.0, 2.0, (2, 5, 6, 3)).astype(np.float32)
    expected = reference.normalize(x, running_mean, running_var, eps=1e-6, axis=-1)
    bound = tolerances.output_tolerance(F32, centering_gain=gain(running_mean, running_var, 1e-6)).bound(
        expected, 0
    )
    assert_agree(layer(jnp.asarray(x)), expected, bound, "eval y")


def snapshot(layer: nnx.Module) -> list[tuple[Any, np.ndarray]]:
    """Every variable of ``layer`` (path, value), copied."""
    return [(path, np.array(v[...])) for path, v in nnx.to_flat_state(nnx.state(layer)) if v[...] is not None]


def test_errors_name_the_argument_and_change_nothing() -> None:
    """Each bad call names the argument, what it got and what was expected, and leaves the
    layer's variables as they were (a layer whose statistics have already moved)."""
    rng = np.random.default_rng(16)
    layer = nk.BatchNorm(3, momentum=0.5, scale_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
    layer(jnp.asarray(rng.normal(2.0, 3.0, (8, 3)), jnp.float32))
    before = snapshot(layer)
    assert not np.allclose(layer.mean[...], 0.0) and not np.allclose(layer.var[...], 1.0)
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="mask has dtype int32; expected bool"):
        layer(x, mask=jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"mask has shape \(1, 2\)"):
        layer(x, mask=jnp.ones((1, 2), bool))
    with pytest.raises(ValueError, match="num_features=3"):
        layer(jnp.ones((4, 5)))
    layer.axis = 1.5
    with pytest.raises(TypeError, match=r"axis=1\.5: expected an int or a sequence of ints, got float"):
        layer(x)
    layer.axis = -1
    layer.axis_name = "batch"  # not bound outside jax.shard_map / pmap / vmap(axis_name=...)
    with pytest.raises(ValueError, match="axis_name='batch' is not bound"):
        layer(x)
    after = snapshot(layer)
    assert [path for path, _ in after] == [path for path, _ in before]
    for (path, got), (_, expected) in zip(after, before, strict=True):
        np.testing.assert_array_equal(got, expected, err_msg=str(path))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: nk.LayerNorm(3, epsilon=0, rngs=nnx.Rngs(0)), ValueError, "epsilon=0"),
        (lambda: nk.BatchNorm(3, momentum=1.5, rngs=nnx.Rngs(0)), ValueError, r"momentum=1\.5"),
        (
            lambda: nk.BatchNorm(3.0, rngs=nnx.Rngs(0)),
            TypeError,
            r"num_features=3\.0: expected a positive int, got float",
        ),
        (lambda: nk.RMSNorm(0, rngs=nnx.Rngs(0)), ValueError, "num_features=0: expected a positive int"),
        (
            lambda: nk.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0)),
            ValueError,
            "num_groups=4 does not divide num_features=6",
        ),
        (
            lambda: nk.GroupNorm(6, num_groups=2.0, rngs=nnx.Rngs(0)),
            TypeError,
            r"num_groups=2\.0: expected a positive int, got float",
        ),
        (
            lambda: nk.GroupNorm(6, num_groups=None, group_size="3", rngs=nnx.Rngs(0)),
            TypeError,
            "group_size='3': expected a positive int, got str",
        ),
        (lambda: nk.GroupNorm(6, num_groups=None, rngs=nnx.Rngs(0)), ValueError, "give exactly one of them"),
        (
            lambda: nk.InstanceNorm(3, feature_axes=0, rngs=nnx.Rngs(0))(jnp.ones((3, 4, 3))),
            ValueError,
            "leading dimension",
        ),
        (
            lambda: nk.InstanceNorm(3, rngs=nnx.Rngs(0))(jnp.ones((4, 3))),
            ValueError,
            "leaves no axis to reduce",
        ),
        (
            lambda: nk.GroupNorm(6, num_groups=2, reduction_axes=(1,), rngs=nnx.Rngs(0))(jnp.ones((2, 3, 6))),
            ValueError,
            "must include the final dimension",
        ),
        (
            lambda: nk.LayerNorm(4, reduction_axes=("a",), rngs=nnx.Rngs(0))(jnp.ones((2, 4))),
            TypeError,
            r"reduction_axes=\('a',\): expected an int or a sequence of ints, got str",
        ),
        (
            lambda: nk.GroupNorm(6, num_groups=2, rngs=nnx.Rngs(0))(jnp.ones(6)),
            ValueError,
            r"x has shape \(6,\); GroupNorm expects at least 2 dimensions",
        ),
    ],
)
def test_bad_arguments_name_the_argument(build: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()
