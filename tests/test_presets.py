"""The presets against the frameworks' own defaults (read from the installed frameworks where
they are installed, from their published specifications otherwise)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from normkit import presets

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_KERAS = importlib.util.find_spec("keras") is not None


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_preset_is_pytorchs_defaults() -> None:
    import torch

    p = presets.get_preset("torch")
    bn, ln, inorm = torch.nn.BatchNorm2d(3), torch.nn.LayerNorm(3), torch.nn.InstanceNorm2d(3)
    assert (p.momentum, p.momentum_weights, p.batch_norm_eps, p.axis) == (bn.momentum, "batch", bn.eps, 1)
    assert (p.layer_norm_eps, p.instance_norm_eps) == (ln.eps, inorm.eps)
    assert p.instance_norm_affine is inorm.affine is False
    assert p.running_var_estimator == "unbiased" and p.allow_single_value is False


@pytest.mark.skipif(not HAS_KERAS, reason="keras is not installed")
def test_keras_preset_is_keras_defaults() -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    p = presets.get_preset("keras")
    bn = keras.layers.BatchNormalization()
    assert (p.momentum, p.momentum_weights, p.batch_norm_eps, p.axis) == (
        bn.momentum,
        "running",
        bn.epsilon,
        bn.axis,
    )
    assert p.layer_norm_eps == keras.layers.LayerNormalization().epsilon
    assert p.instance_norm_eps == keras.layers.GroupNormalization(groups=-1).epsilon
    assert p.running_var_estimator == "biased" and p.allow_single_value is True


def test_flax_and_onnx_presets_follow_their_specifications() -> None:
    # flax.linen.BatchNorm: momentum 0.99, epsilon 1e-5, axis -1; LayerNorm/InstanceNorm epsilon 1e-6
    flax = presets.get_preset("flax")
    assert (flax.momentum, flax.batch_norm_eps, flax.layer_norm_eps, flax.instance_norm_eps, flax.axis) == (
        0.99,
        1e-5,
        1e-6,
        1e-6,
        -1,
    )
    # ONNX BatchNormalization-15: momentum 0.9 (running), epsilon 1e-5, NCHW, population variance
    onnx = presets.get_preset("onnx")
    assert (
        onnx.momentum,
        onnx.momentum_weights,
        onnx.batch_norm_eps,
        onnx.axis,
        onnx.running_var_estimator,
    ) == (0.9, "running", 1e-5, 1, "biased")


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_update_weight_is_the_same_exponential_average_in_either_convention(name: str) -> None:
    p = presets.get_preset(name)
    for weights in ("batch", "running"):
        assert presets.batch_weight(p.default_momentum(weights), weights) == pytest.approx(p.update_weight)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"preset='mxnet' is not a known preset; expected one of \['flax', 'gemma', 'keras', 'llama', 'onnx', 'torch'\]",
    ):
        presets.get_preset("mxnet")
