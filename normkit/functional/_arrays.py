"""Arithmetic on any backend's arrays that the compositions need beyond Python's operators: a
dtype change, the widest float, and the running-statistic mix."""

from __future__ import annotations

from typing import Any

import numpy as np

from normkit.hookspecs import BackendInfo

Array = Any


def cast(info: BackendInfo, array: Array, dtype: str) -> Array:
    """``array`` in the named dtype, on its device: the backend's ``astype``, or (a backend
    without it) a round trip through NumPy."""
    if info.astype is not None:
        return info.astype(array, dtype)
    return info.asarray(np.asarray(info.to_numpy(array)).astype(np.float64), dtype, info.device(array))


def widest_float(info: BackendInfo) -> str:
    """float64 where the backend has it, else float32."""
    return "float64" if "float64" in info.dtypes else "float32"


def mix(info: BackendInfo, old: Array, batch: Array, weight: Array | float) -> Array:
    """``(1 - weight) * old + weight * batch`` in the backend's widest float, returned in ``old``'s
    dtype: ``old + weight * (batch - old)`` in a narrow dtype would lose ``old``'s digits (at
    ``weight = 1``, ``batch - old`` rounds to ``-old`` when ``batch << old``)."""
    wide = widest_float(info)
    mixed = cast(info, old, wide) * (1.0 - weight) + cast(info, batch, wide) * weight
    return cast(info, mixed, info.dtype_name(old))
