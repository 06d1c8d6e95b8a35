"""``normkit_tensorflow``'s Keras layers are ``normkit_keras``'s (one class, one registration
each), a ``.keras`` file saved with them loads in a new process after ``import
normkit_tensorflow``, and normkit loading the TensorFlow plugin imports no more than it must.

The layers themselves are tested under every Keras backend in ``backends/keras/tests``. Each
check here runs in a fresh Python process: in the process that built a model the layers are
registered already, so a load there cannot show whether ``import normkit_tensorflow`` registers
them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import normkit_keras
import normkit_tensorflow
import normkit_tensorflow.layers

LAYERS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization")  # in the model's order
ALL_LAYERS = (
    "BatchNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
)

# Process A: build a model with three layers through normkit_tensorflow's names (non-default
# presets and options), fit it a little, save it and its predictions on a fixed input.
SAVE = """
import json, sys
from pathlib import Path

import keras
import numpy as np

import normkit_tensorflow as nt

directory = Path(sys.argv[1])
keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((6, 6, 3)),
    keras.layers.Conv2D(4, 3, padding="same"),
    nt.BatchNormalization(preset="torch"),
    keras.layers.ReLU(),
    nt.InstanceNormalization(track_running_stats=True, momentum=0.8),
    keras.layers.GlobalAveragePooling2D(),
    keras.layers.Dense(6),
    nt.LayerNormalization(preset="flax"),
    keras.layers.Dense(2),
])
rng = np.random.default_rng(0)
x = rng.normal(1.0, 2.0, size=(32, 6, 6, 3)).astype("float32")
y = rng.normal(size=(32, 2)).astype("float32")
model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
probe = rng.normal(1.0, 2.0, size=(8, 6, 6, 3)).astype("float32")
np.save(directory / "probe.npy", probe)
np.save(directory / "expected.npy", model.predict(probe, verbose=0))
model.save(directory / "model.keras")
configs = [layer.get_config() for layer in model.layers if type(layer).__module__.startswith("normkit")]
(directory / "configs.json").write_text(json.dumps(configs))
"""

# Process B: nothing but the imports a user needs, then load and predict.
LOAD = """
import json, sys
from pathlib import Path

import numpy as np

FRAMEWORKS = ("torch", "jax", "cupy")
before = {name for name in FRAMEWORKS if name in sys.modules}  # TensorFlow imports jax if it can
directory = Path(sys.argv[1])
model = keras.models.load_model(directory / "model.keras")
predictions = model.predict(np.load(directory / "probe.npy"), verbose=0)
np.save(directory / f"got-{sys.argv[2]}.npy", predictions)
normkit_layers = [layer for layer in model.layers if type(layer).__module__.startswith("normkit")]
print(json.dumps({
    "classes": [f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}" for layer in normkit_layers],
    "configs": [layer.get_config() for layer in normkit_layers],
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
    """The directory where process A left model.keras, probe.npy, expected.npy, configs.json."""
    directory = tmp_path_factory.mktemp("saved")
    run(SAVE, directory, cwd=directory)
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
    tag = imports.split(",")[0].split()[-1]
    result = json.loads(run(f"{imports}\n{LOAD}", saved, tag, cwd=saved))
    assert result["classes"] == [f"normkit_keras.{name}" for name in LAYERS]
    assert result["configs"] == json.loads((saved / "configs.json").read_text())
    assert [config["preset"] for config in result["configs"]] == ["torch", "keras", "flax"]
    # Same weights and the same graph on the same machine: the same float32 bits.
    np.testing.assert_array_equal(np.load(saved / f"got-{tag}.npy"), np.load(saved / "expected.npy"))
    assert result["frameworks"] == [], "loading a TensorFlow model imported another framework"


def test_the_registered_names_in_a_saved_file_do_not_change(saved: Path) -> None:
    """The names Keras looks the classes up by are in every saved file: changing them would stop
    files saved by earlier versions (whose ``module`` was ``normkit_tensorflow.layers``) from
    loading."""
    with zipfile.ZipFile(saved / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    ours = [
        (layer["module"].split(".")[0], layer["class_name"], layer["registered_name"])
        for layer in config["config"]["layers"]
        if layer["module"].startswith("normkit")
    ]
    assert ours == [("normkit_keras", name, f"normkit>{name}") for name in LAYERS]


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
