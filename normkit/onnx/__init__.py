"""ONNX: normkit states from the normalization nodes of an ONNX model.

:func:`load_states` reads every ``BatchNormalization``, ``InstanceNormalization``,
``LayerNormalization``, ``GroupNormalization`` and ``RMSNormalization`` node of a model into a
:class:`NodeState`: the normkit layer class, its options under the ``onnx`` preset (ONNX's
momentum convention, biased running variance, channels-first, RMS cast before the weight) and a
state dict. See ``docs/onnx.md``.

``import normkit`` does not import this package, and this package imports ``onnx`` only when
:func:`load_states` runs.
"""

from __future__ import annotations

from normkit.onnx.graph import OnnxImportError
from normkit.onnx.load import load_states
from normkit.onnx.record import NodeState

__all__ = ["NodeState", "OnnxImportError", "load_states"]
