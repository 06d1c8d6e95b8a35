"""``BatchNormalization``, ``LayerNormalization`` and ``InstanceNormalization`` under this run's
Keras backend, against the float64 reference (:mod:`normkit.reference`) and stock Keras's
layers: the presets, one value per channel, several axes, moving statistics, and normkit's
state dicts."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras_helpers import WIDEST, numpy

import normkit
import normkit_keras as nk
from normkit import reference
from normkit.testing.tolerances import (
    Tolerance,
    agreement_tolerance,
    centering_gain,
    output_tolerance,
    statistics_tolerance,
)


@pytest.mark.parametrize("preset", ["keras", "torch"])
def test_batch_normalization_follows_the_reference_under_each_preset(preset: str) -> None:
    p = normkit.get_preset(preset)
    layer = nk.BatchNormalization(preset=preset, dtype=WIDEST)
    assert layer.epsilon == p.batch_norm_eps and layer.momentum == pytest.approx(1 - p.update_weight)
    mean, var = np.zeros(3), np.ones(3)
    rng = np.random.default_rng(6)
    magnitude = 0.0
    for _ in range(6):
        x = rng.normal(5.0, 2.0, size=(10, 4, 3)).astype(WIDEST)
        magnitude = max(magnitude, float(np.abs(x).max()))
        y = numpy(layer(x, training=True))
        expected, mean, var = reference.batch_norm(
            x, None, None, mean, var, training=True, momentum=p.update_weight, eps=p.batch_norm_eps, axis=-1,
            unbiased_running_var=p.running_var_estimator == "unbiased",
        )  # fmt: skip
        # the suite's bound against the reference, with the centering term of these statistics
        gain = centering_gain(x.mean(axis=(0, 1)), x.var(axis=(0, 1)), p.batch_norm_eps)
        np.testing.assert_allclose(y, expected, **output_tolerance(WIDEST, centering_gain=gain).kwargs)
    for got, expected, statistic in ((layer.moving_mean, mean, "mean"), (layer.moving_variance, var, "var")):
        tolerance = statistics_tolerance(WIDEST, statistic, magnitude)
        np.testing.assert_allclose(numpy(got), expected, **tolerance.kwargs)


def test_one_value_per_channel_is_allowed_under_keras_and_an_error_under_torch() -> None:
    x = np.array([[1.0, 2.0, 3.0]], dtype="float32")
    np.testing.assert_array_equal(numpy(nk.BatchNormalization()(x, training=True)), np.zeros((1, 3)))
    layer = nk.BatchNormalization(preset="torch")
    with pytest.raises(
        ValueError, match=r"inputs has shape \(1, 3\): expected more than 1 value per channel"
    ):
        layer(x, training=True)
    np.testing.assert_array_equal(numpy(layer.moving_variance), np.ones(3))  # a failing call changes nothing


def test_layer_normalization_over_several_axes_matches_keras_and_the_reference() -> None:
    x = np.random.default_rng(7).normal(-2.0, 3.0, size=(4, 5, 6)).astype("float32")
    ours, stock = nk.LayerNormalization(axis=[1, -1]), keras.layers.LayerNormalization(axis=[1, -1])
    ours.build(x.shape)
    stock.build(x.shape)
    weights = [np.random.default_rng(8).normal(size=w.shape).astype("float32") for w in stock.weights]
    assert weights[0].shape == (6, 5)  # Keras orders γ by the sorted axes as given: -1, then 1
    stock.set_weights(weights)
    ours.set_weights(weights)
    gamma, beta = (w.reshape(5, 6) for w in weights)  # and reshapes it onto axes (1, 2)
    expected = reference.layer_norm(x, gamma, beta, axes=(1, 2), eps=1e-3)
    gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-3, np.abs(gamma).max())
    got = numpy(ours(x))
    np.testing.assert_allclose(got, expected, **output_tolerance("float32", centering_gain=gain).kwargs)
    np.testing.assert_allclose(
        got, numpy(stock(x)), **agreement_tolerance("float32", centering_gain=gain).kwargs
    )


def test_instance_normalization_follows_the_reference_and_tracks_statistics() -> None:
    layer = nk.InstanceNormalization(track_running_stats=True, dtype=WIDEST)
    rng = np.random.default_rng(9)
    mean, var = np.zeros(3), np.ones(3)
    magnitude = 0.0
    for _ in range(3):
        x = rng.normal(1.0, 2.0, size=(4, 5, 6, 3)).astype(WIDEST)
        magnitude = max(magnitude, float(np.abs(x).max()))
        expected, mean, var = reference.instance_norm(
            x, None, None, mean, var, use_input_stats=True, momentum=0.01, eps=1e-3, axis=-1,
            unbiased_running_var=False,
        )  # fmt: skip
        gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-3)
        tolerance = output_tolerance(WIDEST, centering_gain=gain)
        np.testing.assert_allclose(numpy(layer(x, training=True)), expected, **tolerance.kwargs)
    for got, expected, statistic in ((layer.moving_mean, mean, "mean"), (layer.moving_variance, var, "var")):
        tolerance = statistics_tolerance(WIDEST, statistic, magnitude)
        np.testing.assert_allclose(numpy(got), expected, **tolerance.kwargs)
    x = rng.normal(1.0, 2.0, size=(2, 5, 6, 3)).astype(WIDEST)
    expected, _, _ = reference.instance_norm(
        x, None, None, mean, var, use_input_stats=False, momentum=0.0, eps=1e-3, axis=-1,
        unbiased_running_var=False,
    )  # fmt: skip
    tolerance = output_tolerance(WIDEST, centering_gain=centering_gain(mean, var, 1e-3))
    np.testing.assert_allclose(numpy(layer(x, training=False)), expected, **tolerance.kwargs)


def test_instance_normalization_without_statistics_is_keras_group_norm_with_one_group_per_channel() -> None:
    x = np.random.default_rng(10).normal(3.0, 2.0, size=(4, 5, 6, 3)).astype("float32")
    ours, stock = nk.InstanceNormalization(), keras.layers.GroupNormalization(groups=-1)
    ours.build(x.shape)
    stock.build(x.shape)
    weights = [
        np.random.default_rng(11).normal(1.0, 0.5, size=w.shape).astype("float32") for w in stock.weights
    ]
    ours.set_weights(weights)
    stock.set_weights(weights)
    gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-3, np.abs(weights[0]).max())
    got, expected = numpy(ours(x, training=True)), numpy(stock(x))
    np.testing.assert_allclose(got, expected, **agreement_tolerance("float32", centering_gain=gain).kwargs)
    np.testing.assert_array_equal(numpy(ours(x, training=False)), got)  # no statistics to use in eval


def eval_agreement(state: dict) -> Tolerance:
    """Two backends' eval outputs for one batch-norm state: :func:`agreement_tolerance` with the
    centering gain of its running statistics."""
    arrays = {k: np.asarray(state[k], np.float64) for k in ("weight", "running_mean", "running_var")}
    gain = centering_gain(
        arrays["running_mean"], arrays["running_var"], state["_metadata"]["eps"], arrays["weight"]
    )
    return agreement_tolerance("float32", centering_gain=gain)


def test_state_dict_round_trips_through_normkit_format() -> None:
    layer = nk.BatchNormalization(preset="torch")
    x = np.random.default_rng(10).normal(2.0, 1.0, size=(8, 3)).astype("float32")
    layer(x, training=True)
    state = layer.state_dict()
    assert state["_metadata"]["eps"] == 1e-5 and state["_metadata"]["preset"] == "torch"
    again = nk.BatchNormalization.from_state_dict(state)
    np.testing.assert_array_equal(numpy(again(x, training=False)), numpy(layer(x, training=False)))
    core = normkit.BatchNorm.from_state_dict(state).eval()  # the NumPy backend reads it too
    np.testing.assert_allclose(core(x), numpy(layer(x, training=False)), **eval_agreement(state).kwargs)


def test_state_dict_corner_cases() -> None:
    x = np.random.default_rng(12).normal(1.0, 2.0, size=(8, 3)).astype("float32")
    only_shift = nk.BatchNormalization(scale=False)
    only_shift(x, training=True)
    state = only_shift.state_dict()  # normkit keeps γ and β together: γ is exported as 1
    np.testing.assert_array_equal(np.asarray(state["weight"]), np.ones(3))
    core = normkit.BatchNorm.from_state_dict(state).eval()
    np.testing.assert_allclose(core(x), numpy(only_shift(x, training=False)), **eval_agreement(state).kwargs)

    untracked = normkit.BatchNorm(3, track_running_stats=False, preset="keras")
    untracked(x)
    with pytest.raises(normkit.StateDictError, match="tracks no running statistics"):
        nk.BatchNormalization.from_state_dict(untracked.state_dict())

    overridden = normkit.BatchNorm(3, preset="torch", running_var_estimator="biased")
    overridden(x)
    assert not nk.BatchNormalization.from_state_dict(overridden.state_dict()).unbiased_running_var

    with pytest.raises(RuntimeError, match="the layer has no weights yet"):
        nk.BatchNormalization().state_dict()


def test_layer_norm_state_over_several_trailing_axes() -> None:
    state = normkit.LayerNorm((5, 6), preset="torch")
    x = np.random.default_rng(13).normal(size=(2, 5, 6)).astype("float32")
    state(x)
    layer = nk.LayerNormalization.from_state_dict(state.state_dict())  # axis from normalized_shape
    assert layer.epsilon == 1e-5
    gain = centering_gain(x.mean(axis=(1, 2)), x.var(axis=(1, 2)), 1e-5)
    np.testing.assert_allclose(
        numpy(layer(x)), state(x), **agreement_tolerance("float32", centering_gain=gain).kwargs
    )


def test_a_state_that_does_not_fit_the_input_raises_and_changes_nothing() -> None:
    """``from_state_dict`` sets the weights when the layer is built: an input with other
    features raises, naming the weight and both shapes, before any weight exists, so the layer
    stays unbuilt and keeps the state; a fitting input then loads it exactly."""
    x = np.random.default_rng(14).normal(1.0, 2.0, size=(8, 3)).astype("float32")
    source = normkit.BatchNorm(3, preset="torch")
    source(x)
    state = source.state_dict()
    layer = nk.BatchNormalization.from_state_dict(state)
    with pytest.raises(
        ValueError,
        match=r"the state's moving_mean has shape \(3,\), but this input gives the layer a moving_mean of shape \(5,\)",
    ):
        layer(np.zeros((2, 5), "float32"), training=False)
    assert not layer.built and layer.weights == []
    layer(x, training=False)
    assert len(layer.weights) == 4
    for name, key in (
        ("gamma", "weight"),
        ("beta", "bias"),
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
    ):
        np.testing.assert_array_equal(numpy(getattr(layer, name)), np.asarray(state[key]), err_msg=name)

    source = normkit.LayerNorm((5, 6), preset="torch")
    source(np.ones((2, 5, 6), "float32"))
    layer = nk.LayerNormalization.from_state_dict(source.state_dict())
    with pytest.raises(
        ValueError,
        match=r"the state's gamma has shape \(5, 6\), but this input gives the layer a gamma of shape \(5, 7\)",
    ):
        layer(np.zeros((2, 5, 7), "float32"))
    assert not layer.built and layer.weights == []
    layer(np.zeros((2, 5, 6), "float32"))
    np.testing.assert_array_equal(numpy(layer.gamma), np.asarray(source.state_dict()["weight"]))

    counts = nk.BatchNormalization.from_state_dict({**state, "running_mean": np.arange(3)})
    with pytest.raises(
        TypeError, match=r"the state's moving_mean has dtype int64; expected a floating dtype"
    ):
        counts(x, training=False)
    assert not counts.built and counts.weights == []
