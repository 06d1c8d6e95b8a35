"""normkit's PyTorch backend: ATen-speed kernels with autograd, and drop-in ``torch.nn`` layers.

Installing ``normkit-torch`` is enough for ``normkit.batch_norm(tensor, ...)`` and the
``normkit.BatchNorm`` layers to accept ``torch.Tensor`` input: normkit finds this backend through
the ``normkit.backends`` entry point once ``torch`` is imported. Import this package for the
``torch.nn.Module`` layers:

>>> import torch, normkit_torch
>>> bn = normkit_torch.BatchNorm2d(3, preset="keras")   # biased running variance, eps 1e-3
>>> bn
BatchNorm2d(3, eps=0.001, momentum=0.01, affine=True, bias=True, track_running_stats=True, preset='keras')
>>> y = bn(torch.randn(8, 3, 4, 4))
"""

from normkit_torch.convert import convert_norm_layers
from normkit_torch.distributed import BatchNormXd, SyncBatchNorm, TorchCommunicator, revert_sync_batchnorm
from normkit_torch.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normkit_torch.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormXd",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SyncBatchNorm",
    "TorchCommunicator",
    "__version__",
    "convert_norm_layers",
    "revert_sync_batchnorm",
]
