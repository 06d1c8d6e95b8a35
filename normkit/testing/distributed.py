r"""What the synchronized batch norm tests of every engine share (threads, MPI, torch.distributed,
tf.distribute): per-rank data, a layer state far from the identity, and the bound on an output
normalized with statistics that a rank computed in the compute dtype.

The oracle is always the float64 reference on the concatenated batch
(:func:`normkit.reference.batch_norm`); :func:`output_bound` is the suite's output tolerance for
that normalization, plus how far the output moves (to first order,
:func:`~normkit.testing.tolerances.statistics_effect`) when the mean and variance are off by
what :func:`~normkit.testing.tolerances.statistics_tolerance` allows statistics computed in the
compute dtype.
"""

from __future__ import annotations

import numpy as np

from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    compute_dtype,
    output_tolerance,
    statistics_effect,
    statistics_tolerance,
)

__all__ = ["bn_state", "output_bound", "parts_of"]


def parts_of(sizes: tuple[int, ...], loc: float, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """One ``(n, 3, 4)`` batch per rank, ``n`` from ``sizes`` (0 for an empty rank), drawn from
    :math:`N(\\text{loc}, 1)` and stored in ``dtype``."""
    rng = np.random.default_rng(seed)
    return [rng.normal(loc, 1.0, size=(n, 3, 4)).astype(dtype) for n in sizes]


def bn_state() -> dict[str, object]:
    """A normkit ``BatchNorm(3)`` state (torch preset) whose γ, β and running statistics are far
    from the identity, so that a test notices if any of them is dropped."""
    import normkit

    layer = normkit.BatchNorm(3)
    layer(np.zeros((2, 3), np.float32))  # creates the state
    return layer.state_dict() | {
        "weight": np.array([0.5, 1.0, 2.0], np.float32),
        "bias": np.array([0.25, 0.0, -1.0], np.float32),
        "running_mean": np.array([1.0, -2.0, 0.5], np.float32),
        "running_var": np.array([2.0, 0.5, 1.0], np.float32),
        "num_batches_tracked": 0,
    }


def output_bound(
    x: np.ndarray,
    y_ref: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weight: np.ndarray,
    dtype: str,
    *,
    eps: float = 1e-5,
    axis: int = 1,
) -> np.ndarray:
    """Elementwise bound on ``|y - y_ref|`` for ``x`` (channels on ``axis``) normalized in
    ``dtype`` with statistics ``mean``, ``var`` computed in the compute dtype (module
    docstring)."""
    x = np.asarray(x, np.float64)
    shape = [1] * x.ndim
    shape[axis] = -1
    magnitude = float(np.abs(x).max())
    mean_tol = statistics_tolerance(dtype, "mean", magnitude)
    var_tol = statistics_tolerance(dtype, "var", magnitude)
    mean, var, weight = (np.asarray(a, np.float64) for a in (mean, var, weight))
    effect = statistics_effect(
        x, mean.reshape(shape), var.reshape(shape), eps, weight.reshape(shape),
        mean_error=(mean_tol.rtol * np.abs(mean) + mean_tol.atol).reshape(shape),
        var_error=(var_tol.rtol * var + var_tol.atol).reshape(shape),
    )  # fmt: skip
    gain = (np.abs(mean) * np.abs(weight) / np.sqrt(var + eps)).reshape(shape)
    centering = CENTERING_FACTOR * EPS[compute_dtype(dtype)] * gain
    return output_tolerance(dtype).bound(y_ref, 0.0) + centering + effect
