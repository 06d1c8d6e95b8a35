"""The conformance suite catches real bugs: deliberately broken backends fail the right cases."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import normkit
from normkit import _registry, numpy_backend
from normkit.testing import get_case, run_case

_bn = numpy_backend.normkit_batch_norm


def one_pass_variance(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    if not training:
        return _bn(
            x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
        )
    axes = tuple(a for a in range(x.ndim) if a != axis)
    xf = x.astype(np.float32)
    mean = xf.mean(axis=axes, keepdims=True)
    var = (xf * xf).mean(axis=axes, keepdims=True) - mean * mean  # E[x^2] - E[x]^2
    shape = [1] * x.ndim
    shape[axis] = -1
    y = (xf - mean) / np.sqrt(np.maximum(var, 0) + eps)
    y = y * (1 if weight is None else weight.reshape(shape)) + (0 if bias is None else bias.reshape(shape))
    if running_mean is None:
        return y.astype(x.dtype), None, None
    n = x.size // x.shape[axis]
    stored = var.ravel() * (n / (n - 1) if unbiased_running_var else 1)
    return (y.astype(x.dtype), ((1 - momentum) * running_mean + momentum * mean.ravel()).astype(running_mean.dtype),
            ((1 - momentum) * running_var + momentum * stored).astype(running_var.dtype))  # fmt: skip


def float16_statistics(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    if not training or x.dtype != np.float16:
        return _bn(
            x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
        )
    axes = tuple(a for a in range(x.ndim) if a != axis)
    with np.errstate(over="ignore", invalid="ignore"):
        var = np.var(x, axis=axes, dtype=np.float16)  # squares overflow float16
    y, m, _v = _bn(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    )
    return y, m, ((1 - momentum) * running_var + momentum * var.astype(np.float32)).astype(running_var.dtype)


def always_biased(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    return _bn(x, weight, bias, running_mean, running_var, training, momentum, eps, axis, False)


def flipped_momentum(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    return _bn(
        x, weight, bias, running_mean, running_var, training, 1 - momentum, eps, axis, unbiased_running_var
    )


def eval_with_batch_statistics(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    y, _, _ = _bn(x, weight, bias, None, None, True, momentum, eps, axis, unbiased_running_var)
    if training:
        return _bn(
            x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
        )
    return y, running_mean, running_var


def writes_its_input(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    result = _bn(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    )
    x[...] = 0
    return result


def float32_output(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    y, m, v = _bn(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    )
    return y.astype(np.float32), m, v


def eps_outside_the_root(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    """(x - mean) / (sqrt(var) + eps): the old Keras-CNTK bug."""
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    xf = x.astype(np.float64)
    if training:
        mean, var = xf.mean(axis=axes), xf.var(axis=axes)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    y = (xf - mean.reshape(shape)) / (np.sqrt(var.reshape(shape)) + eps)
    y = y * (1 if weight is None else weight.reshape(shape)) + (0 if bias is None else bias.reshape(shape))
    _, m, v = _bn(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    )
    return y.astype(x.dtype), m, v


def updates_in_place(
    x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
):
    """Writes the new running statistics into the arrays it was given, as F.batch_norm does."""
    y, m, v = _bn(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    )
    if running_mean is None or not training:
        return y, m, v
    running_mean[...] = m
    running_var[...] = v
    return y, running_mean, running_var


BROKEN: dict[str, tuple[Callable[..., object], str]] = {
    "one-pass-variance": (one_pass_variance, "bn-offset-1e4"),
    "one-pass-variance-small-batch": (one_pass_variance, "bn-offset-100-small-batch"),
    "float16-statistics": (float16_statistics, "bn-float16-large-values"),
    "always-biased": (always_biased, "bn-two-values-per-channel"),
    "flipped-momentum": (flipped_momentum, "bn-ema-20-steps"),
    "eval-with-batch-statistics": (eval_with_batch_statistics, "bn-eval-after-train"),
    "writes-its-input": (writes_its_input, "bn-inputs-not-mutated"),
    "float32-output": (float32_output, "bn-output-dtype-f16"),
    "eps-outside-the-root": (eps_outside_the_root, "bn-keras-preset-ema"),
    "updates-in-place": (updates_in_place, "bn-ema-20-steps"),
}


@pytest.fixture
def broken_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.param
    kernel, _ = BROKEN[name]

    def normkit_backend_info() -> normkit.BackendInfo:
        info = numpy_backend.normkit_backend_info()
        return normkit.BackendInfo(**{**info.__dict__, "name": name, "distribution": name})

    module = types.ModuleType(name)
    module.normkit_backend_info = normkit.hookimpl(normkit_backend_info)
    module.normkit_batch_norm = normkit.hookimpl(kernel)
    normkit.register_backend(module, name)
    yield name
    _registry.reset()


@pytest.mark.parametrize("broken_backend", list(BROKEN), indirect=True)
def test_a_broken_backend_fails_the_case_written_for_its_bug(broken_backend: str) -> None:
    case = get_case(BROKEN[broken_backend][1])
    assert run_case(case, "numpy").passed
    result = run_case(case, broken_backend)
    assert not result.passed and result.failures
    assert f"case {case.id!r}" in result.repro()


def test_assert_within_names_the_worst_value_and_fails_on_nan() -> None:
    from normkit.testing.tolerances import assert_within

    assert_within(np.array([0.1, 0.2]), np.array([0.1, 0.3]), "fine")  # on the bound passes
    with pytest.raises(
        AssertionError, match=r"y: 2 of 3 values outside tolerance; worst at \(2,\): error 5, allowed 1"
    ):
        assert_within(np.array([0.0, 2.0, 5.0]), np.array([1.0, 1.5, 1.0]), "y")
    with pytest.raises(AssertionError, match=r"1 of 2 values outside tolerance; worst at \(1,\): error nan"):
        assert_within(np.array([0.0, np.nan]), 1.0, "nan")


# -- spec version 2: broken primitives and the two new composites --------------------------------
_moments = numpy_backend.normkit_moments
_rms = numpy_backend.normkit_rms_norm


def one_pass_moments(x, axes, mask, group_axis, num_groups):
    count, _, _ = _moments(x, axes, mask, group_axis, num_groups)
    if mask is not None or group_axis is not None:
        return _moments(x, axes, mask, group_axis, num_groups)
    xf = x.astype(np.float32)
    mean = xf.mean(axis=axes)
    m2 = ((xf * xf).mean(axis=axes) - mean * mean) * count  # n (E[x^2] - E[x]^2)
    return count, mean, m2.astype(np.float32)


def moments_ignoring_the_mask(x, axes, mask, group_axis, num_groups):
    return _moments(x, axes, None, group_axis, num_groups)


def one_pass_group_norm(x, num_groups, weight, bias, eps, axis):
    moved = np.moveaxis(x.astype(np.float32), axis, 1)
    blocks = moved.reshape(moved.shape[0], num_groups, -1)
    mean = blocks.mean(axis=2, keepdims=True)
    var = np.maximum((blocks * blocks).mean(axis=2, keepdims=True) - mean * mean, 0.0)
    y = ((blocks - mean) / np.sqrt(var + eps)).reshape(moved.shape)
    shape = (1, -1) + (1,) * (moved.ndim - 2)
    y = y * (1 if weight is None else weight.reshape(shape)) + (0 if bias is None else bias.reshape(shape))
    return np.moveaxis(y, 1, axis).astype(x.dtype)


def interleaved_groups(x, num_groups, weight, bias, eps, axis):
    """MLX's default grouping (channel c in group c % G) instead of contiguous blocks."""
    channels = x.shape[axis]
    order = np.argsort(np.arange(channels) % num_groups, kind="stable")
    permuted = np.take(x, order, axis=axis)
    w = None if weight is None else weight[order]
    b = None if bias is None else bias[order]
    y = numpy_backend.normkit_group_norm(permuted, num_groups, w, b, eps, axis)
    return np.take(y, np.argsort(order), axis=axis)


def offset_ignored(x, weight, axes, eps, weight_offset, cast_before_weight):
    return _rms(x, weight, axes, eps, 0.0, cast_before_weight)


def wrong_cast_order(x, weight, axes, eps, weight_offset, cast_before_weight):
    return _rms(x, weight, axes, eps, weight_offset, not cast_before_weight)


BROKEN_V2: dict[str, tuple[str, Callable[..., object], str]] = {
    "one-pass-moments": ("normkit_moments", one_pass_moments, "moments-offset-1e4"),
    "one-pass-moments-merged": ("normkit_moments", one_pass_moments, "merge-unequal-splits-2"),
    "moments-ignoring-the-mask": (
        "normkit_moments",
        moments_ignoring_the_mask,
        "moments-mask-unequal-counts",
    ),
    "one-pass-group-norm": ("normkit_group_norm", one_pass_group_norm, "gn-offset-1e4-channels-first"),
    "one-pass-group-norm-channels-last": (
        "normkit_group_norm",
        one_pass_group_norm,
        "gn-offset-1e4-channels-last",
    ),
    "interleaved-groups": ("normkit_group_norm", interleaved_groups, "gn-basic-f32"),
    "rms-offset-ignored": ("normkit_rms_norm", offset_ignored, "rms-gemma-offset"),
}


def _register_broken(name: str, hook: str, kernel: Callable[..., object]) -> str:
    """A backend that is the NumPy backend's primitives and kernels except one broken hook."""

    def normkit_backend_info() -> normkit.BackendInfo:
        info = numpy_backend.normkit_backend_info()
        return normkit.BackendInfo(**{**info.__dict__, "name": name, "distribution": name})

    module = types.ModuleType(name)
    module.normkit_backend_info = normkit.hookimpl(normkit_backend_info)
    for op in ("moments", "normalize", "group_norm", "rms_norm"):
        setattr(module, f"normkit_{op}", normkit.hookimpl(getattr(numpy_backend, f"normkit_{op}")))
    setattr(module, hook, normkit.hookimpl(kernel))
    return normkit.register_backend(module, name)


@pytest.mark.parametrize("name", list(BROKEN_V2))
def test_a_broken_spec2_backend_fails_the_case_written_for_its_bug(name: str) -> None:
    hook, kernel, case_id = BROKEN_V2[name]
    case = get_case(case_id)
    assert run_case(case, "numpy").passed
    try:
        _register_broken(name, hook, kernel)
        result = run_case(case, name)
    finally:
        _registry.reset()
    assert not result.passed and result.failures, result.report()


def test_the_wrong_rms_cast_order_fails_the_suite(pytestconfig: pytest.Config) -> None:
    """The two cast orders differ by one ulp, within a case's tolerance; the suite's exact-count
    test tells them apart."""
    from normkit.testing import ConformanceTests

    class Broken(ConformanceTests):
        backend = "wrong-cast-order"

    class Right(ConformanceTests):
        backend = "numpy"

    Right().test_rms_cast_order_is_the_named_one("float16", pytestconfig)
    try:
        _register_broken(Broken.backend, "normkit_rms_norm", wrong_cast_order)
        with pytest.raises(AssertionError, match="differ from that order's rounding"):
            Broken().test_rms_cast_order_is_the_named_one("float16", pytestconfig)
    finally:
        _registry.reset()


def test_a_primitives_only_backend_serves_every_op_by_composition() -> None:
    """Spec v2: a backend with only moments and normalize passes the cases of every composite
    (normkit composes them), and a spec-1 backend's missing ops name the backend and the op."""
    name = "primitives-only"

    def normkit_backend_info() -> normkit.BackendInfo:
        info = numpy_backend.normkit_backend_info()
        return normkit.BackendInfo(**{**info.__dict__, "name": name, "distribution": name, "astype": None})

    module = types.ModuleType(name)
    module.normkit_backend_info = normkit.hookimpl(normkit_backend_info)
    module.normkit_moments = normkit.hookimpl(numpy_backend.normkit_moments)
    module.normkit_normalize = normkit.hookimpl(numpy_backend.normkit_normalize)
    try:
        normkit.register_backend(module, name)
        ids = ("bn-ema-20-steps", "bn-offset-1e4", "bn-channels-last", "in-tracked-eval", "ln-axes-0-2",
               "gn-offset-1e4-channels-last", "gn-basic-f16", "rms-gemma-offset", "rms-cast-before-f16",
               "rms-basic-f64")  # fmt: skip
        for case_id in ids:
            result = run_case(get_case(case_id), name)
            assert result.passed, result.report()
    finally:
        _registry.reset()


def test_a_spec1_backend_keeps_loading_and_names_what_it_lacks() -> None:
    """A backend written for spec 1 (composites only) loads and serves them; a spec-2 op raises
    NotImplementedError naming the backend and the op, and the suite skips that op's cases."""
    name = "spec-one"

    def normkit_backend_info() -> normkit.BackendInfo:
        info = numpy_backend.normkit_backend_info()
        return normkit.BackendInfo(
            name=name, distribution=name, array_types=info.array_types, dtypes=info.dtypes,
            devices=info.devices, asarray=info.asarray, to_numpy=info.to_numpy,
            dtype_name=info.dtype_name, device=info.device, shape=info.shape, full=info.full,
        )  # fmt: skip

    module = types.ModuleType(name)
    module.normkit_backend_info = normkit.hookimpl(normkit_backend_info)
    module.normkit_batch_norm = normkit.hookimpl(numpy_backend.normkit_batch_norm)
    x = np.random.default_rng(0).normal(size=(4, 6, 3)).astype(np.float32)
    try:
        normkit.register_backend(module, name)
        assert run_case(get_case("bn-ema-20-steps"), name).passed
        with pytest.raises(NotImplementedError, match=rf"backend '{name}' does not implement group_norm"):
            normkit.group_norm(x, 3, backend=name)
        with pytest.raises(NotImplementedError, match=rf"backend '{name}' does not implement moments"):
            normkit.moments(x, backend=name)
        result = run_case(get_case("rms-basic-f32"), name)
        assert result.skipped is not None and "does not implement rms_norm" in result.skipped
    finally:
        _registry.reset()
