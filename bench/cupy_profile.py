"""Where a CuPy batch-norm call spends its time (issue 17's GPU run): Python's profile of one
training call on the smallest and on a large workload, and CuPy's GPU timer per call.

Run on a machine with a CUDA GPU: ``python bench/cupy_profile.py > profile.txt``.
"""

from __future__ import annotations

import cProfile
import io
import pstats

import cupy
import numpy as np
from cupyx.profiler import benchmark

import normkit


def call(
    x: cupy.ndarray, weight: cupy.ndarray, bias: cupy.ndarray, rm: cupy.ndarray, rv: cupy.ndarray
) -> None:
    normkit.batch_norm(x, rm, rv, weight, bias, training=True, axis=1)


for name, shape in (("tiny", (2, 4)), ("bn2d-nchw", (32, 64, 56, 56)), ("bn1d", (4096, 1024))):
    c = shape[1]
    x = cupy.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    w, b, rm, rv = (
        cupy.ones(c, cupy.float32),
        cupy.zeros(c, cupy.float32),
        cupy.zeros(c, cupy.float32),
        cupy.ones(c, cupy.float32),
    )
    for _ in range(3):
        call(x, w, b, rm, rv)
    cupy.cuda.Device().synchronize()
    timing = benchmark(call, (x, w, b, rm, rv), n_repeat=50, n_warmup=5)
    print(
        f"== {name} {shape}: cpu {np.median(timing.cpu_times) * 1e6:.1f} us, gpu {np.median(timing.gpu_times) * 1e6:.1f} us per call"
    )
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(20):
        call(x, w, b, rm, rv)
    cupy.cuda.Device().synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:3000])
