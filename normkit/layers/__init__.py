r"""Layers: configuration, state and the training flag around the pure operations.

One class per operation, one module per family (:mod:`~normkit.layers.channel_norm`: batch and
instance norm; :mod:`~normkit.layers.layer_norm`, :mod:`~normkit.layers.group_norm`,
:mod:`~normkit.layers.rms_norm`); the input's rank is free (``BatchNorm`` serves 1-D, 2-D and 3-D
inputs). State is created lazily on the first call, in the input's backend and on its
device: ``weight`` = 1, ``bias`` = 0, ``running_mean`` = 0, ``running_var`` = 1, float64 for
float64 input and float32 otherwise.

**Training** (``layer.train()``, the default): batch and instance norm normalize with batch
statistics and, when ``track_running_stats``, update the running statistics and count the
batch in ``num_batches_tracked``. With ``momentum=None`` the update weight of the ``k``-th
batch is ``1/k``: the running statistics are the plain average of every batch's statistics.

**Eval** (``layer.eval()``): running statistics replace batch statistics, so each sample's
output no longer depends on the rest of its batch. A layer that tracks no running statistics
keeps using batch statistics. Eval never changes the state.

>>> import numpy as np, normkit
>>> bn = normkit.BatchNorm()                                   # torch conventions
>>> rng = np.random.default_rng(0)
>>> for _ in range(20):
...     _ = bn(rng.normal(3.0, 2.0, size=(32, 4, 5, 5)).astype(np.float32))
>>> bn.num_batches_tracked
20
>>> y = bn.eval()(rng.normal(3.0, 2.0, size=(8, 4, 5, 5)).astype(np.float32))
>>> y.shape, y.dtype
((8, 4, 5, 5), dtype('float32'))

A call that fails (bad input) changes nothing: the state is replaced only after the
operation succeeded.
"""

from __future__ import annotations

from normkit.layers.channel_norm import BatchNorm, FrozenBatchNorm, InstanceNorm
from normkit.layers.convert import convert_state_dict
from normkit.layers.group_norm import GroupNorm
from normkit.layers.layer_norm import LayerNorm
from normkit.layers.rms_norm import RMSNorm

__all__ = [
    "BatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "convert_state_dict",
]
