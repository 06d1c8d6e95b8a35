"""Record the figures that docs/flax.md and docs/distributed.md quote about Flax's statistics,
next to normkit's, in one run, with the versions and the machine.

1. ``offset``: at |mean|/std = 1e4 in float32 (``normkit_jax.flax_cases.offset_data``, the data of
   ``test_nnx.py::test_mean_1e4_std_1_in_float32``), ``flax.nnx.BatchNorm`` (momentum 0: the
   stored variance is the batch variance) and ``flax.nnx.LayerNorm`` with Flax's default
   ``use_fast_variance=True``, with ``use_fast_variance=False``, and normkit's
   (``normkit_jax.nnx``): stored variances, each group's output standard deviation against the
   float64 one, and the largest output error.
2. ``mean_of_means``: 4 CPU devices under ``jax.shard_map``, device i holding 8 rows from
   N(3i, (1 + i)^2) with 5 features of which 2, 8, 3 and 5 rows count (the data of
   ``test_collectives.py``): the statistics and outputs of ``flax.nnx.BatchNorm(axis_name=...)``
   (both variance algorithms), of ``normkit_jax.nnx.BatchNorm(axis_name=...)`` and of the merges
   of ``normkit_jax.collectives`` (``global_moments``: the layers' two-pass across devices;
   ``moments_across``: from each device's moments alone), against the float64 statistics of
   the counted rows.
3. ``empty_device``: the same with 2, 8, 0 and 5 counted rows: Flax's NaN, normkit's errors.
4. ``offset_across_devices``: the same layers and merge at |mean|/std = 1e4, every row counted
   (device i holding 8 rows from N(1e4 + 3i, 1): equal counts, so a mean of means is exact and
   only the variance algorithm matters).

Run from the repository root (it sets ``XLA_FLAGS`` for 4 CPU devices itself, before importing
JAX; ``normkit-jax`` installed, or ``PYTHONPATH=backends/jax/src``)::

    python bench/flax_statistics.py --json bench/results/cpu-flax-statistics.json
"""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}=4".strip()

import argparse  # noqa: E402  (after XLA_FLAGS, before JAX)
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import normkit  # noqa: E402
from normkit import reference  # noqa: E402

if not any(ep.name == "jax" for ep in importlib.metadata.entry_points(group="normkit.backends")):
    from normkit_jax import plugin

    normkit.register_backend(plugin, "jax")

from normkit_jax import nnx as nk  # noqa: E402
from normkit_jax.flax_cases import (  # noqa: E402
    CHANNELS,
    COUNTED_ROWS,
    EMPTY_DEVICE_ROWS,
    device_data,
    device_mesh,
    merged_under_shard_map,
    nnx_under_shard_map,
    offset_data,
    row_mask,
)

BN_EPS = 1e-5
EVERY_ROW = (8, 8, 8, 8)
OFFSET_LAYERS = {
    # name: (constructor, input shape, axes of one group)
    "BatchNorm": (lambda cls, **kw: cls(4, momentum=0.0, rngs=nnx.Rngs(0), **kw), (256, 4), (0,)),
    "LayerNorm": (lambda cls, **kw: cls(256, rngs=nnx.Rngs(0), **kw), (4, 256), (1,)),
}
VARIANTS = {
    "flax_default": (nnx, {}),  # use_fast_variance=True, Flax's default
    "flax_stable": (nnx, {"use_fast_variance": False}),
    "normkit": (nk, {}),
}


def floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, np.float64).reshape(-1)]


def machine() -> dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``), core count, platform and Python."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model
            )
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def versions() -> dict[str, str]:
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "normkit": importlib.metadata.version("normkit"),
        "python": platform.python_version(),
    }


def offset() -> dict[str, Any]:
    """Section 1 (see the module docstring)."""
    results: dict[str, Any] = {}
    for name, (build, shape, reduced) in OFFSET_LAYERS.items():
        x = offset_data(shape)
        count, mean, m2 = reference.moments(x, reduced, None)
        var = m2 / count
        keep = np.expand_dims
        entry: dict[str, Any] = {"shape": list(shape), "seed": 5, "true_var": floats(var)}
        for variant, (namespace, kwargs) in VARIANTS.items():
            layer = build(getattr(namespace, name), **kwargs)
            eps = layer.epsilon
            expected = (x - keep(mean, reduced)) / np.sqrt(keep(var, reduced) + eps)
            expected_std = expected.std(axis=reduced)
            y = np.asarray(layer(jnp.asarray(x)), np.float64)
            ratio = y.std(axis=reduced) / expected_std
            row: dict[str, Any] = {
                "epsilon": eps,
                "output_std_ratio": floats(ratio),
                "output_std_relative_error_max": float(np.abs(ratio - 1).max()),
                "output_error_max": float(np.abs(y - expected).max()),
            }
            if name == "BatchNorm":
                stored = np.asarray(layer.var[...], np.float64)
                row["stored_var"] = floats(stored)
                row["stored_var_relative_error_max"] = float(np.abs(stored / var - 1).max())
            entry[variant] = row
        results[name] = entry
    return results


def errors(mean: np.ndarray, var: np.ndarray, got_mean: Any, got_var: Any) -> dict[str, Any]:
    """Largest absolute error of the mean and relative error of the variance (NaN counted)."""
    got_mean, got_var = np.asarray(got_mean, np.float64), np.asarray(got_var, np.float64)
    relative = np.abs(got_var / var - 1)
    return {
        "mean": floats(got_mean),
        "var": floats(got_var),
        "mean_error_max": float(np.nanmax(np.abs(got_mean - mean))) if np.isfinite(got_mean).any() else None,
        "var_relative_error": floats(relative),
        "var_relative_error_max": float(np.nanmax(relative)) if np.isfinite(relative).any() else None,
        "nan_fraction": float(np.mean(np.isnan(got_mean) | np.isnan(got_var))),
    }


def across_devices(counted_rows: tuple[int, ...], **data: Any) -> dict[str, Any]:
    """Sections 2 to 4 (see the module docstring); ``data``: options of ``device_data``."""
    mesh = device_mesh("d")
    x, _ = device_data(counted_rows, **data)
    mask = np.broadcast_to(row_mask(counted_rows), x.shape)
    count, mean, m2 = reference.moments(x, (0,), mask)
    var = m2 / count
    expected_y = (x - mean) / np.sqrt(var + BN_EPS)  # every row normalized, masked ones too
    result: dict[str, Any] = {
        "counted_rows": list(counted_rows),
        "data": {"offset": 0.0, "std_grows": True, "seed": 0, **data},
        "count": [int(c) for c in count],
        "reference": {"mean": floats(mean), "var": floats(var)},
    }
    layers = {
        "flax_default": nnx.BatchNorm(CHANNELS, momentum=0.0, axis_name="d", rngs=nnx.Rngs(0)),
        "flax_stable": nnx.BatchNorm(
            CHANNELS, momentum=0.0, axis_name="d", use_fast_variance=False, rngs=nnx.Rngs(0)
        ),
        "normkit_nnx": nk.BatchNorm(CHANNELS, momentum=0.0, axis_name="d", rngs=nnx.Rngs(0)),
    }
    for label, layer in layers.items():
        y, state = nnx_under_shard_map(layer, mesh)(x, mask)
        y = np.asarray(y, np.float64)
        row = errors(mean, var, state["mean"][...], state["var"][...])
        row["output_error_max"] = float(np.nanmax(np.abs(y - expected_y))) if np.isfinite(y).any() else None
        row["output_nan_fraction"] = float(np.mean(np.isnan(y)))
        result[label] = row
    for label, from_data in (("normkit_global_moments", True), ("normkit_moments_across", False)):
        merged = merged_under_shard_map(mesh, x, mask, from_data=from_data)
        merged_count = np.asarray(merged.count)
        result[label] = {
            "count": [int(c) for c in merged_count],
            **errors(mean, var, merged.mean, np.asarray(merged.m2, np.float64) / merged_count),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    record = {
        "command": "python bench/flax_statistics.py" + (f" --json {args.json}" if args.json else ""),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": machine(),
        "offset": offset(),
        "mean_of_means": across_devices(COUNTED_ROWS),
        "empty_device": across_devices(EMPTY_DEVICE_ROWS),
        "offset_across_devices": across_devices(EVERY_ROW, offset=1e4, std_grows=False, seed=2),
    }
    text = json.dumps(record, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
