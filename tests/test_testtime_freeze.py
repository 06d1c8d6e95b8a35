"""normkit.testtime.freeze on normkit's own layers: FrozenBatchNorm normalizes with the running
statistics in training mode too (the reference's eval output on the same arrays), independent
of the batch, never updates, saves and loads; the original layers are unchanged; bad input."""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.testing.tolerances import centering_gain, output_tolerance
from normkit.testtime import freeze, recalibrate


class Model:
    def __init__(self) -> None:
        self.bn = normkit.BatchNorm(3)
        self.ln = normkit.LayerNorm(3)


def trained() -> Model:
    model = Model()
    rng = np.random.default_rng(0)
    for _ in range(3):
        model.bn(rng.normal(2.0, 3.0, size=(8, 3, 4)).astype(np.float32))
    return model


def test_frozen_layers_normalize_with_their_running_statistics_in_training_mode() -> None:
    model = trained()
    before = model.bn.state_dict()
    frozen = freeze(model)
    assert isinstance(frozen.bn, normkit.FrozenBatchNorm) and frozen.ln is not model.ln
    layer = frozen.bn.train()
    assert layer.training is False
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(5, 3, 4)).astype(np.float32)
    y = layer(x)
    expected, _, _ = reference.batch_norm(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var, training=False,
        momentum=0.0, eps=layer.eps, axis=1, unbiased_running_var=True,
    )  # fmt: skip
    gain = centering_gain(layer.running_mean, layer.running_var, layer.eps, layer.weight)
    np.testing.assert_allclose(y, expected, **output_tolerance("float32", centering_gain=gain).kwargs)
    np.testing.assert_array_equal(np.concatenate([layer(x[i : i + 1]) for i in range(5)]), y)
    after = frozen.bn.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before if k != "_metadata")
    assert model.bn.training is True  # the original is untouched
    restored = normkit.FrozenBatchNorm.from_state_dict(frozen.bn.state_dict())
    np.testing.assert_array_equal(restored(x), y)


def test_containers_and_single_layers() -> None:
    model = trained()
    assert isinstance(freeze(model.bn), normkit.FrozenBatchNorm)
    assert isinstance(freeze([model.ln, model.bn])[1], normkit.FrozenBatchNorm)
    assert isinstance(freeze((model.bn,))[0], normkit.FrozenBatchNorm)
    assert isinstance(freeze({"a": model.bn})["a"], normkit.FrozenBatchNorm)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no batch norm that tracks running statistics; nothing to freeze"):
        freeze([normkit.LayerNorm(3)])
    with pytest.raises(ValueError, match=r"\['the layer'\] have no running statistics yet"):
        freeze(normkit.BatchNorm(3))
    frozen = freeze(trained().bn)
    with pytest.raises(ValueError, match="no batch norm that tracks running statistics"):
        recalibrate(frozen, [np.ones((2, 3), np.float32)], forward=frozen)  # fixed: nothing to recalibrate
