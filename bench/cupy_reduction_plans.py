"""Reduction plans for the CuPy backend's statistics on a GPU (issue 17): the sum of squared
deviations per channel of NCHW, NHWC and (N, C) float32 data, computed by

* ``current``: one ``ReductionKernel`` over the reduced axes, as normkit_cupy does now;
* ``two-stage``: the contiguous inner axes first (one output per (n, c)), then the batch axis;
* ``cupy.sum``: CuPy's own reduction of the squared deviations (CUB where it applies);
* ``torch``: ``torch.var_mean`` on the same memory, for scale.

Run on a machine with a CUDA GPU: ``python bench/cupy_reduction_plans.py``.
"""

from __future__ import annotations

import cupy
import numpy as np
import torch
from cupyx.profiler import benchmark

SQUARES = cupy.ReductionKernel("T x, T m", "T y", "(x - m) * (x - m)", "a + b", "y = a", "0", "sq_dev")


def gpu_us(function: object, *args: object) -> float:
    return float(np.median(benchmark(function, args, n_repeat=30, n_warmup=5).gpu_times[0]) * 1e6)


for name, shape, axes in (
    ("bn2d-nchw", (32, 64, 56, 56), (0, 2, 3)),
    ("bn2d-nhwc", (32, 56, 56, 64), (0, 1, 2)),
    ("bn1d", (4096, 1024), (0,)),
):
    x = cupy.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    keep = tuple(1 if a in axes else n for a, n in enumerate(shape))
    m = cupy.zeros(keep, cupy.float32)
    rows = {"current": gpu_us(lambda x, m, axes=axes: SQUARES(x, m, axis=axes), x, m)}
    if name == "bn2d-nchw":
        n, c = shape[:2]
        flat, mflat = x.reshape(n, c, -1), m.reshape(1, c, 1)
        rows["two-stage"] = gpu_us(lambda x, m: SQUARES(x, m, axis=2).sum(axis=0), flat, mflat)
    else:
        rows["two-stage (rows of 64, then the rest)"] = (
            gpu_us(
                lambda x, m, c=shape[-1]: SQUARES(x.reshape(-1, 64, c), m, axis=1).sum(axis=0),
                x,
                m.reshape(1, 1, shape[-1]),
            )
            if shape[0] * int(np.prod(shape[1:-1])) % 64 == 0
            else float("nan")
        )
    rows["cupy.sum"] = gpu_us(lambda x, m, axes=axes: ((x - m) ** 2).sum(axis=axes), x, m)
    t = torch.from_dlpack(x)
    rows["torch.var_mean"] = gpu_us(lambda t, axes=axes: torch.var_mean(t, dim=axes), t)
    gbytes = x.nbytes / 1e9
    print(
        f"== {name} {shape}: "
        + ", ".join(f"{k} {v:.1f} us ({gbytes / (v * 1e-6):.0f} GB/s read)" for k, v in rows.items())
    )
