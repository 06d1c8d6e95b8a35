"""Drop-in equivalence: a model built with ``torch.nn`` norm layers and the same model converted
to normkit's layers behave identically (the oracle is ``torch.nn`` itself)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import normkit_torch


def small_cnn() -> nn.Module:
    """conv -> BN -> ReLU -> conv -> IN -> ReLU -> pool -> LayerNorm head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.LayerNorm(32),
        nn.Linear(32, 5),
        nn.BatchNorm1d(5),
    )


def pair(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    stock = small_cnn().to(dtype)
    converted = normkit_torch.convert_norm_layers(copy.deepcopy(stock))
    return stock, converted


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"max difference {(a - b).abs().max().item():.3g}"


def test_conversion_replaces_every_norm_layer_and_keeps_the_rest() -> None:
    stock, converted = pair()
    kinds = [type(m) for m in converted.modules()]
    for old, new in (
        (nn.BatchNorm2d, normkit_torch.BatchNorm2d),
        (nn.InstanceNorm2d, normkit_torch.InstanceNorm2d),
        (nn.LayerNorm, normkit_torch.LayerNorm),
        (nn.BatchNorm1d, normkit_torch.BatchNorm1d),
    ):
        assert old not in kinds and new in kinds
        assert issubclass(new, old)  # isinstance checks in user code keep working
    assert [
        type(m) for m in converted if not isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm)
    ] == [type(m) for m in stock if not isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm)]
    assert converted.state_dict().keys() == stock.state_dict().keys()


def test_conversion_shares_parameters_and_buffers() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    weight, running_mean = model[1].weight, model[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model = normkit_torch.convert_norm_layers(model)
    assert model[1].weight is weight and model[1].running_mean is running_mean
    # weighted: a plain sum of the last batch norm's outputs is N*beta whatever its input, which
    # leaves the earlier layers only rounding noise as gradient (too small to move a weight of 1)
    (model(torch.randn(4, 3, 6, 6)) * torch.randn(4, 5)).sum().backward()
    optimizer.step()  # the optimizer built before the conversion updates the new layer
    assert not torch.equal(model[1].weight, torch.ones(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_outputs_and_state_dicts_over_ten_sgd_steps_then_eval(dtype: torch.dtype) -> None:
    stock, converted = pair(dtype)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (stock, converted)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = (torch.randn(6, 3, 8, 8, generator=generator) * 2 + 1).to(dtype)
        target = torch.randn(6, 5, generator=generator).to(dtype)
        outputs = []
        for model, optimizer in zip((stock, converted), optimizers, strict=True):
            optimizer.zero_grad()
            y = model(x)
            nn.functional.mse_loss(y, target).backward()
            optimizer.step()
            outputs.append(y.detach())
        assert_identical(*outputs)
    stock_state, converted_state = stock.state_dict(), converted.state_dict()
    assert stock_state.keys() == converted_state.keys()
    for key in stock_state:
        assert_identical(stock_state[key], converted_state[key])
    assert converted_state["1.num_batches_tracked"].item() == 10
    x = torch.randn(3, 3, 8, 8, generator=generator).to(dtype)
    assert_identical(stock.eval()(x), converted.eval()(x))


def test_state_dicts_load_across_in_both_directions() -> None:
    stock, converted = pair()
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        stock(torch.randn(4, 3, 8, 8, generator=generator))
    buffer = io.BytesIO()
    torch.save(stock.state_dict(), buffer)
    buffer.seek(0)
    converted.load_state_dict(torch.load(buffer))  # strict: the keys are torch.nn's
    x = torch.randn(2, 3, 8, 8, generator=generator)
    assert_identical(stock.eval()(x), converted.eval()(x))

    for _ in range(3):
        converted.train()(torch.randn(4, 3, 8, 8, generator=generator))
    fresh = small_cnn()
    fresh.load_state_dict(converted.state_dict())
    assert_identical(fresh.eval()(x), converted.eval()(x))


@pytest.mark.parametrize(
    ("stock_class", "normkit_class", "shape"),
    [
        (nn.BatchNorm1d, normkit_torch.BatchNorm1d, (7, 4)),
        (nn.BatchNorm1d, normkit_torch.BatchNorm1d, (5, 4, 3)),
        (nn.BatchNorm2d, normkit_torch.BatchNorm2d, (3, 4, 5, 2)),
        (nn.BatchNorm3d, normkit_torch.BatchNorm3d, (2, 4, 3, 2, 2)),
        (nn.InstanceNorm1d, normkit_torch.InstanceNorm1d, (3, 4, 6)),
        (nn.InstanceNorm1d, normkit_torch.InstanceNorm1d, (4, 6)),  # unbatched
        (nn.InstanceNorm2d, normkit_torch.InstanceNorm2d, (3, 4, 3, 3)),
        (nn.InstanceNorm3d, normkit_torch.InstanceNorm3d, (2, 4, 2, 3, 2)),
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"affine": False},
        {"track_running_stats": False},
        {"track_running_stats": True},
        {"momentum": None},
        {"momentum": 0.3, "eps": 1e-3},
        {"affine": True, "bias": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_every_channel_layer_matches_torch_nn_in_train_and_eval(
    stock_class, normkit_class, shape, options
) -> None:
    torch.manual_seed(3)
    stock = stock_class(4, **options)
    ours = normkit_class(4, **options)
    ours.load_state_dict(stock.state_dict())
    assert repr(ours) == repr(stock)
    for mode in ("train", "train", "eval", "train", "eval"):
        x = torch.randn(shape) * 3 + 2
        stock.train(mode == "train")
        ours.train(mode == "train")
        assert_identical(ours(x), stock(x))
        for key, value in stock.state_dict().items():
            assert_identical(ours.state_dict()[key], value)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 4, 6)])
@pytest.mark.parametrize(
    "options", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}], ids=str
)
def test_layer_norm_matches_torch_nn(shape, options) -> None:
    torch.manual_seed(4)
    stock, ours = nn.LayerNorm(shape[-1], **options), normkit_torch.LayerNorm(shape[-1], **options)
    if stock.weight is not None:
        with torch.no_grad():
            stock.weight.normal_()
    ours.load_state_dict(stock.state_dict())
    assert repr(ours) == repr(stock)
    x = torch.randn(shape) * 5 - 1
    assert_identical(ours(x), stock(x))
    two = nn.LayerNorm(shape[-2:]), normkit_torch.LayerNorm(shape[-2:])
    assert_identical(two[1](x), two[0](x))


def test_channels_last_memory_format_matches_torch_nn_and_keeps_its_layout() -> None:
    torch.manual_seed(5)
    stock, ours = nn.BatchNorm2d(6), normkit_torch.BatchNorm2d(6)
    x = (torch.randn(4, 6, 5, 5) + 1).contiguous(memory_format=torch.channels_last)
    y = ours(x)
    assert torch.equal(y, stock(x))
    assert torch.equal(ours.running_var, stock.running_var)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_defaults_and_attributes_are_torch_nn_s() -> None:
    for ours, stock in (
        (normkit_torch.BatchNorm2d(3), nn.BatchNorm2d(3)),
        (normkit_torch.InstanceNorm2d(3), nn.InstanceNorm2d(3)),
        (normkit_torch.LayerNorm(3), nn.LayerNorm(3)),
    ):
        for name in (
            "eps",
            "momentum",
            "affine",
            "track_running_stats",
            "elementwise_affine",
            "normalized_shape",
        ):
            assert getattr(ours, name, None) == getattr(stock, name, None), name
        assert {k for k, _ in ours.named_buffers()} == {k for k, _ in stock.named_buffers()}
        assert {k for k, _ in ours.named_parameters()} == {k for k, _ in stock.named_parameters()}
        assert ours.preset == "torch"


def test_an_old_checkpoint_without_num_batches_tracked_loads_as_in_torch() -> None:
    stock, ours = nn.BatchNorm2d(3), normkit_torch.BatchNorm2d(3)
    state = stock.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # saved before torch added the counter
    ours.load_state_dict(state)
    stock.load_state_dict(state)
    assert ours.num_batches_tracked.item() == stock.num_batches_tracked.item() == 0
