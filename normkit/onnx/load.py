"""``load_states``: every normalization node of an ONNX model as a normkit layer state."""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from normkit import layers
from normkit._registry import type_name
from normkit.onnx.graph import ONNX_DOMAINS, GraphReader, OnnxImportError, node_attributes
from normkit.onnx.ops import CONVERTERS, NodeContext
from normkit.onnx.record import NodeState
from normkit.state import ARRAY_KEYS, METADATA_KEY

if TYPE_CHECKING:
    import onnx

__all__ = ["load_states"]

PRESET = "onnx"


def load_states(model: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, NodeState]:
    """Read every normalization node of ``model``'s graph into normkit's terms.

    Each ``BatchNormalization``, ``InstanceNormalization``, ``LayerNormalization``,
    ``GroupNormalization`` and ``RMSNormalization`` node of the ONNX domain becomes a
    :class:`~normkit.onnx.NodeState`: the layer class, its options under ``preset="onnx"`` and
    a state dict, so that ``record.layer()`` evaluates as the node does (see
    :mod:`normkit.onnx.ops` for what each operator version becomes). Other nodes, and nodes of
    other domains (onnxruntime's ``com.microsoft`` contrib ops), are ignored: a model without
    normalization nodes gives ``{}``.

    Only the top-level graph is read: nodes inside control-flow subgraphs (``If``, ``Loop``,
    ``Scan``) and inside model-local functions are not (PyTorch's exporters write no functions
    unless asked to).

    :param model: an ``onnx.ModelProto``, or the path of an ``.onnx`` file (its external data
        is loaded from beside it).
    :returns: the records keyed by node name in graph order; a node without a name is keyed
        ``"<op_type>_<index>"``, with ``index`` its position among all the graph's nodes
        (``"BatchNormalization_0"``).
    :raises TypeError: if ``model`` is neither.
    :raises FileNotFoundError: if ``model`` is a path to no file.
    :raises OnnxImportError: (a ``ValueError``) naming the node, and the input or attribute, if
        a parameter is not an initializer or ``Constant`` output, an operator version or
        attribute has no normkit layer (BatchNormalization-6, ``spatial=0``), shapes do not fit,
        or two normalization nodes share a key.
    :raises ImportError: if ``onnx`` is not installed.
    """
    try:
        import onnx
    except ImportError as error:
        raise ImportError("normkit.onnx.load_states needs the onnx package: pip install onnx") from error
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model={path!r}: no such file")
        model = onnx.load(path)
    elif not isinstance(model, onnx.ModelProto):
        raise TypeError(
            f"model is a {type_name(type(model))}; expected an onnx.ModelProto "
            f"or the path of an .onnx file (str or os.PathLike)"
        )
    reader = GraphReader(model)
    records: dict[str, NodeState] = {}
    for index, node in enumerate(model.graph.node):
        if node.domain not in ONNX_DOMAINS or node.op_type not in CONVERTERS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        if name in records:
            raise OnnxImportError(
                f"node {name!r} ({node.op_type}, node {index}): another normalization node has the same "
                f"key; name the nodes uniquely"
            )
        records[name] = _read_node(reader, node, name)
    return records


def _read_node(reader: GraphReader, node: onnx.NodeProto, name: str) -> NodeState:
    opset, version = reader.since_version(node.op_type, f"node {name!r} ({node.op_type})")
    label = f"node {name!r} ({node.op_type}-{version})"
    versions, converter = CONVERTERS[node.op_type]
    if version not in versions:
        hint = (
            f"Convert the model first: onnx.version_converter.convert_version(model, {versions[-1]})"
            if version < versions[0]
            else "normkit does not know this version yet"
        )
        raise OnnxImportError(
            f"{label}: version {version} (the model's opset is {opset}) is not supported; normkit reads "
            f"{node.op_type} versions {', '.join(map(str, versions))}. {hint}"
        )
    attributes = dict(node_attributes(node))
    context = NodeContext(reader, node, label, version, attributes)
    conversion = converter(context)
    dtype = np.float64 if all(t == "float64" for t in context.element_types) else np.float32
    state: dict[str, Any] = {key: np.asarray(value, dtype=dtype) for key, value in conversion.arrays.items()}
    if "running_mean" in state:
        state["num_batches_tracked"] = 0
    options = {**conversion.options, "preset": PRESET}
    try:  # the layer validates options and arrays; its state dict carries the metadata
        layer = getattr(layers, conversion.layer_name)(**options)
        layer.load_state_dict(state)
    except (TypeError, ValueError) as error:
        raise OnnxImportError(f"{label}: {error}") from error
    saved = layer.state_dict()
    for key in ARRAY_KEYS:
        if key in saved:
            saved[key] = np.array(saved[key])
            saved[key].setflags(write=False)
    saved[METADATA_KEY] = MappingProxyType(dict(saved[METADATA_KEY]))
    return NodeState(
        name, node.op_type, opset, version, MappingProxyType(attributes), conversion.layer_name,
        MappingProxyType(options), MappingProxyType(saved),
    )  # fmt: skip
