"""normkit: one exact specification of BatchNorm, LayerNorm and InstanceNorm, with train and
eval semantics, implemented by interchangeable backends (NumPy built in; PyTorch, TensorFlow,
CuPy and third-party backends as plugins).

``import normkit`` imports NumPy and pluggy, never a framework: a backend is loaded only when
an array of its framework's type reaches normkit.
"""

from normkit._registry import hookimpl, register_backend, unregister_backend
from normkit.errors import NoBackendError, StateDictError
from normkit.functional import BatchNormResult, InstanceNormResult, batch_norm, instance_norm, layer_norm
from normkit.hookspecs import SPEC_VERSION, BackendInfo
from normkit.layers import BatchNorm, InstanceNorm, LayerNorm, convert_state_dict
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
    "InstanceNorm",
    "InstanceNormResult",
    "LayerNorm",
    "NoBackendError",
    "Preset",
    "StateDictError",
    "__version__",
    "batch_norm",
    "convert_state_dict",
    "get_preset",
    "hookimpl",
    "instance_norm",
    "layer_norm",
    "load_state",
    "register_backend",
    "save_state",
    "unregister_backend",
]
