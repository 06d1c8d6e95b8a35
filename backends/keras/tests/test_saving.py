"""``.keras`` files: one saved under Keras's TensorFlow backend loads, in a new process, under each
Keras backend with the same predictions; the registered names (``"normkit>BatchNormalization"``
...) are the ones ``normkit_tensorflow`` has always written, so its files load with
``normkit_keras`` alone; and a model round-trips under this run's backend.

Each load runs in a fresh Python: in the process that built a model the layers are registered
already, so a load there cannot show whether ``import normkit_keras`` registers them.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras_helpers import BACKEND, importable, numpy, run

import normkit_keras as nk
from normkit.testing.tolerances import training_tolerance

LAYERS = (
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "RMSNormalization",
)

# Process A, under TensorFlow: a model with all five layers (non-default presets and options),
# fitted a little; saved with its predictions on a fixed input.
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

# Process B: nothing but the imports a user needs, then load and predict.
LOAD = """
import json, sys
from pathlib import Path

import numpy as np

directory = Path(sys.argv[1])
model = keras.models.load_model(directory / sys.argv[2])
np.save(directory / f"got-{sys.argv[3]}.npy", model.predict(np.load(directory / "probe.npy"), verbose=0))
normkit_layers = [layer for layer in model.layers if type(layer).__module__.startswith("normkit")]
print(json.dumps({
    "backend": keras.backend.backend(),
    "classes": [f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}" for layer in normkit_layers],
    "configs": [layer.get_config() for layer in normkit_layers],
    "normkit_tensorflow": "normkit_tensorflow" in sys.modules,
}))
"""


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory where process A left model.keras, probe.npy, expected.npy, configs.json."""
    if not importable("tensorflow"):
        pytest.skip("the file is saved under Keras's TensorFlow backend, and TensorFlow is not installed")
    directory = tmp_path_factory.mktemp("saved")
    run(SAVE, directory, cwd=directory, backend="tensorflow")
    return directory


def assert_loaded(saved: Path, result: dict, tag: str) -> None:
    """The loaded model has normkit_keras's classes and the saved configs, and predicts as the
    saved one: the same bits under TensorFlow, within one forward pass's rounding elsewhere."""
    assert result["backend"] == BACKEND
    assert result["classes"] == [f"normkit_keras.{name}" for name in LAYERS]
    assert result["configs"] == json.loads((saved / "configs.json").read_text())
    assert [config["preset"] for config in result["configs"]] == ["torch", "keras", "torch", "flax", "gemma"]
    got, expected = np.load(saved / f"got-{tag}.npy"), np.load(saved / "expected.npy")
    if BACKEND == "tensorflow":  # the same weights and graph on the same machine
        np.testing.assert_array_equal(got, expected)
    else:
        tolerance = training_tolerance(
            "float32", steps=0, reduction_size=EVAL_TERMS, scale=np.abs(expected).max()
        )
        np.testing.assert_allclose(got, expected, **tolerance.kwargs)
    if BACKEND != "tensorflow":
        assert not result["normkit_tensorflow"], "loading under another backend imported normkit_tensorflow"


@pytest.mark.parametrize(
    "imports",
    ["import keras, normkit_keras", "import normkit_keras, keras"],
    ids=["keras-first", "normkit-first"],
)
def test_a_file_saved_under_tensorflow_loads_in_a_new_process_under_this_backend(
    saved: Path, imports: str
) -> None:
    tag = f"{BACKEND}-{imports.split(',')[0].split()[-1]}"
    result = json.loads(run(f"{imports}\n{LOAD}", saved, "model.keras", tag, cwd=saved))
    assert_loaded(saved, result, tag)


def test_the_registered_names_in_a_saved_file_are_normkit_tensorflows(saved: Path) -> None:
    """The names Keras looks the classes up by are in every saved file: they are those
    ``normkit_tensorflow`` wrote, so files saved before the layers moved still load."""
    with zipfile.ZipFile(saved / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    ours = [
        (layer["module"].split(".")[0], layer["class_name"], layer["registered_name"])
        for layer in config["config"]["layers"]
        if layer["module"].startswith("normkit")
    ]
    assert ours == [("normkit_keras", name, f"normkit>{name}") for name in LAYERS]


def test_a_file_written_by_normkit_tensorflow_loads_with_normkit_keras_alone(saved: Path) -> None:
    """A file as ``normkit_tensorflow`` wrote it (each layer's ``module`` is
    ``normkit_tensorflow.layers``; the registered names are the same) loads after
    ``import keras, normkit_keras``, without ``normkit_tensorflow`` under JAX or torch."""
    old = saved / f"old-{BACKEND}.keras"
    with zipfile.ZipFile(saved / "model.keras") as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                for layer in config["config"]["layers"]:
                    if layer["module"].startswith("normkit_keras"):
                        layer["module"] = "normkit_tensorflow.layers"
                content = json.dumps(config).encode()
            target.writestr(item, content)
    tag = f"{BACKEND}-old"
    result = json.loads(run(f"import keras, normkit_keras\n{LOAD}", saved, old.name, tag, cwd=saved))
    assert_loaded(saved, result, tag)


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
