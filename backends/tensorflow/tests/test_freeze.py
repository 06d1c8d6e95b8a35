"""normkit.testtime.freeze on Keras models: the frozen model's training-mode outputs reproduce
the original's inference outputs, are independent of the batch, keep γ and β trainable by
choice, save and load as a .keras file, and bad input is refused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import normkit_tensorflow
from normkit.testing.tolerances import agreement_tolerance, centering_gain
from normkit.testtime import freeze
from normkit_tensorflow.frozen import FrozenBatchNormalization


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = keras.layers.BatchNormalization(center=False, name="bn1")(h)
    h = keras.layers.ReLU()(h)
    inner = keras.Sequential([keras.Input((4, 4, 4)), normkit_tensorflow.BatchNormalization(preset="torch")])
    outputs = inner(h)
    m = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    for _ in range(3):
        m(rng.normal(1.0, 2.0, size=(8, 6, 6, 3)).astype(np.float32), training=True)
    return m


def frozen_layers(m: keras.Model) -> list[keras.layers.Layer]:
    return [
        layer for layer in m._flatten_layers(recursive=True) if isinstance(layer, FrozenBatchNormalization)
    ]


def test_training_outputs_reproduce_inference_and_ignore_the_batch() -> None:
    m = model()
    frozen = freeze(m)
    assert len(frozen_layers(frozen)) == 2
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in frozen._flatten_layers(recursive=True)
    )
    x = np.random.default_rng(2).normal(1.0, 2.0, size=(5, 6, 6, 3)).astype(np.float32)
    expected = np.asarray(m(x, training=False))
    got = np.asarray(frozen(x, training=True))
    bn1 = m.get_layer("bn1")
    gain = centering_gain(
        np.asarray(bn1.moving_mean), np.asarray(bn1.moving_variance), bn1.epsilon, np.asarray(bn1.gamma)
    )
    np.testing.assert_allclose(got, expected, **agreement_tolerance("float32", centering_gain=gain).kwargs)
    layer = frozen_layers(frozen)[0]
    h = np.random.default_rng(3).normal(size=(4, 4, 4, 4)).astype(np.float32)
    alone = np.concatenate([np.asarray(layer(h[i : i + 1], training=True)) for i in range(4)])
    np.testing.assert_array_equal(np.asarray(layer(h, training=True)), alone)
    assert layer.epsilon == bn1.epsilon
    np.testing.assert_array_equal(np.asarray(layer.beta), 0.0)  # center=False


@pytest.mark.parametrize("trainable", [False, True])
def test_affine_trainable_by_choice(trainable: bool, tmp_path) -> None:
    frozen = freeze(model(), trainable=trainable)
    names = {v.path.rsplit("/", 1)[-1] for layer in frozen_layers(frozen) for v in layer.trainable_weights}
    assert names == ({"gamma", "beta"} if trainable else set())
    path = tmp_path / "frozen.keras"
    frozen.save(path)
    x = np.ones((2, 6, 6, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(keras.models.load_model(path)(x)), np.asarray(frozen(x)))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="has no BatchNormalization; nothing to freeze"):
        freeze(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="are not built"):
        freeze(keras.Sequential([keras.layers.BatchNormalization()]))


def test_a_subclassed_model_is_refused_with_what_to_do() -> None:
    class Subclassed(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, x: object) -> object:
            return self.bn(x)

    m = Subclassed()
    m(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="is a subclassed Subclassed: freeze rebuilds the model"):
        freeze(m)
