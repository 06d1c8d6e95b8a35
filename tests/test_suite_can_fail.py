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
