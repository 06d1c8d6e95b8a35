"""``fit``, ``evaluate`` and ``predict`` under this run's Keras backend: a model with normkit's
layers trains for two epochs as the same model with Keras's own layers (the oracle), from the
same weights on the same batches, within :func:`normkit.testing.tolerances.training_tolerance`;
a semantic difference (another epsilon) leaves that bound."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, LargestStep, numpy

import normkit_keras as nk
from normkit.testing.tolerances import Tolerance, training_tolerance


def batch_layer_model(library: object, seed: int = 0) -> keras.Model:
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> dense -> LayerNorm -> dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(6, 3, padding="same"),
            library.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(6, 3, padding="same"),
            library.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(8),
            library.LayerNormalization(),
            keras.layers.Dense(2),
        ]
    )


# Terms summed per value along batch_layer_model's forward pass on a batch of 16 8x8 images: the
# convs 3*3*3 and 3*3*6, the pooling 8*8, the dense layers 6 and 8, layer norm's two passes over
# 8; in training also each batch norm's two passes over 16*8*8 and the loss's mean over 16*2. A
# training step's backward pass sums about as many again, plus the conv kernels' gradients over
# the 16*8*8 positions.
BATCH_LAYER_EVAL_TERMS = 27 + 54 + 64 + 6 + 8 + 2 * 8
BATCH_LAYER_STEP_TERMS = 2 * (BATCH_LAYER_EVAL_TERMS + 2 * (2 * 16 * 8 * 8) + 16 * 2) + 2 * 16 * 8 * 8


def group_rms_model(library: object, seed: int = 0, **group: object) -> keras.Model:
    """conv -> GroupNormalization -> ReLU -> pool -> dense -> RMSNormalization -> dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same"),
            library.GroupNormalization(groups=4, **group),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(8),
            library.RMSNormalization(),
            keras.layers.Dense(2),
        ]
    )


# The conv 3*3*3, group norm's two passes over a group (2 channels of 8*8), the pooling 8*8, the
# dense layers 8 and 8, RMS norm's mean square over 8; the loss's mean over 16*2; backward about
# as many again, plus the conv kernel's gradient over 16*8*8.
GROUP_RMS_STEP_TERMS = 2 * (27 + 2 * 128 + 64 + 8 + 8 + 8 + 16 * 2) + 16 * 8 * 8


def data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(64, 8, 8, 3)).astype("float32")
    return x, rng.normal(size=(64, 2)).astype("float32")


BATCH_SIZE, EPOCHS = 16, 2
STEPS = EPOCHS * 64 // BATCH_SIZE


def fit_side_by_side(
    make: Callable[..., keras.Model], ours: keras.Model, jit_compile: bool | str = "auto"
) -> tuple[keras.Model, keras.Model, float, list[float]]:
    """Keras's model and ours, from the same weights, after two epochs of SGD on the same
    batches; the largest change one step made to a weight, and both models' ``evaluate``."""
    stock = make(keras.layers)
    ours.set_weights(stock.get_weights())
    x, y = data()
    largest = LargestStep()
    losses = []
    for model, callbacks, jit in ((stock, [largest], "auto"), (ours, [], jit_compile)):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)
        losses.append(model.evaluate(x, y, batch_size=64, verbose=0))
    return stock, ours, largest.largest, losses


def assert_same_after_fit(
    stock: keras.Model, ours: keras.Model, largest_step: float, losses: list[float], terms: int
) -> None:
    """Weights, ``predict``, ``evaluate`` and training-mode outputs within
    :func:`training_tolerance`: STEPS steps of ``terms`` terms each, relative to the largest
    single step for the weights and to the largest output for the outputs."""

    def tolerance(scale: float) -> Tolerance:
        return training_tolerance("float32", steps=STEPS, reduction_size=terms, scale=scale)

    x, _ = data()
    for w, got, expected in zip(stock.weights, ours.get_weights(), stock.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, **tolerance(largest_step).kwargs, err_msg=w.path)
    predictions = [m.predict(x, verbose=0) for m in (ours, stock)]
    training = [numpy(m(x[:16], training=True)) for m in (ours, stock)]
    for got, expected in (predictions, training):
        np.testing.assert_allclose(got, expected, **tolerance(float(np.abs(expected).max())).kwargs)
    # the loss is a mean of squares of the predictions: twice their relative error, and its rounding
    np.testing.assert_allclose(losses[1], losses[0], rtol=2 * tolerance(0.0).rtol)


def test_batch_and_layer_norm_train_as_keras_layers() -> None:
    assert_same_after_fit(
        *fit_side_by_side(batch_layer_model, batch_layer_model(nk)), terms=BATCH_LAYER_STEP_TERMS
    )


class _EpsilonOf1e5:
    """normkit's Keras layers with batch norm's epsilon 1e-5 instead of Keras's 1e-3."""

    LayerNormalization = nk.LayerNormalization

    @staticmethod
    def BatchNormalization(**kwargs: object) -> keras.layers.Layer:
        return nk.BatchNormalization(epsilon=1e-5, **kwargs)


def test_the_two_epoch_comparison_fails_for_another_epsilon() -> None:
    """The bound of the test above is far below a semantic difference: epsilon 1e-5 instead of
    Keras's 1e-3 leaves it."""
    with pytest.raises(AssertionError):
        assert_same_after_fit(
            *fit_side_by_side(batch_layer_model, batch_layer_model(_EpsilonOf1e5)),
            terms=BATCH_LAYER_STEP_TERMS,
        )


@pytest.mark.parametrize("jit_compile", [False, True], ids=["default", "compiled"])
def test_group_and_rms_norm_train_as_keras_layers(jit_compile: bool) -> None:
    if jit_compile and BACKEND == "jax":
        pytest.skip("JAX's trainer always compiles with XLA: the default run is the compiled one")
    if jit_compile and BACKEND == "torch":
        pytest.skip(
            "jit_compile=True is torch.compile on torch: not run, compiling a training step on a CPU "
            "takes too long for this suite (so normkit's kernels under torch.compile are untested)"
        )
    ours = group_rms_model(nk)
    assert_same_after_fit(*fit_side_by_side(group_rms_model, ours, jit_compile), terms=GROUP_RMS_STEP_TERMS)


def test_the_group_rms_comparison_fails_for_another_epsilon() -> None:
    """Group norm's epsilon 1e-5 (torch's) instead of Keras's 1e-3 leaves the bound."""
    with pytest.raises(AssertionError):
        assert_same_after_fit(
            *fit_side_by_side(group_rms_model, group_rms_model(nk, preset="torch")),
            terms=GROUP_RMS_STEP_TERMS,
        )


def test_stock_keras_weights_load_into_the_normkit_model(tmp_path) -> None:
    stock, ours = batch_layer_model(keras.layers, seed=3), batch_layer_model(nk, seed=4)
    x, y = data(2)
    stock.compile(optimizer="sgd", loss="mse")
    stock.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = tmp_path / "stock.weights.h5"
    stock.save_weights(path)
    ours.load_weights(path)
    expected = stock.predict(x, verbose=0)
    # one forward pass in eval (steps=0), relative to the outputs' magnitude
    tolerance = training_tolerance(
        "float32", steps=0, reduction_size=BATCH_LAYER_EVAL_TERMS, scale=np.abs(expected).max()
    )
    np.testing.assert_allclose(ours.predict(x, verbose=0), expected, **tolerance.kwargs)
