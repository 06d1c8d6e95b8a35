"""The drop-in layers' fast paths (:mod:`normkit_torch.modules`) against their oracles.

Where every tensor a layer holds is in the input's compute dtype, the layers call ATen's op on
their own tensors as ``torch.nn`` does (batch norm's running statistics updated in place by
ATen), and the biased estimator of the keras/flax/onnx presets updates the buffers in place
around ATen's batch statistics; everything else goes through the kernels
(:mod:`normkit_torch.kernels`, ``group_norm``, ``rms_norm``). Nothing is cached: the path is
chosen on every call from the tensors' dtypes and the layer's attributes, so ``.double()``,
``.half()``, a channels-last input, a changed estimator or RMS option, and train/eval switches
take effect at once. The oracles:

* ``torch.nn``'s own layer, bit for bit, where the module docstring promises it (outputs,
  gradients, running statistics, ``num_batches_tracked``);
* the kernels themselves, bit for bit, for the paths the docstring does not compare with
  ``torch.nn`` (the biased estimator, half-precision layers): the fast path must be the same
  computation;
* the float64 reference (:mod:`normkit.reference`) with the derived tolerances
  (:mod:`normkit.testing.tolerances`) for the biased running variance.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import normkit_torch
from normkit import reference
from normkit.testing import tolerances
from normkit_torch import kernels, modules
from normkit_torch.rms_norm import rms_norm


def assert_identical(got: torch.Tensor | None, expected: torch.Tensor | None, what: str = "") -> None:
    if got is None or expected is None:
        assert got is None and expected is None, what
        return
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    assert torch.equal(got, expected), f"{what}: max difference {(got - expected).abs().max().item():.3g}"


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def step(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One call with autograd as in training (the parameters require grad, the input does not),
    and a backward pass of a weighted sum, so that every gradient is exercised."""
    module.zero_grad(set_to_none=True)
    y = module(x)
    if y.requires_grad:
        weights = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).reshape(y.shape)
        (y * weights).sum().backward()
    return y


def assert_same_state(ours: nn.Module, stock: nn.Module) -> None:
    for key, value in stock.state_dict().items():
        assert_identical(ours.state_dict()[key], value, key)


def _randomize(*modules: nn.Module, seed: int) -> None:
    """The same random affine parameters in every module (first module's draw)."""
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in modules[0].state_dict().items()}
    with torch.no_grad():
        for name in ("weight", "bias"):
            if name in state and state[name].is_floating_point():
                state[name] = torch.randn_like(state[name]) * 0.5 + 1
    for m in modules:
        m.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Batch norm
# --------------------------------------------------------------------------------------------

CHANNEL_CASES = [
    (nn.BatchNorm1d, normkit_torch.BatchNorm1d, (6, 4)),
    (nn.BatchNorm1d, normkit_torch.BatchNorm1d, (3, 4, 5)),
    (nn.BatchNorm2d, normkit_torch.BatchNorm2d, (2, 4, 3, 5)),
    (nn.BatchNorm3d, normkit_torch.BatchNorm3d, (2, 4, 2, 3, 2)),
]


@pytest.mark.parametrize(("stock_class", "normkit_class", "shape"), CHANNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [{}, {"track_running_stats": False}, {"affine": False}, {"momentum": None}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_batch_norm_fast_path_is_torch_nn_bit_for_bit(
    stock_class, normkit_class, shape, dtype, options
) -> None:
    stock = stock_class(4, dtype=dtype, **options)
    ours = normkit_class(4, dtype=dtype, **options)
    _randomize(stock, ours, seed=1)
    torch.manual_seed(2)
    for mode in ("train", "train", "eval", "train", "eval", "eval"):
        x = (torch.randn(shape, dtype=dtype) * 3 + 2).detach()
        stock.train(mode == "train")
        ours.train(mode == "train")
        with torch.no_grad() if mode == "eval" else torch.enable_grad():
            assert_identical(step(ours, x), step(stock, x), mode)
        for a, b in zip(grads(ours), grads(stock), strict=True):
            assert_identical(a, b, "gradient")
        assert_same_state(ours, stock)


def test_batch_norm_channels_last_and_half_input_are_torch_nn_bit_for_bit() -> None:
    """Channels-last memory, and float16/bfloat16 input to a float32 layer (autocast's case),
    take the fast path too: ``torch.nn``'s results, bit for bit."""
    stock, ours = nn.BatchNorm2d(6), normkit_torch.BatchNorm2d(6)
    _randomize(stock, ours, seed=3)
    torch.manual_seed(4)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mode in ("train", "eval"):
            x = (torch.randn(4, 6, 3, 5) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
            stock.train(mode == "train")
            ours.train(mode == "train")
            y = step(ours, x)
            assert_identical(y, step(stock, x), f"{dtype} {mode}")
            assert y.is_contiguous(memory_format=torch.channels_last)
            for a, b in zip(grads(ours), grads(stock), strict=True):
                assert_identical(a, b, "gradient")
            assert_same_state(ours, stock)


def kernel_batch_norm(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training call of ``module`` (tracking running statistics, momentum set) through the
    general kernel, on clones of its buffers: ``(y, new running mean, new running var)``."""
    y, mean, var = kernels.batch_norm(
        x,
        module.weight,
        module.bias,
        module.running_mean.clone(),
        module.running_var.clone(),
        True,
        module.momentum,
        module.eps,
        1,
        module.unbiased_running_var,
    )
    return y, mean, var


@pytest.mark.parametrize("preset", ["keras", "flax", "onnx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_biased_estimator_update_in_place_is_the_kernel_s(preset: str, dtype: torch.dtype) -> None:
    """The keras/flax/onnx presets' in-place update (kernels.batch_norm_biased_update) gives
    the kernel's output, gradients and running statistics bit for bit, and the running
    variance is the biased one (against the float64 reference, derived tolerance)."""
    ours = normkit_torch.BatchNorm2d(5, preset=preset, dtype=dtype)
    twin = copy.deepcopy(ours)
    _randomize(ours, twin, seed=5)
    torch.manual_seed(6)
    magnitude = 0.0
    for _ in range(3):
        x = torch.randn(3, 5, 4, 2, dtype=dtype) * 2 + 3
        magnitude = max(magnitude, x.abs().max().item())
        before_mean, before_var = ours.running_mean.clone(), ours.running_var.clone()
        expected_y, expected_mean, expected_var = kernel_batch_norm(twin, x)
        (expected_y * torch.linspace(-1, 2, x.numel(), dtype=dtype).reshape(x.shape)).sum().backward()
        y = step(ours, x)
        assert_identical(y, expected_y, "output")
        assert_identical(ours.weight.grad, twin.weight.grad, "weight gradient")
        assert_identical(ours.bias.grad, twin.bias.grad, "bias gradient")
        twin.zero_grad(set_to_none=True)
        assert_identical(ours.running_mean, expected_mean, "running_mean")
        assert_identical(ours.running_var, expected_var, "running_var")
        with torch.no_grad():
            twin.running_mean.copy_(expected_mean)
            twin.running_var.copy_(expected_var)
        _, ref_mean, ref_var = reference.batch_norm(
            x.numpy(),
            ours.weight.detach().numpy(),
            ours.bias.detach().numpy(),
            before_mean.numpy(),
            before_var.numpy(),
            training=True,
            momentum=ours.momentum,
            eps=ours.eps,
            axis=1,
            unbiased_running_var=False,
        )
        name = "float64" if dtype == torch.float64 else "float32"
        for got, ref, stat in ((ours.running_mean, ref_mean, "mean"), (ours.running_var, ref_var, "var")):
            bound = tolerances.statistics_tolerance(name, stat, magnitude).bound(ref, 0.0)
            tolerances.assert_within(np.abs(got.numpy() - ref), bound, f"running_{stat}")
    assert int(ours.num_batches_tracked) == 3
    ours.eval()
    with torch.no_grad():
        x = torch.randn(3, 5, 4, 2, dtype=dtype)
        expected = kernels.batch_norm(
            x, ours.weight, ours.bias, ours.running_mean, ours.running_var, False, 0.0, ours.eps, 1, False
        )[0]
        assert_identical(ours(x), expected, "eval output")


def test_dtype_layout_and_estimator_changes_take_effect_at_once() -> None:
    """No cached decision survives a change: ``.double()``, ``.half()`` (the kernel's path,
    statistics in float32), back to ``.float()``, channels-last input, and a changed estimator
    each give their oracle's result on the very next call."""
    torch.manual_seed(7)
    ours, stock = normkit_torch.BatchNorm2d(4), nn.BatchNorm2d(4)
    _randomize(ours, stock, seed=8)
    x = torch.randn(2, 4, 3, 3) * 2 + 1
    assert_identical(step(ours, x), step(stock, x), "float32")
    ours.double()
    stock.double()
    assert_identical(step(ours, x.double()), step(stock, x.double()), "float64")
    assert_same_state(ours, stock)
    ours.half()
    twin = copy.deepcopy(ours)
    expected_y, expected_mean, expected_var = kernel_batch_norm(twin, x.half())
    assert_identical(step(ours, x.half()), expected_y, "half layer")
    assert_identical(ours.running_mean, expected_mean, "half layer running_mean")
    assert_identical(ours.running_var, expected_var, "half layer running_var")
    ours.float()
    stock.float()
    stock.load_state_dict(ours.state_dict())
    xl = x.contiguous(memory_format=torch.channels_last)
    assert_identical(step(ours, xl), step(stock, xl), "float32 again, channels-last")
    assert_same_state(ours, stock)
    ours.unbiased_running_var = False  # the biased estimator from now on
    twin = copy.deepcopy(ours)
    expected_y, expected_mean, expected_var = kernel_batch_norm(twin, x)
    assert_identical(step(ours, x), expected_y, "biased")
    assert_identical(ours.running_var, expected_var, "biased running_var")
    ours.eval()
    stock.eval()
    stock.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert_identical(ours(x), stock(x), "eval")


@pytest.mark.parametrize("preset", ["torch", "keras"])
def test_a_failed_call_changes_no_state(preset: str) -> None:
    """One value per channel in training under the torch preset raises before anything moves
    (``torch.nn`` increments ``num_batches_tracked`` first); a wrong channel count raises
    before anything moves under every preset."""
    ours = normkit_torch.BatchNorm1d(3, preset=preset)
    ours(torch.randn(4, 3))
    before = copy.deepcopy(ours.state_dict())
    if preset == "torch":
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            ours(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected num_features=3"):
        ours(torch.randn(4, 5))
    for key, value in before.items():
        assert_identical(ours.state_dict()[key], value, key)
    instance = normkit_torch.InstanceNorm1d(3, track_running_stats=True, preset=preset)
    before = copy.deepcopy(instance.state_dict())
    if preset == "torch":
        with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
            instance(torch.randn(2, 3, 1))
    for key, value in before.items():
        assert_identical(instance.state_dict()[key], value, key)


# --------------------------------------------------------------------------------------------
# Instance norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [{}, {"affine": True}, {"affine": True, "track_running_stats": True}, {"track_running_stats": True}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_instance_norm_fast_path_is_torch_nn_bit_for_bit(dtype: torch.dtype, options: dict) -> None:
    stock, ours = (
        nn.InstanceNorm2d(4, dtype=dtype, **options),
        normkit_torch.InstanceNorm2d(4, dtype=dtype, **options),
    )
    if options.get("affine"):
        _randomize(stock, ours, seed=9)
    torch.manual_seed(10)
    for mode in ("train", "eval", "train", "eval"):
        x = torch.randn(3, 4, 3, 5, dtype=dtype) * 2 - 1
        stock.train(mode == "train")
        ours.train(mode == "train")
        assert_identical(step(ours, x), step(stock, x), mode)
        for a, b in zip(grads(ours), grads(stock), strict=True):
            assert_identical(a, b, "gradient")
        assert_same_state(ours, stock)
    unbatched = torch.randn(4, 3, 5, dtype=dtype)
    assert_identical(ours(unbatched), stock(unbatched), "unbatched")


@pytest.mark.parametrize("track_running_stats", [False, True])
def test_instance_norm_other_paths_are_the_kernel_s(track_running_stats: bool) -> None:
    """The keras preset (affine by default; with running statistics the biased estimator, the
    kernel's path) and a half-precision layer give the kernel's results bit for bit."""
    torch.manual_seed(11)
    for preset, dtype in (("keras", torch.float32), ("torch", torch.float16)):
        ours = normkit_torch.InstanceNorm2d(4, track_running_stats=track_running_stats, preset=preset)
        if preset == "keras":
            _randomize(ours, seed=12)
        ours.to(dtype)
        x = (torch.randn(2, 4, 3, 3) * 2 + 1).to(dtype)
        running = (None, None)
        if track_running_stats:
            running = (ours.running_mean.clone(), ours.running_var.clone())
        expected, mean, var = kernels.instance_norm(
            x, ours.weight, ours.bias, *running, True, ours.momentum, ours.eps, 1, ours.unbiased_running_var
        )
        assert_identical(ours(x), expected, f"{preset} {dtype}")
        if track_running_stats:
            assert_identical(ours.running_mean, mean, "running_mean")
            assert_identical(ours.running_var, var, "running_var")


# --------------------------------------------------------------------------------------------
# Layer norm and RMS norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"elementwise_affine": False}, {"bias": False}], ids=str)
def test_layer_norm_fast_path_is_torch_nn_and_the_kernel_s(dtype: torch.dtype, options: dict) -> None:
    """Parameters in the input's dtype (also a ``.half()`` layer) take ATen's op directly:
    ``torch.nn``'s results; float32 parameters beside half input take the kernel's path, which
    is ATen's mixed-type op, also ``torch.nn``'s."""
    stock, ours = nn.LayerNorm(6, **options), normkit_torch.LayerNorm(6, **options)
    _randomize(stock, ours, seed=13)
    torch.manual_seed(14)
    x = (torch.randn(3, 2, 6) * 3 + 1).to(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    for module_dtype in (torch.float32, dtype) if half else (dtype,):
        stock.to(module_dtype)
        ours.to(module_dtype)
        y = step(ours, x)
        assert_identical(y, step(stock, x), f"{module_dtype} layer")
        for a, b in zip(grads(ours), grads(stock), strict=True):
            assert_identical(a, b, "gradient")
        assert_identical(y, kernels.layer_norm(x, ours.weight, ours.bias, (1, 2)[-1:], ours.eps), "kernel")


def test_rms_norm_fast_path_and_option_changes() -> None:
    """The torch preset is ``torch.nn.RMSNorm`` bit for bit; setting ``weight_offset`` or
    ``cast`` afterwards (validated) switches to the spec's computation at once, and back."""
    torch.manual_seed(15)
    stock, ours = nn.RMSNorm(6), normkit_torch.RMSNorm(6)
    _randomize(stock, ours, seed=16)
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = (torch.randn(3, 2, 6) * 3).to(dtype)
        stock.to(dtype)
        ours.to(dtype)
        assert_identical(step(ours, x), step(stock, x), str(dtype))
        for a, b in zip(grads(ours), grads(stock), strict=True):
            assert_identical(a, b, "gradient")
    x = (torch.randn(3, 2, 6) * 3).half()
    ours.half()
    ours.cast = "before_weight"
    assert_identical(
        ours(x), rms_norm(x, ours.weight, (2,), torch.finfo(torch.float32).eps, 0.0, True), "cast"
    )
    ours.cast = "after_weight"
    ours.weight_offset = 1.0
    expected = rms_norm(x, ours.weight, (2,), torch.finfo(torch.float32).eps, 1.0, False)
    assert_identical(ours(x), expected, "weight_offset")
    assert "weight_offset=1.0" in repr(ours)
    ours.weight_offset = 0.0
    stock.half()
    stock.load_state_dict(ours.state_dict())
    assert_identical(ours(x), stock(x), "torch's options again")
    with pytest.raises(ValueError, match="cast"):
        ours.cast = "sideways"
    with pytest.raises(TypeError, match="weight_offset=nan"):
        ours.weight_offset = float("nan")
    assert_identical(ours(x), stock(x), "a refused option changes nothing")


def test_rms_norm_pickled_with_plain_option_attributes_loads() -> None:
    """A layer pickled when ``weight_offset`` and ``cast`` were plain attributes unpickles with
    them (``__setstate__``) and computes the same."""
    ours = normkit_torch.RMSNorm(4, preset="gemma")
    state = ours.__getstate__() if hasattr(ours, "__getstate__") else ours.__dict__
    old = dict(state)
    old["weight_offset"], old["cast"] = old.pop("_weight_offset"), old.pop("_cast")
    del old["_torch_options"]
    loaded = normkit_torch.RMSNorm.__new__(normkit_torch.RMSNorm)
    loaded.__setstate__(old)
    assert (loaded.weight_offset, loaded.cast) == (1.0, "after_weight")
    x = torch.randn(2, 4)
    assert_identical(loaded(x), ours(x))
    assert_identical(pickle.loads(pickle.dumps(ours))(x), ours(x))


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches emptied before and after: a frame that raised while being traced is not
    traced again in the same process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    "make",
    [lambda: normkit_torch.LayerNorm(4), lambda: normkit_torch.RMSNorm(4)],
    ids=["LayerNorm", "RMSNorm"],
)
def test_trailing_shape_errors_eager_and_compiled(make) -> None:
    """ATen checks the trailing shape on the fast path; the module's error replaces ATen's, in
    eager mode and under ``torch.compile``; ATen's other errors pass through."""
    layer = make()
    message = r"input has shape \(2, 5\): expected trailing dimensions normalized_shape=\(4,\)"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"input has shape \(\): expected trailing dimensions"):
        layer(torch.tensor(1.0))
    # without fullgraph: under fullgraph=True Dynamo reports any exception raised in traced code
    # as its own error (as it did before the fast paths)
    compiled = torch.compile(make(), backend="aot_eager")
    with pytest.raises(ValueError, match=message):
        compiled(torch.randn(2, 5))
    plain = type(layer)(4, elementwise_affine=False)  # no parameter: the fast path for any dtype
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        plain(torch.ones(2, 4, dtype=torch.int64))  # ATen has no integer kernel


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    "make",
    [
        lambda: normkit_torch.LayerNorm(4),
        lambda: normkit_torch.RMSNorm(4),
        lambda: normkit_torch.RMSNorm(4, preset="onnx"),
        lambda: normkit_torch.BatchNorm1d(4, preset="keras"),
        lambda: normkit_torch.InstanceNorm1d(4, affine=True, track_running_stats=True),
    ],
    ids=["LayerNorm", "RMSNorm", "RMSNorm-onnx", "BatchNorm1d-keras", "InstanceNorm1d-tracking"],
)
def test_fast_paths_compile_without_graph_breaks(make) -> None:
    """``fullgraph=True`` compiles the fast paths (train then eval); results, gradients and
    buffers are eager's bit for bit (``aot_eager`` runs the same ATen ops)."""
    torch.manual_seed(17)
    eager = make()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for mode in ("train", "eval"):
        x = torch.randn(3, 4, 4) * 2 + 1
        eager.train(mode == "train")
        compiled_module.train(mode == "train")
        compiled_module.zero_grad(set_to_none=True)
        y = compiled(x)
        if y.requires_grad:
            y.square().sum().backward()
        assert_identical(y, step(eager, x) if mode == "train" else eager(x), mode)
        assert_same_state(compiled_module, eager)


@pytest.mark.parametrize("preset", ["keras", "flax", "onnx", "llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rms_norm_presets_are_the_kernel_s(preset: str, dtype: torch.dtype) -> None:
    """Every preset's RMS norm, whichever path it takes (ATen's op in float32/float64, where
    the cast order cannot matter, on ``w + o`` for Gemma's offset), is the spec's computation
    (normkit_torch.rms_norm) bit for bit, its weight gradient included."""
    torch.manual_seed(18)
    ours = normkit_torch.RMSNorm(6, preset=preset)
    _randomize(ours, seed=19)
    x = (torch.randn(3, 2, 6) * 3).to(dtype)
    for layer_dtype in (torch.float32, dtype):
        ours.to(layer_dtype)
        eps = ours.eps if ours.eps is not None else torch.finfo(kernels.compute_dtype(x)).eps
        weight = ours.weight.detach().clone().requires_grad_()
        expected = rms_norm(x, weight, (2,), eps, ours.weight_offset, ours.cast == "before_weight")
        (expected * torch.linspace(-1, 2, x.numel(), dtype=x.dtype).reshape(x.shape)).sum().backward()
        assert_identical(step(ours, x), expected, f"{layer_dtype} layer")
        assert_identical(ours.weight.grad, weight.grad, f"{layer_dtype} layer: weight gradient")


def test_the_paths_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which calls take ATen's op directly (the kernels are not entered), which the in-place
    biased update, and which the kernel (a half-precision layer; one value per channel where
    the preset allows it)."""
    entered: list[str] = []
    for name in ("batch_norm", "instance_norm", "layer_norm", "batch_norm_biased_update"):
        original = getattr(kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            entered.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    x = torch.randn(2, 4, 3, 3)

    def paths(layer: nn.Module, x: torch.Tensor) -> list[str]:
        entered.clear()
        for training in (True, False):
            layer.train(training)
            layer(x)
        return list(entered)

    assert paths(normkit_torch.BatchNorm2d(4), x) == []
    assert paths(normkit_torch.BatchNorm2d(4).double(), x.double()) == []
    assert paths(normkit_torch.BatchNorm2d(4, track_running_stats=False), x) == []
    assert paths(normkit_torch.BatchNorm2d(4, preset="keras"), x) == ["batch_norm_biased_update"]
    assert paths(normkit_torch.BatchNorm2d(4).half(), x.half()) == ["batch_norm", "batch_norm"]
    assert paths(normkit_torch.BatchNorm2d(4, preset="keras"), x[:1, :, :1, :1]) == ["batch_norm"]
    assert paths(normkit_torch.InstanceNorm2d(4), x) == []
    assert paths(normkit_torch.InstanceNorm2d(4, affine=True, track_running_stats=True), x) == []
    # the biased estimator's update in training; eval applies running statistics (ATen's op)
    assert paths(normkit_torch.InstanceNorm2d(4, preset="keras", track_running_stats=True), x) == [
        "instance_norm"
    ]
    assert paths(normkit_torch.LayerNorm(3), x) == []
    assert paths(normkit_torch.LayerNorm(3), x.half()) == ["layer_norm", "layer_norm"]
    original_rms = modules.rms_norm
    monkeypatch.setattr(
        modules, "rms_norm", lambda *a, **k: entered.append("rms_norm") or original_rms(*a, **k)
    )
    assert paths(normkit_torch.RMSNorm(3), x) == []
    assert paths(normkit_torch.RMSNorm(3, preset="onnx"), x) == []  # the casts agree in float32
    assert paths(normkit_torch.RMSNorm(3, preset="onnx").half(), x.half()) == ["rms_norm", "rms_norm"]
    assert paths(normkit_torch.RMSNorm(3, preset="gemma"), x) == []  # ATen's op on 1 + w
    assert paths(normkit_torch.RMSNorm(3, preset="gemma").half(), x.half()) == ["rms_norm", "rms_norm"]
