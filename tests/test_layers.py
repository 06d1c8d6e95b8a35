"""Layer semantics: training and eval, the running statistics, lazy state, state dicts, presets."""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.testing.tolerances import (
    agreement_tolerance,
    centering_gain,
    output_tolerance,
    statistics_tolerance,
)

rng = np.random.default_rng(42)


def batches(
    count: int, shape: tuple[int, ...] = (16, 3, 4, 4), loc: float = 1.0, scale: float = 2.0
) -> list[np.ndarray]:
    return [rng.normal(loc, scale, size=shape).astype(np.float32) for _ in range(count)]


def channel_gain(x: np.ndarray, eps: float = 1e-5, weight: object = None, axes=(0, 2, 3)) -> float:  # type: ignore[no-untyped-def]
    """:func:`centering_gain` of x's batch statistics over ``axes``."""
    x64 = x.astype(np.float64)
    return centering_gain(x64.mean(axis=axes), x64.var(axis=axes), eps, weight)


def test_cumulative_average_is_the_plain_mean_of_every_batch_statistic() -> None:
    data = batches(7)
    layer = normkit.BatchNorm(momentum=None)
    for x in data:
        layer(x)
    means = [x.astype(np.float64).mean(axis=(0, 2, 3)) for x in data]
    variances = [x.astype(np.float64).var(axis=(0, 2, 3), ddof=1) for x in data]
    assert layer.num_batches_tracked == 7
    magnitude = max(float(np.abs(x).max()) for x in data)
    for got, expected, statistic in (
        (layer.running_mean, np.mean(means, axis=0), "mean"),
        (layer.running_var, np.mean(variances, axis=0), "var"),
    ):
        np.testing.assert_allclose(
            got, expected, **statistics_tolerance("float32", statistic, magnitude).kwargs
        )


def test_exponential_average_keras_convention_equals_torch_with_one_minus_momentum() -> None:
    data = batches(5)
    torch_style = normkit.BatchNorm(momentum=0.25, running_var_estimator="biased")
    keras_style = normkit.BatchNorm(momentum=0.75, momentum_weights="running", running_var_estimator="biased")
    for x in data:
        np.testing.assert_array_equal(torch_style(x), keras_style(x))
    # 1 - 0.75 is 0.25 exactly: the same update runs, bit for bit
    np.testing.assert_array_equal(torch_style.running_mean, keras_style.running_mean)
    np.testing.assert_array_equal(torch_style.running_var, keras_style.running_var)


def test_eval_uses_running_statistics_and_changes_nothing() -> None:
    layer = normkit.BatchNorm()
    for x in batches(4):
        layer(x)
    state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items() if k != "_metadata"}
    x = batches(1)[0]
    y = layer.eval()(x)
    expected, _, _ = reference.batch_norm(
        x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
        training=False, momentum=0.1, eps=1e-5, axis=1, unbiased_running_var=True,
    )  # fmt: skip
    gain = centering_gain(layer.running_mean, layer.running_var, 1e-5, layer.weight)
    np.testing.assert_allclose(y, expected, **output_tolerance("float32", centering_gain=gain).kwargs)
    assert not layer.training
    for key, value in state.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)


def test_eval_without_tracked_statistics_uses_batch_statistics() -> None:
    x = batches(1)[0]
    layer = normkit.BatchNorm(track_running_stats=False).eval()
    y = layer(x)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 2, 3), keepdims=True), x64.var(axis=(0, 2, 3), keepdims=True)
    tolerance = output_tolerance("float32", centering_gain=channel_gain(x))
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), **tolerance.kwargs)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()


def test_instance_norm_with_tracked_statistics_uses_them_in_eval() -> None:
    layer = normkit.InstanceNorm(track_running_stats=True, affine=True)
    for x in batches(3, (4, 3, 5, 5)):
        layer(x)
    x = batches(1, (4, 3, 5, 5))[0]
    eval_y = layer.eval()(x)
    scale = (layer.weight / np.sqrt(layer.running_var.astype(np.float64) + 1e-5)).reshape(1, 3, 1, 1)
    expected = (x - layer.running_mean.reshape(1, 3, 1, 1)) * scale + layer.bias.reshape(1, 3, 1, 1)
    gain = centering_gain(layer.running_mean, layer.running_var, 1e-5, layer.weight)
    tolerance = output_tolerance("float32", centering_gain=gain)
    np.testing.assert_allclose(eval_y, expected, **tolerance.kwargs)
    train_y = layer.train()(x)
    assert np.any(np.abs(train_y - eval_y) > tolerance.bound(expected, 0.0))  # not the same outputs


def test_layer_norm_is_identical_in_training_and_eval() -> None:
    layer = normkit.LayerNorm((4, 4))
    x = batches(1)[0]
    np.testing.assert_array_equal(layer.train()(x), layer.eval()(x))


def test_state_is_created_lazily_in_the_input_dtype_policy() -> None:
    for dtype, state_dtype in ((np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)):
        layer = normkit.BatchNorm()
        assert layer.running_mean is None
        layer(batches(1)[0].astype(dtype))
        assert layer.running_mean.dtype == state_dtype and layer.weight.dtype == state_dtype
        assert layer.num_features is None and layer.state_dict()["_metadata"]["num_features"] == 3


def test_channels_last_axis() -> None:
    x = batches(1)[0]
    first = normkit.BatchNorm()(x)
    last = normkit.BatchNorm(axis=-1)(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
    # two layouts, two reduction orders: each within the suite's bound, so within twice it
    tolerance = agreement_tolerance("float32", centering_gain=channel_gain(x))
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), first, **tolerance.kwargs)


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    layer = normkit.BatchNorm(momentum=None)
    for x in batches(3):
        layer(x)
    restored = normkit.BatchNorm.from_state_dict(layer.state_dict())
    assert restored.momentum is None and restored.num_batches_tracked == 3
    x = batches(1)[0]
    np.testing.assert_array_equal(restored.eval()(x), layer.eval()(x))
    other = normkit.BatchNorm()
    other.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(other.eval()(x), layer(x))
    # loaded arrays are copies: changing the source afterwards does not leak in
    source = layer.state_dict()
    source["running_mean"][:] = 100.0
    assert not np.any(other.running_mean == 100.0)


def test_load_state_dict_non_strict_keeps_missing_arrays() -> None:
    layer = normkit.BatchNorm()
    layer(batches(1)[0])
    before = layer.running_var
    layer.load_state_dict({"weight": np.full(3, 2.0, np.float32)}, strict=False)
    np.testing.assert_array_equal(layer.weight, [2.0, 2.0, 2.0])
    assert layer.running_var is before


def test_reset_running_stats() -> None:
    layer = normkit.BatchNorm()
    layer(batches(1)[0])
    layer.reset_running_stats()
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    assert layer.num_batches_tracked == 0


def test_a_torch_preset_layer_converted_to_keras_evaluates_identically() -> None:
    layer = normkit.BatchNorm()
    for x in batches(5):
        layer(x)
    keras = layer.to_preset("keras", axis=-1)
    assert (keras.preset, keras.axis, keras.eps) == ("keras", -1, 1e-5)  # eps carried, axis moved
    assert keras.momentum == pytest.approx(0.9) and keras.momentum_weights == "running"
    assert keras.running_var_estimator == "biased"
    x = batches(1)[0]
    np.testing.assert_array_equal(np.moveaxis(keras.eval()(np.moveaxis(x, 1, -1)), -1, 1), layer.eval()(x))


def test_convert_state_dict_round_trip() -> None:
    layer = normkit.InstanceNorm(track_running_stats=True, momentum=0.3)
    layer(batches(1, (2, 3, 4, 4))[0])
    there = normkit.convert_state_dict(layer.state_dict(), "onnx")
    back = normkit.convert_state_dict(there, "torch")
    assert there["_metadata"]["momentum"] == pytest.approx(0.7)
    assert back["_metadata"]["momentum"] == pytest.approx(0.3)
    assert back["_metadata"]["running_var_estimator"] == "unbiased"
    assert there["running_mean"] is layer.running_mean


def test_layer_norm_state_and_keras_axes() -> None:
    layer = normkit.LayerNorm(axis=(1, 3), preset="keras")
    x = batches(1)[0]
    y = layer(x)
    assert layer.weight.shape == (3, 4) and layer.eps == 1e-3
    expected = reference.layer_norm(x, layer.weight, layer.bias, axes=(1, 3), eps=1e-3)
    gain = channel_gain(x, 1e-3, np.abs(layer.weight).max(), axes=(1, 3))
    np.testing.assert_allclose(y, expected, **output_tolerance("float32", centering_gain=gain).kwargs)
    restored = normkit.LayerNorm.from_state_dict(layer.state_dict())
    np.testing.assert_array_equal(restored(x), y)


def test_repr_shows_the_configuration() -> None:
    assert repr(normkit.BatchNorm(4, preset="keras")) == (
        "BatchNorm(4, eps=0.001, momentum=0.99, affine=True, track_running_stats=True, axis=-1, "
        "momentum_weights='running', running_var_estimator='biased', allow_single_value=True, preset='keras')"
    )
    assert repr(normkit.LayerNorm(8)).startswith("LayerNorm((8,), axis=None, eps=1e-05")


def test_instance_norm_defaults_follow_the_preset() -> None:
    assert normkit.InstanceNorm().affine is False
    assert normkit.InstanceNorm(preset="keras").affine is True
    assert normkit.InstanceNorm(preset="flax").eps == 1e-6


def test_state_dict_before_the_first_call_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="has no state yet"):
        normkit.BatchNorm(3).state_dict()
    assert (
        normkit.BatchNorm(affine=False, track_running_stats=False).state_dict()["_metadata"]["layer"]
        == "BatchNorm"
    )


def test_overriding_only_momentum_weights_keeps_the_presets_update() -> None:
    x = np.full((4, 3), 5.0, np.float32)
    for layer, weight in (
        (normkit.BatchNorm(momentum_weights="running"), 0.1),
        (normkit.BatchNorm(preset="keras", axis=1, momentum_weights="batch"), 0.01),
    ):
        layer(x)
        tolerance = statistics_tolerance("float32", "mean", 5.0)
        np.testing.assert_allclose(layer.running_mean, weight * 5.0, **tolerance.kwargs)
    _, mean, _ = normkit.batch_norm(
        x, np.zeros(3, np.float32), np.ones(3, np.float32), training=True, momentum_weights="running"
    )
    np.testing.assert_allclose(mean, 0.5, **statistics_tolerance("float32", "mean", 5.0).kwargs)


def test_functional_eval_ignores_momentum() -> None:
    x = batches(1)[0]
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    np.testing.assert_array_equal(
        normkit.batch_norm(x, rm, rv, momentum=None).y, normkit.batch_norm(x, rm, rv).y
    )


def test_integer_like_axes_and_shapes_are_accepted() -> None:
    x = batches(1)[0]
    np.testing.assert_array_equal(normkit.BatchNorm(axis=np.int64(1))(x), normkit.BatchNorm()(x))
    np.testing.assert_array_equal(normkit.layer_norm(x, np.int64(4)), normkit.layer_norm(x, 4))


def test_a_layer_refuses_zero_channels_instead_of_locking_to_them() -> None:
    layer = normkit.BatchNorm()
    with pytest.raises(ValueError, match="no channels on axis 1"):
        layer(np.zeros((4, 0), np.float32))
    assert layer(np.ones((4, 3), np.float32)).shape == (4, 3)


def test_a_layer_names_the_backend_its_state_lives_in() -> None:
    import sys
    from pathlib import Path

    from normkit import _registry

    sys.path.insert(0, str(Path(__file__).parent / "fakefw"))
    _registry.reset()  # forget the entry points read before fakefw was on the path
    try:
        import fakefw

        layer = normkit.BatchNorm()
        layer(batches(1)[0])
        with pytest.raises(
            TypeError, match=r"x is a fakefw\.Array, but this layer's state lives in backend 'numpy'"
        ):
            layer(fakefw.Array(batches(1)[0]))
    finally:
        sys.path.remove(str(Path(__file__).parent / "fakefw"))
        _registry.reset()


def test_layers_pickle_and_deepcopy_with_their_state() -> None:
    import copy
    import pickle

    layer = normkit.BatchNorm(momentum=None)
    for x in batches(2):
        layer(x)
    x = batches(1)[0]
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert clone.num_batches_tracked == 2
        np.testing.assert_array_equal(clone.eval()(x), layer.eval()(x))
        clone.train()(x)  # and it keeps working (its backend is found again from its arrays)
    restored = pickle.loads(pickle.dumps(normkit.LayerNorm(4)))
    assert restored(x).shape == x.shape
