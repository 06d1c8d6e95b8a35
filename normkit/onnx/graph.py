"""Reading an ONNX graph: constant inputs, attributes, operator versions and static shapes.

Everything here reads the model's top-level graph; ``onnx`` is imported by the functions that
need it, so ``import normkit.onnx`` works (and fails only when called) without ``onnx``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = ["GraphReader", "OnnxImportError", "float_attribute"]

ONNX_DOMAINS = ("", "ai.onnx")
"""The standard operator set's domain, by both of its names."""

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
"""``TensorProto`` element types normkit reads as parameters (FLOAT, FLOAT16, DOUBLE, BFLOAT16)."""


class OnnxImportError(ValueError):
    """A normalization node that normkit cannot import: a parameter that is not a constant, an
    operator version or attribute value no normkit layer expresses, or shapes that do not fit.
    The message names the node (and the input or attribute at fault)."""


def float_attribute(value: float) -> float:
    """An ONNX float attribute as the number its writer meant.

    ONNX stores float attributes as float32, so ``epsilon=1e-5`` reads back as
    ``9.999999747378752e-06``. This returns the shortest decimal that rounds to the same float32
    (``1e-05``): the value a runtime computing in float32 uses is unchanged, and normkit's
    layers, which compare ``eps`` exactly when a state dict is loaded, see the exporter's ``1e-5``.
    """
    return float(str(np.float32(value)))


class GraphReader:
    """Lookups on one model's top-level graph: initializers, ``Constant`` outputs, the opset of
    each domain and the static shape of each value (from the graph's declarations, else from
    ONNX shape inference, run once and only when a shape is needed)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.constants = {
            node.output[0]: node
            for node in graph.node
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS and len(node.output) == 1
        }
        self.producers = {output: node for node in graph.node for output in node.output if output}
        self.opsets = {
            ("" if imp.domain == "ai.onnx" else imp.domain): imp.version for imp in model.opset_import
        }
        self._shapes: dict[str, tuple[int | None, ...] | None] = self._declared_shapes(graph)
        self._inferred = False

    # -- operator versions ----------------------------------------------------------------
    def since_version(self, op_type: str, where: str) -> tuple[int, int]:
        """``(opset, since_version)``: the model's version of the ONNX domain and the version of
        ``op_type``'s definition in force at it (BatchNormalization at opset 17 is version 15).

        :raises OnnxImportError: if the model imports no ONNX opset, or ``op_type`` is not
            defined at its opset.
        """
        import onnx.defs

        opset = self.opsets.get("")
        if opset is None:
            raise OnnxImportError(
                f"{where}: the model's opset_import has no entry for the ONNX domain ('' or 'ai.onnx'); "
                f"expected one, e.g. onnx.helper.make_opsetid('', 17)"
            )
        try:
            schema = onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="")
        except onnx.defs.SchemaError:
            raise OnnxImportError(f"{where}: {op_type} is not defined at ONNX opset {opset}") from None
        return opset, int(schema.since_version)

    # -- constants --------------------------------------------------------------------------
    def constant(self, name: str, where: str) -> tuple[np.ndarray, str]:
        """The value of ``name`` (an initializer or the output of a ``Constant`` node) as a NumPy
        array and its ONNX element type's name (``"float32"``, ``"float16"``, ...).

        :param where: names the node and the input, for the error messages.
        :raises OnnxImportError: if ``name`` is computed by another node or is a graph input
            without an initializer, or its value is not floating point.
        """
        from onnx import numpy_helper

        if name in self.initializers:
            tensor = self.initializers[name]
        elif name in self.constants:
            tensor = self._constant_tensor(self.constants[name], name, where)
            if isinstance(tensor, np.ndarray):
                return tensor, "float32"
        else:
            producer = self.producers.get(name)
            origin = (
                f"the output of {producer.op_type} node {producer.name or '(unnamed)'!r}"
                if producer is not None
                else "a graph input without an initializer"
            )
            raise OnnxImportError(
                f"{where} is {name!r}, {origin}; normkit reads parameters only from initializers "
                f"and Constant nodes. Fold the constant subgraph first (torch.onnx.export(..., "
                f"dynamo=True) folds it), or load the values yourself"
            )
        dtype = _FLOAT_TYPES.get(tensor.data_type)
        if dtype is None:
            raise OnnxImportError(
                f"{where} is {name!r}, a tensor of ONNX element type {tensor.data_type}; expected a "
                f"floating-point one ({', '.join(sorted(set(_FLOAT_TYPES.values())))})"
            )
        try:
            return np.asarray(numpy_helper.to_array(tensor)), dtype
        except Exception as error:  # external data that is not where it says, a corrupt tensor
            raise OnnxImportError(
                f"{where} is {name!r}, whose value could not be read ({error}); for a model with external "
                f"data, pass its path to load_states (or onnx.load it with load_external_data=True)"
            ) from error

    @staticmethod
    def _constant_tensor(node: onnx.NodeProto, name: str, where: str) -> Any:
        """The ``TensorProto`` held by a ``Constant`` node, or a float32 array for its
        ``value_float``/``value_floats`` forms."""
        for attribute in node.attribute:
            if attribute.name == "value":
                return attribute.t
            if attribute.name == "value_float":
                return np.asarray(attribute.f, dtype=np.float32)
            if attribute.name == "value_floats":
                return np.asarray(list(attribute.floats), dtype=np.float32)
        kinds = [attribute.name for attribute in node.attribute]
        raise OnnxImportError(
            f"{where} is {name!r}, the output of a Constant node holding {kinds}; expected a floating-point "
            f"tensor (value, value_float or value_floats)"
        )

    # -- shapes -----------------------------------------------------------------------------
    @staticmethod
    def _declared_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | None, ...] | None]:
        shapes: dict[str, tuple[int | None, ...] | None] = {}
        for info in (*graph.input, *graph.value_info, *graph.output):
            tensor_type = info.type.tensor_type
            if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
                continue
            shapes[info.name] = tuple(
                dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
                for dim in tensor_type.shape.dim
            )
        return shapes

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """The static shape of value ``name`` (``None`` for a dimension of unknown size), or
        ``None`` if not even its rank is known. Runs ONNX shape inference on the first miss."""
        if name not in self._shapes and not self._inferred:
            self._inferred = True
            try:
                import onnx.shape_inference

                inferred = onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # any failure only means the shapes stay unknown
                return None
            for key, value in self._declared_shapes(inferred.graph).items():
                self._shapes.setdefault(key, value)
        return self._shapes.get(name)


def node_attributes(node: onnx.NodeProto) -> Mapping[str, Any]:
    """The node's attributes as Python values (float attributes per :func:`float_attribute`)."""
    from onnx import AttributeProto, helper

    result: dict[str, Any] = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if attribute.type == AttributeProto.FLOAT:
            value = float_attribute(value)
        elif attribute.type == AttributeProto.FLOATS:
            value = [float_attribute(v) for v in value]
        elif isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        result[attribute.name] = value
    return result
