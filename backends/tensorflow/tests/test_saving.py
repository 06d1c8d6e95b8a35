"""A ``.keras`` file with normkit's layers loads in a new process, and the layers refuse Keras's
other backends with a clear error.

Each check runs in a fresh Python process: in the process that built a model the layers are
registered already, so a load there cannot show whether ``import normkit_tensorflow`` registers
them (the doctest in docs/keras.md is such a load).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

LAYERS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization")  # in the model's order

# Process A: build a model with all three layers (non-default presets and options), fit it a
# little, save it and its predictions on a fixed input.
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

directory = Path(sys.argv[1])
model = keras.models.load_model(directory / "model.keras")
predictions = model.predict(np.load(directory / "probe.npy"), verbose=0)
np.save(directory / f"got-{sys.argv[2]}.npy", predictions)
normkit_layers = [layer for layer in model.layers if type(layer).__module__.startswith("normkit")]
print(json.dumps({
    "classes": [f"{type(layer).__module__}.{type(layer).__name__}" for layer in normkit_layers],
    "configs": [layer.get_config() for layer in normkit_layers],
    "frameworks": [name for name in ("torch", "jax", "cupy") if name in sys.modules],
}))
"""

# Under another Keras backend: constructing each layer, and loading the file.
OTHER_BACKEND = """
import json, sys

import keras
import normkit_tensorflow as nt

messages = {}
for name in sys.argv[2].split(","):
    try:
        getattr(nt, name)()
    except RuntimeError as error:
        messages[name] = str(error)
try:
    keras.models.load_model(sys.argv[1])
    load = None
except Exception as error:
    load = str(error)
print(json.dumps({"backend": keras.backend.backend(), "messages": messages, "load": load}))
"""

# normkit loading the plugin itself (after `import tensorflow`, for a normkit op on a tensor).
PLUGIN_PATH = """
import json, sys

import tensorflow as tf

import normkit

before = set(sys.modules)
y, mean, var = normkit.batch_norm(tf.ones((4, 3)), tf.zeros(3), tf.ones(3), training=True)
new = sorted({name.split(".")[0] for name in set(sys.modules) - before})
keras = sys.modules.get("keras")
registered = keras is not None and keras.saving.get_registered_object("normkit>BatchNormalization") is not None
print(json.dumps({
    "new": new,
    "keras_imported": keras is not None,
    "registered": registered,
    "y": y.numpy().tolist(),
}))
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
    assert result["classes"] == [f"normkit_tensorflow.layers.{name}" for name in LAYERS]
    assert result["configs"] == json.loads((saved / "configs.json").read_text())
    assert [config["preset"] for config in result["configs"]] == ["torch", "keras", "flax"]
    # Same weights and the same graph on the same machine: the same float32 bits.
    np.testing.assert_array_equal(np.load(saved / f"got-{tag}.npy"), np.load(saved / "expected.npy"))
    assert result["frameworks"] == [], "loading a TensorFlow model imported another framework"


def test_the_registered_names_in_a_saved_file_do_not_change(saved: Path) -> None:
    """The names Keras looks the classes up by are in every saved file: changing them would stop
    files saved by earlier versions from loading."""
    with zipfile.ZipFile(saved / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    ours = [
        (layer["module"], layer["class_name"], layer["registered_name"])
        for layer in config["config"]["layers"]
        if layer["module"].startswith("normkit")
    ]
    assert ours == [("normkit_tensorflow.layers", name, f"normkit>{name}") for name in LAYERS]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_another_keras_backend_is_refused_with_what_to_do(saved: Path, backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed here, and Keras needs it for KERAS_BACKEND={backend}")
    result = json.loads(
        run(OTHER_BACKEND, saved / "model.keras", ",".join(LAYERS), cwd=saved, backend=backend)
    )
    assert result["backend"] == backend
    assert set(result["messages"]) == set(LAYERS), "a layer was constructed under another backend"
    for name, message in result["messages"].items():
        assert f"normkit_tensorflow.{name} runs on Keras's TensorFlow backend only" in message
        assert f"uses the {backend!r} backend (KERAS_BACKEND={backend!r})" in message
        assert (
            "Set the environment variable KERAS_BACKEND=tensorflow before keras is first imported" in message
        )
        assert "planned" in message
    # Loading finds the registered class, which says why it cannot be built here (Keras wraps
    # the error, with the message kept), rather than "Could not locate class".
    assert result["load"] is not None
    assert result["messages"]["BatchNormalization"] in result["load"]


@pytest.mark.parametrize("legacy_keras", [False, True], ids=["keras3", "TF_USE_LEGACY_KERAS"])
def test_normkit_loading_the_plugin_imports_no_more_than_the_package(
    tmp_path: Path, legacy_keras: bool
) -> None:
    """The entry point's module sits in this package, so its ``__init__`` runs on normkit's plugin
    path too. TensorFlow 2.16+ imports Keras 3 itself, so the layers register for free; where
    TensorFlow came without Keras 3 (``TF_USE_LEGACY_KERAS=1``), the package leaves Keras alone."""
    env = {"TF_USE_LEGACY_KERAS": "1"} if legacy_keras else {}
    result = json.loads(run(PLUGIN_PATH, cwd=tmp_path, **env))
    assert result["y"] == [[0.0] * 3] * 4
    assert result["new"] == ["normkit", "normkit_tensorflow"]
    if legacy_keras:
        assert not result["keras_imported"]
    else:
        assert result["keras_imported"] and result["registered"]
