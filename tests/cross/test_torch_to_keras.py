"""State trained in PyTorch, converted through normkit, evaluates in Keras (channels-last) as it
does in PyTorch; and back."""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit.testing.tolerances import agreement_tolerance, centering_gain

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
nt = pytest.importorskip(
    "normkit_tensorflow", reason="normkit-tensorflow is not installed (tox -e cross installs it)"
)


def trained_batch_norm() -> object:
    torch.manual_seed(0)
    module = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        module.bias.uniform_(-1.0, 1.0)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(8):
        optimizer.zero_grad()
        (module(torch.randn(16, 4, 6, 6) * 3 + 2) ** 2).mean().backward()
        optimizer.step()
    return module.eval()


def test_a_torch_batch_norm_evaluates_identically_as_a_keras_layer_on_channels_last_data() -> None:
    module = trained_batch_norm()
    state = normkit.BatchNorm(preset="torch")
    state.load_state_dict(module.state_dict())  # torch.nn's own keys; eps and momentum are torch's defaults
    layer = nt.BatchNormalization.from_state_dict(state.state_dict(), preset="keras", axis=-1)
    x = torch.randn(5, 4, 6, 6) * 3 + 2
    expected = module(x).detach().numpy()
    got = layer(x.permute(0, 2, 3, 1).numpy(), training=False).numpy().transpose(0, 3, 1, 2)
    state64 = {k: v.detach().double().numpy() for k, v in module.state_dict().items()}
    gain = centering_gain(state64["running_mean"], state64["running_var"], module.eps, state64["weight"])
    tolerance = agreement_tolerance("float32", centering_gain=gain)  # two frameworks' eval outputs
    np.testing.assert_allclose(got, expected, **tolerance.kwargs)
    assert layer.epsilon == module.eps and layer.momentum == pytest.approx(0.9)

    back = normkit.BatchNorm.from_state_dict(layer.state_dict())  # and back into PyTorch
    restored = torch.nn.BatchNorm2d(4).eval()
    restored.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in back.state_dict().items() if k != "_metadata"}
    )
    # the same state back in the same torch.nn layer: bit for bit
    np.testing.assert_array_equal(restored(x).detach().numpy(), expected)


def test_a_torch_layer_norm_evaluates_identically_as_a_keras_layer() -> None:
    torch.manual_seed(1)
    module = torch.nn.LayerNorm(6)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        module.bias.uniform_(-1.0, 1.0)
    state = normkit.LayerNorm(6, preset="torch")
    state.load_state_dict(module.state_dict())
    layer = nt.LayerNormalization.from_state_dict(state.state_dict())
    x = torch.randn(3, 5, 6) * 2 - 1
    expected = module(x).detach().numpy()
    x64 = x.double().numpy()
    gain = centering_gain(
        x64.mean(axis=-1), x64.var(axis=-1), 1e-5, float(module.weight.detach().abs().max())
    )
    tolerance = agreement_tolerance("float32", centering_gain=gain)
    np.testing.assert_allclose(layer(x.numpy()).numpy(), expected, **tolerance.kwargs)
    assert layer.epsilon == 1e-5
