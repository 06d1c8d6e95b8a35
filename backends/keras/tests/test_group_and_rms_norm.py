"""``GroupNormalization`` and ``RMSNormalization`` under this run's Keras backend, against
Keras's own layers (the oracle) and the float64 reference: outputs, weights in both directions,
the presets, and bad arguments."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, WIDEST, numpy, weight_names

import normkit_keras as nk
from normkit import presets, reference
from normkit.testing.tolerances import agreement_tolerance, centering_gain, output_tolerance
from normkit_keras.group_normalization import KERAS_OWN_BACKENDS


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
        ((3, 5, 8), -1, -1, WIDEST),  # Keras's groups=-1: one group per channel
        ((3, 5, 8), 1, -1, "float32"),  # one group: layer norm with per-channel affine
    ],
    ids=["nhwc-G4", "nchw-G2", "instance-widest", "G1"],
)
@pytest.mark.parametrize("preset", ["keras", "torch"])
def test_group_normalization_matches_keras_and_the_reference(shape, groups, axis, dtype, preset) -> None:
    """Under ``keras`` on TensorFlow the layer runs Keras's computation; elsewhere, and under
    ``torch``, normkit's kernel: all within the suite's bound of the reference."""
    x = np.random.default_rng(1).normal(2.0, 3.0, size=shape).astype(dtype)
    ours = nk.GroupNormalization(groups=groups, axis=axis, dtype=dtype, epsilon=1e-3, preset=preset)
    stock = keras.layers.GroupNormalization(groups=groups, axis=axis, dtype=dtype)
    stock.build(shape)
    ours.build(shape)
    assert ours.groups == stock.groups  # -1 became the channel count in both
    assert weight_names(ours) == ["gamma", "beta"]
    weights = random_weights(stock, 2)
    stock.set_weights(weights)
    ours.set_weights(weights)
    got, expected = numpy(ours(x)), numpy(stock(x))
    assert got.dtype == expected.dtype == np.dtype(dtype)
    gain = group_gain(x, ours.groups, axis % len(shape), 1e-3, weights[0])
    exact = reference.group_norm(x, ours.groups, *weights, eps=1e-3, axis=axis % len(shape))
    np.testing.assert_allclose(got, exact, **output_tolerance(dtype, centering_gain=gain).kwargs)
    assert_keras_agrees(got, expected, exact, dtype, gain)


def assert_keras_agrees(
    got: np.ndarray, keras_output: np.ndarray, exact: np.ndarray, dtype: str, gain: float
) -> None:
    """Keras's output agrees with ours within :func:`agreement_tolerance` of the dtype, except
    in float64 on torch: there Keras computes in float32 (its ``result_type`` maps float64 to
    float32 on every backend but TensorFlow, ``keras/src/backend/common/dtypes.py``), so its
    output is within float32's bound of the reference and outside float64's agreement with ours."""
    agreement = agreement_tolerance(dtype, centering_gain=gain)
    if not (BACKEND == "torch" and dtype == "float64"):
        np.testing.assert_allclose(got, keras_output, **agreement.kwargs)
        return
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(got, keras_output, **agreement.kwargs)
    np.testing.assert_allclose(keras_output, exact, **output_tolerance("float32", centering_gain=gain).kwargs)


@pytest.mark.parametrize(("shape", "groups", "axis"), [((4, 6, 6, 8), 4, -1), ((4, 8, 5, 5), 2, 1)])
def test_group_normalization_under_the_keras_preset_is_keras_on_tensorflow_and_normkit_elsewhere(
    shape, groups, axis
) -> None:
    """On TensorFlow the default preset computes exactly as Keras's layer (bit-identical after a
    swap; its statistics are two-pass). On JAX and torch normkit's kernel runs, within the
    suite's bound of the reference at ``|mean|/std = 1e3``, where Keras's torch layer
    (``E[x^2] - E[x]^2``) is far outside it."""
    offset = 50.0 if BACKEND == "tensorflow" else 3000.0
    x = np.random.default_rng(6).normal(offset, 3.0, size=shape).astype("float32")
    stock = keras.layers.GroupNormalization(groups=groups, axis=axis)
    ours = nk.GroupNormalization(groups=groups, axis=axis)
    for layer in (stock, ours):
        layer.build(shape)
    weights = random_weights(stock, 2)
    for layer in (stock, ours):
        layer.set_weights(weights)
    got, keras_output = numpy(ours(x)), numpy(stock(x))
    if BACKEND == "tensorflow":
        np.testing.assert_array_equal(got, keras_output)
        return
    exact = reference.group_norm(x, groups, *weights, eps=1e-3, axis=axis % len(shape))
    gain = group_gain(x, groups, axis % len(shape), 1e-3, weights[0])
    tolerance = output_tolerance("float32", centering_gain=gain)
    np.testing.assert_allclose(got, exact, **tolerance.kwargs)
    if BACKEND == "torch":
        with pytest.raises(AssertionError):
            np.testing.assert_allclose(keras_output, exact, **tolerance.kwargs)


def test_keras_group_norm_stays_within_the_bound_at_1e4_exactly_on_the_backends_the_layer_leaves_it_to() -> (
    None
):
    """:data:`~normkit_keras.group_normalization.KERAS_OWN_BACKENDS` is measured here: at
    ``|mean|/std = 1e4`` in float32, Keras's own ``GroupNormalization`` (groups of 512 values) is
    within the suite's bound of the float64 reference on TensorFlow (two-pass ``tf.nn.moments``)
    and outside it on JAX and torch (``E[x^2] - E[x]^2``), which is why the layer's default
    preset runs Keras's computation on TensorFlow only; normkit's layer is within it on every
    backend."""
    x = (1e4 + np.random.default_rng(2).normal(size=(4, 16, 16, 8))).astype("float32")
    exact = reference.group_norm(x, 4, eps=1e-3, axis=3)
    tolerance = output_tolerance("float32", centering_gain=group_gain(x, 4, 3, 1e-3, np.ones(8)))
    np.testing.assert_allclose(numpy(nk.GroupNormalization(groups=4)(x)), exact, **tolerance.kwargs)
    keras_output = numpy(keras.layers.GroupNormalization(groups=4)(x))
    bound = tolerance.rtol * np.abs(exact) + tolerance.atol
    keras_within = bool((np.abs(keras_output - exact) <= bound).all())  # NaN counts as outside
    assert keras_within == (BACKEND in KERAS_OWN_BACKENDS), (
        f"Keras's GroupNormalization on {BACKEND} is {'within' if keras_within else 'outside'} the bound "
        f"at |mean|/std = 1e4: KERAS_OWN_BACKENDS={KERAS_OWN_BACKENDS} no longer matches"
    )


@pytest.mark.parametrize("dtype", ["float32", WIDEST])
def test_rms_normalization_over_the_last_axis_matches_keras(dtype: str) -> None:
    """Through ``normkit.rms_norm``, on TensorFlow normkit's kernel runs the same ops in the same
    order as ``keras.ops.rms_normalization`` (one ``reduce_mean`` of the squares, ``rsqrt``, then
    ``x * r * scale``): the same bits (this guards ``docs/keras.md``'s claim). On the other
    backends, within the suite's bound of the reference and of Keras's (Keras's torch layer in
    float64: see :func:`assert_keras_agrees`)."""
    x = np.random.default_rng(3).normal(0.5, 2.0, size=(4, 7, 16)).astype(dtype)
    ours, stock = nk.RMSNormalization(dtype=dtype), keras.layers.RMSNormalization(dtype=dtype)
    stock.build(x.shape)
    ours.build(x.shape)
    weights = random_weights(stock, 4)
    stock.set_weights(weights)
    ours.set_weights(weights)
    got, keras_output = numpy(ours(x)), numpy(stock(x))
    exact = reference.rms_norm(x, weights[0], axes=(2,), eps=1e-6)
    np.testing.assert_allclose(got, exact, **output_tolerance(dtype).kwargs)
    if BACKEND == "tensorflow":
        np.testing.assert_array_equal(got, keras_output)
    else:
        assert_keras_agrees(got, keras_output, exact, dtype, 0.0)


@pytest.mark.parametrize("axis", [[1, 2], [-2, -1], [-1, 1]], ids=str)
def test_rms_normalization_over_several_axes_matches_keras(axis: list[int]) -> None:
    """Keras lays ``scale`` out along its sorted axes as given (``[-1, 1]``: the last axis first)
    and lets broadcasting apply it; with equal sizes both read it the same way."""
    x = np.random.default_rng(5).normal(0.5, 2.0, size=(3, 6, 6)).astype("float32")
    ours, stock = nk.RMSNormalization(axis=axis), keras.layers.RMSNormalization(axis=axis)
    stock.build(x.shape)
    ours.build(x.shape)
    assert ours.axis == stock.axis and ours.scale.shape == stock.scale.shape
    weights = random_weights(stock, 6)
    stock.set_weights(weights)
    ours.set_weights(weights)
    np.testing.assert_allclose(numpy(ours(x)), numpy(stock(x)), **agreement_tolerance("float32").kwargs)


def test_rms_normalization_scales_along_its_own_axis_where_keras_broadcasts_onto_the_last() -> None:
    """Keras's ``RMSNormalization(axis=1)`` on (N, C, L) input multiplies its ``scale`` of shape
    (C,) along the last axis (broadcasting; an error unless C == L), and on torch it even
    normalizes over the last axis (``F.rms_norm`` with ``normalized_shape=(C,)`` takes the
    trailing axis of that size). normkit's normalizes over axis 1 and scales along it, as the
    reference does, on every backend."""
    x = np.random.default_rng(7).normal(size=(2, 4, 4)).astype("float32")
    layer = nk.RMSNormalization(axis=1)
    layer.build(x.shape)
    scale = np.arange(1.0, 5.0, dtype="float32")
    layer.set_weights([scale])
    exact = reference.rms_norm(x, scale, axes=(1,), eps=1e-6)
    np.testing.assert_allclose(numpy(layer(x)), exact, **output_tolerance("float32").kwargs)
    stock = keras.layers.RMSNormalization(axis=1)
    stock.build(x.shape)
    stock.set_weights([scale])
    keras_axis = 2 if BACKEND == "torch" else 1
    keras_semantics = reference.rms_norm(x, axes=(keras_axis,), eps=1e-6) * scale.reshape(1, 1, 4)
    np.testing.assert_allclose(numpy(stock(x)), keras_semantics, **output_tolerance("float32").kwargs)


def test_weights_load_in_both_directions() -> None:
    """``get_weights``/``set_weights`` between Keras's layers and normkit's, both ways: the same
    names, shapes and order, and the same outputs after the exchange."""
    x = np.random.default_rng(8).normal(1.0, 2.0, size=(2, 5, 5, 6)).astype("float32")
    pairs = [
        (nk.GroupNormalization(groups=3), keras.layers.GroupNormalization(groups=3)),
        (nk.RMSNormalization(), keras.layers.RMSNormalization()),
    ]
    for ours, stock in pairs:
        ours.build(x.shape)
        stock.build(x.shape)
        names = [(n, tuple(w.shape)) for n, w in zip(weight_names(ours), ours.weights, strict=True)]
        assert names == [(n, tuple(w.shape)) for n, w in zip(weight_names(stock), stock.weights, strict=True)]
        stock.set_weights(random_weights(stock, 9))
        ours.set_weights(stock.get_weights())
        first = numpy(ours(x))
        ours.set_weights(random_weights(ours, 10))
        stock.set_weights(ours.get_weights())
        for a, b in zip(stock.get_weights(), ours.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        second = numpy(stock(x))
        grouped = isinstance(ours, nk.GroupNormalization)
        gain = group_gain(x, 3, 3, 1e-3, ours.get_weights()[0]) if grouped else 0.0
        np.testing.assert_allclose(
            numpy(ours(x)), second, **agreement_tolerance("float32", centering_gain=gain).kwargs
        )
        assert np.abs(first - second).max() > 0.1  # the second exchange changed something


def test_presets_set_epsilon_cast_order_and_weight_offset() -> None:
    x = np.random.default_rng(15).normal(0.5, 2.0, size=(3, 4, 8)).astype("float32")
    assert nk.GroupNormalization().epsilon == 1e-3
    assert nk.GroupNormalization(preset="torch").epsilon == presets.get_preset("torch").group_norm_eps
    assert nk.GroupNormalization(preset="torch", epsilon=0.5).epsilon == 0.5
    # torch: eps=None is the machine epsilon of the compute dtype, found at call time
    torch_like = nk.RMSNormalization(preset="torch")
    assert torch_like.epsilon is None and torch_like.get_config()["epsilon"] is None
    exact = reference.rms_norm(x, np.ones(8), axes=(2,), eps=np.finfo(np.float32).eps)
    np.testing.assert_allclose(numpy(torch_like(x)), exact, **output_tolerance("float32").kwargs)
    # gemma: y = x̂ (1 + w), w starting at 0
    gemma = nk.RMSNormalization(preset="gemma")
    gemma.build(x.shape)
    np.testing.assert_array_equal(numpy(gemma.scale), np.zeros(8))
    w = np.random.default_rng(16).normal(size=8).astype("float32")
    gemma.set_weights([w])
    exact = reference.rms_norm(x, w, axes=(2,), eps=1e-6, weight_offset=1.0)
    np.testing.assert_allclose(numpy(gemma(x)), exact, **output_tolerance("float32").kwargs)
    assert not gemma.cast_before_weight and nk.RMSNormalization(preset="llama").cast_before_weight
    assert not nk.RMSNormalization().cast_before_weight and nk.RMSNormalization().weight_offset == 0.0


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="axis=0 is the batch axis"):
        nk.GroupNormalization(groups=2, axis=0).build((4, 6))
    with pytest.raises(ValueError, match=r"axis=5: expected one axis of inputs of rank 3"):
        nk.GroupNormalization(groups=2, axis=5).build((4, 5, 6))
    with pytest.raises(ValueError, match="must be a multiple"):  # Keras's own check
        nk.GroupNormalization(groups=4).build((2, 6))
    with pytest.raises(ValueError, match=r"axis=\[1, 3\]: expected axes of inputs of rank 3"):
        nk.RMSNormalization(axis=[1, 3]).build((2, 4, 5))
    with pytest.raises(ValueError, match="epsilon=-1"):
        nk.RMSNormalization(epsilon=-1)
    with pytest.raises(TypeError):
        nk.GroupNormalization(32, -1, 1e-3, True, True, "zeros", "ones", None, None, None, None, "torch")
