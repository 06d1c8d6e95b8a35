"""``normkit bench`` times a workload only on backends that have its dtype."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

import normkit
from normkit import bench, numpy_backend
from normkit.testing import wrapped_backend


@pytest.fixture
def float32_only() -> Iterator[str]:
    """The NumPy backend under another name, claiming float32 only (as JAX without x64 lacks
    float64)."""
    name = "numpy-float32-only"
    info = dataclasses.replace(numpy_backend.normkit_backend_info(), name=name, dtypes=("float32",))
    kernels = {"batch_norm": numpy_backend.normkit_batch_norm}
    normkit.register_backend(wrapped_backend(name, info, kernels, lambda op, kernel: kernel), name)
    try:
        yield name
    finally:
        normkit.unregister_backend(name)


def test_a_workload_in_a_dtype_the_backend_lacks_is_left_out(float32_only: str) -> None:
    workloads = (
        bench.Workload("bn-float32", "batch_norm", (4, 3)),
        bench.Workload("bn-float64", "batch_norm", (4, 3), dtype="float64"),
    )
    results = bench.run_bench([float32_only, "numpy"], workloads, rounds=2)
    ran = {(r.workload, r.backend) for r in results}
    assert ("bn-float32", float32_only) in ran and ("bn-float64", float32_only) not in ran
    assert {("bn-float32", "numpy"), ("bn-float64", "numpy")} <= ran
