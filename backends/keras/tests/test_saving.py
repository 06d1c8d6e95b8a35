"""``.keras`` files across Keras backends: a model saved under each of TensorFlow, JAX and torch
loads, in a new process, under this run's backend with the same predictions; the registered
names (``"normkit>BatchNormalization"`` ...) are the ones ``normkit_tensorflow`` has always
written, so its files load with ``normkit_keras`` alone; and a model round-trips under this run's
backend.

tox runs this file once per Keras backend, so every (save, load) pair of the three is covered.
Each file is saved once per session, in a subprocess under its backend (the saves run side by
side), and one new process loads them all: in the process that built a model the layers are
registered already, so a load there cannot show whether ``import normkit_keras`` registers them.
"""

from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, PLUGINS, importable, numpy, run

import normkit_keras as nk
from normkit.testing.tolerances import training_tolerance

LAYERS = (
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "RMSNormalization",
)

# Process A, under the saving backend: a model with all five layers (non-default presets and
# options), fitted a little; saved with its predictions on a fixed input.
SAVE = """
import json, sys
from pathlib import Path

import keras
import numpy as np

import normkit_keras as nk

directory = Path(sys.argv[1])
keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((6, 6, 4)),
    keras.layers.Conv2D(4, 3, padding="same"),
    nk.BatchNormalization(preset="torch"),
    keras.layers.ReLU(),
    nk.InstanceNormalization(track_running_stats=True, momentum=0.8),
    nk.GroupNormalization(groups=-1, preset="torch"),
    keras.layers.GlobalAveragePooling2D(),
    keras.layers.Dense(6),
    nk.LayerNormalization(preset="flax"),
    nk.RMSNormalization(preset="gemma"),
    keras.layers.Dense(2),
])
rng = np.random.default_rng(0)
x = rng.normal(1.0, 2.0, size=(32, 6, 6, 4)).astype("float32")
y = rng.normal(size=(32, 2)).astype("float32")
model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
probe = rng.normal(1.0, 2.0, size=(8, 6, 6, 4)).astype("float32")
np.save(directory / "probe.npy", probe)
np.save(directory / "expected.npy", model.predict(probe, verbose=0))
model.save(directory / "model.keras")
configs = [layer.get_config() for layer in model.layers if type(layer).__module__.startswith("normkit")]
(directory / "configs.json").write_text(json.dumps(configs))
"""

# Terms summed per value along the saved model's forward pass: the conv 3*3*4, instance norm's two
# passes over 6*6, group norm's over 6*6, the pooling 6*6, the dense layers 4 and 6, layer norm's
# two passes over 6, RMS norm's one (batch norm in eval sums nothing).
EVAL_TERMS = 36 + 2 * 36 + 2 * 36 + 36 + 4 + 6 + 2 * 6 + 6

SAVING_BACKENDS = ("tensorflow", "jax", "torch")

# Process B: nothing but the imports a user needs, then load each file given as NAME=PATH
# (probe.npy beside it) and predict; float32 predictions go through JSON exactly. The configs come
# last: Keras's get_config imports TensorFlow wherever it is installed (serialization_lib checks
# for tf.TensorShape), after which normkit would load its TensorFlow backend on its next new type.
LOAD = """
import json, sys
from pathlib import Path

import numpy as np

models, results = {}, {}
for argument in sys.argv[1:]:
    name, path = argument.split("=", 1)
    models[name] = keras.models.load_model(path)
    predictions = models[name].predict(np.load(Path(path).parent / "probe.npy"), verbose=0)
    results[name] = {"predictions": predictions.tolist()}
normkit_tensorflow = "normkit_tensorflow" in sys.modules
for name, model in models.items():
    normkit_layers = [layer for layer in model.layers if type(layer).__module__.startswith("normkit")]
    results[name]["classes"] = [
        f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}" for layer in normkit_layers
    ]
    results[name]["configs"] = [layer.get_config() for layer in normkit_layers]
print(json.dumps({"backend": keras.backend.backend(), "files": results, "normkit_tensorflow": normkit_tensorflow}))
"""


def can_save_under(backend: str) -> bool:
    """Whether Keras's ``backend`` and normkit's backend for its tensors are installed."""
    return importable(backend) and importable(PLUGINS[backend].split(".")[0])


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """For each Keras backend that is installed, the directory where process A left model.keras,
    probe.npy, expected.npy and configs.json."""
    root = tmp_path_factory.mktemp("saved")
    directories = {backend: root / backend for backend in SAVING_BACKENDS if can_save_under(backend)}
    for directory in directories.values():
        directory.mkdir()
    workers = max(1, min(len(directories), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # each waits on its own subprocess
        jobs = [pool.submit(run, SAVE, d, cwd=d, backend=b) for b, d in directories.items()]
        for job in jobs:
            job.result()
    return directories


def written_by_normkit_tensorflow(saved: dict[str, Path]) -> Path:
    """The TensorFlow file as ``normkit_tensorflow`` wrote it: each layer's ``module`` is
    ``normkit_tensorflow.layers`` (the registered names are the same)."""
    old = saved["tensorflow"] / "old.keras"
    with zipfile.ZipFile(saved["tensorflow"] / "model.keras") as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                for layer in config["config"]["layers"]:
                    if layer["module"].startswith("normkit_keras"):
                        layer["module"] = "normkit_tensorflow.layers"
                content = json.dumps(config).encode()
            target.writestr(item, content)
    return old


def load(imports: str, files: dict[str, Path]) -> dict:
    """What process B reports after ``imports`` for each of ``files`` (by name)."""
    arguments = [f"{name}={path}" for name, path in files.items()]
    directory = next(iter(files.values())).parent
    return json.loads(run(f"{imports}\n{LOAD}", *arguments, cwd=directory))


@pytest.fixture(scope="session")
def loaded(saved: dict[str, Path]) -> dict:
    """Process B's report on every saved file, after ``import keras, normkit_keras``."""
    return load("import keras, normkit_keras", {b: d / "model.keras" for b, d in saved.items()})


def assert_loaded(directory: Path, saving_backend: str, result: dict, name: str) -> None:
    """The loaded model has normkit_keras's classes and the saved configs, and predicts as the
    saved one: the same bits under the backend that saved it, within one forward pass's
    rounding under another."""
    assert result["backend"] == BACKEND
    if BACKEND != "tensorflow":
        assert not result["normkit_tensorflow"], "loading under another backend imported normkit_tensorflow"
    got = result["files"][name]
    assert got["classes"] == [f"normkit_keras.{layer}" for layer in LAYERS]
    assert got["configs"] == json.loads((directory / "configs.json").read_text())
    assert [config["preset"] for config in got["configs"]] == ["torch", "keras", "torch", "flax", "gemma"]
    predictions, expected = np.array(got["predictions"], dtype="float32"), np.load(directory / "expected.npy")
    if BACKEND == saving_backend:  # the same weights and kernels on the same machine
        np.testing.assert_array_equal(predictions, expected)
    else:
        tolerance = training_tolerance(
            "float32", steps=0, reduction_size=EVAL_TERMS, scale=np.abs(expected).max()
        )
        np.testing.assert_allclose(predictions, expected, **tolerance.kwargs)


def saved_under(saved: dict[str, Path], backend: str) -> Path:
    if backend not in saved:
        pytest.skip(f"Keras's {backend!r} backend or normkit's backend for it is not installed")
    return saved[backend]


@pytest.mark.parametrize("saving_backend", SAVING_BACKENDS)
def test_a_file_saved_under_each_backend_loads_in_a_new_process_under_this_one(
    saved: dict[str, Path], loaded: dict, saving_backend: str
) -> None:
    assert_loaded(saved_under(saved, saving_backend), saving_backend, loaded, saving_backend)


@pytest.mark.parametrize("saving_backend", SAVING_BACKENDS)
def test_the_registered_names_in_a_saved_file_are_normkit_tensorflows(
    saved: dict[str, Path], saving_backend: str
) -> None:
    """The names Keras looks the classes up by are in every saved file, whatever backend saved
    it: they are those ``normkit_tensorflow`` wrote, so files saved before the layers moved still
    load."""
    with zipfile.ZipFile(saved_under(saved, saving_backend) / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    ours = [
        (layer["module"].split(".")[0], layer["class_name"], layer["registered_name"])
        for layer in config["config"]["layers"]
        if layer["module"].startswith("normkit")
    ]
    assert ours == [("normkit_keras", name, f"normkit>{name}") for name in LAYERS]


def test_a_file_written_by_normkit_tensorflow_loads_with_normkit_keras_alone(saved: dict[str, Path]) -> None:
    """A file as ``normkit_tensorflow`` wrote it (under TensorFlow, the only backend it had)
    loads after ``import normkit_keras, keras`` (the other import order than the test above),
    without ``normkit_tensorflow`` under JAX or torch."""
    directory = saved_under(saved, "tensorflow")
    result = load("import normkit_keras, keras", {"old": written_by_normkit_tensorflow(saved)})
    assert_loaded(directory, "tensorflow", result, "old")


def test_a_model_round_trips_through_a_keras_file_here(tmp_path: Path) -> None:
    """Saved and loaded under this run's backend, in this process: configs, weights and the
    same predictions bit for bit."""
    keras.utils.set_random_seed(12)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            nk.GroupNormalization(groups=-1, preset="torch"),
            keras.layers.Conv2D(4, 3, padding="same"),
            nk.BatchNormalization(),
            nk.RMSNormalization(axis=[-2, -1], preset="gemma"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    rng = np.random.default_rng(13)
    x, y = (
        rng.normal(1.0, 2.0, size=(32, 6, 6, 4)).astype("float32"),
        rng.normal(size=(32, 2)).astype("float32"),
    )
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for index, cls in ((0, nk.GroupNormalization), (2, nk.BatchNormalization), (3, nk.RMSNormalization)):
        assert type(loaded.layers[index]) is cls
        assert loaded.layers[index].get_config() == model.layers[index].get_config()
    assert loaded.layers[0].groups == 4 and loaded.layers[0].epsilon == 1e-5
    assert loaded.layers[3].weight_offset == 1.0
    for got, expected in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(numpy(loaded.predict(x, verbose=0)), numpy(model.predict(x, verbose=0)))
