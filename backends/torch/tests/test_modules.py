"""The torch layers under the other presets, checked against the float64 reference; their error
messages; and that a failed call changes no state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normkit
import normkit_torch
from normkit import reference
from normkit.testing.tolerances import (
    centering_gain,
    output_tolerance,
    statistics_effect,
    statistics_tolerance,
    training_tolerance,
)


def as64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def assert_within(got: np.ndarray, expected: np.ndarray, bound: np.ndarray, what: str = "") -> None:
    error = np.abs(got - expected)
    assert np.all(error <= bound), (
        f"{what}: error {error.max():.3g}, allowed {np.min(bound):.3g} to {np.max(bound):.3g}"
    )


@pytest.mark.parametrize("preset", ["keras", "flax", "onnx"])
def test_other_presets_follow_the_reference_over_many_steps(preset: str) -> None:
    p = normkit.get_preset(preset)
    layer = normkit_torch.BatchNorm2d(3, preset=preset, dtype=torch.float64)
    assert layer.eps == p.batch_norm_eps and layer.momentum == pytest.approx(p.update_weight)
    assert not layer.unbiased_running_var and layer.allow_single_value
    mean, var = np.zeros(3), np.ones(3)
    generator = torch.Generator().manual_seed(0)
    magnitude = 0.0
    for _ in range(15):
        x = torch.randn(5, 3, 4, 4, generator=generator, dtype=torch.float64) * 2 + 7
        magnitude = max(magnitude, float(x.abs().max()))
        y = layer(x)
        expected, mean, var = reference.batch_norm(
            as64(x), None, None, mean, var, training=True, momentum=p.update_weight, eps=p.batch_norm_eps,
            axis=1, unbiased_running_var=False,
        )  # fmt: skip
        # the suite's bound against the reference, with the centering term of the batch statistics
        gain = centering_gain(as64(x).mean(axis=(0, 2, 3)), as64(x).var(axis=(0, 2, 3)), p.batch_norm_eps)
        np.testing.assert_allclose(
            as64(y), expected, **output_tolerance("float64", centering_gain=gain).kwargs
        )
    statistics = {k: statistics_tolerance("float64", k, magnitude) for k in ("mean", "var")}
    np.testing.assert_allclose(as64(layer.running_mean), mean, **statistics["mean"].kwargs)
    np.testing.assert_allclose(as64(layer.running_var), var, **statistics["var"].kwargs)
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    expected, _, _ = reference.batch_norm(
        as64(x), None, None, mean, var, training=False, momentum=0.0, eps=p.batch_norm_eps, axis=1,
        unbiased_running_var=False,
    )  # fmt: skip
    # eval: the layer's running statistics are those of the reference within their tolerance
    m, v = mean.reshape(1, 3, 1, 1), var.reshape(1, 3, 1, 1)
    moved = statistics_effect(
        as64(x), m, v, p.batch_norm_eps,
        mean_error=statistics["mean"].bound(m, 0.0), var_error=statistics["var"].bound(v, 0.0),
    )  # fmt: skip
    tolerance = output_tolerance("float64", centering_gain=centering_gain(mean, var, p.batch_norm_eps))
    assert_within(as64(layer.eval()(x)), expected, tolerance.bound(expected, 0.0) + moved, "eval")


def test_keras_instance_norm_is_affine_with_biased_running_variance() -> None:
    layer = normkit_torch.InstanceNorm2d(2, preset="keras", track_running_stats=True, dtype=torch.float64)
    assert layer.affine and layer.eps == 1e-3
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -1.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.5, 3.0], dtype=torch.float64))
    x = torch.randn(4, 2, 3, 5, dtype=torch.float64) * 3 + 1
    y = layer(x)
    expected, mean, var = reference.instance_norm(
        as64(x), as64(layer.weight), as64(layer.bias), np.zeros(2), np.ones(2), use_input_stats=True,
        momentum=0.01, eps=1e-3, axis=1, unbiased_running_var=False,
    )  # fmt: skip
    gain = centering_gain(as64(x).mean(axis=(2, 3)), as64(x).var(axis=(2, 3)), 1e-3, [[2.0, 1.0]])
    np.testing.assert_allclose(as64(y), expected, **output_tolerance("float64", centering_gain=gain).kwargs)
    magnitude = float(x.abs().max())
    for key, expected, statistic in (("running_mean", mean, "mean"), ("running_var", var, "var")):
        tolerance = statistics_tolerance("float64", statistic, magnitude)
        np.testing.assert_allclose(as64(getattr(layer, key)), expected, **tolerance.kwargs, err_msg=key)


def test_one_value_per_channel_is_an_error_under_torch_and_gives_the_bias_under_keras() -> None:
    strict = normkit_torch.BatchNorm1d(3)
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel when training, got input size"
    ):
        strict(torch.randn(1, 3))
    assert strict.num_batches_tracked.item() == 0  # torch.nn would have counted the failed call
    assert torch.equal(strict.running_mean, torch.zeros(3))

    lenient = normkit_torch.BatchNorm1d(3, preset="keras")
    with torch.no_grad():
        lenient.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.tensor([[4.0, 5.0, 6.0]])
    assert torch.equal(lenient(x), torch.tensor([[1.0, -2.0, 0.5]]))
    for got, expected, statistic in (
        (lenient.running_mean, 0.01 * x[0], "mean"),
        (lenient.running_var, torch.full((3,), 0.99), "var"),  # biased batch variance 0
    ):
        torch.testing.assert_close(got, expected, **statistics_tolerance("float32", statistic, 6.0).kwargs)


def test_instance_norm_with_one_spatial_value() -> None:
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        normkit_torch.InstanceNorm1d(2)(torch.randn(3, 2, 1))
    y = normkit_torch.InstanceNorm1d(2, preset="keras")(torch.randn(3, 2, 1))
    assert torch.equal(y, torch.zeros(3, 2, 1))


def test_bad_input_names_what_it_got_and_expected_and_changes_nothing() -> None:
    layer = normkit_torch.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"input has shape \(4, 5, 2, 2\): expected num_features=3"):
        layer(torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(4, 3, 2))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=r"input has shape \(2, 5\): expected trailing dimensions"):
        normkit_torch.LayerNorm(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="eps=-1"):
        normkit_torch.BatchNorm1d(3, eps=-1)
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        normkit_torch.InstanceNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="preset='pytorch' is not a known preset"):
        normkit_torch.LayerNorm(3, preset="pytorch")


def test_empty_batch_returns_empty_and_counts_like_torch_nn() -> None:
    ours, stock = normkit_torch.BatchNorm2d(3), nn.BatchNorm2d(3)
    y = ours(torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
    stock(torch.randn(0, 3, 2, 2))
    assert ours.num_batches_tracked.item() == stock.num_batches_tracked.item() == 1
    assert torch.equal(ours.running_var, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_compute_statistics_in_float32(dtype: torch.dtype) -> None:
    layer = normkit_torch.BatchNorm2d(2, dtype=dtype)
    x = (torch.randn(8, 2, 4, 4) * 0.05 + 300).to(dtype)  # float16 values >= 256, tiny spread
    y = layer(x)
    assert y.dtype == dtype and layer.running_mean.dtype == dtype
    expected, _, _ = reference.batch_norm(
        as64(x),
        None,
        None,
        None,
        None,
        training=True,
        momentum=0.1,
        eps=1e-5,
        axis=1,
        unbiased_running_var=True,
    )
    # the suite's bound for this dtype; the centering term is large (|mean| / std in the thousands):
    # a float32 mean of values near 300 is only known to eps32 * 300. Statistics in float16
    # would be off by a float16 ulp of 300 (0.25), far more.
    gain = centering_gain(as64(x).mean(axis=(0, 2, 3)), as64(x).var(axis=(0, 2, 3)), 1e-5)
    tolerance = output_tolerance(str(dtype).removeprefix("torch."), centering_gain=gain)
    np.testing.assert_allclose(as64(y), expected, **tolerance.kwargs)


def test_converting_to_another_preset_keeps_eval_outputs() -> None:
    torch.manual_seed(6)
    stock = nn.Sequential(nn.BatchNorm2d(3), nn.LayerNorm(4))
    for _ in range(3):
        stock(torch.randn(5, 3, 4, 4) * 2 + 1)
    converted = normkit_torch.convert_norm_layers(stock, preset="keras")
    assert converted[0].preset == "keras" and converted[0].eps == 1e-5 and converted[0].momentum == 0.1
    x = torch.randn(2, 3, 4, 4)
    stock_copy = nn.Sequential(nn.BatchNorm2d(3), nn.LayerNorm(4))
    stock_copy.load_state_dict(converted.state_dict())
    assert torch.equal(converted.eval()(x), stock_copy.eval()(x))


@pytest.mark.parametrize("affine", [True, False])
def test_one_value_per_group_output_is_new_and_differentiable(affine: bool) -> None:
    layer = normkit_torch.BatchNorm1d(3, preset="keras", affine=affine)
    if affine:
        with torch.no_grad():
            layer.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    x = torch.randn(1, 3, requires_grad=True)
    y = layer(x)
    bias_before = None if layer.bias is None else layer.bias.detach().clone()
    g = torch.tensor([[0.5, -1.0, 2.0]])
    (y * g).sum().backward()
    with torch.no_grad():
        y.add_(100.0)  # the output is the layer's own tensor, not a view of its bias
    if affine:
        assert torch.equal(layer.bias, bias_before)
        assert torch.equal(layer.bias.grad, g[0])  # dy/dβ = 1
        assert torch.equal(layer.weight.grad, torch.zeros(3))  # x - μ is 0
    assert torch.equal(x.grad, torch.zeros(1, 3))


def test_float64_running_statistics_keep_their_precision_beside_float32_input() -> None:
    layer = normkit_torch.BatchNorm1d(2, momentum=1e-3)
    layer.running_mean = torch.tensor([1.0 + 1e-12, -3.0], dtype=torch.float64)
    layer.running_var = torch.tensor([2.0 + 1e-12, 0.5], dtype=torch.float64)
    x = torch.randn(16, 2)
    layer(x)
    _, mean, var = reference.batch_norm(
        as64(x), None, None, np.array([1.0 + 1e-12, -3.0]), np.array([2.0 + 1e-12, 0.5]),
        training=True, momentum=1e-3, eps=1e-5, axis=1, unbiased_running_var=True,
    )  # fmt: skip
    assert layer.running_mean.dtype == torch.float64
    # The batch statistics are float32 sums over 16 values (mean and M2: 2 * 16 terms), off by
    # about sqrt(32) eps32 of what they sum (|x| for the mean, the variance for M2); weighted by
    # 1e-3 and added in float64 (a few eps64 of the value, within rtol). An update in float32
    # would round the whole value to float32, up to 6e-8 off at 1.0 and 1.2e-7 at -3.0.
    batch = training_tolerance("float32", steps=0, reduction_size=2 * len(x), scale=0.0).rtol
    scales = (float(x.abs().max()), float(x.var(dim=0).max()))
    for got, expected, scale in ((layer.running_mean, mean, scales[0]), (layer.running_var, var, scales[1])):
        np.testing.assert_allclose(as64(got), expected, rtol=4 * 2.0**-52, atol=1e-3 * batch * scale)


def test_constructor_values_print_as_given_and_eps_zero_is_accepted_as_in_torch_nn() -> None:
    assert repr(normkit_torch.BatchNorm2d(3, momentum=1)) == repr(nn.BatchNorm2d(3, momentum=1))
    ours, stock = normkit_torch.LayerNorm(4, eps=0), nn.LayerNorm(4, eps=0)
    assert repr(ours) == repr(stock)
    x = torch.randn(2, 4)
    assert torch.equal(ours(x), stock(x))
