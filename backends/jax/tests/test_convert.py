"""``normkit_jax.convert``: PyTorch normalization layers become ``normkit_jax`` layers with the
same eval outputs (oracle: the ``torch.nn`` layer itself, trained a few steps so its running
statistics are its own), within the agreement tolerance of :mod:`normkit.testing.tolerances`."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normkit import StateDictError
from normkit.testing import tolerances
from normkit_jax import convert
from normkit_jax import nnx as nk

torch = pytest.importorskip("torch")

F32 = "float32"


def trained(module: Any, shape: tuple[int, ...]) -> Any:
    """``module`` with random affine parameters, after three training steps on data from
    ``N(2, 3^2)`` (so its running statistics are far from their initial values), in eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
        module.train()
        for _ in range(3):
            module(2.0 + 3.0 * torch.randn(shape, generator=generator))
    return module.eval()


def eval_gain(module: Any, x: np.ndarray, reduced: tuple[int, ...] | None) -> float:
    """The centering gain of the statistics the torch layer normalizes with in eval: its running
    statistics, or (without them) the input's own over ``reduced``."""
    weight = getattr(module, "weight", None)
    gamma = 1.0 if weight is None else float(weight.detach().abs().max())
    if getattr(module, "running_mean", None) is not None:
        mean, var = (
            getattr(module, name).numpy().astype(np.float64) for name in ("running_mean", "running_var")
        )
    else:
        x64 = x.astype(np.float64)
        mean, var = x64.mean(axis=reduced), x64.var(axis=reduced)
        if type(module).__name__ == "RMSNorm":
            mean, var = np.zeros_like(mean), (x64**2).mean(axis=reduced)
    return tolerances.centering_gain(mean, var, module.eps or float(np.finfo(np.float32).eps)) * gamma


# (module factory, input shape NCHW or (N, ..., normalized), per-channel (NHWC on the Flax side),
#  reduced axes of the statistics in the torch layout); eps=0.1 against variances near 9 moves
# the outputs by far more than the tolerance, so a lost eps fails

MODULES = [
    pytest.param(lambda: torch.nn.BatchNorm2d(6), (4, 6, 5, 5), True, (0, 2, 3), id="BatchNorm2d"),
    pytest.param(
        lambda: torch.nn.BatchNorm1d(6, momentum=0.3, affine=False),
        (8, 6),
        True,
        (0,),
        id="BatchNorm1d-no-affine",
    ),
    pytest.param(
        lambda: torch.nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        (4, 6, 5, 5),
        True,
        (2, 3),
        id="InstanceNorm2d-tracked",
    ),
    pytest.param(
        lambda: torch.nn.InstanceNorm2d(6, eps=0.1), (4, 6, 5, 5), True, (2, 3), id="InstanceNorm2d"
    ),
    pytest.param(lambda: torch.nn.GroupNorm(3, 6, eps=0.1), (4, 6, 5, 5), True, None, id="GroupNorm"),
    pytest.param(lambda: torch.nn.LayerNorm((6, 5, 5)), (4, 6, 5, 5), False, (1, 2, 3), id="LayerNorm-3d"),
    pytest.param(
        lambda: torch.nn.LayerNorm(5, eps=0.1, bias=False), (4, 6, 5), False, (2,), id="LayerNorm-no-bias"
    ),
    pytest.param(lambda: torch.nn.RMSNorm((5, 5)), (4, 6, 5, 5), False, (2, 3), id="RMSNorm-2d"),
    pytest.param(lambda: torch.nn.RMSNorm(5, eps=0.1), (4, 6, 5), False, (2,), id="RMSNorm"),
]


@pytest.mark.parametrize("api", ["nnx", "linen"])
@pytest.mark.parametrize(("factory", "shape", "per_channel", "reduced"), MODULES)
def test_eval_outputs_equal_torchs(
    factory: Any, shape: tuple[int, ...], per_channel: bool, reduced: Any, api: str
) -> None:
    module = trained(factory(), shape)
    x = (2.0 + 3.0 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).float()
    with torch.no_grad():
        expected = module(x).numpy().astype(np.float64)
    x_flax = x.numpy().transpose(0, *range(2, x.ndim), 1) if per_channel else x.numpy()
    if api == "nnx":
        y = convert.from_torch(module)(jnp.asarray(x_flax))
    else:
        layer, variables = convert.from_torch(module, api="linen")
        y = layer.apply(variables, jnp.asarray(x_flax))
    y = np.asarray(y, np.float64)
    if per_channel:
        y = y.transpose(0, -1, *range(1, y.ndim - 1))
    if reduced is None:  # group norm: the statistics of each sample's blocks
        blocks = x.numpy().reshape(shape[0], 3, -1)
        centering = tolerances.centering_gain(blocks.mean(axis=2), blocks.var(axis=2), module.eps)
        centering *= float(module.weight.detach().abs().max())
    else:
        centering = eval_gain(module, x.numpy(), reduced)
    bound = tolerances.agreement_tolerance(F32, centering_gain=centering).bound(expected, 0.0)
    tolerances.assert_within(np.abs(y - expected), bound, f"{type(module).__name__} eval output")


def test_state_is_copied_and_momentum_converted() -> None:
    """``weight``/``bias``/``running_mean``/``running_var`` are copied unchanged (the unbiased
    running variance included), momentum 0.1 becomes the decay 0.9, the layer is in eval mode."""
    module = trained(torch.nn.BatchNorm2d(4), (8, 4, 3, 3))
    layer = convert.from_torch(module)
    state = module.state_dict()
    for torch_name, flax_name in (
        ("weight", "scale"),
        ("bias", "bias"),
        ("running_mean", "mean"),
        ("running_var", "var"),
    ):
        np.testing.assert_array_equal(getattr(layer, flax_name)[...], state[torch_name].numpy())
    assert layer.momentum == pytest.approx(0.9) and layer.axis == -1 and layer.epsilon == module.eps
    assert layer.use_running_average is True
    assert convert.from_torch(module, channels_last=False).axis == 1


def test_continued_training_follows_flaxs_conventions() -> None:
    """One more training step on both sides: the running means agree (momentum 0.1 is decay 0.9),
    and the running variance takes Flax's biased batch variance where torch takes the unbiased."""
    module = trained(torch.nn.BatchNorm1d(3), (16, 3))
    layer = convert.from_torch(module)
    layer.train()
    old_mean, old_var = (
        module.running_mean.numpy().astype(np.float64),
        module.running_var.numpy().astype(np.float64),
    )
    x = (1.0 + 2.0 * torch.randn(16, 3, generator=torch.Generator().manual_seed(2))).float()
    module.train()
    with torch.no_grad():
        module(x)
    layer(jnp.asarray(x.numpy()))
    x64 = x.numpy().astype(np.float64)
    magnitude = float(np.abs(x64).max())
    expectations = (
        ("mean", layer.mean, module.running_mean, 0.9 * old_mean + 0.1 * x64.mean(axis=0)),
        ("var", layer.var, None, 0.9 * old_var + 0.1 * x64.var(axis=0)),
    )
    for stat, ours, theirs, expected in expectations:
        bound = tolerances.statistics_tolerance(F32, stat, magnitude).bound(expected, 0.0)
        tolerances.assert_within(np.abs(np.asarray(ours[...], np.float64) - expected), bound, stat)
        if theirs is not None:
            tolerances.assert_within(np.abs(theirs.numpy() - expected), bound, f"torch {stat}")
    unbiased = 0.9 * old_var + 0.1 * x64.var(axis=0, ddof=1)
    bound = tolerances.statistics_tolerance(F32, "var", magnitude).bound(unbiased, 0.0)
    tolerances.assert_within(np.abs(module.running_var.numpy() - unbiased), bound, "torch var")


def test_unconvertible_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="momentum=None is PyTorch's cumulative average"):
        convert.from_torch(torch.nn.BatchNorm2d(3, momentum=None))
    layer = convert.from_torch(torch.nn.BatchNorm2d(3, momentum=None), momentum=0.95)
    assert layer.momentum == 0.95
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert.from_torch(torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="channels last only"):
        convert.from_torch(torch.nn.GroupNorm(1, 3), channels_last=False)
    with pytest.raises(ValueError, match="Linear: not a PyTorch normalization layer"):
        convert.from_torch(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="api='keras'"):
        convert.from_torch(torch.nn.BatchNorm2d(3), api="keras")


def test_load_into_nnx_checks_everything_before_assigning() -> None:
    layer = nk.BatchNorm(3, rngs=nnx.Rngs(0))
    good = {
        "weight": np.full(3, 2.0),
        "bias": np.ones(3),
        "running_mean": np.ones(3),
        "running_var": np.full(3, 4.0),
    }
    with pytest.raises(StateDictError, match=r"missing \['running_var'\]"):
        convert.load_into_nnx(layer, {k: v for k, v in good.items() if k != "running_var"})
    with pytest.raises(StateDictError, match=r"running_var has shape \(4,\)"):
        convert.load_into_nnx(layer, {**good, "running_var": np.ones(4)})
    with pytest.raises(StateDictError, match=r"\['extra'\] that no Flax variable takes"):
        convert.load_into_nnx(layer, {**good, "extra": np.ones(3)})
    with pytest.raises(StateDictError, match="weight has dtype int64"):
        convert.load_into_nnx(layer, {**good, "weight": np.ones(3, np.int64)})
    np.testing.assert_array_equal(layer.scale[...], np.ones(3))  # nothing assigned
    model_state = {f"block.bn.{k}": v for k, v in good.items()} | {
        "block.bn.num_batches_tracked": np.int64(3)
    }
    convert.load_into_nnx(layer, model_state, prefix="block.bn.")
    np.testing.assert_array_equal(layer.var[...], np.full(3, 4.0))


def test_tensors_of_any_dtype_and_device_are_read() -> None:
    array = convert.to_numpy(torch.arange(3, dtype=torch.bfloat16))
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, [0.0, 1.0, 2.0])
    variables = convert.linen_variables({"weight": torch.ones(2, 3, dtype=torch.float64)})
    assert variables["params"]["scale"].shape == (2, 3) and variables["params"]["scale"].dtype == jnp.float32


def test_importing_convert_does_not_import_torch() -> None:
    code = "import sys, normkit_jax.convert; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
