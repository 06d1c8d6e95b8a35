"""What is TensorFlow's own about the Keras layers: ``normkit_tensorflow``'s names are
``normkit_keras``'s classes (one class, one registration each), a ``.keras`` file of a model built
with them loads in a new process after ``import normkit_tensorflow`` alone, and normkit loading
the TensorFlow plugin imports no more than it must.

Saving and loading across Keras backends, the registered names in every file and files written
by earlier versions are tested under every Keras backend in ``backends/keras/tests``
(``test_saving.py``). A load runs in a fresh Python process: in the process that built a model
the layers are registered already, so a load there cannot show whether ``import
normkit_tensorflow`` registers them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import normkit_keras
import normkit_tensorflow
import normkit_tensorflow as nt
import normkit_tensorflow.layers

ALL_LAYERS = (
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
)

MODEL_LAYERS = (
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "RMSNormalization",
)
"""The saved model's normkit layers, in its order."""

# A new process: nothing but the imports a user needs, then load and predict.
LOAD = """
import json, sys
from pathlib import Path

import numpy as np

FRAMEWORKS = ("torch", "jax", "cupy")
before = {name for name in FRAMEWORKS if name in sys.modules}  # TensorFlow imports jax if it can
directory = Path(sys.argv[1])
model = keras.models.load_model(directory / "model.keras")
predictions = model.predict(np.load(directory / "probe.npy"), verbose=0)
ours = [layer for layer in model.layers if type(layer).__module__.startswith("normkit")]
print(json.dumps({
    "predictions": predictions.tolist(),
    "classes": [f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}" for layer in ours],
    "presets": [layer.preset for layer in ours],
    "frameworks": [name for name in FRAMEWORKS if name in sys.modules and name not in before],
}))
"""

# normkit loading the plugin itself (after `import tensorflow`, for a normkit op on a tensor).
PLUGIN_PATH = """
import json, sys

import tensorflow as tf

import normkit

before = set(sys.modules)
y, mean, var = normkit.batch_norm(tf.ones((4, 3)), tf.zeros(3), tf.ones(3), training=True)
# normkit loads the backends of the frameworks already imported (TensorFlow imports jax if it can)
others = {f"normkit_{name}" for name in ("jax", "torch", "cupy") if name in before}
new = sorted({name.split(".")[0] for name in set(sys.modules) - before} - others)
keras = sys.modules.get("keras")
registered = keras is not None and keras.saving.get_registered_object("normkit>BatchNormalization") is not None
print(json.dumps({
    "new": new,
    "keras_imported": keras is not None,
    "registered": registered,
    "y": y.numpy().tolist(),
}))
"""

# normkit_keras missing (a broken installation: normkit-tensorflow depends on it).
WITHOUT_NORMKIT_KERAS = """
import json, sys


class Missing:
    def find_spec(self, name, path=None, target=None):
        if name == "normkit_keras":
            raise ModuleNotFoundError("No module named 'normkit_keras'", name=name)
        return None


sys.meta_path.insert(0, Missing())
import keras, tensorflow as tf, normkit, normkit_tensorflow

y = normkit.layer_norm(tf.ones((2, 3)))  # the kernels need no Keras layers
try:
    normkit_tensorflow.BatchNormalization()
    message = None
except ImportError as error:
    message = str(error)
print(json.dumps({"message": message, "y": y.numpy().tolist()}))
"""


def run(code: str, *args: object, cwd: Path, backend: str = "tensorflow", **env: str) -> str:
    """Run ``code`` in a new Python with Keras on ``backend``; its stdout (it must succeed)."""
    environ = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    process = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environ,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-6000:]
    return process.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model built with ``normkit_tensorflow``'s names, with weights drawn by NumPy (positive
    variances), saved with a probe input and its predictions; built here: only the load must be
    in a new process."""
    directory = tmp_path_factory.mktemp("saved")
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            nt.BatchNormalization(preset="torch"),
            keras.layers.Conv2D(4, 3, padding="same"),
            nt.InstanceNormalization(track_running_stats=True, momentum=0.8),
            keras.layers.Conv2D(4, 3, padding="same"),
            nt.GroupNormalization(groups=2, preset="torch"),
            keras.layers.GlobalAveragePooling2D(),
            nt.LayerNormalization(preset="flax"),
            keras.layers.Dense(6),
            nt.RMSNormalization(preset="gemma"),
        ]
    )
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(0.5, 1.5, size=w.shape).astype("float32") for w in model.weights])
    probe = rng.normal(1.0, 2.0, size=(8, 6, 6, 3)).astype("float32")
    np.save(directory / "probe.npy", probe)
    np.save(directory / "expected.npy", model.predict(probe, verbose=0))
    model.save(directory / "model.keras")
    return directory


def test_the_layers_are_normkit_keras_classes_registered_once() -> None:
    for name in ALL_LAYERS:
        cls = getattr(normkit_keras, name)
        assert getattr(normkit_tensorflow, name) is cls
        assert getattr(normkit_tensorflow.layers, name) is cls
        assert keras.saving.get_registered_object(f"normkit>{name}") is cls
    assert sorted(normkit_tensorflow.__all__) == sorted([*ALL_LAYERS, "__version__"])


@pytest.mark.parametrize(
    "imports",
    ["import keras, normkit_tensorflow", "import normkit_tensorflow, keras"],
    ids=["keras-first", "normkit-first"],
)
def test_a_saved_model_loads_in_a_new_process_after_importing_normkit_tensorflow(
    saved: Path, imports: str
) -> None:
    result = json.loads(run(f"{imports}\n{LOAD}", saved, cwd=saved))
    assert result["classes"] == [f"normkit_keras.{name}" for name in MODEL_LAYERS]
    assert result["presets"] == ["torch", "keras", "torch", "flax", "gemma"]
    # Same weights and the same graph on the same machine: the same float32 bits.
    np.testing.assert_array_equal(np.array(result["predictions"], "float32"), np.load(saved / "expected.npy"))
    assert result["frameworks"] == [], "loading a TensorFlow model imported another framework"


@pytest.mark.parametrize("legacy_keras", [False, True], ids=["keras3", "TF_USE_LEGACY_KERAS"])
def test_normkit_loading_the_plugin_imports_no_more_than_the_packages(
    tmp_path: Path, legacy_keras: bool
) -> None:
    """The entry point's module sits in this package, so its ``__init__`` runs on normkit's plugin
    path too. TensorFlow 2.16+ imports Keras 3 itself, so the layers register for the cost of
    normkit_keras's modules; where TensorFlow came without Keras 3 (``TF_USE_LEGACY_KERAS=1``),
    the package leaves Keras alone."""
    env = {"TF_USE_LEGACY_KERAS": "1"} if legacy_keras else {}
    result = json.loads(run(PLUGIN_PATH, cwd=tmp_path, **env))
    assert result["y"] == [[0.0] * 3] * 4
    if legacy_keras:
        assert result["new"] == ["normkit", "normkit_tensorflow"]
        assert not result["keras_imported"]
    else:
        assert result["new"] == ["normkit", "normkit_keras", "normkit_tensorflow"]
        assert result["keras_imported"] and result["registered"]


def test_without_normkit_keras_the_kernels_work_and_the_layers_say_what_to_install(tmp_path: Path) -> None:
    result = json.loads(run(WITHOUT_NORMKIT_KERAS, cwd=tmp_path))
    assert result["y"] == [[0.0] * 3] * 2
    assert result["message"] is not None
    assert "normkit_keras" in result["message"] and "pip install normkit-keras" in result["message"]
