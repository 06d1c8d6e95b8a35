"""The audit's adapters for Flax, ``jax.nn.standardize``, Equinox and MLX.

Each adapter is built from a :class:`~normkit.audit.adapter.Config` written out here and played
against :mod:`normkit.reference` (float64), with the suite's derived bound
(:mod:`normkit.testing.tolerances`, as :func:`normkit.testing.runner.expected_step` computes it):

    |y - y_ref| <= r|y_ref| + r + K*Delta + 2*eps_c*g,   r = eps_d + 64*eps_c,

with Delta the reference's own movement under a one-ulp relative perturbation of the input and
g the centering gain max|mu|*|gamma|/sqrt(var + eps) (here the product of the two maxima, an
upper bound of the per-element gain), and running statistics within
:func:`~normkit.testing.tolerances.statistics_tolerance`. A configuration the framework gets
right passes that bound: this proves the adapter's conversions (eps, axes, momentum convention,
estimator, loaded state). Where a framework is known to differ, the error is asserted to exceed
the bound a hundredfold: Flax's and ``jax.nn.standardize``'s default one-pass variance at
|mean|/std = 1e4, MLX's interleaved groups, Equinox's ``mode="ema"`` batch norm, and MLX's fused
kernels, which compute float64 input in float32.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from normkit import reference
from normkit.audit.adapter import Adapter, Config, Unsupported
from normkit.numpy_backend import numpy_dtype
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    compute_dtype,
    output_tolerance,
    statistics_tolerance,
)

ADAPTER_MODULES = {
    "flax": "normkit.audit.adapters.flax",
    "jax": "normkit.audit.adapters.jax_nn",
    "equinox": "normkit.audit.adapters.equinox",
    "mlx": "normkit.audit.adapters.mlx",
}


def _adapters(framework: str) -> dict[str, Adapter]:
    """The module's adapters by name, or a skip when the framework is not installed."""
    pytest.importorskip(framework)
    module = importlib.import_module(ADAPTER_MODULES[framework])
    return {adapter.name: adapter for adapter in module.adapters()}


# --- the reference side, from normkit.reference --------------------------------------------


def _initial_state(config: Config, seed: int) -> dict[str, np.ndarray]:
    """Well-conditioned starting arrays in the state dtype, for the keys the op uses."""
    rng = np.random.default_rng([seed, 1])
    c = config
    shape = c.normalized_shape if c.op in ("layer_norm", "rms_norm") else (c.num_channels,)
    arrays = {
        "weight": 1.0 + 0.5 * rng.standard_normal(shape),
        "bias": 0.5 * rng.standard_normal(shape),
        "running_mean": 0.1 * rng.standard_normal(shape),
        "running_var": rng.uniform(0.5, 1.5, size=shape),
    }
    keys = ["weight", "bias"] if c.affine else []
    if c.op == "rms_norm":
        keys = keys[:1]
    if c.op == "layer_norm" and not c.bias:
        keys = [k for k in keys if k != "bias"]
    if c.op in ("batch_norm", "instance_norm") and c.track_running_stats:
        keys += ["running_mean", "running_var"]
    dtype = compute_dtype(c.dtype)
    return {k: arrays[k].astype(dtype) for k in keys}


def _reference_step(c: Config, state: dict[str, np.ndarray], x: np.ndarray, training: bool) -> np.ndarray:
    """One call in float64, updating ``state`` (float64 arrays) as the layer would."""
    w, b = state.get("weight"), state.get("bias")
    if c.op == "layer_norm":
        return reference.layer_norm(x, w, b, axes=c.axes, eps=c.eps)
    if c.op == "rms_norm":
        return reference.rms_norm(x, w, axes=c.axes, eps=c.eps)
    if c.op == "group_norm":
        return reference.group_norm(x, c.groups, w, b, eps=c.eps, axis=c.axis)
    update = training and c.track_running_stats
    use_batch = training or not c.track_running_stats
    held = update or not use_batch
    function = reference.batch_norm if c.op == "batch_norm" else reference.instance_norm
    flag = "training" if c.op == "batch_norm" else "use_input_stats"
    y, mean, var = function(
        x,
        w,
        b,
        state.get("running_mean") if held else None,
        state.get("running_var") if held else None,
        **{flag: use_batch},
        momentum=c.momentum if update else 0.0,
        eps=c.eps,
        axis=c.axis,
        unbiased_running_var=c.unbiased,
    )
    if update:
        state["running_mean"], state["running_var"] = mean, var
    return y


def _centering_gain(c: Config, state: Mapping[str, np.ndarray], x: np.ndarray, training: bool) -> float:
    """max|mu|/sqrt(var + eps) over the groups, times max|gamma|."""
    if c.op == "rms_norm":
        return 0.0
    gamma = float(np.abs(state["weight"]).max()) if "weight" in state else 1.0
    if c.op in ("batch_norm", "instance_norm") and c.track_running_stats and not training:
        mean, var = state["running_mean"], state["running_var"]
    elif c.op == "layer_norm":
        mean, var = x.mean(axis=c.axes), x.var(axis=c.axes)
    else:
        moved = np.moveaxis(x, c.axis, 1)
        groups = c.groups if c.op == "group_norm" else moved.shape[1]
        rows = moved.reshape(moved.shape[0], groups, -1)
        if c.op == "batch_norm":
            rows = np.moveaxis(moved, 1, 0).reshape(moved.shape[1], 1, -1)
        mean, var = rows.mean(axis=2), rows.var(axis=2)
    return float(np.max(np.abs(mean) / np.sqrt(var + c.eps))) * gamma


class Played:
    """The largest error over the steps in units of its bound, and the final statistics'."""

    def __init__(self) -> None:
        self.output_share = 0.0
        self.output_error = 0.0
        self.stats_share = 0.0
        self.reference_scale = 0.0
        self.dtypes: set[str] = set()


def _play(adapter: Adapter, c: Config, steps: tuple[str, ...], *, loc: float = 0.0, seed: int = 0) -> Played:
    state = _initial_state(c, seed)
    layer = adapter.build(c, {k: v.copy() for k, v in state.items()})
    clean = {k: v.astype(np.float64) for k, v in state.items()}
    perturbed = {k: v.copy() for k, v in clean.items()}
    eps_c = EPS[compute_dtype(c.dtype)]
    played = Played()
    magnitude = 0.0
    for step, mode in enumerate(steps):
        training = mode == "train"
        rng = np.random.default_rng([seed, step])
        x = rng.normal(loc, 1.0, size=c.shape).astype(numpy_dtype(c.dtype))
        x64 = x.astype(np.float64)
        magnitude = max(magnitude, float(np.abs(x64).max()))
        gain = _centering_gain(c, clean, x64, training)
        y = np.asarray(layer(x, training))
        played.dtypes.add(y.dtype.name)
        y_ref = _reference_step(c, clean, x64, training)
        u = np.random.default_rng([seed, step, 7]).uniform(-1.0, 1.0, size=x.shape)
        y_pert = _reference_step(c, perturbed, x64 * (1.0 + eps_c * u), training)
        conditioning = float(np.abs(y_ref - y_pert).max())
        bound = output_tolerance(c.dtype).bound(y_ref, conditioning) + CENTERING_FACTOR * eps_c * gain
        error = np.abs(y.astype(np.float64) - y_ref)
        played.output_share = max(played.output_share, float(np.max(error / bound)))
        played.output_error = max(played.output_error, float(error.max()))
        played.reference_scale = max(played.reference_scale, float(np.abs(y_ref).max()))
    if c.op in ("batch_norm", "instance_norm") and c.track_running_stats:
        got = layer.running_stats()
        for key, statistic in (("running_mean", "mean"), ("running_var", "var")):
            conditioning = float(np.abs(clean[key] - perturbed[key]).max())
            bound = statistics_tolerance(c.dtype, statistic, magnitude).bound(clean[key], conditioning)
            error = np.abs(np.asarray(got[key], np.float64) - clean[key])
            played.stats_share = max(played.stats_share, float(np.max(error / bound)))
    return played


def _assert_conforms(adapter: Adapter, c: Config, steps: tuple[str, ...], **kwargs: Any) -> None:
    played = _play(adapter, c, steps, **kwargs)
    assert played.output_share <= 1.0, f"{adapter.name} {c}: output error {played.output_share:.3g} x bound"
    assert played.stats_share <= 1.0, f"{adapter.name} {c}: statistics error {played.stats_share:.3g} x bound"
    assert played.dtypes == {c.dtype}


# --- configurations --------------------------------------------------------------------------

TRAIN_EVAL = ("train", "train", "eval")
F64 = "float64"

BN_BIASED = Config(
    "batch_norm", F64, (8, 3, 4, 4), eps=1e-3, momentum=0.2, unbiased=False, track_running_stats=True
)
BN_BIASED_LAST = Config(
    "batch_norm", F64, (8, 4, 4, 3), axis=3, eps=1e-3, momentum=0.2, unbiased=False, track_running_stats=True
)
BN_UNTRACKED = Config("batch_norm", F64, (8, 3, 4), eps=1e-3, momentum=0.2, track_running_stats=False)
BN_UNBIASED = Config(
    "batch_norm", F64, (8, 3, 4, 4), eps=1e-3, momentum=0.2, unbiased=True, track_running_stats=True
)
BN_CUMULATIVE = Config("batch_norm", F64, (8, 3, 4), momentum=None, unbiased=False, track_running_stats=True)
IN_AFFINE = Config("instance_norm", F64, (4, 3, 6, 5), eps=1e-3)
IN_TRACKED = Config("instance_norm", F64, (4, 3, 6, 5), unbiased=False, track_running_stats=True)
LN_TRAILING = Config("layer_norm", F64, (4, 6, 8), eps=1e-3, axes=(1, 2))
LN_SPLIT_NO_BIAS = Config("layer_norm", F64, (4, 3, 5), eps=1e-3, axes=(0, 2), bias=False)
LN_NO_AFFINE = Config("layer_norm", F64, (4, 10), eps=1e-3, axes=(1,), affine=False)
GN_FIRST = Config("group_norm", F64, (4, 6, 5, 5), eps=1e-3, groups=3)
GN_LAST = Config("group_norm", F64, (4, 5, 5, 6), eps=1e-3, groups=2, axis=3)
RMS = Config("rms_norm", F64, (4, 5, 16), eps=1e-3, axes=(2,))
RMS_NO_WEIGHT = Config("rms_norm", F64, (4, 10), eps=1e-3, axes=(1,), affine=False)
RMS_OFFSET = Config("rms_norm", F64, (4, 10), axes=(1,), weight_offset=1.0)

FLAX_CONFORMING = (
    BN_BIASED,
    BN_BIASED_LAST,
    BN_UNTRACKED,
    IN_AFFINE,
    LN_TRAILING,
    LN_SPLIT_NO_BIAS,
    GN_FIRST,
    GN_LAST,
    RMS,
    RMS_NO_WEIGHT,
)
LN_OFFSET = Config("layer_norm", "float32", (8, 256), eps=1e-5, axes=(1,))
"""The suite's ``ln-offset-1e4`` shape, at |mean|/std = 1e4 in float32."""


def _id(c: Config) -> str:
    return f"{c.op}-{'x'.join(map(str, c.shape))}-axis{c.axes or c.axis}"


# --- Flax ------------------------------------------------------------------------------------

FLAX = (
    "flax.nnx",
    "flax.nnx (use_fast_variance=False)",
    "flax.linen",
    "flax.linen (use_fast_variance=False)",
)


@pytest.mark.parametrize("name", FLAX)
@pytest.mark.parametrize("config", FLAX_CONFORMING, ids=_id)
def test_flax_conforms_at_mean_zero(name: str, config: Config) -> None:
    _assert_conforms(_adapters("flax")[name], config, TRAIN_EVAL)


@pytest.mark.parametrize("name", FLAX)
@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (BN_UNBIASED, "biased running variance only"),
        (BN_CUMULATIVE, "no cumulative average"),
        (IN_TRACKED, "no running statistics"),
        (RMS_OFFSET, "no weight offset"),
    ],
    ids=["unbiased", "cumulative", "tracked-instance", "weight-offset"],
)
def test_flax_unsupported(name: str, config: Config, reason: str) -> None:
    with pytest.raises(Unsupported, match=reason):
        _adapters("flax")[name].build(config, _initial_state(config, 0))


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_flax_fast_variance_fails_at_offset(api: str) -> None:
    """``use_fast_variance=True`` (the default) loses the variance at |mean|/std = 1e4 in float32;
    ``False`` stays within the bound."""
    adapters = _adapters("flax")
    fast = _play(adapters[f"flax.{api}"], LN_OFFSET, ("train",), loc=1e4)
    stable = _play(adapters[f"flax.{api} (use_fast_variance=False)"], LN_OFFSET, ("train",), loc=1e4)
    assert fast.output_share > 100, fast.output_share
    assert stable.output_share <= 1.0, stable.output_share


def test_flax_promotes_bfloat16_output() -> None:
    """bfloat16 input with float32 parameters comes back float32: the adapter does not cast."""
    config = Config("layer_norm", "bfloat16", (4, 16), axes=(1,))
    y = _adapters("flax")["flax.nnx"].build(config, _initial_state(config, 0))(
        np.ones((4, 16), numpy_dtype("bfloat16")), True
    )
    assert np.asarray(y).dtype == np.float32


# --- jax.nn.standardize -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jax.nn.standardize", "jax.nn.standardize (algorithm='stable')"])
@pytest.mark.parametrize("config", [LN_TRAILING, LN_SPLIT_NO_BIAS, LN_NO_AFFINE], ids=_id)
def test_standardize_conforms_at_mean_zero(name: str, config: Config) -> None:
    _assert_conforms(_adapters("jax")[name], config, ("train", "eval"))


def test_standardize_fast_fails_at_offset() -> None:
    adapters = _adapters("jax")
    fast = _play(adapters["jax.nn.standardize"], LN_OFFSET, ("train",), loc=1e4)
    stable = _play(adapters["jax.nn.standardize (algorithm='stable')"], LN_OFFSET, ("train",), loc=1e4)
    assert fast.output_share > 100, fast.output_share
    assert stable.output_share <= 1.0, stable.output_share


# --- Equinox ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        (BN_BIASED, ("eval", "train", "train", "eval")),  # eval first: the loaded state as is
        (BN_BIASED_LAST, TRAIN_EVAL),
        (BN_UNTRACKED, TRAIN_EVAL),
        (LN_TRAILING, TRAIN_EVAL),
        (LN_SPLIT_NO_BIAS, TRAIN_EVAL),
        (GN_FIRST, TRAIN_EVAL),
        (GN_LAST, TRAIN_EVAL),
        (RMS, TRAIN_EVAL),
        (RMS_NO_WEIGHT, TRAIN_EVAL),
    ],
    ids=lambda v: _id(v) if isinstance(v, Config) else "-".join(v),
)
def test_equinox_conforms_at_mean_zero(config: Config, steps: tuple[str, ...]) -> None:
    _assert_conforms(_adapters("equinox")["equinox"], config, steps)


@pytest.mark.parametrize("config", [BN_UNBIASED, BN_CUMULATIVE, RMS_OFFSET], ids=_id)
def test_equinox_unsupported(config: Config) -> None:
    with pytest.raises(Unsupported, match="equinox"):
        _adapters("equinox")["equinox"].build(config, _initial_state(config, 0))


def test_equinox_ema_mode_normalizes_with_the_running_average() -> None:
    """``mode="ema"`` normalizes training batches with the updated running statistics, not the
    batch's: far outside the bound, while the running statistics themselves are right."""
    ema = _adapters("equinox")["equinox (BatchNorm mode='ema')"]
    played = _play(ema, BN_BIASED, ("train",))
    assert played.output_share > 100, played.output_share
    assert played.stats_share <= 1.0, played.stats_share
    with pytest.raises(Unsupported):
        ema.build(LN_TRAILING, {})


# --- MLX -------------------------------------------------------------------------------------

F32 = "float32"
MLX_BN = Config(
    "batch_norm", F64, (8, 3, 4, 4), eps=1e-3, momentum=0.2, unbiased=True, track_running_stats=True
)
MLX_BN_5D = Config(
    "batch_norm", F64, (4, 3, 3, 4, 5), eps=1e-3, momentum=0.2, unbiased=True, track_running_stats=True
)
MLX_BN_UNTRACKED = Config("batch_norm", F64, (8, 4, 3), axis=2, eps=1e-3, track_running_stats=False)


@pytest.mark.parametrize("config", [MLX_BN, MLX_BN_5D, MLX_BN_UNTRACKED], ids=_id)
def test_mlx_batch_norm_conforms_in_float64(config: Config) -> None:
    _assert_conforms(_adapters("mlx")["mlx (cpu)"], config, ("train", "train", "eval"))


@pytest.mark.parametrize(
    "config",
    [
        Config("instance_norm", F32, (4, 3, 6, 5), eps=1e-3),
        Config("layer_norm", F32, (4, 6, 8), eps=1e-3, axes=(1, 2)),
        Config("layer_norm", F32, (4, 3, 5), eps=1e-3, axes=(0, 2), bias=False),
        Config("rms_norm", F32, (4, 5, 16), eps=1e-3, axes=(2,)),
        Config("rms_norm", F32, (4, 10), eps=1e-3, axes=(1,), affine=False),
    ],
    ids=_id,
)
def test_mlx_fused_layers_conform_in_float32(config: Config) -> None:
    _assert_conforms(_adapters("mlx")["mlx (cpu)"], config, ("train", "eval"))


@pytest.mark.parametrize("config", [GN_FIRST, GN_LAST], ids=_id)
def test_mlx_group_norm_interleaved_by_default(config: Config) -> None:
    """The default ``GroupNorm`` groups channel c with c % G: not normkit's contiguous groups;
    ``pytorch_compatible=True`` is (fused, so judged in float32)."""
    adapters = _adapters("mlx")
    config32 = dataclasses.replace(config, dtype=F32)
    default = _play(adapters["mlx (cpu)"], config32, ("train",))
    assert default.output_share > 100, default.output_share
    _assert_conforms(adapters["mlx (cpu, GroupNorm pytorch_compatible=True)"], config32, ("train",))


def test_mlx_fused_kernels_compute_float64_in_float32() -> None:
    """``mx.fast.layer_norm`` takes and returns float64 but its error is float32's: the audit
    reports MLX's float64 layer norm as failing."""
    played = _play(_adapters("mlx")["mlx (cpu)"], LN_TRAILING, ("train",))
    assert played.dtypes == {F64}
    assert played.output_share > 100, played.output_share
    float32 = output_tolerance(F32)  # the error of a correct float32 computation
    assert played.output_error <= float32.rtol * played.reference_scale + float32.atol, played.output_error


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (BN_BIASED, "unbiased running variance only"),
        (Config("batch_norm", F64, (8, 3), momentum=None, track_running_stats=True), "cumulative"),
        (IN_TRACKED, "no running statistics"),
        (RMS_OFFSET, "no weight offset"),
    ],
    ids=["biased", "cumulative", "tracked-instance", "weight-offset"],
)
def test_mlx_unsupported(config: Config, reason: str) -> None:
    with pytest.raises(Unsupported, match=reason):
        _adapters("mlx")["mlx (cpu)"].build(config, _initial_state(config, 0))


# --- listing ---------------------------------------------------------------------------------


def test_listing_imports_no_framework() -> None:
    """``adapters()`` builds the instances without importing their frameworks."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from normkit.audit.adapters import equinox, flax, jax_nn, mlx\n"
        "names = [a.name for m in (flax, jax_nn, equinox, mlx) for a in m.adapters()]\n"
        "assert len(set(names)) == len(names) == 10, names\n"
        "loaded = [m for m in ('jax', 'flax', 'equinox', 'mlx') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
