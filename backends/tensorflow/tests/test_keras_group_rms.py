"""``normkit_tensorflow.GroupNormalization`` and ``RMSNormalization`` against Keras's own layers
(the oracle) and the float64 reference: outputs, weights in both directions, a ``.keras`` file,
training in ``model.fit``, mixed precision and the presets."""

from __future__ import annotations

import importlib.util
import json
import zipfile

import keras
import numpy as np
import pytest
from test_keras_layers import LargestStep
from test_saving import run

import normkit_tensorflow as nt
from normkit import presets, reference
from normkit.testing.tolerances import (
    Tolerance,
    agreement_tolerance,
    centering_gain,
    output_tolerance,
    training_tolerance,
)


def group_gain(x: np.ndarray, groups: int, axis: int, eps: float, gamma: np.ndarray) -> float:
    """:func:`centering_gain` over every (sample, group) of group norm."""
    moved = np.moveaxis(x.astype(np.float64), axis, 1)
    blocks = moved.reshape(moved.shape[0], groups, -1)
    return centering_gain(blocks.mean(axis=2), blocks.var(axis=2), eps, np.abs(gamma).max())


def random_weights(layer: keras.layers.Layer, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(1.0, 0.5, size=w.shape).astype(w.dtype) for w in layer.weights]


@pytest.mark.parametrize(
    ("shape", "groups", "axis", "dtype"),
    [
        ((4, 6, 6, 8), 4, -1, "float32"),
        ((4, 8, 5, 5), 2, 1, "float32"),  # channels first
        ((3, 5, 8), -1, -1, "float64"),  # Keras's groups=-1: one group per channel
        ((3, 5, 8), 1, -1, "float32"),  # one group: layer norm with per-channel affine
    ],
    ids=["nhwc-G4", "nchw-G2", "instance-f64", "G1"],
)
def test_group_normalization_matches_keras_and_the_reference(shape, groups, axis, dtype) -> None:
    x = np.random.default_rng(1).normal(2.0, 3.0, size=shape).astype(dtype)
    ours = nt.GroupNormalization(groups=groups, axis=axis, dtype=dtype)
    stock = keras.layers.GroupNormalization(groups=groups, axis=axis, dtype=dtype)
    stock.build(shape)
    ours.build(shape)
    assert ours.groups == stock.groups  # -1 became the channel count in both
    assert [w.path.split("/")[-1] for w in ours.weights] == ["gamma", "beta"]
    weights = random_weights(stock, 2)
    stock.set_weights(weights)
    ours.set_weights(weights)
    got, expected = ours(x).numpy(), stock(x).numpy()
    assert got.dtype == expected.dtype == np.dtype(dtype)
    gain = group_gain(x, ours.groups, axis % len(shape), 1e-3, weights[0])
    np.testing.assert_allclose(got, expected, **agreement_tolerance(dtype, centering_gain=gain).kwargs)
    exact = reference.group_norm(x, ours.groups, *weights, eps=1e-3, axis=axis % len(shape))
    np.testing.assert_allclose(got, exact, **output_tolerance(dtype, centering_gain=gain).kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("shape", "groups", "axis"), [((4, 6, 6, 8), 4, -1), ((4, 8, 5, 5), 2, 1), ((3, 5, 8), -1, -1)]
)
def test_group_normalization_is_bit_identical_to_keras_under_the_keras_preset(
    shape, groups, axis, dtype
) -> None:
    """The default preset computes exactly as Keras's layer; another preset runs normkit's
    kernel, which differs from Keras's by rounding (so the first assertion can fail)."""
    x = np.random.default_rng(6).normal(50.0, 3.0, size=shape).astype(dtype)
    stock = keras.layers.GroupNormalization(groups=groups, axis=axis, dtype=dtype)
    ours = nt.GroupNormalization(groups=groups, axis=axis, dtype=dtype)
    other = nt.GroupNormalization(groups=groups, axis=axis, dtype=dtype, epsilon=1e-3, preset="torch")
    for layer in (stock, ours, other):
        layer.build(shape)
    weights = random_weights(stock, 2)
    for layer in (stock, ours, other):
        layer.set_weights(weights)
    np.testing.assert_array_equal(ours(x).numpy(), stock(x).numpy())
    assert not np.array_equal(other(x).numpy(), stock(x).numpy())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rms_normalization_is_bit_identical_to_keras_over_the_last_axis(dtype: str) -> None:
    """The same TensorFlow ops in the same order (one ``reduce_mean`` of the squares, ``rsqrt``,
    then ``x * r * scale``) as ``keras.ops.rms_normalization``: the same bits."""
    x = np.random.default_rng(3).normal(0.5, 2.0, size=(4, 7, 16)).astype(dtype)
    ours, stock = nt.RMSNormalization(dtype=dtype), keras.layers.RMSNormalization(dtype=dtype)
    stock.build(x.shape)
    ours.build(x.shape)
    weights = random_weights(stock, 4)
    stock.set_weights(weights)
    ours.set_weights(weights)
    np.testing.assert_array_equal(ours(x).numpy(), stock(x).numpy())
    exact = reference.rms_norm(x, weights[0], axes=(2,), eps=1e-6)
    np.testing.assert_allclose(ours(x).numpy(), exact, **output_tolerance(dtype).kwargs)


@pytest.mark.parametrize("axis", [[1, 2], [-2, -1], [-1, 1]], ids=str)
def test_rms_normalization_over_several_axes_matches_keras(axis: list[int]) -> None:
    """Keras lays ``scale`` out along its sorted axes as given (``[-1, 1]``: the last axis first)
    and lets broadcasting apply it; with equal sizes both read it the same way."""
    x = np.random.default_rng(5).normal(0.5, 2.0, size=(3, 6, 6)).astype("float32")
    ours, stock = nt.RMSNormalization(axis=axis), keras.layers.RMSNormalization(axis=axis)
    stock.build(x.shape)
    ours.build(x.shape)
    assert ours.axis == stock.axis and ours.scale.shape == stock.scale.shape
    weights = random_weights(stock, 6)
    stock.set_weights(weights)
    ours.set_weights(weights)
    np.testing.assert_allclose(ours(x).numpy(), stock(x).numpy(), **agreement_tolerance("float32").kwargs)


def test_rms_normalization_scales_along_its_own_axis_where_keras_broadcasts_onto_the_last() -> None:
    """Keras's ``RMSNormalization(axis=1)`` on (N, C, L) input multiplies its ``scale`` of shape
    (C,) along the last axis (broadcasting; an error unless C == L). normkit's applies it along
    axis 1, as the reference does."""
    x = np.random.default_rng(7).normal(size=(2, 4, 4)).astype("float32")
    layer = nt.RMSNormalization(axis=1)
    layer.build(x.shape)
    scale = np.arange(1.0, 5.0, dtype="float32")
    layer.set_weights([scale])
    exact = reference.rms_norm(x, scale, axes=(1,), eps=1e-6)
    np.testing.assert_allclose(layer(x).numpy(), exact, **output_tolerance("float32").kwargs)
    stock = keras.layers.RMSNormalization(axis=1)
    stock.build(x.shape)
    stock.set_weights([scale])
    along_last = reference.rms_norm(x, axes=(1,), eps=1e-6) * scale.reshape(1, 1, 4)
    np.testing.assert_allclose(stock(x).numpy(), along_last, **output_tolerance("float32").kwargs)


def test_weights_load_in_both_directions() -> None:
    """``get_weights``/``set_weights`` between Keras's layers and normkit's, both ways: the same
    names, shapes and order, and the same outputs after the exchange."""
    x = np.random.default_rng(8).normal(1.0, 2.0, size=(2, 5, 5, 6)).astype("float32")
    pairs = [
        (nt.GroupNormalization(groups=3), keras.layers.GroupNormalization(groups=3)),
        (nt.RMSNormalization(), keras.layers.RMSNormalization()),
    ]
    for ours, stock in pairs:
        ours.build(x.shape)
        stock.build(x.shape)
        names = [(w.path.split("/")[-1], tuple(w.shape)) for w in ours.weights]
        assert names == [(w.path.split("/")[-1], tuple(w.shape)) for w in stock.weights]
        stock.set_weights(random_weights(stock, 9))
        ours.set_weights(stock.get_weights())
        first = ours(x).numpy()
        ours.set_weights(random_weights(ours, 10))
        stock.set_weights(ours.get_weights())
        for a, b in zip(stock.get_weights(), ours.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        second = stock(x).numpy()
        gain = (
            group_gain(x, 3, 3, 1e-3, ours.get_weights()[0]) if isinstance(ours, nt.GroupNormalization) else 0
        )
        np.testing.assert_allclose(
            ours(x).numpy(), second, **agreement_tolerance("float32", centering_gain=gain).kwargs
        )
        assert np.abs(first - second).max() > 0.1  # the second exchange changed something


def model(library: object, seed: int = 0, **group: object) -> keras.Model:
    """conv -> GroupNormalization -> ReLU -> pool -> dense -> RMSNormalization -> dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            keras.layers.Conv2D(8, 3, padding="same"),
            library.GroupNormalization(groups=4, **group),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(8),
            library.RMSNormalization(),
            keras.layers.Dense(2),
        ]
    )


# Terms summed per value along model's forward pass on a batch of 16 8x8 images: the conv 3*3*4,
# group norm's two passes over a group (2 channels of 8*8), the pooling 8*8, the dense layers 8
# and 8, RMS norm's mean square over 8; in training also the loss's mean over 16*2. A training
# step's backward pass sums about as many again, plus the conv kernel's gradient over 16*8*8.
FORWARD_TERMS = 36 + 2 * 128 + 64 + 8 + 8 + 8
STEP_TERMS = 2 * (FORWARD_TERMS + 16 * 2) + 16 * 8 * 8


def data(seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, size=(48, 8, 8, 4)).astype("float32"), rng.normal(size=(48, 2)).astype(
        "float32"
    )


def fit_side_by_side(
    jit_compile: bool = False, **group: object
) -> tuple[keras.Model, keras.Model, int, float]:
    """Keras's model and normkit's from the same weights after two epochs of SGD on the same
    batches (normkit's compiled by XLA with ``jit_compile``); the steps taken and the largest
    change one step made to a weight."""
    stock, ours = model(keras.layers), model(nt, **group)
    ours.set_weights(stock.get_weights())
    x, y = data()
    largest = LargestStep()
    for m, callbacks, jit in ((stock, [largest], False), (ours, [], jit_compile)):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=jit)
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    return stock, ours, 2 * 3, largest.largest


def assert_same_after_fit(stock: keras.Model, ours: keras.Model, steps: int, largest_step: float) -> None:
    """Weights, predictions and outputs within :func:`training_tolerance` (``steps`` steps of
    STEP_TERMS terms each, relative to the largest step for weights, to the largest output for
    outputs)."""

    def tolerance(scale: float) -> Tolerance:
        return training_tolerance("float32", steps=steps, reduction_size=STEP_TERMS, scale=scale)

    for w, got, expected in zip(stock.weights, ours.get_weights(), stock.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, **tolerance(largest_step).kwargs, err_msg=w.path)
    x, _ = data()
    got, expected = ours.predict(x, verbose=0), stock.predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, **tolerance(float(np.abs(expected).max())).kwargs)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["function", "xla"])
def test_a_model_trains_in_fit_as_with_keras_layers(jit_compile: bool) -> None:
    assert_same_after_fit(*fit_side_by_side(jit_compile))


def test_the_fit_comparison_fails_for_another_epsilon() -> None:
    """The bound above is far below a semantic difference: group norm's epsilon 1e-5 (torch's)
    instead of Keras's 1e-3 leaves it."""
    with pytest.raises(AssertionError):
        assert_same_after_fit(*fit_side_by_side(preset="torch"))


def test_a_model_round_trips_through_a_keras_file(tmp_path) -> None:
    """Non-default presets and options survive saving: configs, weights and predictions."""
    keras.utils.set_random_seed(12)
    m = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            nt.GroupNormalization(groups=-1, preset="torch"),
            keras.layers.Conv2D(4, 3, padding="same"),
            nt.RMSNormalization(axis=[-2, -1], preset="gemma"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    x, y = data(13)
    m.compile(optimizer="sgd", loss="mse")
    m.fit(x[:, :6, :6], y, batch_size=16, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    m.save(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    names = [
        layer["registered_name"]
        for layer in config["config"]["layers"]
        if layer["module"].startswith("normkit")
    ]
    assert names == ["normkit>GroupNormalization", "normkit>RMSNormalization"]
    loaded = keras.models.load_model(path)
    for index, cls in ((0, nt.GroupNormalization), (2, nt.RMSNormalization)):
        assert type(loaded.layers[index]) is cls
        assert loaded.layers[index].get_config() == m.layers[index].get_config()
    assert loaded.layers[0].groups == 4 and loaded.layers[0].epsilon == 1e-5
    assert loaded.layers[2].weight_offset == 1.0
    np.testing.assert_array_equal(loaded.predict(x[:, :6, :6], verbose=0), m.predict(x[:, :6, :6], verbose=0))


def test_mixed_precision_behaves_as_keras() -> None:
    """Group norm does not autocast (float32 input stays float32 inside, as Keras's), RMS norm
    does (its input becomes float16, its scale is read as float16); both return float16 with
    float32 weights, and agree with Keras's within the float16 tolerance."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = np.random.default_rng(14).normal(2.0, 3.0, size=(4, 5, 5, 8)).astype("float32")
        for ours, stock in (
            (nt.GroupNormalization(groups=4), keras.layers.GroupNormalization(groups=4)),
            (nt.RMSNormalization(), keras.layers.RMSNormalization()),
        ):
            assert ours.autocast == stock.autocast
            got, expected = ours(x), stock(x)
            assert got.dtype == expected.dtype == "float16"
            assert all(w.dtype == "float32" for w in ours.weights)
            if isinstance(ours, nt.GroupNormalization):
                gain = group_gain(x, 4, 3, 1e-3, np.ones(8))  # float32 statistics of float32 input
            else:
                gain = 0.0
            tolerance = agreement_tolerance("float16", centering_gain=gain)
            np.testing.assert_allclose(got.numpy(), expected.numpy(), **tolerance.kwargs)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_presets_set_epsilon_cast_order_and_weight_offset() -> None:
    x = np.random.default_rng(15).normal(0.5, 2.0, size=(3, 4, 8)).astype("float32")
    assert nt.GroupNormalization().epsilon == 1e-3
    assert nt.GroupNormalization(preset="torch").epsilon == presets.get_preset("torch").group_norm_eps
    assert nt.GroupNormalization(preset="torch", epsilon=0.5).epsilon == 0.5
    # torch: eps=None is the machine epsilon of the compute dtype, found at call time
    torch_like = nt.RMSNormalization(preset="torch")
    assert torch_like.epsilon is None and torch_like.get_config()["epsilon"] is None
    exact = reference.rms_norm(x, np.ones(8), axes=(2,), eps=np.finfo(np.float32).eps)
    np.testing.assert_allclose(torch_like(x).numpy(), exact, **output_tolerance("float32").kwargs)
    # gemma: y = x̂ (1 + w), w starting at 0
    gemma = nt.RMSNormalization(preset="gemma")
    gemma.build(x.shape)
    np.testing.assert_array_equal(gemma.scale.numpy(), np.zeros(8))
    w = np.random.default_rng(16).normal(size=8).astype("float32")
    gemma.set_weights([w])
    exact = reference.rms_norm(x, w, axes=(2,), eps=1e-6, weight_offset=1.0)
    np.testing.assert_allclose(gemma(x).numpy(), exact, **output_tolerance("float32").kwargs)
    assert not gemma.cast_before_weight and nt.RMSNormalization(preset="llama").cast_before_weight
    assert not nt.RMSNormalization().cast_before_weight and nt.RMSNormalization().weight_offset == 0.0


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="axis=0 is the batch axis"):
        nt.GroupNormalization(groups=2, axis=0).build((4, 6))
    with pytest.raises(ValueError, match=r"axis=5: expected one axis of inputs of rank 3"):
        nt.GroupNormalization(groups=2, axis=5).build((4, 5, 6))
    with pytest.raises(ValueError, match="must be a multiple"):  # Keras's own check
        nt.GroupNormalization(groups=4).build((2, 6))
    with pytest.raises(ValueError, match=r"axis=\[1, 3\]: expected axes of inputs of rank 3"):
        nt.RMSNormalization(axis=[1, 3]).build((2, 4, 5))
    with pytest.raises(ValueError, match="epsilon=-1"):
        nt.RMSNormalization(epsilon=-1)
    with pytest.raises(TypeError):
        nt.GroupNormalization(32, -1, 1e-3, True, True, "zeros", "ones", None, None, None, None, "torch")


LOAD_AND_REFUSE = """
import json, sys
from pathlib import Path

import numpy as np
import keras
import normkit_tensorflow as nt

directory = Path(sys.argv[1])
result = {"backend": keras.backend.backend(), "messages": {}}
if result["backend"] == "tensorflow":
    model = keras.models.load_model(directory / "model.keras")
    np.save(directory / "got.npy", model.predict(np.load(directory / "probe.npy"), verbose=0))
    result["classes"] = [type(layer).__name__ for layer in model.layers if type(layer).__module__.startswith("normkit")]
else:
    for name in ("GroupNormalization", "RMSNormalization"):
        try:
            getattr(nt, name)()
        except RuntimeError as error:
            result["messages"][name] = str(error)
print(json.dumps(result))
"""


def test_a_saved_file_loads_in_a_new_process_and_other_keras_backends_are_refused(tmp_path) -> None:
    """``import keras, normkit_tensorflow`` registers the new layers for ``load_model`` in a fresh
    process (the same float32 bits come out); under Keras's torch backend they refuse to be built,
    naming KERAS_BACKEND."""
    m = model(nt, seed=17)
    m.compile(optimizer="sgd", loss="mse")
    x, y = data(18)
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    m.save(tmp_path / "model.keras")
    np.save(tmp_path / "probe.npy", x[:8])
    result = json.loads(run(LOAD_AND_REFUSE, tmp_path, cwd=tmp_path))
    assert result["classes"] == ["GroupNormalization", "RMSNormalization"]
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), m.predict(x[:8], verbose=0))
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed here, and Keras needs it for KERAS_BACKEND=torch")
    result = json.loads(run(LOAD_AND_REFUSE, tmp_path, cwd=tmp_path, backend="torch"))
    assert set(result["messages"]) == {"GroupNormalization", "RMSNormalization"}
    for name, message in result["messages"].items():
        assert f"normkit_tensorflow.{name} runs on Keras's TensorFlow backend only" in message
