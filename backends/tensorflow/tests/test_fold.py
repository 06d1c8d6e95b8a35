"""normkit.testtime.fold on Keras 3 models: the folded model's outputs against the unfolded
model's ``model(x, training=False)`` (float32, within a tolerance derived from each layer's sums
and magnitudes), no normalization layer left, Sequential and functional models (nested ones
included), and every refusal with the model unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest

import normkit_tensorflow as nt
from normkit.testing.testtime import folding_bound, folding_offset
from normkit.testing.tolerances import assert_within
from normkit.testtime.fold import fold

NORMALIZATIONS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
)


def randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Batch norms with statistics and affine parameters far from the identity."""
    rng = np.random.default_rng(seed)
    for bn in batch_norms(model):
        if not bn.built:
            continue
        n = bn.moving_mean.shape[0]
        bn.moving_mean.assign(rng.normal(0.5, 2.0, n))
        bn.moving_variance.assign(rng.uniform(1e-3, 4.0, n))
        if bn.scale:
            bn.gamma.assign(rng.normal(1.0, 1.0, n))
        if bn.center:
            bn.beta.assign(rng.normal(0.0, 1.0, n))
    return model


def layers_of(model: keras.Model) -> list[Any]:
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(layers_of(layer))
    return found


def batch_norms(model: keras.Model) -> list[Any]:
    return [layer for layer in layers_of(model) if isinstance(layer, keras.layers.BatchNormalization)]


def no_normalization_left(model: keras.Model) -> None:
    left = [layer.name for layer in layers_of(model) if isinstance(layer, NORMALIZATIONS)]
    assert not left, left


def terms_of(layer: Any) -> int:
    """The products each output element sums (an upper bound for a transposed convolution)."""
    kernel = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.Dense):
        return kernel[0]
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return int(np.prod(kernel[:-2]))
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)):
        return int(np.prod(kernel[:-2])) * kernel[-1]
    return int(np.prod(kernel[:-1]))  # (*k, C_in/groups, C_out)


def magnitude(original: Any, bn: Any, folded: Any, x: np.ndarray) -> np.ndarray:
    r""":math:`\sum|W'||x| + |s|(|b| + |\mu|) + |\beta|` per output element, in float64: a float64
    copy of the folded layer run on ``|x|`` with ``|W'|`` and :func:`folding_offset` as its bias."""
    offset = folding_offset(
        bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon,
        gamma=bn.gamma.numpy() if bn.scale else None, beta=bn.beta.numpy() if bn.center else None,
        bias=original.bias.numpy() if original.use_bias else None,
    )  # fmt: skip
    config = {**folded.get_config(), "dtype": "float64", "name": None}
    copy = type(folded).from_config(config)
    copy.build(x.shape)
    copy.set_weights([np.abs(folded.get_weights()[0]).astype(np.float64), offset])
    return np.asarray(copy(np.abs(x).astype(np.float64)))


def unchanged(model: keras.Model) -> Callable[[], None]:
    """A check that ``model``'s layers and weights are as now."""
    names = [layer.name for layer in layers_of(model)]
    weights = [w.copy() for w in model.get_weights()]

    def check() -> None:
        assert [layer.name for layer in layers_of(model)] == names
        after = model.get_weights()
        assert len(after) == len(weights) and all(
            np.array_equal(a, b) for a, b in zip(after, weights, strict=True)
        )

    return check


# (the producer, the batch norm, the input shape without the batch)
PAIRS: dict[str, tuple[Callable[[], Any], Callable[[], Any], tuple[int, ...]]] = {
    "conv2d": (lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same"), keras.layers.BatchNormalization, (9, 9, 3)),
    "conv2d-no-bias-grouped": (
        lambda: keras.layers.Conv2D(6, 3, groups=3, use_bias=False, dilation_rate=2),
        lambda: nt.BatchNormalization(preset="torch"),  # eps 1e-5: the layer's own
        (9, 9, 3),
    ),
    "depthwise-conv2d": (
        lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
        nt.BatchNormalization,
        (7, 7, 3),
    ),
    "conv2d-transpose": (
        lambda: keras.layers.Conv2DTranspose(5, 3, strides=2),
        lambda: keras.layers.BatchNormalization(center=False),
        (4, 4, 3),
    ),
    "conv1d-causal": (
        lambda: keras.layers.Conv1D(5, 3, padding="causal", use_bias=False),
        lambda: keras.layers.BatchNormalization(scale=False),
        (10, 4),
    ),
    "conv1d-transpose": (lambda: keras.layers.Conv1DTranspose(3, 4, strides=3), keras.layers.BatchNormalization, (6, 2)),
    "dense": (lambda: keras.layers.Dense(5), keras.layers.BatchNormalization, (7,)),
    "dense-3d": (lambda: keras.layers.Dense(5, use_bias=False), keras.layers.BatchNormalization, (3, 7)),
}  # fmt: skip


def pair_model(case: str) -> keras.Sequential:
    keras.utils.set_random_seed(sum(map(ord, case)))
    make_layer, make_bn, shape = PAIRS[case]
    return randomize(keras.Sequential([keras.Input(shape), make_layer(), make_bn(), keras.layers.ReLU()]))


def check_pair(
    original: Any, bn: Any, folded: Any, x: np.ndarray, got: np.ndarray, expected: np.ndarray
) -> None:
    bound = folding_bound(magnitude(original, bn, folded, x), terms_of(original), "float32")
    assert_within(np.abs(got.astype(np.float64) - expected), bound, original.name)


@pytest.mark.parametrize("case", list(PAIRS))
def test_sequential_folded_outputs_equal_the_unfolded_model(case: str) -> None:
    model = pair_model(case)
    check = unchanged(model)
    folded = fold(model)
    check()
    assert isinstance(folded, keras.Sequential) and folded is not model
    no_normalization_left(folded)
    assert [type(layer) for layer in folded.layers] == [type(model.layers[0]), keras.layers.ReLU]
    layer = folded.layers[0]
    assert layer.use_bias and layer.kernel.dtype == "float32"
    x = np.random.default_rng(1).normal(1.0, 2.0, (2, *PAIRS[case][2])).astype(np.float32)
    expected = np.asarray(model(x, training=False), np.float64)
    got = np.asarray(folded(x, training=False))
    check_pair(model.layers[0], model.layers[1], layer, x, got, expected)


def test_functional_model_with_branches_and_a_nested_sequential() -> None:
    """input -> [Conv2D -> BN] and [DepthwiseConv2D -> BN -> nested (Conv2D -> BN)] and
    [Flatten -> Dense -> BN]: each output is one fold away from the input (the nested one two:
    its first fold's difference is carried through the nested convolution, |W'| applied)."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 3))
    a = keras.layers.BatchNormalization(name="bn_a")(keras.layers.Conv2D(4, 3, name="conv_a")(inputs))
    depthwise = keras.layers.DepthwiseConv2D(3, name="depthwise")(inputs)
    b = keras.layers.BatchNormalization(name="bn_b")(depthwise)
    nested = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Conv2D(2, 1, name="inner"),
            keras.layers.BatchNormalization(name="bn_inner"),
        ],
        name="nested",
    )
    c = nested(keras.layers.ReLU()(b))
    flat = keras.layers.Flatten()(inputs)
    d = keras.layers.BatchNormalization(name="bn_d")(keras.layers.Dense(5, name="dense")(flat))
    model = randomize(keras.Model(inputs, {"a": a, "c": c, "d": keras.ops.add(d, 1.0)}))
    check = unchanged(model)
    folded = fold(model)
    check()
    no_normalization_left(folded)
    x = np.random.default_rng(2).normal(1.0, 2.0, (3, 6, 6, 3)).astype(np.float32)
    expected = {k: np.asarray(v, np.float64) for k, v in model(x, training=False).items()}
    got = {k: np.asarray(v) for k, v in folded(x, training=False).items()}
    layer = {layer.name: layer for layer in layers_of(folded)}
    original = {layer.name: layer for layer in layers_of(model)}
    check_pair(original["conv_a"], original["bn_a"], layer["conv_a"], x, got["a"], expected["a"])
    # d = fold + 1: one more rounding, of at most eps * |d| <= eps * magnitude
    check_pair(
        original["dense"], original["bn_d"], layer["dense"], x.reshape(3, -1), got["d"] - 1, expected["d"] - 1
    )
    h = np.maximum(np.asarray(original["bn_b"](original["depthwise"](x), training=False), np.float64), 0)
    bound_b = folding_bound(
        magnitude(original["depthwise"], original["bn_b"], layer["depthwise"], x), 9, "float32"
    )
    inner = layer["inner"].get_weights()[0].astype(np.float64)  # (1, 1, 3, 2)
    carried = np.einsum("nhwc,co->nhwo", bound_b, np.abs(inner[0, 0]))
    bound = carried + folding_bound(
        magnitude(original["inner"], original["bn_inner"], layer["inner"], h), 3, "float32"
    )
    assert_within(np.abs(got["c"] - expected["c"]), bound, "nested")


def test_float16_variables_fold_in_float64_and_round_once() -> None:
    """The folded kernel and bias are the float64 fold (the formula in NumPy float64 here) cast
    once to the layer's float16 variables."""
    keras.utils.set_random_seed(6)
    model = randomize(
        keras.Sequential(
            [keras.Input((5, 5, 2), dtype="float16"), keras.layers.Conv2D(3, 2, dtype="float16"),
             keras.layers.BatchNormalization(dtype="float16")]
        )
    )  # fmt: skip
    conv, bn = model.layers
    folded = fold(model).layers[0]
    s = bn.gamma.numpy().astype(np.float64) / np.sqrt(
        bn.moving_variance.numpy().astype(np.float64) + bn.epsilon
    )
    kernel = conv.kernel.numpy().astype(np.float64) * s
    bias = (conv.bias.numpy().astype(np.float64) - bn.moving_mean.numpy()) * s + bn.beta.numpy()
    assert folded.kernel.dtype == "float16"
    np.testing.assert_array_equal(folded.kernel.numpy(), kernel.astype(np.float16))
    np.testing.assert_array_equal(folded.bias.numpy(), bias.astype(np.float16))


def test_channels_first_folds_along_axis_1() -> None:
    """TensorFlow's CPU kernels run no channels-first convolution, so the folded kernel is checked
    against the formula in float64 (rounded once to float32), without running the model."""
    keras.utils.set_random_seed(7)
    model = randomize(
        keras.Sequential(
            [keras.Input((3, 6, 6)), keras.layers.Conv2D(4, 3, data_format="channels_first"),
             keras.layers.BatchNormalization(axis=1)]
        )
    )  # fmt: skip
    conv, bn = model.layers
    folded = fold(model).layers[0]
    s = bn.gamma.numpy().astype(np.float64) / np.sqrt(
        bn.moving_variance.numpy().astype(np.float64) + bn.epsilon
    )
    np.testing.assert_array_equal(
        folded.kernel.numpy(), (conv.kernel.numpy().astype(np.float64) * s).astype(np.float32)
    )
    wrong_axis = keras.Sequential(
        [keras.Input((3, 6, 6)), keras.layers.Conv2D(4, 3, data_format="channels_first", name="conv"),
         keras.layers.BatchNormalization(name="bn")]
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"'bn': it normalizes axis -1 of its 4-D input, but 'conv' \(Conv2D\) has its output channels on axis 1",
    ):
        fold(wrong_axis)


def zero_variance() -> keras.Model:
    """epsilon=0 and a moving variance of 0: the batch norm divides by zero."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, name="dense"),
            keras.layers.BatchNormalization(epsilon=0.0, name="bn"),
        ]
    )
    model.layers[1].moving_variance.assign([1.0, 0.0])
    return model


def conv_relu_activation() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            keras.layers.Conv2D(2, 1, activation="relu"),
            keras.layers.BatchNormalization(),
        ]
    )


def output_used_twice() -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    y = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    return keras.Model(
        inputs, keras.layers.Add(name="add")([keras.layers.BatchNormalization(name="bn")(y), y])
    )


def conv_called_twice() -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    conv = keras.layers.Conv2D(3, 1, name="conv")
    y = keras.layers.BatchNormalization(name="bn")(conv(inputs))
    return keras.Model(inputs, keras.layers.Add()([y, conv(inputs)]))


def training_true() -> keras.Model:
    inputs = keras.Input((5,))
    return keras.Model(
        inputs, keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(3)(inputs), training=True)
    )


class Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = keras.layers.Conv2D(2, 1), keras.layers.BatchNormalization()

    def call(self, x: Any) -> Any:
        return self.bn(self.conv(x))


def subclassed() -> keras.Model:
    model = Subclassed()
    model(np.zeros((1, 4, 4, 3), np.float32))
    return model


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), ValueError, r"has no BatchNormalization layer"),
        (
            lambda: keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 1), keras.layers.ReLU(name="act"), keras.layers.BatchNormalization(name="bn")]),
            ValueError, r"'bn': its input comes from 'act' \(ReLU\), not a convolution or dense layer",
        ),
        (conv_relu_activation, ValueError, r"with activation 'relu', not linear"),
        (
            lambda: keras.Sequential([keras.Input((3,), name="x"), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2)]),
            ValueError, r"'bn': its input comes from the model's input 'x'",
        ),
        (output_used_twice, ValueError, r"'bn': the output of 'conv' is also used by 'add'"),
        (conv_called_twice, ValueError, r"'bn': 'conv' is called 2 times in the model"),
        (
            lambda: keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(4, 1, name="conv"), keras.layers.BatchNormalization(axis=1, name="bn")]),
            ValueError, r"'bn': it normalizes axis 1 of its 4-D input, but 'conv' \(Conv2D\) has its output channels on axis 3",
        ),
        (training_true, ValueError, r"'bn': the batch norm is called with training=True"),
        (lambda: keras.Sequential([keras.layers.Dense(2), keras.layers.BatchNormalization()]), ValueError, r"has not been built"),
        (subclassed, TypeError, r"is a subclassed Subclassed: fold needs a Sequential or functional model"),
        (zero_variance, ValueError, r"'bn' \(folded into 'dense'\): running_var\[1\] \+ eps = 0.0: expected > 0"),
    ],
    ids=[
        "no-batch-norm", "after-relu", "relu-activation", "after-input", "output-used-twice",
        "layer-called-twice", "axis", "training-true", "not-built", "subclassed", "zero-variance",
    ],
)  # fmt: skip
def test_refusals_name_the_layer_and_leave_the_model_unchanged(
    make: Callable[[], Any], error: type, message: str
) -> None:
    model = make()
    check = unchanged(model)
    with pytest.raises(error, match=message):
        fold(model)
    check()


def test_a_layer_is_refused() -> None:
    from normkit_tensorflow.fold import fold_model

    with pytest.raises(TypeError, match=r"expected a Keras 3 model"):
        fold_model(keras.layers.BatchNormalization())
