"""normkit's conformance suite on the CuPy backend's glue, on the CPU: the backend's own kernel
functions, registered as a backend of a NumPy subclass, run with the NumPy expressions that
stand in for the CUDA kernels (:class:`normkit_cupy.kernels._NumPyOps`). Every case the GPU
suite (``test_conformance.py``) plays checks the glue here first: shapes, axes, groups, masks,
dtypes, statistics and cast orders, through normkit's public functions and layers."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

import normkit
from normkit.testing import ConformanceTests
from normkit_cupy import kernels


class StandIn(np.ndarray):
    """A NumPy array that the stand-in backend claims by name (the suite passes ``backend=``)."""


def _asarray(array: np.ndarray, dtype: str, device: str | None) -> StandIn:
    return np.asarray(array).astype(dtype).view(StandIn)


def _full(shape: tuple[int, ...], fill_value: float, dtype: str, like: StandIn) -> StandIn:
    return np.full(shape, fill_value, dtype=dtype).view(StandIn)


def _standin(kernel: Any) -> Any:
    """``kernel`` returning :class:`StandIn` arrays: the NumPy stand-ins make some results (counts,
    zeros) as plain ``numpy.ndarray``, where CuPy makes CuPy arrays."""

    def view(result: Any) -> Any:
        return (
            result.view(StandIn)
            if isinstance(result, np.ndarray) and not isinstance(result, StandIn)
            else result
        )

    @functools.wraps(kernel)  # the spec's signature, for the registry's check
    def run(*args: Any) -> Any:
        result = kernel(*args)
        return tuple(view(r) for r in result) if isinstance(result, tuple) else view(result)

    return run


def _hook(kernel: Any) -> Any:
    return staticmethod(normkit.hookimpl(_standin(kernel)))


class _StandInPlugin:
    """The CuPy plugin's hooks, with a BackendInfo for :class:`StandIn` arrays on the CPU."""

    @staticmethod
    @normkit.hookimpl
    def normkit_backend_info() -> normkit.BackendInfo:
        return normkit.BackendInfo(
            name="cupy-standin",
            distribution="normkit-cupy",
            array_types=(f"{__name__}:StandIn",),
            dtypes=("float16", "float32", "float64"),  # CuPy's
            devices=("cpu",),
            asarray=_asarray,
            to_numpy=lambda a: np.array(a),
            dtype_name=lambda a: a.dtype.name,
            device=lambda a: "cpu",
            shape=lambda a: a.shape,
            full=_full,
            astype=_standin(kernels.astype),
        )

    normkit_batch_norm = _hook(kernels.batch_norm)
    normkit_instance_norm = _hook(kernels.instance_norm)
    normkit_layer_norm = _hook(kernels.layer_norm)
    normkit_group_norm = _hook(kernels.group_norm)
    normkit_rms_norm = _hook(kernels.rms_norm)
    normkit_moments = _hook(kernels.moments)
    normkit_normalize = _hook(kernels.normalize)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    name = normkit.register_backend(_StandInPlugin(), "cupy-standin")
    yield
    normkit.unregister_backend(name)


class TestCuPyGlueOnCPU(ConformanceTests):
    backend = "cupy-standin"
