"""The ``avx2`` tox environment holds every framework to AVX2 code; these tests check that each
one obeyed, so that the cross-framework tests run there really ran on a narrower vector width
than an AVX-512 machine's (they are skipped elsewhere). On a CPU without AVX-512 the
environment's own settings change nothing, so each mechanism is also proven in a subprocess with
a setting narrower than the host: it must change what the framework reports or emits.

Set by the environment: ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's CPU kernels),
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN, inside TensorFlow and PyTorch), ``NPY_DISABLE_CPU_FEATURES``
naming NumPy's AVX-512 dispatch targets, ``NUMBA_CPU_NAME=haswell`` with ``NUMBA_CPU_FEATURES`` empty (numba's code generation),
``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` (XLA's CPU compiler, under JAX).
"""

from __future__ import annotations

import ast
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


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with ``env`` added; its stdout."""
    process = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return process.stdout


def test_numba_emits_no_512_bit_code_and_obeys_a_narrower_cpu() -> None:
    pytest.importorskip("numba")
    code = (
        "import numba, numpy as np\n"
        "@numba.njit\n"
        "def axpy(a, x, y):\n"
        "    for i in range(x.size):\n"
        "        y[i] += a * x[i]\n"
        "axpy(2.0, np.ones(64), np.ones(64))\n"
        "print(axpy.inspect_asm(axpy.signatures[0]))\n"
    )
    assert "zmm" not in _python(code)  # this environment: haswell, AVX2 at most
    assert "ymm" not in _python(code, NUMBA_CPU_NAME="nehalem", NUMBA_CPU_FEATURES="")  # SSE4.2 only


def test_the_restrictions_take_effect_below_the_host() -> None:
    """Each variable narrows its framework when asked for less than this CPU has."""
    pytest.importorskip("torch")
    torch_capability = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    assert _python(torch_capability, ATEN_CPU_CAPABILITY="default").strip() == "DEFAULT"
    from numpy._core._multiarray_umath import __cpu_features__

    if __cpu_features__.get("X86_V3"):  # NumPy's AVX2 dispatch target, off when disabled
        features = "from numpy._core._multiarray_umath import __cpu_features__ as f; print(f['X86_V3'])"
        assert _python(features, NPY_DISABLE_CPU_FEATURES="X86_V3").strip() == "False"


def test_onednn_obeys_a_narrower_isa() -> None:
    pytest.importorskip("tensorflow")
    code = (
        "import tensorflow as tf\n"
        "tf.nn.conv2d(tf.random.normal((1, 8, 8, 3)), tf.random.normal((3, 3, 3, 4)), 1, 'SAME')\n"
    )
    output = _python(code, ONEDNN_VERBOSE="1", ONEDNN_MAX_CPU_ISA="SSE41")
    assert any(",isa:" in line and "SSE4.1" in line for line in output.splitlines()), output[-2000:]


_XLA_VECTORS = (
    "import os, pathlib, re, tempfile\n"
    "dump = tempfile.mkdtemp()\n"
    "os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_dump_to=' + dump).strip()\n"
    "import jax, jax.numpy as jnp\n"
    "f = jax.jit(lambda x: (x - x.mean(0)) * jax.lax.rsqrt(x.var(0) + 1e-5))\n"
    "f(jnp.ones((256, 512), jnp.float32)).block_until_ready()\n"
    "ir = ''.join(p.read_text() for p in pathlib.Path(dump).glob('*ir-with-opt.ll'))\n"
    "print(sorted({int(n) for n in re.findall(r'<(\\d+) x float>', ir)}))\n"
)
"""Prints the float vector widths (in lanes) of the LLVM IR XLA's CPU compiler emits for a jitted
normalization."""


def test_xla_emits_no_512_bit_vectors_and_obeys_a_narrower_isa() -> None:
    """XLA's CPU compiler (JAX) honours ``--xla_cpu_max_isa``: at most 8 float lanes (256 bits,
    AVX2) here, and at most 4 (SSE4.2) when asked for less than this CPU has."""
    pytest.importorskip("jax")
    assert "--xla_cpu_max_isa=AVX2" in os.environ.get("XLA_FLAGS", "")
    widths = ast.literal_eval(_python(_XLA_VECTORS))
    assert widths and max(widths) <= 8, widths
    narrower = ast.literal_eval(_python(_XLA_VECTORS, XLA_FLAGS="--xla_cpu_max_isa=SSE4_2"))
    assert narrower and max(narrower) <= 4, narrower
