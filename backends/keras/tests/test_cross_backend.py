"""One model, trained for two epochs under this run's Keras backend, gives the predictions of an
independent float64 oracle: the same model built from Keras's own layers, in float64, trained
under Keras's TensorFlow backend in a subprocess (once per session) from the same NumPy weights
on the same batches.

Why this oracle: it shares no code with normkit (stock Keras layers; on TensorFlow, Keras's
statistics are two-pass ``tf.nn.moments``) and it is one set of numbers for all three runs, so
"within the training tolerance of the oracle" under tensorflow, jax and torch puts the three
backends within twice that of each other; float64 makes its own rounding negligible, so the
tolerance is the float32 side's alone. (A normkit run on another backend would not be
independent; a NumPy reimplementation of the model's forward and backward passes would be
code written for the test.) Instance norm without moving statistics has a stock stand-in:
Keras's group norm with one group per channel.

At ``|mean|/std = 1e4`` the same holds for batch norm on raw features, under every backend,
while Keras's own layer on torch (``E[x^2] - E[x]^2``) trains to NaN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras_helpers import (
    BACKEND,
    CROSS_EVAL_TERMS,
    CROSS_STEP_TERMS,
    OFFSET_STEP_TERMS,
    TESTS,
    cross_model,
    importable,
    initial_weights,
    instance_as_group_norm,
    offset_model,
    run,
)

import normkit_keras as nk
from normkit.testing.tolerances import CENTERING_FACTOR, EPS, reduction_growth, training_tolerance

BATCH_SIZE, EPOCHS, SAMPLES = 16, 2, 64
STEPS = EPOCHS * SAMPLES // BATCH_SIZE
OFFSET = 1e4

# The oracle: stock Keras layers in float64 on the TensorFlow backend, in a fresh process.
ORACLE = """
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, sys.argv[1])
from keras_helpers import LargestStep, cross_model, instance_as_group_norm, offset_model

directory = Path(sys.argv[2])
inputs = np.load(directory / "inputs.npz")
results = {}
for name, model in (
    ("cross", cross_model(keras.layers, instance_as_group_norm, "float64")),
    ("offset", offset_model(keras.layers, "float64")),
):
    model.set_weights([inputs[f"{name}_w{i}"] for i in range(len(model.weights))])
    largest = LargestStep()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(inputs[f"{name}_x"], inputs[f"{name}_y"], batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[largest])
    results[f"{name}_predictions"] = model.predict(inputs[f"{name}_x"], verbose=0)
    results[f"{name}_largest"] = np.array(largest.largest)
    for i, w in enumerate(model.get_weights()):
        results[f"{name}_trained{i}"] = w
np.savez(directory / "oracle.npz", **results)
"""


def cross_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20)
    x = rng.normal(1.0, 2.0, size=(SAMPLES, 8, 8, 3)).astype("float32")
    return x, rng.normal(size=(SAMPLES, 2)).astype("float32")


def offset_data() -> tuple[np.ndarray, np.ndarray]:
    """Four features at 1e4 with standard deviation 1 (``|mean|/std = 1e4``) and targets that
    depend on their deviations."""
    rng = np.random.default_rng(21)
    deviations = rng.normal(size=(SAMPLES, 4))
    x = (OFFSET + deviations).astype("float32")
    y = deviations @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(SAMPLES, 2))
    return x, y.astype("float32")


@pytest.fixture(scope="session")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The inputs (initial weights and data, drawn by NumPy) and the float64 oracle's results."""
    if not importable("tensorflow"):
        pytest.skip("the oracle trains under Keras's TensorFlow backend, and TensorFlow is not installed")
    directory: Path = tmp_path_factory.mktemp("oracle")
    inputs: dict[str, np.ndarray] = {}
    for name, model, (x, y), seed in (
        ("cross", cross_model(keras.layers, instance_as_group_norm), cross_data(), 22),
        ("offset", offset_model(keras.layers), offset_data(), 23),
    ):
        inputs |= {f"{name}_x": x, f"{name}_y": y}
        inputs |= {f"{name}_w{i}": w for i, w in enumerate(initial_weights(model, seed))}
    np.savez(directory / "inputs.npz", **inputs)
    run(ORACLE, TESTS, directory, cwd=directory, backend="tensorflow")
    return inputs | dict(np.load(directory / "oracle.npz"))


def train(model: keras.Model, name: str, oracle: dict[str, Any]) -> np.ndarray:
    """``model`` from the oracle's initial weights after the oracle's training run, and its
    predictions on the training data."""
    model.set_weights([oracle[f"{name}_w{i}"] for i in range(len(model.weights))])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = oracle[f"{name}_x"], oracle[f"{name}_y"]
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0)
    return model.predict(x, verbose=0)


def test_the_five_layers_train_here_as_the_float64_oracle(oracle: dict[str, Any]) -> None:
    """Predictions and every weight (moving statistics included) after two epochs of ``fit``
    within :func:`training_tolerance` of the oracle: 8 steps of CROSS_STEP_TERMS terms each,
    relative to the largest output, and to the largest single step for the weights."""
    model = cross_model(nk, nk.InstanceNormalization)
    predictions = train(model, "cross", oracle)
    expected = oracle["cross_predictions"]
    scale = float(np.abs(expected).max())
    tolerance = training_tolerance("float32", steps=STEPS, reduction_size=CROSS_STEP_TERMS, scale=scale)
    np.testing.assert_allclose(predictions, expected, **tolerance.kwargs)
    step = training_tolerance(
        "float32", steps=STEPS, reduction_size=CROSS_STEP_TERMS, scale=float(oracle["cross_largest"])
    )
    for i, (w, got) in enumerate(zip(model.weights, model.get_weights(), strict=True)):
        np.testing.assert_allclose(got, oracle[f"cross_trained{i}"], **step.kwargs, err_msg=w.path)
    # and eval alone, from the oracle's trained weights: one forward pass (steps=0)
    model.set_weights([oracle[f"cross_trained{i}"].astype("float32") for i in range(len(model.weights))])
    once = training_tolerance("float32", steps=0, reduction_size=CROSS_EVAL_TERMS, scale=scale)
    np.testing.assert_allclose(model.predict(oracle["cross_x"], verbose=0), expected, **once.kwargs)


def offset_tolerance(scale: float) -> dict[str, float]:
    r""":func:`training_tolerance` with each step's relative error widened by the spec's centering
    allowance :math:`2\epsilon_c g`, :math:`g = |\mu|/\sigma = 10^4`: a float32 mean of values
    near :math:`10^4` is known to :math:`\epsilon_c|\mu|`, which enters the normalized output,
    the moving mean and, through the weights, every later step:
    :math:`r = \epsilon_d + (K + 1)(\sqrt N + 2g)\,\epsilon_c`."""
    gain = OFFSET / 1.0
    r = (
        EPS["float32"]
        + (STEPS + 1) * (reduction_growth(OFFSET_STEP_TERMS) + CENTERING_FACTOR * gain) * EPS["float32"]
    )
    return {"rtol": r, "atol": r * scale}


def test_at_mean_over_std_1e4_batch_norm_trains_as_the_oracle_where_keras_on_torch_gives_nan(
    oracle: dict[str, Any],
) -> None:
    expected = oracle["offset_predictions"]
    tolerance = offset_tolerance(float(np.abs(expected).max()))
    ours = train(offset_model(nk), "offset", oracle)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, expected, **tolerance)
    stock = train(offset_model(keras.layers), "offset", oracle)
    if BACKEND == "torch":  # Keras's ops.moments on torch: E[x^2] - E[x]^2, unclamped
        assert np.isnan(stock).any(), "Keras's torch BatchNormalization no longer fails at this offset"
    else:  # two-pass statistics (tf.nn.moments, jnp.var): within the same bound
        np.testing.assert_allclose(stock, expected, **tolerance)
