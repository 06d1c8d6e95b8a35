"""The record :func:`normkit.onnx.load_states` returns for one normalization node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from normkit.state import ARRAY_KEYS, METADATA_KEY

__all__ = ["NodeState"]


@dataclass(frozen=True, eq=False)
class NodeState:
    """One ONNX normalization node, read into normkit's terms. Immutable: its mappings are
    read-only views and its arrays read-only; :meth:`state_dict` and :meth:`layer` hand out
    copies.
    """

    name: str
    """The node's name, or ``"<op_type>_<index>"`` (its position in the graph) if it has none."""
    op_type: str
    """``"BatchNormalization"``, ``"InstanceNormalization"``, ``"LayerNormalization"``,
    ``"GroupNormalization"`` or ``"RMSNormalization"``."""
    opset: int
    """The model's version of the ONNX operator set."""
    version: int
    """The version of the operator's definition in force at that opset (its ``since_version``:
    BatchNormalization at opset 17 is version 15)."""
    attributes: Mapping[str, Any]
    """The node's attributes as written (absent ones are not filled in with defaults; float
    attributes as the shortest decimal of their float32 value: ``1e-05``)."""
    layer_name: str
    """The normkit layer class: ``"BatchNorm"``, ``"InstanceNorm"``, ``"LayerNorm"``,
    ``"GroupNorm"`` or ``"RMSNorm"``."""
    options: Mapping[str, Any]
    """Keyword arguments of that class, ``preset="onnx"`` included:
    ``getattr(normkit, layer_name)(**options)`` is the layer the node describes."""
    _state: Mapping[str, Any] = field(repr=False)

    @property
    def layer_class(self) -> type:
        """The normkit layer class named by :attr:`layer_name`."""
        from normkit import layers

        return getattr(layers, self.layer_name)  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        """A new state dict in normkit's format (:mod:`normkit.state`): NumPy arrays
        (``weight``, ``bias``, and for batch norm ``running_mean``, ``running_var``; float64 if
        every parameter of the node is double, else float32), ``num_batches_tracked`` (0 for
        batch norm: ONNX keeps no count) and ``_metadata``, for ``load_state_dict``,
        ``from_state_dict`` or :func:`normkit.save_state`."""
        result: dict[str, Any] = {}
        for key, value in self._state.items():
            if key == METADATA_KEY:
                result[key] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()}
            elif key in ARRAY_KEYS:
                result[key] = np.array(value)
            else:
                result[key] = value
        return result

    def layer(self, backend: str | None = None, *, device: str | None = None) -> Any:
        """A new normkit layer with this state, in eval mode.

        :param backend: the backend whose arrays the state is put in (``"torch"``, ...; its
            framework is imported) and whose inputs the layer takes; ``None`` keeps NumPy arrays.
        :param device: the device for the arrays (``"cuda"``, ...), with ``backend``.
        """
        if device is not None and backend is None:
            raise ValueError(f"device={device!r} needs backend=: NumPy arrays have no device")
        state = self.state_dict()
        if backend is not None:
            from normkit._registry import load_backend

            info = load_backend(backend)
            for key in ARRAY_KEYS:
                if key in state:
                    state[key] = info.asarray(state[key], str(state[key].dtype), device)
        layer = self.layer_class(**self.options, backend=backend)
        layer.load_state_dict(state)
        return layer.eval()

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"NodeState({self.name!r}: {self.op_type}-{self.version} -> {self.layer_name}({options}))"
