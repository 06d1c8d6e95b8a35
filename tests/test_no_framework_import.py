"""``import normkit`` and NumPy work (state files included) import no framework, even with the frameworks
installed; ``import normkit`` imports not even safetensors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "tensorflow", "cupy", "jax", "onnx", "onnxruntime")
INSTALLED = [name for name in FRAMEWORKS if importlib.util.find_spec(name) is not None]

CODE = """
import sys
import numpy as np
import normkit
x = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)
y, mean, var = normkit.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=True)
layer = normkit.BatchNorm()
layer(x)
layer.eval()(x)
normkit.layer_norm(x, (4, 4))
normkit.instance_norm(x)
import os, tempfile
with tempfile.TemporaryDirectory() as directory:  # state files: safetensors.numpy, no framework
    path = os.path.join(directory, "bn.safetensors")
    normkit.save_state(layer.state_dict(), path)
    normkit.BatchNorm.from_state_dict(normkit.load_state(path))
print(",".join(name for name in {frameworks!r} if name in sys.modules) or "none")
"""


@pytest.mark.skipif(
    not INSTALLED,
    reason="none of torch, tensorflow, cupy, jax, onnx, onnxruntime is installed here; the core tox env installs them",
)
def test_numpy_work_imports_no_framework() -> None:
    process = subprocess.run(
        [sys.executable, "-c", CODE.format(frameworks=FRAMEWORKS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "none", (
        f"imported: {process.stdout.strip()} (installed here: {INSTALLED})"
    )


def test_import_normkit_imports_neither_frameworks_nor_the_testing_tools() -> None:
    code = "import sys, normkit; print(sorted(m for m in sys.modules if m.split('.')[0] in {}))"
    heavy = (
        *FRAMEWORKS,
        *("keras", "flax", "mlx", "equinox", "onnxscript", "tf2onnx", "numba", "mpi4py"),
        *("pytest", "hypothesis", "ml_dtypes", "matplotlib", "safetensors"),
    )
    process = subprocess.run(
        [sys.executable, "-c", code.format(heavy)], capture_output=True, text=True, timeout=60
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "[]"
