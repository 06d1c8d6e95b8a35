"""normkit's NumPy layers under the torch preset against PyTorch's own layers (the oracle).

PyTorch is installed in the test environment as an oracle, not as a backend: normkit runs on
NumPy arrays and every result is compared with ``torch.nn`` on the same data, step by step:
20 training steps, then eval; outputs, running statistics and the batch counter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import normkit
from normkit.testing.tolerances import (
    agreement_tolerance,
    assert_within,
    centering_gain,
    statistics_effect,
    statistics_tolerance,
)

torch = pytest.importorskip("torch")

STEPS = 20
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def load_torch_state_into(layer: Any, module: Any) -> None:
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})


def randomize_affine(module: Any, rng: np.random.Generator) -> None:
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, module.weight.shape)))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.from_numpy(rng.normal(0, 0.5, module.bias.shape)))


def statistic_axes(module: Any, ndim: int) -> tuple[int, ...]:
    """The axes each statistic of ``module`` is taken over (channels on axis 1)."""
    if isinstance(module, torch.nn.LayerNorm):
        return tuple(range(ndim - len(module.normalized_shape), ndim))
    first = 2 if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) else 0
    return tuple(a for a in range(first, ndim) if a != 1)


def as64(array: Any) -> np.ndarray:
    return np.asarray(array.detach().numpy() if hasattr(array, "detach") else array, np.float64)


def allowed_difference(module: Any, x: np.ndarray, expected: np.ndarray, magnitude: float) -> np.ndarray:
    """Elementwise bound between normkit's output and torch's for one call: the suite's bound
    for two implementations (:func:`agreement_tolerance`, with the centering gain of the
    statistics used) and, in eval with running statistics, how far the output moves when the
    two layers' running statistics differ within twice :func:`statistics_tolerance`."""
    dtype = np.dtype(x.dtype).name
    x64 = x.astype(np.float64)
    weight = getattr(module, "weight", None)
    gamma = 1.0 if weight is None else float(as64(weight).__abs__().max())
    if isinstance(module, torch.nn.RMSNorm):  # no mean is subtracted: nothing to centre
        return agreement_tolerance(dtype).bound(expected, 0.0)
    if isinstance(module, torch.nn.GroupNorm):
        blocks = x64.reshape(x.shape[0], module.num_groups, -1)
        gain = centering_gain(blocks.mean(axis=2), blocks.var(axis=2), module.eps, gamma)
        return agreement_tolerance(dtype, centering_gain=gain).bound(expected, 0.0)
    if module.training or getattr(module, "running_mean", None) is None:
        axes = statistic_axes(module, x.ndim)
        gain = centering_gain(x64.mean(axis=axes), x64.var(axis=axes), module.eps, gamma)
        return agreement_tolerance(dtype, centering_gain=gain).bound(expected, 0.0)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = as64(module.running_mean).reshape(shape), as64(module.running_var).reshape(shape)
    statistics = [statistics_tolerance(dtype, s, magnitude).pairwise() for s in ("mean", "var")]
    moved = statistics_effect(
        x64, mean, var, module.eps, gamma,
        mean_error=statistics[0].bound(mean, 0.0), var_error=statistics[1].bound(var, 0.0),
    )  # fmt: skip
    gain = centering_gain(mean, var, module.eps, gamma)
    return agreement_tolerance(dtype, centering_gain=gain).bound(expected, 0.0) + moved


def compare_over_training_then_eval(
    module: Any,
    layer: Any,
    shape: tuple[int, ...],
    dtype: type,
    compare_stats: bool = True,
    compare_counter: bool = True,
) -> None:
    rng = np.random.default_rng(123)
    module = module.to(TORCH_DTYPE[dtype])
    randomize_affine(module, rng)
    if any(True for _ in module.state_dict()):
        load_torch_state_into(layer, module)
    magnitude = 0.0
    for step in range(STEPS + 3):
        training = step < STEPS
        module.train(training)
        layer.train(training)
        x = rng.normal(1.5, 2.0, size=shape).astype(dtype)
        if training:
            magnitude = max(magnitude, float(np.abs(x).max()))
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        got = layer(x)
        assert got.dtype == dtype
        error = np.abs(got.astype(np.float64) - expected)
        bound = allowed_difference(module, x, expected.astype(np.float64), magnitude)
        assert_within(error, bound, f"step {step}")
    if compare_stats:
        for key, statistic in (("running_mean", "mean"), ("running_var", "var")):
            tolerance = statistics_tolerance(np.dtype(dtype).name, statistic, magnitude).pairwise()
            np.testing.assert_allclose(getattr(layer, key), getattr(module, key).numpy(), **tolerance.kwargs)
    if compare_counter:
        assert layer.num_batches_tracked == int(module.num_batches_tracked)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("torch_class", "shape"),
    [
        ("BatchNorm1d", (16, 5)),
        ("BatchNorm1d", (8, 5, 7)),
        ("BatchNorm2d", (8, 5, 6, 6)),
        ("BatchNorm3d", (4, 5, 3, 4, 5)),
    ],
)
def test_batch_norm_matches_torch(torch_class: str, shape: tuple[int, ...], dtype: type) -> None:
    compare_over_training_then_eval(
        getattr(torch.nn, torch_class)(5), normkit.BatchNorm(preset="torch"), shape, dtype
    )


def test_batch_norm_cumulative_average_matches_torch() -> None:
    compare_over_training_then_eval(
        torch.nn.BatchNorm2d(4, momentum=None), normkit.BatchNorm(momentum=None), (8, 4, 5, 5), np.float32
    )


def test_batch_norm_small_batches_match_torch() -> None:  # two values per channel: the n/(n-1) factor is 2
    compare_over_training_then_eval(torch.nn.BatchNorm1d(3), normkit.BatchNorm(), (2, 3), np.float64)


def test_batch_norm_without_tracked_statistics_matches_torch() -> None:
    compare_over_training_then_eval(
        torch.nn.BatchNorm2d(4, track_running_stats=False),
        normkit.BatchNorm(track_running_stats=False),
        (8, 4, 5, 5),
        np.float32,
        compare_stats=False,
        compare_counter=False,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_instance_norm_without_tracked_statistics_matches_torch(dtype: type) -> None:
    compare_over_training_then_eval(
        torch.nn.InstanceNorm2d(4),
        normkit.InstanceNorm(),
        (6, 4, 7, 7),
        dtype,
        compare_stats=False,
        compare_counter=False,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_instance_norm_with_tracked_statistics_matches_torch(dtype: type) -> None:
    # torch's InstanceNorm never increments num_batches_tracked; normkit counts (see docs/conventions.md)
    compare_over_training_then_eval(
        torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        normkit.InstanceNorm(affine=True, track_running_stats=True),
        (6, 4, 7, 7),
        dtype,
        compare_counter=False,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_matches_torch(dtype: type) -> None:
    compare_over_training_then_eval(
        torch.nn.LayerNorm((6, 8)),
        normkit.LayerNorm((6, 8)),
        (4, 3, 6, 8),
        dtype,
        compare_stats=False,
        compare_counter=False,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("groups", "shape"), [(3, (8, 6, 5, 5)), (1, (4, 6, 7)), (6, (4, 6, 3, 3)), (2, (16, 4))]
)
def test_group_norm_matches_torch(groups: int, shape: tuple[int, ...], dtype: type) -> None:
    compare_over_training_then_eval(
        torch.nn.GroupNorm(groups, shape[1]),
        normkit.GroupNorm(groups, preset="torch"),
        shape,
        dtype,
        compare_stats=False,
        compare_counter=False,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_torch(eps: float | None, dtype: type) -> None:
    """eps=None is the compute dtype's machine epsilon in both (torch's opmath rule)."""
    compare_over_training_then_eval(
        torch.nn.RMSNorm((6, 8), eps=eps),
        normkit.RMSNorm((6, 8), eps=eps, preset="torch"),
        (4, 3, 6, 8),
        dtype,
        compare_stats=False,
        compare_counter=False,
    )


def test_functional_ops_match_torch_functional() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3, 5, 5)).astype(np.float32)
    rm, rv = rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    w, b = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    rm_before, rv_before = rm.copy(), rv.copy()
    t = {name: torch.from_numpy(a.copy()) for name, a in dict(x=x, rm=rm, rv=rv, w=w, b=b).items()}
    expected = torch.nn.functional.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], True, 0.3, 1e-3)
    y, mean, var = normkit.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-3)
    x64, gamma = x.astype(np.float64), float(np.abs(w).max())

    def agreement(axes: tuple[int, ...], eps: float, gamma: float = 1.0) -> dict[str, float]:
        gain = centering_gain(x64.mean(axis=axes), x64.var(axis=axes), eps, gamma)
        return agreement_tolerance("float32", centering_gain=gain).kwargs

    np.testing.assert_allclose(y, expected.numpy(), **agreement((0, 2, 3), 1e-3, gamma))
    magnitude = float(max(np.abs(x).max(), np.abs(rm).max(), np.abs(rv).max()))
    for got, key, statistic in ((mean, "rm", "mean"), (var, "rv", "var")):  # torch updated its own in place
        tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
        np.testing.assert_allclose(got, t[key].numpy(), **tolerance.kwargs)
    np.testing.assert_array_equal(rm, rm_before)  # and normkit did not touch ours
    np.testing.assert_array_equal(rv, rv_before)
    np.testing.assert_allclose(
        normkit.instance_norm(x, weight=w, bias=b).y,
        torch.nn.functional.instance_norm(t["x"], weight=t["w"], bias=t["b"]).numpy(),
        **agreement((2, 3), 1e-5, gamma),
    )
    np.testing.assert_allclose(
        normkit.layer_norm(x, (5, 5)),
        torch.nn.functional.layer_norm(t["x"], (5, 5)).numpy(),
        **agreement((2, 3), 1e-5),
    )


def test_one_value_per_channel_error_matches_torch_wording() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm1d(3)(torch.ones(1, 3))
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        normkit.BatchNorm()(np.ones((1, 3), np.float32))
