"""normkit.testtime.fold on PyTorch models: the folded model's eval outputs against the unfolded
model's (float32, within a tolerance derived from the layer's sums and magnitudes), the folded
weights against an independent float64 fold (torch.nn.utils.fusion's, and the formula in torch
float64 for float16/bfloat16 models), no normalization module left, channels_last kept, and
every refusal with the model unchanged."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

import normkit_torch
from normkit.testing.testtime import folding_bound, folding_offset
from normkit.testing.tolerances import EPS, assert_within, reduction_growth
from normkit.testtime.fold import fold
from normkit_torch.fold import RankCheck

NORMALIZATIONS = (
    _BatchNorm,
    normkit_torch.FrozenBatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def scale_of(bn: _BatchNorm) -> torch.Tensor:
    gamma = torch.ones(bn.num_features, dtype=torch.float64) if bn.weight is None else bn.weight.double()
    return gamma.detach() / torch.sqrt(bn.running_var.double() + bn.eps)


def magnitude(layer: nn.Module, bn: _BatchNorm, x: torch.Tensor, folded: nn.Module) -> np.ndarray:
    """:math:`\\sum|W'||x| + |s|(|b| + |\\mu|) + |\\beta|` per output element, in float64: the
    folded layer run on ``|x|`` with ``|W'|`` and :func:`folding_offset` as its bias."""

    def array(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().double().numpy()

    offset = folding_offset(
        array(bn.running_mean), array(bn.running_var), bn.eps,
        gamma=array(bn.weight), beta=array(bn.bias), bias=array(layer.bias),
    )  # fmt: skip
    weight = folded.weight.detach().double().abs()
    return torch.func.functional_call(
        copy.deepcopy(folded).double(),
        {"weight": weight, "bias": torch.from_numpy(offset)},
        (x.double().abs(),),
    ).numpy()


def terms_of(layer: nn.Module) -> int:
    """The products each output element sums (an upper bound for a transposed convolution)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    in_channels = layer.in_channels // layer.groups
    return in_channels * int(torch.tensor(layer.kernel_size).prod())


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with statistics and affine parameters far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 2 + 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 4 + 1e-3)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(n, generator=g) + 1)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def no_normalization_left(model: nn.Module) -> None:
    left = [name for name, m in model.named_modules() if isinstance(m, NORMALIZATIONS)]
    assert not left, left


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's arrays (a lazy module's uninitialized ones as None)."""
    return {k: None if nn.parameter.is_lazy(v) else v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor | None], model: nn.Module) -> None:
    after = state(model)
    assert before.keys() == after.keys()
    for k, value in before.items():
        assert (value is None and after[k] is None) or torch.equal(value, after[k]), k


# (make the producer, the batch norm, the input shape)
PAIRS: dict[str, tuple[Callable[[bool], nn.Module], Callable[[], _BatchNorm], tuple[int, ...]]] = {
    "conv2d": (lambda bias: nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias), lambda: nn.BatchNorm2d(4), (2, 3, 9, 9)),
    "conv2d-drop-in-keras": (
        lambda bias: nn.Conv2d(3, 4, 3, dilation=2, bias=bias),
        lambda: normkit_torch.BatchNorm2d(4, preset="keras"),  # eps 1e-3: the layer's own
        (2, 3, 9, 9),
    ),
    "conv-transpose2d-grouped": (
        lambda bias: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=bias),
        lambda: nn.BatchNorm2d(6),
        (2, 4, 5, 5),
    ),
    "conv-transpose1d-grouped": (
        lambda bias: nn.ConvTranspose1d(6, 9, 4, stride=3, groups=3, dilation=2, bias=bias),
        lambda: nn.BatchNorm1d(9),
        (2, 6, 7),
    ),
    "conv1d": (lambda bias: nn.Conv1d(3, 6, 5, groups=3, padding=2, bias=bias), lambda: nn.BatchNorm1d(6), (2, 3, 11)),
    "conv3d": (lambda bias: nn.Conv3d(2, 3, 2, bias=bias), lambda: nn.BatchNorm3d(3), (2, 2, 4, 4, 4)),
    "linear": (lambda bias: nn.Linear(7, 5, bias=bias), lambda: nn.BatchNorm1d(5), (6, 7)),
    "linear-drop-in-no-affine": (
        lambda bias: nn.Linear(7, 5, bias=bias),
        lambda: normkit_torch.BatchNorm1d(5, affine=False),
        (6, 7),
    ),
}  # fmt: skip


def pair_model(case: str, bias: bool) -> nn.Sequential:
    torch.manual_seed(sum(map(ord, case)))
    make_layer, make_bn, _ = PAIRS[case]
    return randomize(nn.Sequential(make_layer(bias), make_bn(), nn.ReLU()))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(PAIRS))
def test_folded_outputs_equal_the_unfolded_model(case: str, bias: bool) -> None:
    model = pair_model(case, bias)
    before, modes = state(model), [m.training for m in model.modules()]
    folded = fold(model)
    assert folded is not model and not folded.training
    no_normalization_left(folded)
    assert_same_state(before, model)
    assert [m.training for m in model.modules()] == modes
    layer, bn = model[0], model[1]
    x = torch.randn(PAIRS[case][2], generator=torch.Generator().manual_seed(1)) * 2 + 1
    with torch.no_grad():
        expected, got = model(x), folded(x)
        bound = folding_bound(magnitude(layer, bn, x, folded.get_submodule("0")), terms_of(layer), "float32")
    assert got.dtype == torch.float32 and folded.get_submodule("0").bias is not None
    assert_within((got.double() - expected.double()).abs().numpy(), bound, case)


@pytest.mark.parametrize("case", ["conv2d", "conv1d", "conv3d", "linear"])
def test_folded_weights_are_torch_fusion_in_float64_rounded_once(case: str) -> None:
    """torch.nn.utils.fusion as the oracle (groups 1: where it is right), run in float64."""
    model = pair_model(case, True)
    layer, bn = model[0], model[1]
    if isinstance(layer, nn.Linear):
        s = scale_of(bn)
        weight = layer.weight.double() * s[:, None]
        bias = (layer.bias.double() - bn.running_mean.double()) * s + bn.bias.double()
    else:
        weight, bias = fuse_conv_bn_weights(
            *(t.double() for t in (layer.weight, layer.bias, bn.running_mean, bn.running_var)),
            bn.eps,
            bn.weight.double(),
            bn.bias.double(),
        )
    folded = fold(model).get_submodule("0")
    for got, exact in ((folded.weight, weight), (folded.bias, bias)):
        rounding = (EPS["float32"] / 2 + 4 * EPS["float64"]) * exact.detach().abs()  # one rounding to float32
        assert_within((got.double() - exact).detach().abs().numpy(), rounding.numpy(), case)


class Custom(nn.Module):
    """A forward of its own: two branches, each a fold, returned as a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn_conv = normkit_torch.BatchNorm2d(4)
        self.fc = nn.Linear(27, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bn_conv(self.conv(x)), torch.relu(self.bn_fc(self.fc(x.flatten(1))))


def test_a_custom_forward() -> None:
    torch.manual_seed(2)
    model = randomize(Custom())
    folded = fold(model)
    no_normalization_left(folded)
    x = torch.randn(4, 3, 3, 3) + 1
    with torch.no_grad():
        expected, got = model(x), folded(x)
        for i, (layer, bn, name, inputs) in enumerate(
            ((model.conv, model.bn_conv, "conv", x), (model.fc, model.bn_fc, "fc", x.flatten(1)))
        ):
            bound = folding_bound(
                magnitude(layer, bn, inputs, folded.get_submodule(name)), terms_of(layer), "float32"
            )
            assert_within((got[i] - expected[i]).double().abs().numpy(), bound, name)


def test_a_chain_in_nested_sequentials() -> None:
    """conv -> bn -> relu -> conv -> bn: the first fold's difference reaches the output through
    the second (folded) convolution, |W2'| applied to it (ReLU is 1-Lipschitz)."""
    torch.manual_seed(3)
    model = randomize(
        nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5)),
        )
    )
    folded = fold(model)
    no_normalization_left(folded)
    first, second = folded.get_submodule("0.0"), folded.get_submodule("2.0")
    x = torch.randn(2, 3, 8, 8) + 1
    with torch.no_grad():
        h = model[1](model[0](x))  # the second layer's input in the unfolded model
        bound1 = folding_bound(magnitude(model[0][0], model[0][1], x, first), terms_of(first), "float32")
        carried = torch.nn.functional.conv2d(torch.from_numpy(bound1), second.weight.double().abs()).numpy()
        bound = carried + folding_bound(
            magnitude(model[2][0], model[2][1], h, second), terms_of(second), "float32"
        )
        error = (folded(x).double() - model(x).double()).abs()
    assert_within(error.numpy(), bound, "chain")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_models_fold_in_float64_and_round_once(dtype: torch.dtype) -> None:
    """The folded weights are the float64 fold (the formula in torch float64, an independent
    computation) cast once; the folded model's output is within one rounding per step of the
    float64 evaluation of the unfolded model (the convolution's sums in the half dtype at worst)."""
    torch.manual_seed(4)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(dtype)
    layer, bn = model[0], model[1]
    folded = fold(model)
    conv = folded.get_submodule("0")
    s = scale_of(bn)
    weight = (layer.weight.double() * s[:, None, None, None]).to(dtype)
    bias = ((layer.bias.double() - bn.running_mean.double()) * s + bn.bias.double()).to(dtype)
    assert conv.weight.dtype == dtype and torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)
    x = (torch.randn(2, 3, 6, 6) + 1).to(dtype)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        got = folded(x).double()
        name = str(dtype).removeprefix("torch.")
        bound = EPS[name] * (reduction_growth(terms_of(layer) + 1) + 3) * magnitude(layer, bn, x, conv)
    assert_within((got - exact).abs().numpy(), bound, name)


def test_channels_last_weights_stay_channels_last() -> None:
    model = pair_model("conv2d", False).to(memory_format=torch.channels_last)
    folded = fold(model)
    conv = folded.get_submodule("0")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = (torch.randn(2, 3, 9, 9) + 1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        bound = folding_bound(magnitude(model[0], model[1], x, conv), terms_of(model[0]), "float32")
        assert_within((folded(x) - model(x)).double().abs().numpy(), bound, "channels_last")


def test_linear_on_3d_input_is_checked_when_the_folded_model_runs() -> None:
    """A BatchNorm1d after a Linear normalizes dim 1: the linear's features only for 2-D input.
    The graph cannot tell the rank, so the folded model checks it where the batch norm was."""
    model = pair_model("linear", True)
    folded = fold(model)
    assert any(isinstance(m, RankCheck) for m in folded.modules())
    x = torch.randn(3, 5, 7)  # model(x): BatchNorm1d(5) over dim 1 (length 5), not the features
    model(x)
    with pytest.raises(ValueError, match=r"'1' was folded into '0' for 2-D input.*shape \(3, 5, 5\)"):
        folded(x)
    assert not any(isinstance(m, RankCheck) for m in fold(pair_model("conv2d", True)).modules())


def test_the_folded_model_pickles() -> None:
    import pickle

    folded = fold(pair_model("linear", True))
    again = pickle.loads(pickle.dumps(folded))
    x = torch.randn(3, 7)
    assert torch.equal(again(x), folded(x))


class ReadsOutputTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class CallsConvTwice(ReadsOutputTwice):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class DataDependent(ReadsOutputTwice):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def parametrized() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    nn.utils.parametrizations.weight_norm(model[0])
    return model


def overflowed() -> nn.Module:
    """A float16 batch norm whose running variance overflowed to inf (its output is β)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).half()
    model[1].running_var[2] = 1e5  # above float16's largest value, 65504
    return model


def trained() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), r"model \(Sequential\) has no batch norm"),
        (lambda: nn.BatchNorm2d(3), r"is itself a batch norm: there is no layer before it"),
        (trained, r"'1': the batch norm is in training mode.*call model.eval\(\) first"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
            r"'1': the batch norm has no running statistics \(track_running_stats=False\)",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)),
            r"'2': its input comes from '1' \(ReLU\), not a convolution or linear layer that can absorb it",
        ),
        (
            lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)),
            r"'0': its input comes from the model's input 'input'",
        ),
        (ReadsOutputTwice, r"'bn': the output of 'conv' is also used by add"),
        (CallsConvTwice, r"'bn': 'conv' is used more than once in the forward"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5)),
            r"'1': num_features=5, but '0' \(Conv2d\) has 4 output channels",
        ),
        (
            lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm2d(4)),
            r"'1': BatchNorm2d takes input of rank \[4\], but '0' \(Linear\) has its output channels on dim 1 only at rank 2",
        ),
        (DataDependent, r"model \(DataDependent\) cannot be traced by torch.fx"),
        (parametrized, r"'1': its input comes from '0', whose weight is computed by a parametrization"),
        (lambda: nn.Sequential(nn.LazyConv2d(4, 1), nn.BatchNorm2d(4)), r"'1': '0' is a lazy layer not yet initialized"),
        (overflowed, r"'1' \(folded into '0'\): running_var\[2\] is inf: expected finite values"),
    ],
    ids=[
        "no-batch-norm", "bare-batch-norm", "training", "no-running-stats", "after-relu", "after-input",
        "output-used-twice", "layer-called-twice", "num-features", "linear-batchnorm2d", "untraceable",
        "parametrized", "lazy", "overflowed",
    ],
)  # fmt: skip
def test_refusals_name_the_layer_and_leave_the_model_unchanged(
    make: Callable[[], nn.Module], message: str
) -> None:
    model = make() if make is trained else make().eval()
    before, modes = state(model), [m.training for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        fold(model)
    assert_same_state(before, model)
    assert [m.training for m in model.modules()] == modes


def test_a_non_module_is_refused() -> None:
    from normkit_torch.fold import fold_model

    with pytest.raises(TypeError, match=r"model is a list: expected a torch.nn.Module"):
        fold_model([nn.Conv2d(3, 4, 1)])


@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_batch_norms_fold_too(trainable: bool) -> None:
    """freeze, then fold: a FrozenBatchNorm is the same fixed map in any mode, so it folds
    whatever the model's mode, to the frozen model's outputs within the folding bound."""
    from normkit.testtime import freeze

    model = pair_model("conv2d", bias=False)
    frozen = freeze(model, trainable=trainable).train()
    folded = fold(frozen)
    assert not any(isinstance(m, normkit_torch.FrozenBatchNorm) for m in folded.modules())
    no_normalization_left(folded)
    x = torch.randn(PAIRS["conv2d"][2], generator=torch.Generator().manual_seed(2)) * 2 + 1
    with torch.no_grad():
        expected, got = frozen(x), folded(x)
        bound = folding_bound(
            magnitude(model[0], model[1], x, folded.get_submodule("0")), terms_of(model[0]), "float32"
        )
    assert_within((got.double() - expected.double()).abs().numpy(), bound, "frozen conv2d")
