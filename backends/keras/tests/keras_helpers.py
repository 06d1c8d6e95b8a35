"""What the test modules share: the Keras backend in use, conversions, the subprocess runner,
and the models trained side by side."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

import normkit

BACKEND = keras.backend.backend()
"""The Keras backend of this run (``KERAS_BACKEND``, fixed when Keras was imported)."""

PLUGINS = {
    "tensorflow": "normkit_tensorflow.plugin",
    "jax": "normkit_jax.plugin",
    "torch": "normkit_torch.plugin",
}
"""The normkit backend serving each Keras backend's tensors."""

DISTRIBUTIONS = {"tensorflow": "normkit-tensorflow", "jax": "normkit-jax", "torch": "normkit-torch"}

TESTS = Path(__file__).parent

REGISTER = f"""
import importlib, importlib.metadata, os
import normkit
_backend = os.environ.get("KERAS_BACKEND", "tensorflow")
_plugin = {PLUGINS!r}.get(_backend)
if _plugin and _backend not in {{e.name for e in importlib.metadata.entry_points(group="normkit.backends")}}:
    normkit.register_backend(importlib.import_module(_plugin), _backend)
"""
"""Code that registers the normkit backend of the process's Keras backend (``KERAS_BACKEND``) when it
is on the path but not installed (it then has no entry point), for the subprocesses the tests
start; it imports neither Keras nor normkit_keras, whose order a test may choose."""


def register_uninstalled_backend() -> None:
    """Register this run's normkit backend if it is importable but has no entry point."""
    plugin = PLUGINS.get(BACKEND)
    names = {entry.name for entry in importlib.metadata.entry_points(group="normkit.backends")}
    if plugin is None or BACKEND in names or importlib.util.find_spec(plugin.split(".")[0]) is None:
        return
    normkit.register_backend(importlib.import_module(plugin), BACKEND)


def missing_backend() -> str | None:
    """Why this run cannot test the layers, or ``None``."""
    if BACKEND not in PLUGINS:
        return f"the layers are tested under Keras's tensorflow, jax and torch backends, not {BACKEND!r}"
    if importlib.util.find_spec(PLUGINS[BACKEND].split(".")[0]) is None:
        return (
            f"{DISTRIBUTIONS[BACKEND]} (normkit's backend for Keras's {BACKEND!r} tensors) is not installed"
        )
    return None


if missing_backend() is None:
    register_uninstalled_backend()


def float64_supported() -> bool:
    """Whether Keras variables and tensors can be float64 here (JAX only with x64 enabled)."""
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


FLOAT64_SKIP = "JAX truncates float64 to float32 unless JAX_ENABLE_X64 is set"


def numpy(value: Any) -> np.ndarray:
    """A tensor, a Keras variable or an array as a NumPy array."""
    if isinstance(value, keras.Variable):
        value = value.value
    return np.array(keras.ops.convert_to_numpy(value))


def weight_names(layer_or_model: Any) -> list[str]:
    return [w.path.split("/")[-1] for w in layer_or_model.weights]


class LargestStep(keras.callbacks.Callback):
    """The largest change one training step makes to any weight (moving statistics included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0.0
        self.before: list[np.ndarray] = []

    def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
        self.before = [numpy(w) for w in self.model.weights]

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        for w, before in zip(self.model.weights, self.before, strict=True):
            self.largest = max(self.largest, float(np.abs(numpy(w) - before).max()))


def run(code: str, *args: object, cwd: Path, backend: str = BACKEND, **env: str) -> str:
    """Run ``code`` in a new Python with Keras on ``backend`` (after :data:`REGISTER`); its
    stdout. It must succeed."""
    environ = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    process = subprocess.run(
        [sys.executable, "-c", REGISTER + code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-6000:]
    return process.stdout


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


WIDEST = "float64" if float64_supported() else "float32"
"""The widest float dtype of this run: float64, or float32 under JAX without x64 (the tests that
use it derive their tolerances from it)."""


def instance_as_group_norm(**kwargs: Any) -> keras.layers.Layer:
    """Keras's stand-in for instance norm without moving statistics: group norm with one group per
    channel normalizes the same groups, with the same weights (``gamma``, ``beta``)."""
    return keras.layers.GroupNormalization(groups=-1, **kwargs)


def cross_model(library: Any, instance_norm: Any, dtype: str = "float32") -> keras.Model:
    """The model every backend trains: conv -> BN -> ReLU -> conv -> InstanceNorm -> ReLU ->
    GroupNorm -> pool -> dense -> LayerNorm -> RMSNorm -> dense, all five normalizations."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 3), dtype=dtype),
            keras.layers.Conv2D(6, 3, padding="same", dtype=dtype),
            library.BatchNormalization(momentum=0.9, dtype=dtype),
            keras.layers.ReLU(dtype=dtype),
            keras.layers.Conv2D(6, 3, padding="same", dtype=dtype),
            instance_norm(dtype=dtype),
            keras.layers.ReLU(dtype=dtype),
            library.GroupNormalization(groups=3, dtype=dtype),
            keras.layers.GlobalAveragePooling2D(dtype=dtype),
            keras.layers.Dense(8, dtype=dtype),
            library.LayerNormalization(dtype=dtype),
            library.RMSNormalization(dtype=dtype),
            keras.layers.Dense(2, dtype=dtype),
        ]
    )


# Terms summed per value along cross_model's forward pass on a batch of 16 8x8 images: the convs
# 3*3*3 and 3*3*6, instance norm's two passes over 8*8, group norm's over 2*8*8, the pooling 8*8,
# the dense layers 6 and 8, layer norm's two passes over 8, RMS norm's one; in training also batch
# norm's two passes over 16*8*8 and the loss's mean over 16*2. A training step's backward pass
# sums about as many again, plus the conv kernels' gradients over the 16*8*8 positions.
CROSS_EVAL_TERMS = 27 + 54 + 2 * 64 + 2 * 128 + 64 + 6 + 8 + 2 * 8 + 8
CROSS_STEP_TERMS = 2 * (CROSS_EVAL_TERMS + 2 * 16 * 64 + 16 * 2) + 2 * 16 * 64


def offset_model(library: Any, dtype: str = "float32") -> keras.Model:
    """Batch norm first, on raw features far from 0, then a dense layer."""
    return keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            library.BatchNormalization(momentum=0.9, dtype=dtype),
            keras.layers.Dense(2, dtype=dtype),
        ]
    )


# Batch norm's two passes over the batch of 16, the dense layer's 4 terms and the loss's mean
# over 16*2; backward as many again, plus the dense kernel's gradient over the 16 samples.
OFFSET_STEP_TERMS = 2 * (2 * 16 + 4 + 16 * 2) + 16


def initial_weights(model: keras.Model, seed: int) -> list[np.ndarray]:
    """Weights for ``model`` drawn by NumPy, the same on every Keras backend (Keras's own
    initializers draw from each backend's generator): kernels N(0, 0.3), biases and β N(0, 0.1),
    γ and RMS scales 1 + N(0, 0.1), moving means 0 and moving variances 1."""
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.weights:
        name, shape = w.path.split("/")[-1], tuple(w.shape)
        if name == "kernel":
            weights.append(rng.normal(0.0, 0.3, size=shape))
        elif name in ("bias", "beta"):
            weights.append(rng.normal(0.0, 0.1, size=shape))
        elif name in ("gamma", "scale"):
            weights.append(1.0 + rng.normal(0.0, 0.1, size=shape))
        elif name == "moving_mean":
            weights.append(np.zeros(shape))
        elif name == "moving_variance":
            weights.append(np.ones(shape))
        else:
            raise AssertionError(f"no initial value for weight {w.path}")
    return [w.astype("float32") for w in weights]
