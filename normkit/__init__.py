"""normkit: one exact specification of BatchNorm, LayerNorm, InstanceNorm, GroupNorm and
RMSNorm, with train and eval semantics and the statistics as values (moments and their exact
merge), implemented by interchangeable backends (NumPy built in; PyTorch, TensorFlow,
CuPy and third-party backends as plugins).

``import normkit`` imports NumPy and pluggy, never a framework: a backend is loaded only when
an array of its framework's type reaches normkit.
"""

from normkit._registry import hookimpl, register_backend, unregister_backend
from normkit.errors import NoBackendError, StateDictError
from normkit.functional import (
    BatchNormResult,
    InstanceNormResult,
    Moments,
    batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    merge_moments,
    moments,
    normalize,
    rms_norm,
)
from normkit.hookspecs import SPEC_VERSION, BackendInfo
from normkit.layers import (
    BatchNorm,
    FrozenBatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
    convert_state_dict,
)
from normkit.presets import DEFAULT, PRESETS, Preset, get_preset
from normkit.state_files import load_state, save_state

__version__ = "0.1.0"

__all__ = [
    "DEFAULT",
    "PRESETS",
    "SPEC_VERSION",
    "BackendInfo",
    "BatchNorm",
    "BatchNormResult",
    "FrozenBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "InstanceNormResult",
    "LayerNorm",
    "Moments",
    "NoBackendError",
    "Preset",
    "RMSNorm",
    "StateDictError",
    "__version__",
    "batch_norm",
    "convert_state_dict",
    "get_preset",
    "group_norm",
    "hookimpl",
    "instance_norm",
    "layer_norm",
    "load_state",
    "merge_moments",
    "moments",
    "normalize",
    "register_backend",
    "rms_norm",
    "save_state",
    "unregister_backend",
]
