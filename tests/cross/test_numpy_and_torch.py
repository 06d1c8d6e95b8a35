"""NumPy and PyTorch backends against each other on the same inputs, and state moving between them."""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit.testing.tolerances import agreement_tolerance, centering_gain, statistics_tolerance

torch = pytest.importorskip("torch")
normkit_torch = pytest.importorskip(
    "normkit_torch", reason="normkit-torch is not installed (tox -e cross installs it)"
)


@pytest.mark.parametrize("preset", ["torch", "keras"])
def test_the_same_layer_trained_on_either_backend_holds_the_same_state(preset: str) -> None:
    rng = np.random.default_rng(0)
    on_numpy = normkit.BatchNorm(preset=preset, axis=1)
    on_torch = normkit.BatchNorm(preset=preset, axis=1)
    magnitude = 0.0
    for _ in range(20):
        x = rng.normal(3.0, 2.0, size=(8, 4, 5, 5)).astype(np.float32)
        magnitude = max(magnitude, float(np.abs(x).max()))
        y_numpy = on_numpy(x)
        y_torch = on_torch(torch.from_numpy(x))
        x64 = x.astype(np.float64)
        gain = centering_gain(x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3)), on_numpy.eps)
        np.testing.assert_allclose(
            y_torch.numpy(), y_numpy, **agreement_tolerance("float32", centering_gain=gain).kwargs
        )
    for key, statistic in (("running_mean", "mean"), ("running_var", "var")):
        tolerance = statistics_tolerance("float32", statistic, magnitude).pairwise()
        np.testing.assert_allclose(getattr(on_torch, key).numpy(), getattr(on_numpy, key), **tolerance.kwargs)
    assert on_torch.num_batches_tracked == on_numpy.num_batches_tracked == 20


def test_torch_module_state_evaluates_identically_in_numpy_and_back() -> None:
    torch.manual_seed(0)
    module = normkit_torch.BatchNorm2d(4)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        module.bias.uniform_(-1.0, 1.0)
    for _ in range(5):
        module(torch.randn(8, 4, 3, 3) * 2 + 5)
    module.eval()
    state = {k: v.numpy() if v.dim() else int(v) for k, v in module.state_dict().items()}
    layer = normkit.BatchNorm(preset="torch").eval()
    layer.load_state_dict(state)
    x = torch.randn(3, 4, 3, 3) * 2 + 5
    gain = centering_gain(*(state[k] for k in ("running_mean", "running_var")), module.eps, state["weight"])
    tolerance = agreement_tolerance("float32", centering_gain=gain)
    np.testing.assert_allclose(layer(x.numpy()), module(x).detach().numpy(), **tolerance.kwargs)

    back = normkit_torch.BatchNorm2d(4).eval()
    back.load_state_dict({k: torch.as_tensor(v) for k, v in layer.state_dict().items() if k != "_metadata"})
    assert torch.equal(back(x), module(x))


def test_layer_norm_over_non_trailing_axes_agrees() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(-2.0, 3.0, size=(4, 5, 6)).astype(np.float32)
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    y_numpy = normkit.layer_norm(x, weight=weight, axis=(0, 2))
    y_torch = normkit.layer_norm(torch.from_numpy(x), weight=torch.from_numpy(weight), axis=(0, 2))
    x64 = x.astype(np.float64)
    gain = centering_gain(x64.mean(axis=(0, 2)), x64.var(axis=(0, 2)), 1e-5, np.abs(weight).max())
    np.testing.assert_allclose(
        y_torch.numpy(), y_numpy, **agreement_tolerance("float32", centering_gain=gain).kwargs
    )
