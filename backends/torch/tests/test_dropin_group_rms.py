"""The drop-in ``normkit_torch.GroupNorm`` and ``normkit_torch.RMSNorm`` against their oracles:
``torch.nn.GroupNorm`` / ``torch.nn.RMSNorm`` themselves (bit for bit under the torch preset,
float32 and float64, forward and gradients, ``state_dict``s both ways, training side by side),
the float64 reference on channels-last memory (where the drop-in is more accurate than
``torch.nn``), the Llama and Gemma formulas for their presets, and eager execution for
``torch.compile``."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import normkit_torch
from normkit import reference
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    agreement_tolerance,
    assert_within,
    output_tolerance,
    training_tolerance,
)

FLOATS = [torch.float32, torch.float64]


def assert_identical(a: torch.Tensor | None, b: torch.Tensor | None, what: str = "") -> None:
    assert a is not None and b is not None, what
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max difference {(a - b).abs().max().item():.3g}"


def randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def forward_backward(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(upstream)
    grads = {f"grad {name.removeprefix('_orig_mod.')}": p.grad for name, p in module.named_parameters()}
    module.zero_grad()
    return {"y": y.detach(), "grad x": x.grad, **grads}


def assert_bit_identical(
    ours: nn.Module, theirs: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 2).to(dtype)
    upstream = torch.randn(shape, generator=g, dtype=dtype)
    got, expected = forward_backward(ours, x, upstream), forward_backward(theirs, x, upstream)
    assert got.keys() == expected.keys()
    for key in expected:
        assert_identical(got[key], expected[key], key)


# --------------------------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------------------------

GN_OPTIONS = [{}, {"affine": False}, {"bias": False}, {"eps": 1e-3}]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(3, 6, 5, 4), (3, 6, 7), (4, 6), (2, 6, 3, 2, 4)], ids=str)
@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize(
    "options", GN_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_group_norm_is_bit_identical_to_torch_nn(
    dtype: torch.dtype, shape: tuple[int, ...], groups: int, options: dict
) -> None:
    theirs = nn.GroupNorm(groups, 6, dtype=dtype, **options)
    randomize(theirs, seed=1)
    ours = normkit_torch.GroupNorm(groups, 6, dtype=dtype, **options)
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    assert_bit_identical(ours, theirs, shape, dtype, seed=2)


def test_group_norm_defaults_and_attributes_are_torch_nn_s() -> None:
    ours, theirs = normkit_torch.GroupNorm(4, 8), nn.GroupNorm(4, 8)
    assert isinstance(ours, nn.GroupNorm)
    for name in ("num_groups", "num_channels", "eps", "affine"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert_identical(ours.state_dict()[key], value, key)
    assert ours.preset == "torch"
    keras = normkit_torch.GroupNorm(4, 8, preset="keras")
    assert keras.eps == 1e-3 and repr(keras).endswith("preset='keras')")
    with pytest.raises(ValueError, match="divisible"):
        normkit_torch.GroupNorm(3, 8)


def _roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize(
    ("make_ours", "make_theirs", "shape"),
    [
        pytest.param(
            lambda: normkit_torch.GroupNorm(2, 6), lambda: nn.GroupNorm(2, 6), (3, 6, 4, 4), id="GroupNorm"
        ),
        pytest.param(
            lambda: normkit_torch.RMSNorm((4, 5)), lambda: nn.RMSNorm((4, 5)), (3, 6, 4, 5), id="RMSNorm"
        ),
    ],
)
def test_state_dicts_load_across_in_both_directions(make_ours, make_theirs, shape) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) + 1
    theirs = make_theirs()
    randomize(theirs, seed=4)
    ours = make_ours()
    ours.load_state_dict(_roundtrip(theirs.state_dict()))  # strict: the keys are torch.nn's
    assert_identical(ours(x), theirs(x), "torch.nn -> normkit_torch")
    randomize(ours, seed=5)
    fresh = make_theirs()
    fresh.load_state_dict(_roundtrip(ours.state_dict()))
    assert_identical(fresh(x), ours(x), "normkit_torch -> torch.nn")


def test_group_norm_input_errors_name_the_input() -> None:
    layer = normkit_torch.GroupNorm(2, 4)
    with pytest.raises(ValueError, match="num_channels=4"):
        layer(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layer(torch.randn(4))
    # torch.nn's check: the whole batch holds one value per group (N * C/G * spatial == 1)
    one = normkit_torch.GroupNorm(4, 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        one(torch.randn(1, 4))
    with pytest.raises(ValueError, match="more than 1 value"):
        nn.GroupNorm(4, 4)(torch.randn(1, 4))
    keras = normkit_torch.GroupNorm(4, 4, preset="keras")  # allowed there: y = β
    randomize(keras, seed=20)
    x = torch.randn(1, 4, 1, generator=torch.Generator().manual_seed(21))
    # up to ATen's fused x*a + (β - μa), which rounds μa: the centering term, with μ = x here
    gain = float((x.abs().view(4) * keras.weight.detach().abs()).max()) / keras.eps**0.5
    tolerance = output_tolerance("float32", centering_gain=gain)
    torch.testing.assert_close(keras(x).detach(), keras.bias.detach().view(1, 4, 1), **tolerance.kwargs)


def group_norm_bound(x64: np.ndarray, layer: nn.GroupNorm) -> tuple[np.ndarray, np.ndarray]:
    """The reference output and the conformance runner's float32 bound: ``output_tolerance`` with
    the case's conditioning (the output's move under a one-ulp perturbation of x) and the
    centering term :math:`2\\epsilon_c|\\mu|\\,|\\gamma|/\\sqrt{\\sigma^2+\\epsilon}` per element."""
    w64 = layer.weight.detach().double().numpy()
    b64 = layer.bias.detach().double().numpy()
    eps_c, groups = EPS["float32"], layer.num_groups
    ref = reference.group_norm(x64, groups, w64, b64, eps=layer.eps, axis=1)
    u = np.random.default_rng(6).uniform(-1.0, 1.0, size=x64.shape)
    perturbed = reference.group_norm(x64 * (1 + eps_c * u), groups, w64, b64, eps=layer.eps, axis=1)
    n, c = x64.shape[:2]
    blocks = x64.reshape(n, groups, -1)
    gain = np.abs(blocks.mean(axis=2)) / np.sqrt(blocks.var(axis=2) + layer.eps)
    gain = np.repeat(gain, c // groups, axis=1).reshape(n, c, 1, 1) * np.abs(w64).reshape(1, c, 1, 1)
    bound = output_tolerance("float32").bound(ref, float(np.abs(perturbed - ref).max()))
    return ref, bound + CENTERING_FACTOR * eps_c * gain


@pytest.mark.parametrize("loc", [1e3, 1e4])
def test_group_norm_on_channels_last_is_more_accurate_than_torch_nn(loc: float) -> None:
    """On channels-last memory the drop-in stays within the reference's bound, keeps the layout,
    and torch.nn.GroupNorm (ATen's one-pass channels-last kernel) does not."""
    theirs = nn.GroupNorm(4, 8)
    randomize(theirs, seed=7)
    ours = normkit_torch.GroupNorm(4, 8)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(8)) + loc).contiguous(
        memory_format=torch.channels_last
    )
    ref, bound = group_norm_bound(x.double().numpy(), theirs)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_within(np.abs(y.detach().double().numpy() - ref), bound, "normkit_torch.GroupNorm")
    error = np.abs(theirs(x).detach().double().numpy() - ref)
    assert np.max(error / bound) > 10, "torch.nn.GroupNorm misses the bound on this input"


def test_group_norm_on_channels_last_agrees_with_torch_nn_on_contiguous_input() -> None:
    """Where the data is well conditioned, the channels-last drop-in agrees with torch.nn on the
    same values stored channels-first, forward and gradients (:func:`agreement_tolerance`)."""
    theirs = nn.GroupNorm(2, 6)
    randomize(theirs, seed=9)
    ours = normkit_torch.GroupNorm(2, 6)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 6, 5, 5, generator=g) * 2 + 1
    upstream = torch.randn(x.shape, generator=g)
    got = forward_backward(ours, x.contiguous(memory_format=torch.channels_last), upstream)
    expected = forward_backward(theirs, x, upstream)
    blocks = x.double().view(3, 2, -1)
    gain = float((blocks.mean(2).abs() / (blocks.var(2, unbiased=False) + theirs.eps).sqrt()).max())
    gain *= float(theirs.weight.detach().abs().max())
    tolerance = agreement_tolerance("float32", centering_gain=gain)
    torch.testing.assert_close(got["y"], expected["y"], **tolerance.kwargs)
    # the gradients: two forward and two backward reductions over each sample's group
    for key in ("grad x", "grad weight", "grad bias"):
        scale = float(expected[key].abs().max())
        tol = training_tolerance("float32", steps=0, reduction_size=4 * x[0].numel(), scale=scale)
        torch.testing.assert_close(got[key], expected[key], **tol.kwargs, msg=key)


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------

RMS_OPTIONS = [{}, {"elementwise_affine": False}, {"eps": 1e-5}, {"eps": 0.0}]


@pytest.mark.parametrize("dtype", [*FLOATS, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("normalized_shape", "shape"), [(5, (3, 4, 5)), ((4, 5), (3, 4, 5)), ((6,), (6,))], ids=str
)
@pytest.mark.parametrize(
    "options", RMS_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
)
def test_rms_norm_is_bit_identical_to_torch_nn(
    dtype: torch.dtype, normalized_shape, shape, options: dict
) -> None:  # type: ignore[no-untyped-def]
    """Float32 and float64 as promised; a float16/bfloat16 layer too (both run ATen's half path,
    the cast after the weight)."""
    theirs = nn.RMSNorm(normalized_shape, dtype=dtype, **options)
    randomize(theirs, seed=11)
    ours = normkit_torch.RMSNorm(normalized_shape, dtype=dtype, **options)
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    assert_bit_identical(ours, theirs, shape, dtype, seed=12)


def test_rms_norm_defaults_attributes_and_presets() -> None:
    ours, theirs = normkit_torch.RMSNorm(8), nn.RMSNorm(8)
    assert isinstance(ours, nn.RMSNorm)
    for name in ("normalized_shape", "eps", "elementwise_affine"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert_identical(ours.weight, theirs.weight, "weight")
    assert (ours.preset, ours.weight_offset, ours.cast) == ("torch", 0.0, "after_weight")
    gemma = normkit_torch.RMSNorm(8, preset="gemma")
    assert (gemma.eps, gemma.weight_offset, gemma.cast) == (1e-6, 1.0, "after_weight")
    assert torch.equal(gemma.weight, torch.zeros(8))  # w + o = 1: a new layer scales by 1
    llama = normkit_torch.RMSNorm(8, preset="llama")
    assert (llama.eps, llama.weight_offset, llama.cast) == (1e-6, 0.0, "before_weight")
    assert repr(llama) == "RMSNorm((8,), eps=1e-06, elementwise_affine=True, preset='llama')"
    custom = normkit_torch.RMSNorm(8, weight_offset=1.0, cast="before_weight")
    assert (
        repr(custom)
        == "RMSNorm((8,), eps=None, elementwise_affine=True, weight_offset=1.0, cast='before_weight')"
    )
    assert custom.state_dict().keys() == theirs.state_dict().keys()
    with pytest.raises(ValueError, match="cast="):
        normkit_torch.RMSNorm(8, cast="before")
    with pytest.raises(TypeError, match="weight_offset="):
        normkit_torch.RMSNorm(8, weight_offset=float("nan"))
    with pytest.raises(ValueError, match="normalized_shape"):
        ours(torch.randn(2, 7))


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (Meta's ``llama/model.py``, Hugging Face's ``LlamaRMSNorm``): normalize in
    float32, cast to the input dtype, then multiply by the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm (Hugging Face's ``GemmaRMSNorm``): everything in float32 with the weight
    ``1 + w``, cast at the end."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("preset", "formula"), [("llama", llama_rms_norm), ("gemma", gemma_rms_norm)])
def test_rms_norm_presets_are_the_model_families_formulas(dtype: torch.dtype, preset: str, formula) -> None:  # type: ignore[no-untyped-def]
    """The same operations in the same order (torch's own on both sides): bit for bit forward.
    Gradients within a reduction's rounding (:func:`training_tolerance`): Llama's half-precision
    product has its weight's gradient summed in the half dtype by autograd, the kernel's in
    float32."""
    layer = normkit_torch.RMSNorm(64, preset=preset, dtype=dtype)
    randomize(layer, seed=13)
    g = torch.Generator().manual_seed(14)
    x = (torch.randn(8, 64, generator=g) * 3).to(dtype)
    upstream = torch.randn(8, 64, generator=g).to(dtype)
    got = forward_backward(layer, x, upstream)
    weight = layer.weight.detach().clone().requires_grad_()
    xe = x.clone().requires_grad_()
    y = formula(xe, weight, layer.eps)
    y.backward(upstream)
    assert_identical(got["y"], y.detach(), "y")
    name = str(dtype).removeprefix("torch.")
    for key, expected in (("grad x", xe.grad), ("grad weight", weight.grad)):
        # a weight's gradient sums over the 8 rows, x's over the 64 columns, each of 2 terms
        tol = training_tolerance(name, steps=0, reduction_size=2 * 64, scale=float(expected.abs().max()))
        torch.testing.assert_close(got[key], expected, **tol.kwargs, msg=key)


def test_rms_norm_eps_none_is_the_compute_dtypes_machine_epsilon() -> None:
    """``eps=None`` as torch.nn resolves it: float32's epsilon for float16 input (not float16's),
    float64's for float64; a constant row of value ``v`` normalizes to :math:`v/\\sqrt{v^2 +
    \\epsilon}`, which tells them apart at :math:`v^2 \\sim \\epsilon`."""
    for dtype, eps in (
        (torch.float16, torch.finfo(torch.float32).eps),
        (torch.float64, torch.finfo(torch.float64).eps),
    ):
        v = eps**0.5
        layer = normkit_torch.RMSNorm(4, dtype=dtype)
        y = layer(torch.full((1, 4), v, dtype=dtype)).double()
        stored_v = torch.tensor(v, dtype=dtype).double().item()
        expected = stored_v / (stored_v**2 + eps) ** 0.5
        tolerance = output_tolerance(str(dtype).removeprefix("torch."))
        torch.testing.assert_close(y, torch.full((1, 4), expected, dtype=torch.float64), **tolerance.kwargs)


# --------------------------------------------------------------------------------------------
# Training side by side, then eval
# --------------------------------------------------------------------------------------------


def small_model(lib: object, **rms_kw: object) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        lib.GroupNorm(4, 8),  # type: ignore[attr-defined]
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        lib.RMSNorm(16, **rms_kw),  # type: ignore[attr-defined]
        nn.Linear(16, 5),
    )


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_identical_training_with_torch_nn_over_ten_sgd_steps(dtype: torch.dtype) -> None:
    torch.manual_seed(15)
    theirs = small_model(nn).to(dtype)
    ours = small_model(normkit_torch).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (theirs, ours)]
    g = torch.Generator().manual_seed(16)
    for _ in range(10):
        x = (torch.randn(4, 3, 6, 6, generator=g) * 2 + 1).to(dtype)
        target = torch.randn(4, 5, generator=g).to(dtype)
        outputs = []
        for model, optimizer in zip((theirs, ours), optimizers, strict=True):
            optimizer.zero_grad()
            y = model(x)
            nn.functional.mse_loss(y, target).backward()
            optimizer.step()
            outputs.append(y.detach())
        assert_identical(*outputs)
    for key, value in theirs.state_dict().items():
        assert_identical(ours.state_dict()[key], value, key)
    x = torch.randn(2, 3, 6, 6, generator=g).to(dtype)
    assert_identical(ours.eval()(x), theirs.eval()(x))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    ("rms_kw", "channels_last", "dynamic"),
    [
        pytest.param({}, False, False, id="torch"),
        pytest.param({}, True, False, id="torch-channels-last"),
        pytest.param({"preset": "gemma"}, True, False, id="gemma-channels-last"),
        pytest.param({"preset": "llama"}, False, True, id="llama-dynamic"),
    ],
)
def test_fullgraph_compile_matches_eager(rms_kw: dict, channels_last: bool, dynamic: bool) -> None:
    """One graph (``fullgraph=True``, no break, no recompilation) for three training steps;
    outputs and gradients within a reduction's rounding of eager (:func:`training_tolerance`:
    aot_eager runs the same ATen ops, a decomposition may sum in another order)."""
    torch.manual_seed(17)
    model = small_model(normkit_torch, **rms_kw)
    randomize(model, seed=18)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    g = torch.Generator().manual_seed(19)
    for batch in (4, 4, 5) if dynamic else (4, 4, 4):
        x = torch.randn(batch, 3, 6, 6, generator=g) * 2 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        upstream = torch.randn(batch, 5, generator=g)
        got, expected = forward_backward(compiled, x, upstream), forward_backward(eager, x, upstream)
        # terms summed along a step: conv 27, group norm's passes over 2*36*4, linear 288, RMS 16,
        # linear 16, and as many again backward plus the weight gradients over the batch
        terms = 2 * (27 + 3 * 2 * 36 * 4 + 288 + 16 + 16) + batch * (288 + 16 + 36 * 8)
        for key, e in expected.items():
            tol = training_tolerance("float32", steps=0, reduction_size=terms, scale=float(e.abs().max()))
            torch.testing.assert_close(got[key], e, **tol.kwargs, msg=key)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
