"""normkit.testtime.prior_mixing on normkit's own layers: every layer's eval output against the
float64 formula (normkit.testing.testtime) for N in {0, 16, inf} and n in {1, 2, 64}, N=inf
bit-identical to standard eval, training untouched, removal exact, and bad input refused."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import normkit
from normkit.testing.testtime import prior_mixed_reference, prior_mixing_bound
from normkit.testing.tolerances import assert_within
from normkit.testtime import prior_mixing


class Model:
    """Two batch norms, channels-first (torch preset) and channels-last (keras preset), and
    a record of every layer's input and output."""

    def __init__(self) -> None:
        self.first = normkit.BatchNorm(3)
        self.second = normkit.BatchNorm(3, preset="keras", axis=-1)
        self.seen: list[tuple[str, np.ndarray, np.ndarray]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = self.first(x)
        self.seen.append(("first", x, h))
        z = np.moveaxis(np.tanh(h), 1, -1)
        y = self.second(z)
        self.seen.append(("second", z, y))
        return y


def trained(seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    model = Model()
    for _ in range(4):
        model(rng.normal(1.0, 2.0, size=(16, 3, 4, 4)).astype(np.float32))
    model.first.load_state_dict(
        model.first.state_dict()
        | {"weight": np.array([0.5, 1.0, 2.0], np.float32), "bias": np.full(3, 0.25, np.float32)}
    )
    model.first.eval()
    model.second.eval()
    return model


@pytest.mark.parametrize("N", [0, 16, math.inf])
@pytest.mark.parametrize("n", [1, 2, 64])
def test_every_layer_follows_the_formula(N: float, n: int) -> None:
    model = trained()
    x = np.random.default_rng(n).normal(3.0, 5.0, size=(n, 3, 4, 4)).astype(np.float32)  # shifted
    plain = model(x)
    model.seen.clear()
    with prior_mixing(model, N):
        y = model(x)
    if math.isinf(N):
        np.testing.assert_array_equal(y, plain)  # standard eval, bit for bit
    for name, layer_input, layer_output in model.seen:
        layer = getattr(model, name)
        ref, mean, var = prior_mixed_reference(
            layer_input, layer.running_mean, layer.running_var, layer.weight, layer.bias,
            eps=layer.eps, axis=layer.axis, N=N,
        )  # fmt: skip
        bound = prior_mixing_bound(
            layer_input, ref, mean, var, layer.weight, eps=layer.eps, axis=layer.axis, N=N
        )
        assert_within(np.abs(layer_output - ref), bound, f"{name}, N={N}, n={n}")
    np.testing.assert_array_equal(model(x), plain)  # removed on leaving the block


def test_the_batch_share_moves_the_output_and_the_running_statistics_stay() -> None:
    model = trained()
    before = model.first.state_dict()
    x = np.random.default_rng(5).normal(3.0, 5.0, size=(4, 3, 4, 4)).astype(np.float32)
    outputs = {}
    for N in (0, 16, math.inf):
        with prior_mixing(model, N):
            outputs[N] = model.first(x)
    assert not np.allclose(outputs[16], outputs[math.inf]) and not np.allclose(outputs[16], outputs[0])
    after = model.first.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before if k != "_metadata")


def test_training_mode_is_unchanged_and_remove_is_idempotent() -> None:
    mixed, plain = trained(), trained()
    handle = prior_mixing(mixed, 0)
    x = np.random.default_rng(6).normal(size=(8, 3, 4, 4)).astype(np.float32)
    for m in (mixed, plain):
        m.first.train()
    np.testing.assert_array_equal(mixed.first(x), plain.first(x))
    np.testing.assert_array_equal(mixed.first.running_var, plain.first.running_var)
    assert handle.active
    handle.remove()
    handle.remove()
    assert not handle.active


@pytest.mark.parametrize(
    ("N", "message"),
    [
        (-1, "N=-1: expected a number >= 0"),
        (math.nan, "N=nan: expected a number >= 0"),
        ("16", "N='16': expected a number >= 0"),
        (True, "N=True: expected a number >= 0"),
    ],
)
def test_bad_prior_is_refused(N: object, message: str) -> None:
    model = trained()
    with pytest.raises(ValueError, match=re.escape(message)):
        prior_mixing(model, N)  # type: ignore[arg-type]
    assert getattr(model.first, "_eval_forward", None) is None


def test_no_batch_norm_one_value_per_channel_and_double_activation_are_refused() -> None:
    with pytest.raises(ValueError, match="no batch norm that tracks running statistics"):
        prior_mixing([normkit.LayerNorm(3)], 0)
    layer = normkit.BatchNorm(3)
    layer(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    layer.eval()
    with prior_mixing(layer, 16):
        with pytest.raises(ValueError, match=r"1 value per channel, whose unbiased variance is undefined"):
            layer(np.ones((1, 3), np.float32))
        with pytest.raises(ValueError, match=re.escape("prior mixing is active already on ['the layer']")):
            prior_mixing(layer, 0)
    with prior_mixing(layer, math.inf):  # no batch share: one value per channel is fine
        layer(np.ones((1, 3), np.float32))
