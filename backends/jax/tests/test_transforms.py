r"""The JAX backend under JAX's transformations, against oracles that share no code with it.

* ``grad`` (``jax.vjp`` under ``jit``, and eagerly): the gradient of :math:`L = \sum g\,y` with
  respect to ``x``, γ and β equals (a) the float64 central differences of :mod:`normkit.reference`
  and (b) PyTorch's float64 autograd of ``torch.nn.functional`` on the same data (when torch is
  installed), in float16, bfloat16, float32 and float64 (``jax_enable_x64``); ``moments`` (with a
  mask over NaN and inf) and ``normalize`` against their closed-form derivatives in float64 NumPy.
* ``jvp``: :math:`\langle g, J v\rangle` from ``jax.jvp`` equals :math:`\langle \nabla L, v\rangle`
  with the oracles' gradients.
* ``vmap`` over an ensemble axis: each member's output and running statistics equal the
  reference on that member, and a loop of eager calls.
* ``shard_map`` over 4 CPU devices: each device's output and statistics equal the reference on
  its shard; the per-device moments merge to those of the whole masked batch.
* SPMD ``jit`` on a batch-sharded input (explicit and automatic sharding): the statistics are
  those of the whole batch.
* Dispatch: tracers of every kind reach this backend; ``BackendInfo`` answers for tracers without
  asking for their devices, and maps symbolic dimensions (``jax.export``) to ``None``; eval returns
  the running statistics it was given.

Tolerances come from :mod:`normkit.testing.tolerances`: the suite's output and statistics bounds
against the reference; for a gradient, :func:`~normkit.testing.tolerances.training_tolerance` with
no step (the rounding of every reduction on the path from ``x`` to ``L`` and back) plus the
oracle's own error (:func:`~normkit.testing.tolerances.normalization_gradient_tolerances` for
central differences; float64 rounding, far below, for torch).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import normkit
from normkit import reference
from normkit.testing.primitives import moments_bounds
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    assert_within,
    centering_gain,
    compute_dtype,
    normalization_gradient_tolerances,
    output_tolerance,
    statistics_tolerance,
    training_tolerance,
)
from normkit_jax import plugin
from normkit_jax.testing import enable_x64, register_jit_backend

HAS_TORCH = importlib.util.find_spec("torch") is not None
DTYPES = ("float16", "bfloat16", "float32", "float64")
N, C, L, G = 4, 6, 5, 3
SHAPE = (N, C, L)
EPSILON = 1e-5
RMS_EPSILON = 1e-6
MOMENTUM = 0.1
STEP = 1e-4
"""Central-difference step: near :math:`(3E/M_3)^{1/3}` for this data (E ~ 1e-12, M3 ~ 30)."""


@contextlib.contextmanager
def x64_for(dtype: str) -> Iterator[None]:
    """``jax_enable_x64`` on for float64, off otherwise (whatever the environment says)."""
    with enable_x64(dtype == "float64"):
        yield


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` and back to float64: the data both sides see."""
    return np.asarray(values, np.float64).astype(jnp.dtype(dtype)).astype(np.float64)


def param_dtype(dtype: str) -> str:
    """Parameters and running statistics are stored in the compute dtype (spec rule 7)."""
    return compute_dtype(dtype)


# --- the operations, three ways ------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One normalization as a function of ``(x, w, b)``: normkit on JAX arrays, the float64
    reference, and ``torch.nn.functional``; ``params`` is the shape of γ and β."""

    name: str
    params: tuple[int, ...]
    jax: Callable[..., Any]
    reference: Callable[..., np.ndarray]
    torch: Callable[..., Any]
    has_bias: bool = True


RUNNING_MEAN = np.array([2.5, 2.75, 3.0, 3.25, 3.5, 3.75])
RUNNING_VAR = np.array([3.0, 3.5, 4.0, 4.5, 5.0, 5.5])
"""Running statistics exact in every dtype: both sides normalize with the same values."""


def _running(dtype: str) -> tuple[jax.Array, jax.Array]:
    d = jnp.dtype(param_dtype(dtype))
    return jnp.asarray(RUNNING_MEAN, d), jnp.asarray(RUNNING_VAR, d)


def _torch_running(x: Any) -> tuple[Any, Any]:
    import torch

    return torch.tensor(RUNNING_MEAN, dtype=x.dtype), torch.tensor(RUNNING_VAR, dtype=x.dtype)


def _bn_train_jax(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    rm, rv = _running(x.dtype.name)
    return normkit.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPSILON).y


def _bn_eval_jax(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    rm, rv = _running(x.dtype.name)
    return normkit.batch_norm(x, rm, rv, w, b, training=False, eps=EPSILON).y


def _torch_bn(training: bool) -> Callable[..., Any]:
    def run(x: Any, w: Any, b: Any) -> Any:
        import torch.nn.functional as F

        rm, rv = _torch_running(x)
        return F.batch_norm(x, rm, rv, w, b, training=training, momentum=MOMENTUM, eps=EPSILON)

    return run


def _torch_instance(x: Any, w: Any, b: Any) -> Any:
    import torch.nn.functional as F

    return F.instance_norm(x, weight=w, bias=b, use_input_stats=True, eps=EPSILON)


def _torch_layer(x: Any, w: Any, b: Any) -> Any:
    import torch.nn.functional as F

    return F.layer_norm(x, (L,), w, b, eps=EPSILON)


def _torch_group(x: Any, w: Any, b: Any) -> Any:
    import torch.nn.functional as F

    return F.group_norm(x, G, w, b, eps=EPSILON)


def _torch_rms(x: Any, w: Any, b: Any) -> Any:
    import torch.nn.functional as F

    return F.rms_norm(x, (L,), w, eps=RMS_EPSILON)


OPS = (
    Op(
        "batch_norm-train",
        (C,),
        _bn_train_jax,
        lambda x, w, b: reference.batch_norm(
            x, w, b, training=True, momentum=MOMENTUM, eps=EPSILON, axis=1, unbiased_running_var=True
        )[0],
        _torch_bn(True),
    ),
    Op(
        "batch_norm-eval",
        (C,),
        _bn_eval_jax,
        lambda x, w, b: reference.batch_norm(
            x,
            w,
            b,
            RUNNING_MEAN,
            RUNNING_VAR,
            training=False,
            momentum=0.0,
            eps=EPSILON,
            axis=1,
            unbiased_running_var=True,
        )[0],
        _torch_bn(False),
    ),
    Op(
        "instance_norm",
        (C,),
        lambda x, w, b: normkit.instance_norm(x, None, None, w, b, use_input_stats=True, eps=EPSILON).y,
        lambda x, w, b: reference.instance_norm(
            x, w, b, use_input_stats=True, momentum=0.0, eps=EPSILON, axis=1, unbiased_running_var=False
        )[0],
        _torch_instance,
    ),
    Op(
        "layer_norm",
        (L,),
        lambda x, w, b: normkit.layer_norm(x, L, w, b, eps=EPSILON),
        lambda x, w, b: reference.layer_norm(x, w, b, axes=(2,), eps=EPSILON),
        _torch_layer,
    ),
    Op(
        "group_norm",
        (C,),
        lambda x, w, b: normkit.group_norm(x, G, w, b, eps=EPSILON),
        lambda x, w, b: reference.group_norm(x, G, w, b, eps=EPSILON, axis=1),
        _torch_group,
    ),
    Op(
        "rms_norm",
        (L,),
        lambda x, w, b: normkit.rms_norm(x, w, normalized_shape=L, eps=RMS_EPSILON),
        lambda x, w, b: reference.rms_norm(x, w, axes=(2,), eps=RMS_EPSILON),
        _torch_rms,
        has_bias=False,
    ),
)


def _data(op: Op, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs, parameters and a cotangent ``g`` (and a tangent ``v`` per argument), rounded to
    the dtypes JAX holds them in."""
    rng = np.random.default_rng(seed)
    pd = param_dtype(dtype)
    return {
        "x": rounded(rng.normal(3.0, 2.0, SHAPE), dtype),
        "w": rounded(rng.uniform(0.5, 1.5, op.params), pd),
        "b": rounded(rng.uniform(-1.0, 1.0, op.params), pd),
        "g": rounded(rng.uniform(-1.0, 1.0, SHAPE), dtype),
        "vx": rounded(rng.uniform(-1.0, 1.0, SHAPE), dtype),
        "vw": rounded(rng.uniform(-1.0, 1.0, op.params), pd),
        "vb": rounded(rng.uniform(-1.0, 1.0, op.params), pd),
    }


def _broadcast(op: Op, param: np.ndarray) -> np.ndarray:
    shape = (1, C, 1) if op.params == (C,) else (1, 1, L)
    return np.broadcast_to(param.reshape(shape), SHAPE)


def _normalized_by(op: Op, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    r"""``(mean, std, batch_statistics)`` broadcast to ``x``: what each element is normalized
    with (:math:`s = \sqrt{\sigma^2+\epsilon}`; RMS norm subtracts 0)."""
    if op.name == "batch_norm-eval":
        return _broadcast(op, RUNNING_MEAN), np.sqrt(_broadcast(op, RUNNING_VAR) + EPSILON), False
    if op.name == "rms_norm":
        ms = np.mean(x * x, axis=2, keepdims=True)
        return np.zeros(SHAPE), np.broadcast_to(np.sqrt(ms + RMS_EPSILON), SHAPE), True
    if op.name == "group_norm":
        blocks = x.reshape(N, G, -1)
        mean = np.repeat(blocks.mean(axis=2), C // G, axis=1)[:, :, None]
        var = np.repeat(blocks.var(axis=2), C // G, axis=1)[:, :, None]
    else:
        axes = {"batch_norm-train": (0, 2), "instance_norm": (2,), "layer_norm": (2,)}[op.name]
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return np.broadcast_to(mean, SHAPE), np.broadcast_to(np.sqrt(var + EPSILON), SHAPE), True


def _central_differences(op: Op, data: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The gradients of :math:`L = \\sum g\\,y(x, w, b)` of the float64 reference by central
    differences, and their allowed errors (elementwise)."""
    args = [data["x"], data["w"], data["b"]]
    g = data["g"]

    def loss(values: list[np.ndarray]) -> float:
        return float(np.sum(g * op.reference(*values)))

    grads = []
    for index, array in enumerate(args):
        grad = np.empty_like(array)
        for position in np.ndindex(array.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[index][position] += STEP
            minus[index][position] -= STEP
            grad[position] = (loss(plus) - loss(minus)) / (2 * STEP)
        grads.append(grad)
    mean, std, batch_statistics = _normalized_by(op, data["x"])
    bias = _broadcast(op, data["b"]) if op.has_bias else np.zeros(SHAPE)
    tolerances = normalization_gradient_tolerances(
        data["x"], _broadcast(op, data["w"]), bias, g, mean, std, batch_statistics=batch_statistics, step=STEP
    )
    bounds = [rtol * np.abs(grad) + atol for grad, (rtol, atol) in zip(grads, tolerances, strict=True)]
    return grads, bounds


def _torch_gradients(op: Op, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The same gradients by PyTorch's float64 autograd."""
    import torch

    x, w, b = (torch.tensor(data[k], dtype=torch.float64, requires_grad=True) for k in ("x", "w", "b"))
    loss = torch.sum(torch.tensor(data["g"]) * op.torch(x, w, b))
    loss.backward()
    return [t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for t in (x, w, b)]


def _jax_bound(dtype: str, oracle: np.ndarray) -> np.ndarray:
    """What JAX's own rounding may cost a gradient in ``dtype`` (the oracle is float64): every
    reduction on the path from ``x`` to ``L`` and back (the two statistics, the loss, the two
    sums of the backward pass: at most ``5 x.size`` terms), then the rounding to ``dtype``."""
    size = int(np.prod(SHAPE))
    scale = float(np.abs(oracle).max())
    tolerance = training_tolerance(dtype, steps=0, reduction_size=5 * size, scale=scale)
    return tolerance.bound(oracle, 0.0)


def _oracles(op: Op, data: dict[str, np.ndarray]) -> list[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """``(name, gradients, their own error bounds)`` for every oracle available."""
    grads, bounds = _central_differences(op, data)
    found = [("central differences of the float64 reference", grads, bounds)]
    if HAS_TORCH:
        torch_grads = _torch_gradients(op, data)
        size = int(np.prod(SHAPE))
        torch_bounds = [
            training_tolerance(
                "float64", steps=0, reduction_size=5 * size, scale=float(np.abs(t).max())
            ).bound(t, 0.0)
            for t in torch_grads
        ]
        found.append(("torch float64 autograd", torch_grads, torch_bounds))
    return found


def _as64(array: jax.Array) -> np.ndarray:
    """A JAX array as float64 NumPy (bfloat16 through float32, exactly)."""
    return np.asarray(array.astype(jnp.float32) if array.dtype != jnp.float64 else array, np.float64)


def _jax_args(op: Op, data: dict[str, np.ndarray], dtype: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    pd = jnp.dtype(param_dtype(dtype))
    return jnp.asarray(data["x"], jnp.dtype(dtype)), jnp.asarray(data["w"], pd), jnp.asarray(data["b"], pd)


# --- grad -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "mode"), [*((d, "jit") for d in DTYPES), ("float32", "eager")])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_gradients_equal_the_float64_oracles(op: Op, dtype: str, mode: str) -> None:
    """Under ``jit`` in every dtype, and eagerly in float32."""
    with x64_for(dtype):
        data = _data(op, dtype)
        args = _jax_args(op, data, dtype)

        def vjp(x: jax.Array, w: jax.Array, b: jax.Array, g: jax.Array) -> tuple[jax.Array, ...]:
            return jax.vjp(op.jax, x, w, b)[1](g)

        run = jax.jit(vjp) if mode == "jit" else vjp
        grads = run(*args, jnp.asarray(data["g"], jnp.dtype(dtype)))
        assert [a.dtype for a in grads] == [a.dtype for a in args]
        got = [_as64(a) for a in grads]
        for name, oracle, oracle_bounds in _oracles(op, data):
            for arg, grad, ref, bound in zip(
                ("x", "weight", "bias"), got, oracle, oracle_bounds, strict=True
            ):
                if arg == "bias" and not op.has_bias:
                    continue
                arg_dtype = dtype if arg == "x" else param_dtype(dtype)
                error = np.abs(grad - ref)
                assert_within(error, bound + _jax_bound(arg_dtype, ref), f"{op.name} d/d{arg} vs {name}")


def test_updated_running_statistics_carry_no_gradient() -> None:
    """The running statistics are state (``lax.stop_gradient``): their derivative is exactly 0,
    while the output's is not."""
    with x64_for("float32"):
        x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, SHAPE), jnp.float32)
        rm, rv = _running("float32")

        def stats(x: jax.Array) -> jax.Array:
            result = normkit.batch_norm(x, rm, rv, training=True)
            return jnp.sum(result.running_mean) + jnp.sum(result.running_var)

        assert np.array_equal(np.asarray(jax.grad(stats)(x)), np.zeros(SHAPE, np.float32))
        output = jax.grad(lambda x: jnp.sum(normkit.batch_norm(x, rm, rv, training=True).y ** 3))(x)
        assert np.abs(np.asarray(output)).max() > 0.1


def _closed_form_moments(x: np.ndarray, mask: np.ndarray, g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    r""":math:`\partial(\sum g_1\mu + \sum g_2 M_2)/\partial x_i = m_i\,(g_1/n + 2 g_2 (x_i - \mu))`
    per channel (axis 1 kept), from float64 NumPy."""
    m = mask.astype(np.float64)
    x0 = np.where(mask, x, 0.0)
    n = m.sum(axis=(0, 2), keepdims=True)
    mean = (x0 * m).sum(axis=(0, 2), keepdims=True) / n
    return m * (g1[None, :, None] / n + 2.0 * g2[None, :, None] * (x0 - mean))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_masked_moments_gradient_equals_its_closed_form(dtype: str) -> None:
    """Masked positions hold NaN and inf: the gradient is finite, exactly 0 there, and equals
    the closed form elsewhere."""
    with x64_for(dtype):
        rng = np.random.default_rng(2)
        x = rounded(rng.normal(3.0, 2.0, SHAPE), dtype)
        mask = rng.uniform(size=SHAPE) < 0.6
        mask[0, :, 0] = True  # every channel counts something
        poisoned = np.where(mask, x, np.where(rng.uniform(size=SHAPE) < 0.5, np.nan, np.inf))
        g1, g2 = rounded(rng.uniform(-1, 1, C), dtype), rounded(rng.uniform(-1, 1, C), dtype)
        cdt = jnp.dtype(dtype)

        def loss(x: jax.Array) -> jax.Array:
            m = normkit.moments(x, axis=1, mask=jnp.asarray(mask))
            return jnp.sum(jnp.asarray(g1, cdt) * m.mean) + jnp.sum(jnp.asarray(g2, cdt) * m.m2)

        got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(poisoned, cdt)), np.float64)
        expected = _closed_form_moments(x, mask, g1, g2)
        assert np.all(got[~mask] == 0.0)
        # terms: the count, the mean, M2 and the backward sums, each of at most x.size terms
        assert_within(np.abs(got - expected), _jax_bound(dtype, expected), "d(mean, m2)/dx")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalize_gradient_equals_its_closed_form(dtype: str) -> None:
    r""":math:`y = \gamma(x - \mu)/s + \beta`, :math:`s = \sqrt{\sigma^2+\epsilon}`: the gradients
    of :math:`\sum g y` are :math:`g\gamma/s` (x), :math:`-\sum g\gamma/s` (μ),
    :math:`-\sum g\gamma(x-\mu)/(2s^3)` (σ²), :math:`\sum g(x-\mu)/s` (γ), :math:`\sum g` (β)."""
    with x64_for(dtype):
        rng = np.random.default_rng(3)
        x, g = rounded(rng.normal(3.0, 2.0, SHAPE), dtype), rounded(rng.uniform(-1, 1, SHAPE), dtype)
        mean, var = rounded(RUNNING_MEAN, dtype), rounded(RUNNING_VAR, dtype)
        w, b = rounded(rng.uniform(0.5, 1.5, C), dtype), rounded(rng.uniform(-1, 1, C), dtype)
        cdt = jnp.dtype(dtype)
        arrays = [jnp.asarray(a, cdt) for a in (x, mean, var, w, b)]

        def loss(x: jax.Array, mean: jax.Array, var: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
            return jnp.sum(jnp.asarray(g, cdt) * normkit.normalize(x, mean, var, w, b, eps=EPSILON, axis=1))

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*arrays)
        s = np.sqrt(var + EPSILON)[None, :, None]
        centred = x - mean[None, :, None]
        gw = g * w[None, :, None]
        expected = [
            gw / s,
            -(gw / s).sum(axis=(0, 2)),
            -(gw * centred / (2 * s**3)).sum(axis=(0, 2)),
            (g * centred / s).sum(axis=(0, 2)),
            g.sum(axis=(0, 2)),
        ]
        for name, value, ref in zip(("x", "mean", "var", "weight", "bias"), got, expected, strict=True):
            error = np.abs(np.asarray(value, np.float64) - ref)
            assert_within(error, _jax_bound(dtype, ref), f"normalize d/d{name}")


# --- jvp --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_jvp_agrees_with_the_oracle_gradients(op: Op, dtype: str) -> None:
    r""":math:`\langle g, Jv\rangle` from ``jax.jvp`` (tangent ``v`` on x, γ and β) equals
    :math:`\sum_a \langle \nabla_a L, v_a\rangle` with each oracle's gradients of
    :math:`L = \sum g\,y`; allowed: :math:`\sum|g|` times JAX's bound on the tangent plus
    :math:`\sum_a |v_a|` times the oracle's bound on its gradient. The primal output equals the
    reference."""
    with x64_for(dtype):
        data = _data(op, dtype)
        args = _jax_args(op, data, dtype)
        cdt, pd = jnp.dtype(dtype), jnp.dtype(param_dtype(dtype))
        tangents = (jnp.asarray(data["vx"], cdt), jnp.asarray(data["vw"], pd), jnp.asarray(data["vb"], pd))
        y, tangent = jax.jit(lambda *a: jax.jvp(op.jax, a, tangents))(*args)
        y_ref = op.reference(data["x"], data["w"], data["b"])
        mean, std, _ = _normalized_by(op, data["x"])
        gain = np.abs(mean) * np.abs(_broadcast(op, data["w"])) / std
        bound = (
            output_tolerance(dtype).bound(y_ref, 0.0) + CENTERING_FACTOR * EPS[compute_dtype(dtype)] * gain
        )
        assert_within(np.abs(_as64(y) - y_ref), bound, "y")
        t = _as64(tangent)
        got = float(np.sum(data["g"] * t))
        tangent_bound = float(np.sum(np.abs(data["g"]) * _jax_bound(dtype, t)))
        directions = [data["vx"], data["vw"], data["vb"]]
        for name, grads, bounds in _oracles(op, data):
            expected = sum(float(np.sum(gr * v)) for gr, v in zip(grads, directions, strict=True))
            allowed = tangent_bound + sum(
                float(np.sum(np.abs(v) * bd)) for v, bd in zip(directions, bounds, strict=True)
            )
            assert abs(got - expected) <= allowed, (
                f"<g, J v> = {got}, {name}: {expected} (allowed {allowed:.3g})"
            )


# --- vmap -------------------------------------------------------------------------------------

ENSEMBLE = 3


def _ensemble_data(dtype: str) -> dict[str, np.ndarray]:
    """Each member's data at its own offset, so pooled statistics would be far from any member's."""
    rng = np.random.default_rng(4)
    pd = param_dtype(dtype)
    loc = np.array([-4.0, 0.5, 6.0])[:, None, None, None]
    return {
        "x": rounded(loc + rng.normal(0.0, 1.5, (ENSEMBLE, *SHAPE)), dtype),
        "w": rounded(rng.uniform(0.5, 1.5, (ENSEMBLE, C)), pd),
        "b": rounded(rng.uniform(-1.0, 1.0, (ENSEMBLE, C)), pd),
        "rm": rounded(rng.uniform(-1.0, 1.0, (ENSEMBLE, C)), pd),
        "rv": rounded(rng.uniform(0.5, 2.0, (ENSEMBLE, C)), pd),
    }


def _batch_norm_bound(x: np.ndarray, w: np.ndarray, y_ref: np.ndarray, dtype: str) -> np.ndarray:
    """The suite's bound on a batch norm output in training (:mod:`normkit.testing.runner`): the
    output tolerance, ``K`` times the conditioning (how far the exact output moves when the input
    is perturbed by one unit in the last place of the compute dtype) and the centering term."""
    eps_c = EPS[compute_dtype(dtype)]
    u = np.random.default_rng(5).uniform(-1.0, 1.0, x.shape)
    options = {"training": True, "momentum": 0.0, "eps": EPSILON, "axis": 1, "unbiased_running_var": True}
    exact = reference.batch_norm(x, w, **options)[0]
    perturbed = reference.batch_norm(x * (1 + eps_c * u), w, **options)[0]
    mean, var = x.mean(axis=(0, 2), keepdims=True), x.var(axis=(0, 2), keepdims=True)
    gain = np.abs(mean) * np.abs(w.reshape(1, -1, 1)) / np.sqrt(var + EPSILON)
    conditioning = float(np.abs(exact - perturbed).max())
    return output_tolerance(dtype).bound(y_ref, conditioning) + CENTERING_FACTOR * eps_c * gain


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_vmap_over_an_ensemble_equals_a_loop_and_the_reference(dtype: str) -> None:
    """``vmap`` of a training batch norm over a leading ensemble axis: each member normalized by
    its own statistics and its running statistics updated from them, as the float64 reference
    on that member says, and as a loop of eager calls gives (within twice the bound)."""
    with x64_for(dtype):
        data = _ensemble_data(dtype)
        cdt, pd = jnp.dtype(dtype), jnp.dtype(param_dtype(dtype))

        def member(x: jax.Array, w: jax.Array, b: jax.Array, rm: jax.Array, rv: jax.Array) -> tuple[Any, ...]:
            return tuple(normkit.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPSILON))

        arrays = [jnp.asarray(data["x"], cdt), *(jnp.asarray(data[k], pd) for k in ("w", "b", "rm", "rv"))]
        batched = jax.jit(jax.vmap(member))(*arrays)
        looped = [member(*(a[e] for a in arrays)) for e in range(ENSEMBLE)]
        magnitude = float(np.abs(data["x"]).max())
        for e in range(ENSEMBLE):
            x, w, b, rm, rv = (data[k][e] for k in ("x", "w", "b", "rm", "rv"))
            y_ref, rm_ref, rv_ref = reference.batch_norm(
                x,
                w,
                b,
                rm,
                rv,
                training=True,
                momentum=MOMENTUM,
                eps=EPSILON,
                axis=1,
                unbiased_running_var=True,
            )
            bound = _batch_norm_bound(x, w, y_ref, dtype)
            for source, (y, new_mean, new_var) in (("vmap", [o[e] for o in batched]), ("loop", looped[e])):
                assert_within(np.abs(_as64(y) - y_ref), bound, f"{source} member {e}: y")
                for name, got, ref, statistic in (
                    ("running_mean", new_mean, rm_ref, "mean"),
                    ("running_var", new_var, rv_ref, "var"),
                ):
                    tolerance = statistics_tolerance(dtype, statistic, magnitude)
                    error = np.abs(np.asarray(got, np.float64) - ref)
                    assert_within(error, tolerance.bound(ref, 0.0), f"{source} member {e}: {name}")
            difference = np.abs(_as64(batched[0][e]) - _as64(looped[e][0]))
            assert_within(difference, 2 * bound, f"member {e}: vmap vs loop")


# --- shard_map and SPMD jit -------------------------------------------------------------------

DEVICES = 4


def _mesh(axis_type: AxisType = AxisType.Explicit) -> jax.sharding.Mesh:
    if len(jax.devices("cpu")) < DEVICES:
        pytest.fail(
            f"{len(jax.devices('cpu'))} CPU device(s): these tests need {DEVICES}; XLA_FLAGS="
            f"--xla_force_host_platform_device_count={DEVICES} must be set before jax is imported (conftest.py)"
        )
    return jax.make_mesh((DEVICES,), ("batch",), axis_types=(axis_type,))


def _sharded_data(seed: int = 6, shape: tuple[int, ...] = (4 * DEVICES, C, L)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # each device's shard at its own offset: per-device statistics differ from the global ones
    loc = np.repeat(np.array([-3.0, 0.0, 2.0, 7.0]), shape[0] // DEVICES)
    return rounded(loc.reshape(-1, 1, 1) + rng.normal(0.0, 1.5, shape), "float32")


def _per_device(array: jax.Array) -> list[np.ndarray]:
    """Each device's shard of an array sharded along axis 0, in batch order, as float64 NumPy
    (counts stay integers)."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    assert len(shards) == DEVICES and len({shard.device for shard in shards}) == DEVICES
    return [
        np.asarray(_as64(s.data) if jnp.issubdtype(s.data.dtype, jnp.floating) else s.data) for s in shards
    ]


def test_shard_map_gives_each_device_the_statistics_of_its_shard() -> None:
    """Inside ``shard_map`` every kernel sees its shard: batch norm's output and running
    statistics on each device equal the float64 reference on that shard."""
    with x64_for("float32"):
        mesh = _mesh()
        x_np = _sharded_data()
        w_np = np.linspace(0.5, 1.5, C)
        x = jax.device_put(jnp.asarray(x_np), NamedSharding(mesh, P("batch")))
        w = jnp.asarray(w_np, jnp.float32)
        rm, rv = _running("float32")

        def per_device(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            result = normkit.batch_norm(x, rm, rv, w, training=True, momentum=MOMENTUM, eps=EPSILON)
            return result.y, result.running_mean[None], result.running_var[None]

        mapped = jax.shard_map(per_device, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
        y, means, variances = (_per_device(a) for a in jax.jit(mapped)(x))
        magnitude = float(np.abs(x_np).max())
        for device, part in enumerate(np.split(x_np, DEVICES)):
            y_ref, rm_ref, rv_ref = reference.batch_norm(
                part, w_np, None, RUNNING_MEAN.astype(np.float32), RUNNING_VAR.astype(np.float32),
                training=True, momentum=MOMENTUM, eps=EPSILON, axis=1, unbiased_running_var=True,
            )  # fmt: skip
            bound = _batch_norm_bound(part, w_np, y_ref, "float32")
            assert_within(np.abs(y[device] - y_ref), bound, f"device {device}: y")
            for name, got, ref, statistic in (
                ("mean", means, rm_ref, "mean"),
                ("var", variances, rv_ref, "var"),
            ):
                bound = statistics_tolerance("float32", statistic, magnitude).bound(ref, 0.0)
                assert_within(np.abs(got[device][0] - ref), bound, f"device {device}: running_{name}")


def _chan_merge_bound(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    r"""``(count, mean, m2, mean_bound, m2_bound)``: Chan's merge of the parts (each as
    :func:`~normkit.testing.primitives.moments_bounds` gives it) in float64, carrying the bounds
    as :mod:`normkit.testing.primitives` derives them: the error of each part's mean moves into
    :math:`\delta = \mu_b - \mu_a` (:math:`e_\delta \le e_a + e_b`), which costs :math:`M_2`
    :math:`(2|\delta| e_\delta + e_\delta^2)\,n_a n_b/n`; the merged mean is off by at most the
    larger part error."""
    n, mean, m2, e_mean, e_m2 = parts[0]
    for count, mean_b, m2_b, e_b, e2_b in parts[1:]:
        total = n + count
        safe = np.maximum(total, 1.0)
        delta = mean_b - mean
        e_delta = np.where((n > 0) & (count > 0), e_mean + e_b, 0.0)
        weight = n * count / safe
        m2, e_m2 = (
            m2 + m2_b + delta**2 * weight,
            e_m2 + e2_b + (2 * np.abs(delta) * e_delta + e_delta**2) * weight,
        )
        mean = mean + delta * count / safe
        e_mean = np.maximum(np.where(n > 0, e_mean, 0.0), np.where(count > 0, e_b, 0.0))
        n = total
    return n, mean, m2, e_mean, e_m2


def test_shard_map_moments_with_unequal_masks_merge_to_the_whole() -> None:
    """Per-device masked moments (unequal counts; device 0 selects nothing in channel 0) equal
    the reference on each shard, and ``merge_moments`` of the four (in float64, with
    ``jax_enable_x64``) equals the moments of the whole masked batch, where a mean of the
    per-device means (Flax's ``pmean``) is far off."""
    with x64_for("float64"):
        mesh = _mesh()
        x_np = _sharded_data(7)
        rng = np.random.default_rng(8)
        keep = rng.uniform(size=x_np.shape) < np.repeat([0.2, 0.5, 0.8, 1.0], 4).reshape(-1, 1, 1)
        keep[:4, 0] = False
        sharding = NamedSharding(mesh, P("batch"))
        x = jax.device_put(jnp.asarray(x_np, jnp.float32), sharding)
        mask = jax.device_put(jnp.asarray(keep), sharding)

        def per_device(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
            return tuple(a[None] for a in normkit.moments(x, axis=1, mask=mask))

        mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P("batch"))
        count, mean, m2 = (_per_device(a) for a in jax.jit(mapped)(x, mask))
        shards = list(zip(np.split(x_np, DEVICES), np.split(keep, DEVICES), strict=True))
        bounds = []
        for device, (part, part_keep) in enumerate(shards):
            bounds.append(moments_bounds(part, (0, 2), part_keep, "float32"))
            n_ref, mean_ref, m2_ref, mean_bound, m2_bound = bounds[-1]
            assert np.array_equal(count[device][0], n_ref), f"device {device}: count"
            assert_within(np.abs(mean[device][0] - mean_ref), mean_bound, f"device {device}: mean")
            assert_within(np.abs(m2[device][0] - m2_ref), m2_bound, f"device {device}: m2")
        parts = [
            (
                jnp.asarray(count[d][0]),
                jnp.asarray(mean[d][0], jnp.float32),
                jnp.asarray(m2[d][0], jnp.float32),
            )
            for d in range(DEVICES)
        ]
        merged = normkit.merge_moments(*parts)
        n_all, mean_all, m2_all = reference.moments(x_np, (0, 2), keep)
        _, _, _, mean_bound, m2_bound = _chan_merge_bound(bounds)
        assert np.array_equal(np.asarray(merged.count), n_all)
        assert_within(np.abs(_as64(merged.mean) - mean_all), mean_bound, "merged mean")
        assert_within(np.abs(_as64(merged.m2) - m2_all), m2_bound, "merged m2")
        mean_of_means = np.mean([reference.moments(p, (0, 2), k)[1] for p, k in shards[1:]], axis=0)
        assert np.all(np.abs(mean_of_means - mean_all)[1:] > 100 * mean_bound[1:]), (
            "the data do not tell the exact merge from a mean of means"
        )


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_spmd_jit_on_a_batch_sharded_input_gives_global_statistics(axis_type: AxisType) -> None:
    """``jit`` of batch norm on an input sharded along the batch: XLA's partitioner makes the
    reductions global, so output and running statistics equal the reference on the whole batch
    (with explicit sharding the kernels shift by a first-pass mean, see ``kernels``); the
    output stays sharded. Masked moments likewise."""
    with x64_for("float32"):
        mesh = _mesh(axis_type)
        x_np = _sharded_data(9)
        w_np = np.linspace(0.5, 1.5, C)
        keep = np.random.default_rng(10).uniform(size=x_np.shape) < 0.7
        sharding = NamedSharding(mesh, P("batch"))
        x, mask = jax.device_put(jnp.asarray(x_np), sharding), jax.device_put(jnp.asarray(keep), sharding)
        w = jnp.asarray(w_np, jnp.float32)
        rm, rv = _running("float32")

        @jax.jit
        def step(x: jax.Array, mask: jax.Array) -> tuple[Any, ...]:
            result = normkit.batch_norm(x, rm, rv, w, training=True, momentum=MOMENTUM, eps=EPSILON)
            return (*result, *normkit.moments(x, axis=1, mask=mask))

        y, new_mean, new_var, count, mean, m2 = step(x, mask)
        y_ref, rm_ref, rv_ref = reference.batch_norm(
            x_np, w_np, None, RUNNING_MEAN.astype(np.float32), RUNNING_VAR.astype(np.float32),
            training=True, momentum=MOMENTUM, eps=EPSILON, axis=1, unbiased_running_var=True,
        )  # fmt: skip
        assert len(y.sharding.device_set) == DEVICES, "the output was gathered onto one device"
        bound = _batch_norm_bound(x_np, w_np, y_ref, "float32")
        assert_within(np.abs(np.asarray(y, np.float64) - y_ref), bound, "y")
        magnitude = float(np.abs(x_np).max())
        for name, got, ref, statistic in (
            ("mean", new_mean, rm_ref, "mean"),
            ("var", new_var, rv_ref, "var"),
        ):
            tolerance = statistics_tolerance("float32", statistic, magnitude)
            assert_within(
                np.abs(np.asarray(got, np.float64) - ref), tolerance.bound(ref, 0.0), f"running_{name}"
            )
        n_ref, mean_ref, m2_ref, mean_bound, m2_bound = moments_bounds(x_np, (0, 2), keep, "float32")
        assert np.array_equal(np.asarray(count), n_ref)
        assert_within(np.abs(np.asarray(mean, np.float64) - mean_ref), mean_bound, "masked mean")
        assert_within(np.abs(np.asarray(m2, np.float64) - m2_ref), m2_bound, "masked m2")


# --- dispatch and BackendInfo -----------------------------------------------------------------


def test_every_kind_of_tracer_reaches_the_jax_backend() -> None:
    """Under ``jit``, ``grad``, ``jvp``, ``vmap`` and ``shard_map`` the function sees a tracer
    that is no subclass of ``jax.Array``; each is served by this backend (named explicitly with
    ``backend="jax"``), and ``BackendInfo`` describes it without touching its devices."""
    info = plugin.normkit_backend_info()
    seen: dict[str, type] = {}

    def probe(kind: str) -> Callable[[jax.Array], jax.Array]:
        def f(x: jax.Array) -> jax.Array:
            seen[kind] = type(x)
            assert info.device(x) == jax.default_backend()
            assert info.shape(x) == tuple(x.shape)
            assert info.dtype_name(x) == "float32"
            return jnp.sum(normkit.layer_norm(x, x.shape[-1], backend="jax") ** 3)

        return f

    with x64_for("float32"):
        x = jnp.asarray(np.random.default_rng(11).normal(size=(4, 8)), jnp.float32)
        jax.jit(probe("jit"))(x)
        jax.grad(probe("grad"))(x)
        jax.jvp(probe("jvp"), (x,), (jnp.ones_like(x),))
        jax.vmap(probe("vmap"))(x)
        mesh = _mesh()
        shard = jax.shard_map(
            lambda x: probe("shard_map")(x)[None], mesh=mesh, in_specs=P("batch"), out_specs=P("batch")
        )
        jax.jit(shard)(jax.device_put(x, NamedSharding(mesh, P("batch"))))
    assert set(seen) == {"jit", "grad", "jvp", "vmap", "shard_map"}
    for kind, cls in seen.items():
        assert issubclass(cls, jax.core.Tracer) and not issubclass(cls, jax.Array), kind


def test_symbolic_dimensions_are_unknown_and_exported_functions_are_correct() -> None:
    """Under ``jax.export`` with a symbolic batch, ``BackendInfo.shape`` gives ``None`` for it;
    the exported batch norm and layer norm, called on a concrete batch, equal the reference."""
    from jax import export

    info = plugin.normkit_backend_info()
    shapes: list[tuple[int | None, ...]] = []

    def f(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        shapes.append(info.shape(x))
        return normkit.batch_norm(x, training=True, eps=EPSILON).y, normkit.layer_norm(x, L, eps=EPSILON)

    with x64_for("float32"):
        spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {C}, {L}"), jnp.float32)
        exported = export.export(jax.jit(f))(spec)
        assert shapes == [(None, C, L)]
        x_np = rounded(np.random.default_rng(12).normal(3.0, 2.0, (7, C, L)), "float32")
        y_bn, y_ln = exported.call(jnp.asarray(x_np, jnp.float32))
    bn_ref = reference.batch_norm(
        x_np, training=True, momentum=0.0, eps=EPSILON, axis=1, unbiased_running_var=True
    )[0]
    ln_ref = reference.layer_norm(x_np, axes=(2,), eps=EPSILON)
    bound = _batch_norm_bound(x_np, np.ones(C), bn_ref, "float32")
    assert_within(np.abs(np.asarray(y_bn, np.float64) - bn_ref), bound, "exported batch norm")
    gain = centering_gain(x_np.mean(axis=2), x_np.var(axis=2), EPSILON)
    ln_bound = output_tolerance("float32", centering_gain=gain).bound(ln_ref, 0.0)
    assert_within(np.abs(np.asarray(y_ln, np.float64) - ln_ref), ln_bound, "exported layer norm")


@pytest.mark.parametrize("backend", ["jax", "jax-jit"])
def test_eval_returns_the_running_statistics_it_was_given(backend: str) -> None:
    """The spec's purity rule: without an update, the kernel returns the very objects passed in
    (the compiled kernel's wrapper returns them too), for batch norm in eval and instance norm
    with running statistics."""
    with x64_for("float32"), register_jit_backend():
        x = jnp.asarray(np.random.default_rng(13).normal(size=SHAPE), jnp.float32)
        rm, rv = _running("float32")
        result = normkit.batch_norm(x, rm, rv, training=False, backend=backend)
        assert result.running_mean is rm and result.running_var is rv
        result = normkit.instance_norm(x, rm, rv, use_input_stats=False, backend=backend)
        assert result.running_mean is rm and result.running_var is rv
        trained = normkit.batch_norm(x, rm, rv, training=True, backend=backend)
        assert trained.running_mean is not rm


def test_backend_info_describes_concrete_arrays() -> None:
    """Dtypes follow ``jax_enable_x64``; ``full`` and ``asarray`` place arrays on the given
    device, replicated over the mesh for a sharded ``like``; ``astype`` to int64 gives JAX's
    canonical integer without a warning."""
    with x64_for("float32"):
        info = plugin.normkit_backend_info()
        assert "float64" not in info.dtypes and info.devices[0] == "cpu"
        x = info.asarray(np.arange(6.0).reshape(2, 3), "bfloat16", "cpu:1")
        assert info.dtype_name(x) == "bfloat16" and info.device(x) == "cpu:1"
        assert info.device(info.full((3,), 2.0, "float32", x)) == "cpu:1"
        assert info.dtype_name(info.astype(x, "int64")) == "int32"
        mesh = _mesh()
        sharded = jax.device_put(jnp.zeros((8, 3)), NamedSharding(mesh, P("batch")))
        filled = info.full((3,), 1.0, "float32", sharded)
        assert filled.sharding.spec == P() and len(filled.sharding.device_set) == DEVICES
        np.testing.assert_array_equal(info.to_numpy(filled), np.ones(3, np.float32))
    with x64_for("float64"):
        info = plugin.normkit_backend_info()
        assert "float64" in info.dtypes
        assert info.dtype_name(info.astype(info.asarray(np.ones(2), "float64", None), "int64")) == "int64"
