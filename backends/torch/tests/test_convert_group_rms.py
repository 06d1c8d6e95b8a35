"""``convert_norm_layers`` on ``torch.nn.GroupNorm`` and ``torch.nn.RMSNorm``: the converted model
against the unconverted one (the oracle), bit for bit under the torch preset (forward, gradients,
training side by side with an optimizer built before the conversion, ``state_dict``); the new
layers share the old parameters and keep their configuration, training mode, device and dtype;
other presets change only the conventions ``torch.nn`` hard-codes (the one-value rule, RMS norm's
cast order, checked against Llama's formula), never a layer's eps or the meaning of its weight."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dropin_group_rms import assert_identical, forward_backward, llama_rms_norm, randomize
from torch import nn

import normkit_torch

FLOATS = [torch.float32, torch.float64]


def stock_model() -> nn.Sequential:
    """conv -> GroupNorm -> ReLU -> conv -> GroupNorm (no affine) -> flatten -> linear ->
    RMSNorm -> a block (nested) with an RMSNorm over two axes and eps=1e-5 -> linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.GroupNorm(3, 6, affine=False),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 12),
        nn.RMSNorm(12),
        nn.Sequential(nn.Unflatten(1, (3, 4)), nn.RMSNorm((3, 4), eps=1e-5), nn.Flatten()),
        nn.Linear(12, 5),
    )


def pair(dtype: torch.dtype = torch.float32, preset: str = "torch") -> tuple[nn.Module, nn.Module]:
    """The stock model (random affine parameters) and a converted deep copy of it."""
    torch.manual_seed(0)
    stock = stock_model().to(dtype)
    randomize(stock, seed=1)
    return stock, normkit_torch.convert_norm_layers(copy.deepcopy(stock), preset=preset)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm | nn.RMSNorm)]


def test_every_group_and_rms_norm_is_replaced_and_the_rest_is_kept() -> None:
    stock, converted = pair()
    kinds = [type(m) for m in converted.modules()]
    for old, new in ((nn.GroupNorm, normkit_torch.GroupNorm), (nn.RMSNorm, normkit_torch.RMSNorm)):
        assert old not in kinds and new in kinds
        assert issubclass(new, old)  # isinstance checks in user code keep working
    assert [type(m) for m in norm_layers(converted)] == [
        normkit_torch.GroupNorm,
        normkit_torch.GroupNorm,
        normkit_torch.RMSNorm,
        normkit_torch.RMSNorm,  # the nested one
    ]
    others = [type(m) for m in converted.modules() if not isinstance(m, nn.GroupNorm | nn.RMSNorm)]
    assert others == [type(m) for m in stock.modules() if not isinstance(m, nn.GroupNorm | nn.RMSNorm)]
    # the configuration, as torch.nn prints it: num_groups, eps, affine, normalized_shape, eps=None
    assert [repr(m) for m in norm_layers(converted)] == [repr(m) for m in norm_layers(stock)]
    assert converted.state_dict().keys() == stock.state_dict().keys()
    for key, value in stock.state_dict().items():
        assert_identical(converted.state_dict()[key], value, key)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_outputs_and_gradients_are_bit_identical_to_the_unconverted_model(dtype: torch.dtype) -> None:
    stock, converted = pair(dtype)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 3 + 2).to(dtype)
    upstream = torch.randn(4, 5, generator=g).to(dtype)
    got, expected = forward_backward(converted, x, upstream), forward_backward(stock, x, upstream)
    assert got.keys() == expected.keys()  # y, grad x and every parameter's gradient
    assert {"grad 1.weight", "grad 1.bias", "grad 7.weight", "grad 8.1.weight"} <= got.keys()
    for key in expected:
        assert_identical(got[key], expected[key], key)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_training_with_an_optimizer_built_before_the_conversion_stays_identical(dtype: torch.dtype) -> None:
    """The new layers share the old Parameter objects: an optimizer built on the stock model before
    the conversion trains the converted one, in step with an unconverted copy, then eval."""
    torch.manual_seed(0)
    model = stock_model().to(dtype)
    randomize(model, seed=1)
    oracle = copy.deepcopy(model)
    shared = {name: p for name, p in model.named_parameters() if name.startswith(("1.", "7.", "8.1."))}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (oracle, model)]
    model = normkit_torch.convert_norm_layers(model)
    assert all(p is dict(model.named_parameters())[name] for name, p in shared.items())
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = (torch.randn(4, 3, 5, 5, generator=g) * 2 + 1).to(dtype)
        target = torch.randn(4, 5, generator=g).to(dtype)
        outputs = []
        for m, optimizer in zip((oracle, model), optimizers, strict=True):
            optimizer.zero_grad()
            y = m(x)
            nn.functional.mse_loss(y, target).backward()
            optimizer.step()
            outputs.append(y.detach())
        assert_identical(*outputs)
    for key, value in oracle.state_dict().items():
        assert_identical(model.state_dict()[key], value, key)
    x = torch.randn(2, 3, 5, 5, generator=g).to(dtype)
    assert_identical(model.eval()(x), oracle.eval()(x))


def test_training_mode_device_dtype_and_options_are_kept() -> None:
    """The new layers are built on the meta device and take the old parameters: nothing of the
    meta device is left, the dtype is the model's, and each option and the mode carry over."""
    stock = nn.Sequential(
        nn.GroupNorm(2, 4, eps=1e-3, bias=False),
        nn.GroupNorm(1, 4, affine=False),
        nn.RMSNorm(4, elementwise_affine=False),
        nn.RMSNorm([2, 4], eps=0.0),
    ).to(torch.float64)
    stock[1].eval()
    stock[3].eval()
    converted = normkit_torch.convert_norm_layers(copy.deepcopy(stock))
    for ours, theirs in zip(converted, stock, strict=True):
        assert type(ours).__module__ == "normkit_torch.modules"
        assert ours.training == theirs.training
        assert repr(ours) == repr(theirs)
        for name in ("num_groups", "num_channels", "eps", "affine", "normalized_shape", "elementwise_affine"):
            assert getattr(ours, name, None) == getattr(theirs, name, None), name
        assert [(n, p.dtype, p.device) for n, p in ours.named_parameters()] == [
            (n, p.dtype, p.device) for n, p in theirs.named_parameters()
        ]
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert converted[0].bias is None and converted[1].weight is None and converted[2].weight is None
    assert converted[3].eps == 0.0 and converted[2].eps is None
    x = torch.randn(3, 4, 2, 4, dtype=torch.float64)
    for ours, theirs in zip(converted, stock, strict=True):
        assert_identical(ours(x), theirs(x), repr(theirs))


def test_a_single_layer_converts_and_normkit_layers_and_subclasses_are_left_alone() -> None:
    layer = nn.RMSNorm(6)
    converted = normkit_torch.convert_norm_layers(layer)
    assert type(converted) is normkit_torch.RMSNorm and converted.weight is layer.weight
    assert normkit_torch.convert_norm_layers(converted) is converted  # converting twice: no change

    class Scaled(nn.GroupNorm):  # a subclass may compute something else: not converted
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(input)

    model = nn.Sequential(Scaled(2, 4), normkit_torch.GroupNorm(2, 4, preset="keras"))
    kept = list(model)
    assert list(normkit_torch.convert_norm_layers(model, preset="llama")) == kept
    assert model[1].preset == "keras"


def test_the_llama_preset_sets_the_cast_order_and_keeps_eps_none_and_the_weight() -> None:
    """``preset="llama"`` on a float16 model: the cast before the weight (the oracle: Llama's
    formula, run in torch ops, bit for bit) with the layer's own eps (``None``: float32's machine
    epsilon, not the preset's 1e-6); in float32 the two orders agree, so the converted model is
    bit for bit the stock one."""
    stock = nn.RMSNorm(64)
    randomize(stock, seed=4)
    llama = normkit_torch.convert_norm_layers(copy.deepcopy(stock), preset="llama")
    assert (llama.preset, llama.eps, llama.weight_offset, llama.cast) == ("llama", None, 0.0, "before_weight")
    assert repr(llama) == "RMSNorm((64,), eps=None, elementwise_affine=True, preset='llama')"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 64, generator=g) * 3
    assert_identical(llama(x), stock(x), "float32")
    half, stock_half = llama.half(), copy.deepcopy(stock).half()
    xh = x.half()
    expected = llama_rms_norm(xh, half.weight.detach(), torch.finfo(torch.float32).eps)
    assert_identical(half(xh).detach(), expected, "float16, Llama's formula")
    assert not torch.equal(half(xh), stock_half(xh))  # the stock order rounds once: other bits


def test_the_gemma_preset_does_not_reread_the_stock_weight_as_one_plus_w() -> None:
    """A stock weight means :math:`\\hat x\\,w`; with Gemma's offset the same weight would mean
    :math:`\\hat x\\,(1 + w)`. The conversion keeps offset 0 (and the layer's eps), so the model
    computes what it did, and says so in its repr."""
    stock = nn.Sequential(nn.RMSNorm(16, eps=1e-5))
    randomize(stock, seed=6)
    converted = normkit_torch.convert_norm_layers(copy.deepcopy(stock), preset="gemma")
    layer = converted[0]
    assert (layer.preset, layer.eps, layer.weight_offset) == ("gemma", 1e-5, 0.0)
    assert (
        repr(layer) == "RMSNorm((16,), eps=1e-05, elementwise_affine=True, preset='gemma', weight_offset=0.0)"
    )
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    assert_identical(converted(x), stock(x))


def test_another_preset_sets_group_norms_one_value_rule_and_keeps_its_eps() -> None:
    """``torch.nn.GroupNorm`` refuses a batch that holds one value per group; converted with
    ``preset="keras"`` the layer keeps its eps (1e-5, not Keras's 1e-3) and normalizes such a
    group to β (exactly: x - μ is 0 and the output is β, bar ATen's rounding of the fused
    affine, which is exact at μ = 0)."""
    stock = nn.GroupNorm(4, 4)
    randomize(stock, seed=8)
    keras = normkit_torch.convert_norm_layers(copy.deepcopy(stock), preset="keras")
    assert (keras.preset, keras.eps) == ("keras", 1e-5)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        stock(x)
    assert_identical(keras(x).detach(), keras.bias.detach().view(1, 4), "one value per group")
    y = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(9))
    assert_identical(keras(y), stock(y))
