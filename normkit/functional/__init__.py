r"""The public operations: validate once, dispatch to the array's backend, return new state.

These functions are pure: they never modify their arguments, and return the output together
with the new running statistics. Defaults come from the ``preset`` (``"torch"`` unless you say
otherwise); every option can be overridden by keyword. The math and the train/eval rules are
those of :mod:`normkit.hookspecs`.

>>> import numpy as np, normkit
>>> x = np.arange(12, dtype=np.float32).reshape(3, 4)       # (N, C)
>>> y, mean, var = normkit.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32),
...                                   training=True)
>>> y[:, 0]                                  # (x - 4) / sqrt(32/3 + 1e-5)
array([-1.2247443,  0.       ,  1.2247443], dtype=float32)
>>> mean, var                                # 0.9 * running + 0.1 * (batch mean, unbiased batch var)
(array([0.4, 0.5, 0.6, 0.7], dtype=float32), array([2.5, 2.5, 2.5, 2.5], dtype=float32))

Errors name the parameter at fault: ``TypeError`` for a wrong array type or dtype
(:class:`~normkit.errors.NoBackendError` when no backend handles the array: a scalar, a list,
a ``numpy.ma.MaskedArray``), ``ValueError`` for wrong shapes and values.
"""

from __future__ import annotations

from normkit.functional.channel import BatchNormResult, InstanceNormResult, batch_norm, instance_norm
from normkit.functional.group import group_norm
from normkit.functional.layer import layer_norm
from normkit.functional.rms import rms_norm
from normkit.functional.statistics import Moments, merge_moments, moments, normalize

__all__ = [
    "BatchNormResult",
    "InstanceNormResult",
    "Moments",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "merge_moments",
    "moments",
    "normalize",
    "rms_norm",
]
