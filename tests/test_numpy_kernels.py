"""Both NumPy kernel paths, compiled and pure, against the float64 reference on inputs that reach
every layout of the compiled kernels (see :mod:`normkit.numpy_backend.compiled`): channels-first rows
(with a tail shorter than a block), columns (channels-last, ``(N, C)``, several row ranges and
blocks), instance norm in both, layer norm over one and several trailing axes, float16/float64,
constant channels and large offsets; the columns cases once more with the streaming
(non-temporal) stores the glue takes for large outputs, and that kernel against NumPy's own
``(x - s)·a + b`` at every alignment. The conformance suite covers the spec's cases on top."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from normkit import numpy_backend
from normkit.testing.cases import Case
from normkit.testing.runner import run_case

HAS_NUMBA = importlib.util.find_spec("numba") is not None
PATHS = [
    pytest.param("compiled", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")),
    "pure",
]

BN, IN, LN = "batch_norm", "instance_norm", "layer_norm"
STEPS = ("train", "train", "eval")
LAYOUT_CASES = [
    Case("rows", BN, (6, 5, 8, 8), loc=3.0, purpose="channels-first rows of 64"),
    Case("rows-tail-offset", BN, (3, 4, 700), loc=1e4, purpose="rows of 512 + 188 values at a 1e4 offset"),
    Case("rows-float16", BN, (6, 5, 8, 8), dtype="float16", loc=50.0),
    Case("rows-float64", BN, (6, 5, 8, 8), dtype="float64", loc=1e4),
    Case("rows-constant", BN, (6, 5, 8, 8), constant_channel=2, loc=7.0),
    Case("columns-nhwc", BN, (8, 6, 6, 5), options={"axis": -1}, loc=2.0),
    Case("columns-many-parts", BN, (4096, 7), loc=1e4, purpose="16 blocks of 256 rows in 8 ranges"),
    Case("columns-wide", BN, (300, 1024), loc=1.0, purpose="blocks of 32 rows"),
    Case("columns-short-inner", BN, (16, 3, 4, 5), loc=5.0, purpose="channels-first, 20 values per row"),
    Case("columns-constant", BN, (64, 6), constant_channel=4, loc=-3.0),
    Case("columns-float16", BN, (512, 6), dtype="float16", loc=100.0),
    Case("columns-float64", BN, (512, 6), dtype="float64", loc=1e4),
    Case("instance-rows", IN, (4, 3, 40), options={"affine": True}, loc=1e4),
    Case("instance-columns", IN, (4, 10, 10, 3), options={"axis": -1, "affine": True}, loc=2.0),
    Case("instance-tracked", IN, (4, 3, 9, 9), options={"track_running_stats": True}, steps=STEPS),
    Case("layer-rows", LN, (8, 1500), loc=1e4, purpose="rows of 512 + 512 + 476"),
    Case("layer-two-axes", LN, (4, 6, 70), options={"normalized_shape": (6, 70)}),
    Case("layer-float16", LN, (8, 640), dtype="float16", loc=300.0),
    Case("layer-noncontiguous", LN, (4, 50), noncontiguous=True, loc=3.0),
    Case("bn-noncontiguous-rows", BN, (4, 3, 40), noncontiguous=True, loc=3.0),
    # the register-blocked column sums: rows left over after the blocks of four, blocks and row
    # ranges of uneven length, widths that are not a multiple of the vector width
    Case("columns-row-tails", BN, (4099, 7), loc=1e4, purpose="ranges of 512-513 rows, blocks of 256 + 1-2"),
    Case("columns-three-rows", BN, (3, 1030), loc=1e4, purpose="fewer rows than one sweep of four"),
    Case("columns-two-rows", BN, (2, 5), loc=-2.0),
    Case("columns-odd-width", BN, (301, 1023), loc=1e4, purpose="blocks of 32 rows + 13"),
    Case("columns-nhwc-odd", BN, (5, 7, 9, 67), options={"axis": -1}, loc=1e4),
    Case("columns-float64-odd", BN, (1030, 9), dtype="float64", loc=1e4),
    Case("columns-huge-values", BN, (70, 6), scale=3e18, purpose="float32 sums of d² overflow"),
    Case("columns-many-rows", BN, (100003, 3), loc=1e4, purpose="blocks of 256 rows, a 3-row tail"),
    Case("instance-columns-odd", IN, (3, 33, 13), options={"axis": -1, "affine": True}, loc=1e4),
]


@pytest.fixture(params=PATHS)
def kernels(request: pytest.FixtureRequest) -> str:
    before = numpy_backend.kernels_in_use()
    yield numpy_backend.use_kernels(request.param)
    numpy_backend.use_kernels(before)


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda case: case.id)
def test_every_layout_matches_the_reference(case: Case, kernels: str) -> None:
    result = run_case(case, "numpy", None, raise_errors=True)
    assert result.skipped is None
    assert result.passed, result.report()


COLUMN_CASES = [case for case in LAYOUT_CASES if case.id.startswith(("columns", "instance-columns"))]


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("case", COLUMN_CASES, ids=lambda case: case.id)
def test_columns_with_streaming_stores_match_the_reference(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The columns layout with every output written by the non-temporal-store kernel (which the
    glue otherwise takes from 8 MiB on): the same cases, the same reference and bounds."""
    from normkit.numpy_backend import numba_loops

    before = numpy_backend.kernels_in_use()
    numpy_backend.use_kernels("compiled")
    monkeypatch.setattr(numba_loops, "STREAM_BYTES", 0)
    try:
        result = run_case(case, "numpy", None, raise_errors=True)
    finally:
        numpy_backend.use_kernels(before)
    assert result.skipped is None
    assert result.passed, result.report()


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("shape", "parts"),
    [((1, 64, 64), 3), ((2, 37, 1023), 4), ((3, 5, 3), 2), ((1, 9, 1), 1), ((2, 300, 13), 7)],
)
@pytest.mark.parametrize("misalign", [0, 1, 3])
def test_streaming_stores_write_the_affine_map_exactly(
    shape: tuple[int, int, int], parts: int, dtype: str, misalign: int
) -> None:
    """:func:`~normkit.numpy_backend.numba_loops.affine_columns_streaming` writes exactly
    ``(x - s)·a + b`` rounded after each operation, as NumPy computes it, into an output whose
    rows start at every alignment (vectors run over row ends; ordinary stores before the first
    aligned address and after the last whole vector), and touches nothing outside ``y``."""
    import numpy as np

    from normkit.numpy_backend import numba_loops

    rng = np.random.default_rng([misalign, *shape])
    x = rng.normal(3.0, 2.0, size=shape).astype(dtype)
    s, a, b = (rng.normal(size=(shape[0], shape[2])).astype(dtype) for _ in range(3))
    expected = (x - s[:, None, :]) * a[:, None, :] + b[:, None, :]
    buffer = np.full(x.size + 2 * misalign + 8, -7.0, dtype)
    y = buffer[misalign : misalign + x.size].reshape(shape)
    width = shape[2]
    periodic = np.arange(width + numba_loops.stream_lanes(x.itemsize) - 1) % width
    numba_loops.affine_columns_streaming(x, *(np.take(c, periodic, axis=1) for c in (s, a, b)), y, parts)
    np.testing.assert_array_equal(y, expected)
    assert (buffer[:misalign] == -7.0).all() and (buffer[misalign + x.size :] == -7.0).all()


def test_an_unknown_kernel_choice_names_the_variable() -> None:
    with pytest.raises(
        ValueError, match=r"kernels='fastest'.*NORMKIT_NUMPY_KERNELS.*'auto', 'compiled', 'pure'"
    ):
        numpy_backend.use_kernels("fastest")


def _kernels_in_a_fresh_process(env_value: str, block_numba: bool = False) -> subprocess.CompletedProcess:
    code = (
        ("import sys; sys.modules['numba'] = None\n" if block_numba else "")
        + "import numpy as np, normkit\n"
        + "from normkit import numpy_backend\n"
        + "normkit.batch_norm(np.ones((4, 3), np.float32), training=True)\n"
        + "print(numpy_backend.kernels_in_use())\n"
    )
    env = {"NORMKIT_NUMPY_KERNELS": env_value, "PATH": "", "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("value", "block_numba", "expected"),
    [
        ("pure", False, "pure"),
        ("auto", True, "pure"),
        pytest.param("auto", False, "compiled", marks=pytest.mark.skipif(not HAS_NUMBA, reason="no numba")),
        pytest.param(
            "compiled", False, "compiled", marks=pytest.mark.skipif(not HAS_NUMBA, reason="no numba")
        ),
    ],
)
def test_the_environment_variable_chooses_the_kernels(value: str, block_numba: bool, expected: str) -> None:
    process = _kernels_in_a_fresh_process(value, block_numba)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == expected


def test_compiled_without_numba_is_a_clear_error() -> None:
    process = _kernels_in_a_fresh_process("compiled", block_numba=True)
    assert process.returncode != 0
    assert "the compiled NumPy kernels need numba" in process.stderr
    assert "normkit[fast]" in process.stderr and "NORMKIT_NUMPY_KERNELS=pure" in process.stderr


@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
def test_eval_with_out_allocates_no_tensor_sized_temporary(kernels: str, layout: str) -> None:
    """Peak memory traced while normalizing a (32, 64, 56, 56) float32 batch (25.7 MB) in eval
    into a given ``out``: at most 1 MiB (NumPy reports its allocations to tracemalloc; the
    compiled kernels allocate nothing in eval)."""
    import tracemalloc

    import numpy as np

    import normkit

    shape, axis = ((32, 64, 56, 56), 1) if layout == "channels-first" else ((32, 56, 56, 64), -1)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = np.empty_like(x)
    stats = (np.full(64, 0.5, np.float32), np.full(64, 2.0, np.float32))
    params = (np.full(64, 1.5, np.float32), np.full(64, 0.25, np.float32))
    expected = normkit.batch_norm(x, *stats, *params, axis=axis).y
    normkit.batch_norm(x, *stats, *params, axis=axis, out=out)  # warm: caches, lazy imports
    tracemalloc.start()
    try:
        y = normkit.batch_norm(x, *stats, *params, axis=axis, out=out).y
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert y is out
    np.testing.assert_array_equal(out, expected)
    assert peak <= 2**20, f"eval with out= peaked at {peak / 2**20:.1f} MiB of extra memory"
    # the measurement can fail: without out= the 25.7 MB output shows up
    tracemalloc.start()
    try:
        normkit.batch_norm(x, *stats, *params, axis=axis)
        _, peak_without_out = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_without_out >= x.nbytes
