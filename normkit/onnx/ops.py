"""One converter per ONNX normalization operator: from a node to a normkit layer's options and
arrays under the ``onnx`` preset.

=========================  ==================  ==============================================
ONNX operator (versions)   normkit layer       what is converted
=========================  ==================  ==============================================
BatchNormalization         ``BatchNorm``       scale, B, mean, var → weight, bias,
(7 with ``spatial=1``,                         running_mean, running_var; ``epsilon`` → eps,
9, 14, 15)                                     ``momentum`` (weight of the old value: the
                                               preset's ``momentum_weights="running"``)
InstanceNormalization      ``InstanceNorm``    scale, B → weight, bias; no running statistics
(6, 22)
LayerNormalization (17)    ``LayerNorm``       Scale, B (optional) broadcast to the normalized
                                               shape ``X.shape[axis:]`` → weight, bias
GroupNormalization         ``GroupNorm``       ``num_groups``; version 18's per-group scale and
(18, 21)                                       bias repeated ``C/G`` times to per channel;
                                               version 21's are per channel already
RMSNormalization (23)      ``RMSNorm``         scale broadcast to ``X.shape[axis:]`` → weight;
                                               the spec's cast before the weight is the
                                               preset's ``cast="before_weight"``
=========================  ==================  ==============================================

Every layer is channels-first (``axis=1``) as ONNX is. ``stash_type`` (the precision ONNX
computes LayerNormalization, GroupNormalization-21 and RMSNormalization statistics in) is
recorded, not converted: normkit computes statistics in float32, or float64 for float64 input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from normkit.onnx.graph import GraphReader, OnnxImportError

if TYPE_CHECKING:
    import onnx

__all__ = ["CONVERTERS", "Conversion", "NodeContext"]


@dataclass
class NodeContext:
    """One node being converted: where it is, its version and attributes, and the parameters
    read so far with their ONNX element types."""

    reader: GraphReader
    node: onnx.NodeProto
    label: str
    """``"node 'bn1' (BatchNormalization-15)"``, the start of every message about it."""
    version: int
    attributes: dict[str, Any]
    element_types: list[str] = field(default_factory=list)

    def error(self, message: str) -> OnnxImportError:
        return OnnxImportError(f"{self.label}: {message}")

    def has_input(self, index: int) -> bool:
        return len(self.node.input) > index and bool(self.node.input[index])

    def param(self, index: int, role: str) -> np.ndarray:
        """The constant value of input ``index`` (called ``role`` in the spec)."""
        if not self.has_input(index):
            raise self.error(f"input {index} ({role}) is missing; expected a constant tensor")
        array, element_type = self.reader.constant(
            self.node.input[index], f"{self.label}: input {index} ({role})"
        )
        self.element_types.append(element_type)
        return array

    def vector(self, index: int, role: str, size: int | None = None) -> np.ndarray:
        """A parameter that must have shape ``(size,)`` (or any 1-D shape when ``size`` is None)."""
        array = self.param(index, role)
        if array.ndim != 1 or (size is not None and array.shape[0] != size):
            expected = "(C,)" if size is None else f"({size},)"
            raise self.error(f"input {index} ({role}) has shape {array.shape}; expected {expected}")
        return array

    def eps(self) -> float:
        return float(self.attributes.get("epsilon", 1e-5))

    def x_shape(self) -> tuple[int | None, ...] | None:
        return self.reader.shape(self.node.input[0]) if self.has_input(0) else None


@dataclass(frozen=True)
class Conversion:
    """A normkit layer class name, its keyword arguments and its arrays (as read)."""

    layer_name: str
    options: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _batch_norm(ctx: NodeContext) -> Conversion:
    if ctx.version == 7 and ctx.attributes.get("spatial", 1) != 1:
        raise ctx.error(
            f"spatial={ctx.attributes['spatial']}: statistics per activation (not per channel) are "
            f"not a normkit layer; expected spatial=1"
        )
    scale = ctx.vector(1, "scale")
    channels = scale.shape[0]
    arrays = {
        "weight": scale,
        "bias": ctx.vector(2, "B", channels),
        "running_mean": ctx.vector(3, "input_mean", channels),
        "running_var": ctx.vector(4, "input_var", channels),
    }
    options = {
        "num_features": channels,
        "eps": ctx.eps(),
        "momentum": float(ctx.attributes.get("momentum", 0.9)),
        "axis": 1,
        "affine": True,
        "track_running_stats": True,
    }
    return Conversion("BatchNorm", options, arrays)


def _instance_norm(ctx: NodeContext) -> Conversion:
    scale = ctx.vector(1, "scale")
    channels = scale.shape[0]
    arrays = {"weight": scale, "bias": ctx.vector(2, "B", channels)}
    options = {
        "num_features": channels,
        "eps": ctx.eps(),
        "axis": 1,
        "affine": True,
        "track_running_stats": False,
    }
    return Conversion("InstanceNorm", options, arrays)


def _group_norm(ctx: NodeContext) -> Conversion:
    groups = ctx.attributes.get("num_groups")
    if not isinstance(groups, int) or groups < 1:
        raise ctx.error(f"num_groups={groups!r}; expected a positive int")
    scale, bias = ctx.vector(1, "scale"), ctx.vector(2, "bias")
    if bias.shape != scale.shape:
        raise ctx.error(f"bias has shape {bias.shape} but scale {scale.shape}; expected the same")
    x_shape = ctx.x_shape()
    known = x_shape[1] if x_shape is not None and len(x_shape) > 1 else None
    if ctx.version == 18:  # per group: repeat each value over its group's C/G channels
        if scale.shape[0] != groups:
            raise ctx.error(
                f"scale has shape {scale.shape}; GroupNormalization-18 takes one value per group, "
                f"({groups},) for num_groups={groups}"
            )
        if known is None:
            raise ctx.error(
                f"its scale and bias are per group, and converting them to per channel needs the number "
                f"of channels X.shape[1], which the model does not state for input {ctx.node.input[0]!r}; "
                f"give the graph a static channel dimension"
            )
        channels = known
        if channels % groups:
            raise ctx.error(f"num_groups={groups} does not divide the {channels} channels of X")
        scale, bias = np.repeat(scale, channels // groups), np.repeat(bias, channels // groups)
    else:
        channels = scale.shape[0]
        if channels % groups:
            raise ctx.error(f"num_groups={groups} does not divide the {channels} channels of scale")
        if known is not None and known != channels:
            raise ctx.error(f"scale has {channels} values but X has {known} channels")
    options = {"num_groups": groups, "num_channels": channels, "eps": ctx.eps(), "affine": True, "axis": 1}
    return Conversion("GroupNorm", options, {"weight": scale, "bias": bias})


def _normalized(
    ctx: NodeContext, params: dict[str, np.ndarray]
) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """The normalized shape ``X.shape[axis:]`` and the parameters broadcast to it.

    ONNX lets Scale and B broadcast (unidirectionally) to X; normkit's element-wise affine has
    the normalized shape. Each normalized dimension's size comes from X's static shape, or else
    from a parameter that is not 1 there."""
    axis = ctx.attributes.get("axis", -1)
    x_shape = ctx.x_shape()
    rank = None if x_shape is None else len(x_shape)
    if rank is not None and not -rank <= axis < rank:
        raise ctx.error(f"axis={axis} is out of range for X of rank {rank}")
    if axis < 0:
        count = -axis
    elif rank is None:
        raise ctx.error(
            f"axis={axis} counts from the front, so the normalized axes depend on the rank of X, which the "
            f"model does not state for input {ctx.node.input[0]!r}"
        )
    else:
        count = rank - axis
    trimmed = {}
    for role, array in params.items():
        lead = array.shape[: max(array.ndim - count, 0)]
        if any(size != 1 for size in lead):
            raise ctx.error(
                f"{role} has shape {array.shape}, which varies along axes outside the normalized ones "
                f"(the last {count}); normkit's affine is element-wise over the normalized axes only"
            )
        trimmed[role] = array.reshape(array.shape[len(lead) :])
    dims: list[int | None] = list(x_shape[rank - count :]) if x_shape is not None else [None] * count
    for i in range(count):
        if dims[i] is not None:
            continue
        sizes = {a.shape[i - count + a.ndim] for a in trimmed.values() if i - count + a.ndim >= 0}
        sizes.discard(1)
        if len(sizes) > 1:
            raise ctx.error(
                f"{' and '.join(params)} disagree on the size of normalized dimension {i - count}"
            )
        if not sizes:
            raise ctx.error(
                f"the size of normalized dimension {i - count} is stated neither by X's shape nor by "
                f"{' or '.join(params)}; give the graph static shapes"
            )
        dims[i] = sizes.pop()
    shape = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    broadcast = {}
    for role, array in trimmed.items():
        try:
            broadcast[role] = np.ascontiguousarray(np.broadcast_to(array, shape))
        except ValueError:
            raise ctx.error(
                f"{role} has shape {params[role].shape}, which does not broadcast to the normalized shape {shape}"
            ) from None
    return shape, broadcast


def _layer_norm(ctx: NodeContext) -> Conversion:
    params = {"Scale": ctx.param(1, "Scale")}
    if ctx.has_input(2):
        params["B"] = ctx.param(2, "B")
    shape, arrays = _normalized(ctx, params)
    options = {"normalized_shape": shape, "eps": ctx.eps(), "affine": True, "bias": "B" in arrays}
    return Conversion(
        "LayerNorm", options, {"weight": arrays["Scale"], **({"bias": arrays["B"]} if "B" in arrays else {})}
    )


def _rms_norm(ctx: NodeContext) -> Conversion:
    shape, arrays = _normalized(ctx, {"scale": ctx.param(1, "scale")})
    options = {
        "normalized_shape": shape,
        "eps": ctx.eps(),
        "elementwise_affine": True,
        "cast": "before_weight",
    }
    return Conversion("RMSNorm", options, {"weight": arrays["scale"]})


CONVERTERS: dict[str, tuple[tuple[int, ...], Callable[[NodeContext], Conversion]]] = {
    "BatchNormalization": ((7, 9, 14, 15), _batch_norm),
    "InstanceNormalization": ((6, 22), _instance_norm),
    "LayerNormalization": ((17,), _layer_norm),
    "GroupNormalization": ((18, 21), _group_norm),
    "RMSNormalization": ((23,), _rms_norm),
}
"""Operator type → (the versions normkit reads, converter). BatchNormalization-1 and -6
(``consumed_inputs``, ``is_test``) and InstanceNormalization-1 are refused; convert such a model
with ``onnx.version_converter.convert_version`` first."""
