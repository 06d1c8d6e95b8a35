"""Everything that needs no GPU: the kernels' logic with NumPy standing in for CuPy (the same
glue, with NumPy expressions in place of the three CUDA kernels), registration and lazy loading.
The oracle is normkit's float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from normkit import reference
from normkit.testing.tolerances import assert_within, output_tolerance, statistics_tolerance
from normkit_cupy import kernels


def _inputs(shape, dtype, loc=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(loc, 3.0, size=shape).astype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_channel_norms_follow_the_reference(dtype, axis, op, unbiased, training) -> None:
    shape = (4, 3, 5, 6) if axis == 1 else (4, 5, 6, 3)
    x = _inputs(shape, dtype)
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=3).astype("float32"), rng.normal(size=3).astype("float32")
    rm, rv = rng.normal(size=3).astype("float32"), rng.uniform(0.5, 2.0, size=3).astype("float32")
    before = [a.copy() for a in (x, w, b, rm, rv)]
    y, m, v = getattr(kernels, op)(x, w, b, rm, rv, training, 0.1, 1e-5, axis % 4, unbiased)
    flag = "training" if op == "batch_norm" else "use_input_stats"
    y_ref, m_ref, v_ref = getattr(reference, op)(
        x,
        w,
        b,
        rm,
        rv,
        **{flag: training},
        momentum=0.1,
        eps=1e-5,
        axis=axis % 4,
        unbiased_running_var=unbiased,
    )
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    bound = output_tolerance(dtype).bound(y_ref, 0.0)
    assert np.all(np.abs(y.astype(np.float64) - y_ref) <= bound)
    assert m.dtype == np.float32 and v.dtype == np.float32
    # one update of float32 running statistics (they keep their dtype): the suite's statistics bound
    magnitude = float(np.abs(x.astype(np.float64)).max())
    for got, expected, statistic in ((m, m_ref, "mean"), (v, v_ref, "var")):
        bound = statistics_tolerance("float32", statistic, magnitude).bound(expected, 0.0)
        assert np.all(np.abs(got.astype(np.float64) - expected) <= bound), statistic
    for original, now in zip(before, (x, w, b, rm, rv), strict=True):
        np.testing.assert_array_equal(original, now)  # pure


@pytest.mark.parametrize("axes", [(2,), (1, 2), (0, 2)])
def test_layer_norm_follows_the_reference(axes) -> None:
    x = _inputs((4, 5, 6), "float32", loc=-3.0)
    shape = tuple(x.shape[a] for a in axes)
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=shape).astype("float32"), rng.normal(size=shape).astype("float32")
    y = kernels.layer_norm(x, w, b, axes, 1e-5)
    y_ref = reference.layer_norm(x, w, b, axes=axes, eps=1e-5)
    assert np.all(np.abs(y - y_ref) <= output_tolerance("float32").bound(y_ref, 0.0))


def test_large_offsets_constant_channels_and_single_values() -> None:
    x = _inputs((64, 3, 32, 32), "float32", loc=1e4)
    x[:, 1] = 12345.678  # a constant channel: exactly beta
    b = np.array([0.5, 0.25, -1.0], dtype="float32")
    y, _, _ = kernels.batch_norm(x, np.full(3, 3.0, "float32"), b, None, None, True, 0.1, 1e-5, 1, False)
    assert np.all(y[:, 1] == np.float32(0.25))
    y_ref, _, _ = reference.batch_norm(
        x,
        np.full(3, 3.0),
        b,
        None,
        None,
        training=True,
        momentum=0.1,
        eps=1e-5,
        axis=1,
        unbiased_running_var=False,
    )
    # the shifted two-pass at |mean|/std = 1e4/3 never rounds the mean itself (x - s is exact, the
    # residual mean is the size of sigma): the suite's output bound holds without its centering term
    bound = output_tolerance("float32").bound(y_ref[:, 0], 0.0)
    assert_within(np.abs(y[:, 0] - y_ref[:, 0]), bound, "y at offset 1e4")
    one = np.array([[4.0, -7.0, 1e4]], dtype="float32")
    y, _, _ = kernels.batch_norm(one, None, b, None, None, True, 0.1, 1e-5, 1, False)
    np.testing.assert_array_equal(y, b[None, :])


def test_the_plugin_registers_without_a_gpu_and_names_its_devices() -> None:
    pytest.importorskip("cupy")
    import normkit
    from normkit._registry import load_backend

    info = load_backend("cupy")
    assert info.name == "cupy" and info.distribution == "normkit-cupy"
    assert info.dtypes == ("float16", "float32", "float64")
    assert info.array_types == ("cupy:ndarray",)
    import cupy

    assert info.devices == (("cuda",) if cupy.is_available() else ())
    assert "cupy" in normkit._registry.registry().loaded()


def test_the_plugin_implements_every_hook_of_spec_2_and_astype() -> None:
    pytest.importorskip("cupy")
    from normkit._registry import OPS, load_backend, registry

    info = load_backend("cupy")
    assert info.astype is kernels.astype
    hooks = registry().manager().hook
    for op in OPS:
        implementations = {
            impl.plugin_name: impl.function for impl in getattr(hooks, f"normkit_{op}").get_hookimpls()
        }
        assert implementations.get("cupy") is getattr(kernels, op), op


def test_import_normkit_does_not_import_cupy() -> None:
    code = "import sys, normkit; normkit.batch_norm; print('cupy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_normkit_check_reports_a_backend_without_a_device_instead_of_failing() -> None:
    cupy = pytest.importorskip("cupy")
    if cupy.is_available():
        pytest.skip("this machine has a CUDA device: the conformance suite runs instead")
    from normkit.check import run_check

    report = run_check(["numpy", "cupy"])
    assert report.no_device == ["cupy"] and "cupy" not in report.results
    assert report.passed, report.failures()


def test_peak_bandwidth_from_device_properties() -> None:
    from normkit.bench_baselines import peak_bandwidth_gbps

    # an H100 SXM: HBM3 at 2619 MHz over a 5120-bit bus -> about 3.35 TB/s
    assert peak_bandwidth_gbps({"memoryClockRate": 2_619_000, "memoryBusWidth": 5120}) == pytest.approx(
        3352.3, rel=1e-4
    )


def test_bench_table_shows_bandwidth_only_for_results_that_have_it() -> None:
    from normkit.bench import BenchResult, format_table

    common = dict(
        workload="bn2d-nchw", shape=(2, 3), dtype="float32", mode="train", native=None, normkit_ms=1.0,
        native_ms=None, floor_ms=0.5, ratio_to_native=None, ratio_to_floor=2.0, overhead_us=None, noise=0.1,
        rounds=3,
    )  # fmt: skip
    cpu = BenchResult(backend="numpy", **common)
    gpu = BenchResult(backend="cupy", extra={"fraction_of_peak": 0.83}, **common)
    assert "% peak BW" not in format_table([cpu])
    table = format_table([cpu, gpu], markdown=True)
    assert "% peak BW" in table and table.splitlines()[-1].endswith("| 83% |")
