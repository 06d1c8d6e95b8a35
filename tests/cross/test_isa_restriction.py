"""The ``avx2`` tox environment holds every framework to AVX2 code; these tests check that each
one obeyed, so that the cross-framework tests run there really ran on a narrower vector width
than an AVX-512 machine's (they are skipped elsewhere).

Set by the environment: ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's CPU kernels),
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN, inside TensorFlow and PyTorch), ``NPY_DISABLE_CPU_FEATURES``
naming NumPy's AVX-512 dispatch targets, ``NUMBA_CPU_NAME=haswell`` with ``NUMBA_CPU_FEATURES`` empty (numba's code generation).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NORMKIT_TEST_ISA") != "avx2",
    reason="runs in the avx2 tox environment (NORMKIT_TEST_ISA=avx2), which restricts the frameworks",
)


def test_numpy_dispatches_no_avx512_code() -> None:
    from numpy._core._multiarray_umath import __cpu_features__

    enabled = [
        name
        for name, on in __cpu_features__.items()
        if on and (name.startswith("AVX512") or name == "X86_V4")
    ]
    assert enabled == []


def test_torch_kernels_are_at_most_avx2() -> None:
    torch = pytest.importorskip("torch")
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")


def test_numba_compiles_for_haswell() -> None:
    numba = pytest.importorskip("numba")
    # without NUMBA_CPU_FEATURES set (empty), numba would add the host's features (AVX-512 too)
    assert numba.config.CPU_NAME == "haswell" and numba.config.CPU_FEATURES == ""


def test_onednn_in_tensorflow_runs_at_most_avx2() -> None:
    """oneDNN reports the instruction set it dispatches to when ONEDNN_VERBOSE is on."""
    pytest.importorskip("tensorflow")
    code = (
        "import tensorflow as tf\n"
        "x = tf.random.normal((1, 8, 8, 3))\n"
        "tf.nn.conv2d(x, tf.random.normal((3, 3, 3, 4)), 1, 'SAME')\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    isa = [line for line in process.stdout.splitlines() if ",isa:" in line]
    assert isa, f"oneDNN printed no instruction set:\n{process.stdout[-2000:]}"
    assert all("AVX-512" not in line and "AVX512" not in line for line in isa), isa
