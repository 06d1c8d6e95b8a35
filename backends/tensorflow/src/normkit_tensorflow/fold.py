r"""The Keras 3 implementation of :func:`normkit.testtime.fold`: every ``BatchNormalization``
folded into the ``Conv1D/2D/3D``, ``Conv1DTranspose/2D/3D``, ``DepthwiseConv1D/2D`` or ``Dense``
before it, for Sequential and functional models.

A batch norm folds where it is called on the output of one of those layers, with a linear
activation, an output nothing else uses, of a layer called once in the model, and normalizes that
layer's output-channel axis (the last for ``channels_last`` and ``Dense``, 1 for
``channels_first``). Its eval transform (the moving statistics: what ``model(x, training=False)``
computes) goes into the layer's kernel and bias (:func:`normkit.testtime.fold.fold_weights`, in
float64, cast to the variables' dtype); a layer without bias gets one (``use_bias=True``).

The result is a new model of the same kind (Sequential, or functional through
``keras.models.clone_model``) whose layers are new, with the original weights copied, the folded
ones replaced, and no batch norm left; nested models are folded the same way. The model passed in
is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from normkit.testtime.fold import fold_weights

__all__ = ["fold_model"]

_ABSORBING = (
    (keras.layers.Conv1D, "out-last"),
    (keras.layers.Conv2D, "out-last"),
    (keras.layers.Conv3D, "out-last"),
    (keras.layers.Conv1DTranspose, "keras-transposed"),
    (keras.layers.Conv2DTranspose, "keras-transposed"),
    (keras.layers.Conv3DTranspose, "keras-transposed"),
    (keras.layers.DepthwiseConv1D, "keras-depthwise"),
    (keras.layers.DepthwiseConv2D, "keras-depthwise"),
    (keras.layers.Dense, "out-last"),
)


def _base(layer: object) -> tuple[type, str] | None:
    """The Keras class among :data:`_ABSORBING` whose computation ``layer`` runs unchanged, and
    its kernel layout."""
    for cls, layout in _ABSORBING:
        if isinstance(layer, cls):
            same = type(layer).call is cls.call and getattr(type(layer), "convolution_op", None) is getattr(
                cls, "convolution_op", None
            )
            return (cls, layout) if same else None
    return None


def _batch_norms(model: Any) -> list[Any]:
    """Every ``BatchNormalization`` in ``model``, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(_batch_norms(layer))
    return found


@dataclass
class _Fold:
    batch_norm: Any
    layer: Any
    layout: str


def _describe(operation: Any, node: Any) -> str:
    if node.is_input:
        return f"the model's input {operation.name!r}"
    return f"{operation.name!r} ({type(operation).__name__})"


def _plan(graph: Any, outputs: list[Any]) -> list[_Fold]:
    """Every batch-norm call in the graph, checked, with the layer it folds into."""
    nodes = [
        node for depth in sorted(graph._nodes_by_depth, reverse=True) for node in graph._nodes_by_depth[depth]
    ]
    calls: dict[int, int] = {}
    consumers: dict[int, list[str]] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers.setdefault(id(tensor), []).append(node.operation.name)
    for tensor in outputs:
        consumers.setdefault(id(tensor), []).append("the model's outputs")
    plan = []
    for node in nodes:
        bn = node.operation
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        name = bn.name
        if node.arguments.kwargs.get("training"):
            raise ValueError(
                f"{name!r}: the batch norm is called with training=True, so it normalizes with batch "
                f"statistics even when the model runs in inference; fold uses the moving statistics"
            )
        if len(node.input_tensors) != 1:
            raise ValueError(f"{name!r}: called on {len(node.input_tensors)} tensors, expected one input")
        x = node.input_tensors[0]
        operation, node_index, _ = x._keras_history
        source = operation._inbound_nodes[node_index]
        base = None if source.is_input else _base(operation)
        if base is None:
            raise ValueError(
                f"{name!r}: its input comes from {_describe(operation, source)}, not a convolution or "
                f"dense layer that can absorb it (Conv1D/2D/3D, Conv1DTranspose/2D/3D, "
                f"DepthwiseConv1D/2D, Dense)"
            )
        cls, layout = base
        layer = operation.name
        if operation.activation is not keras.activations.linear:
            activation = getattr(operation.activation, "__name__", repr(operation.activation))
            raise ValueError(
                f"{name!r}: its input comes from {layer!r} ({cls.__name__}) with activation "
                f"{activation!r}, not linear: the batch norm normalizes the activation's output"
            )
        if getattr(operation, "lora_enabled", False) or getattr(operation, "quantization_mode", None):
            raise ValueError(
                f"{name!r}: {layer!r} has LoRA or quantized weights; folding needs a plain kernel"
            )
        users = consumers[id(x)]
        if len(users) > 1:
            others = ", ".join(repr(u) for u in users if u != name) or f"{name!r} again"
            raise ValueError(
                f"{name!r}: the output of {layer!r} is also used by {others}; folding the batch norm "
                f"into {layer!r} would change what they see"
            )
        if calls[id(operation)] > 1:
            raise ValueError(
                f"{name!r}: {layer!r} is called {calls[id(operation)]} times in the model; folding the "
                f"batch norm into it would change its other calls"
            )
        rank = len(x.shape)
        channel_axis = (
            1 if getattr(operation, "data_format", "channels_last") == "channels_first" else rank - 1
        )
        if bn.axis % rank != channel_axis:
            raise ValueError(
                f"{name!r}: it normalizes axis {bn.axis} of its {rank}-D input, but {layer!r} "
                f"({cls.__name__}) has its output channels on axis {channel_axis}: the batch norm's "
                f"per-channel transform cannot go into {layer!r}'s kernel"
            )
        if tuple(bn.moving_mean.shape) != (x.shape[channel_axis],):
            raise ValueError(
                f"{name!r}: {bn.moving_mean.shape[0]} moving statistics for the "
                f"{x.shape[channel_axis]} output channels of {layer!r}"
            )
        plan.append(_Fold(bn, operation, layout))
    return plan


def _numpy(variable: Any) -> np.ndarray | None:
    return None if variable is None else np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _absorb(fold: _Fold, clone: Any) -> None:
    """Set ``clone`` (of ``fold.layer``, with a bias) to the layer with the batch norm folded in."""
    layer, bn = fold.layer, fold.batch_norm
    kernel, bias = fold_weights(
        _numpy(layer.kernel),
        _numpy(layer.bias),
        _numpy(bn.moving_mean),
        _numpy(bn.moving_variance),
        _numpy(bn.gamma) if bn.scale else None,
        _numpy(bn.beta) if bn.center else None,
        float(bn.epsilon),
        layout=fold.layout,
    )
    variables = clone.weights
    if len(variables) != 2 or tuple(variables[0].shape) != kernel.shape:
        raise AssertionError(f"{clone.name!r}: expected a kernel of shape {kernel.shape} and a bias")
    for variable, value in zip(variables, (kernel, bias), strict=True):
        dtype = keras.ops.convert_to_numpy(variable).dtype  # ml_dtypes' bfloat16 included
        variable.assign(value.astype(dtype))  # rounded once, from float64


def fold_model(model: Any) -> Any:
    r"""A new Keras model computing ``model(x, training=False)`` with every ``BatchNormalization``
    folded into the convolution or dense layer before it (see :mod:`normkit_tensorflow.fold` and
    :func:`normkit.testtime.fold`); ``model`` is not changed.

    :raises ValueError: for a model without batch norm, one not built, and any batch norm that
        cannot be folded (the message names it and says why).
    :raises TypeError: for anything but a Sequential or functional Keras 3 model.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model is a {type(model).__module__}.{type(model).__qualname__}: expected a Keras 3 model "
            f"(Sequential or functional)"
        )
    if not _batch_norms(model):
        raise ValueError(f"model {model.name!r} has no BatchNormalization layer to fold")
    sequential = isinstance(model, keras.Sequential)
    if not sequential and not isinstance(model, keras.Function):
        raise TypeError(
            f"model {model.name!r} is a subclassed {type(model).__name__}: fold needs a Sequential or "
            f"functional model, whose graph of layers is known"
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"model {model.name!r} has not been built: call it on an input or give it an Input first"
        )
    graph = model if not sequential else keras.Function(model.inputs, model.outputs)
    plan = _plan(graph, graph.outputs)
    folded = {id(f.batch_norm) for f in plan}
    producers = {id(f.layer): f for f in plan}
    clones: dict[int, tuple[Any, Any, bool]] = {}  # id(layer): (layer, clone, weights set already)

    def clone_function(layer: Any) -> Any:
        if id(layer) in clones:  # a layer used twice stays shared
            return clones[id(layer)][1]
        if id(layer) in folded:
            return layer  # never called: see call_function
        if id(layer) in producers:
            config = layer.get_config()
            config["use_bias"] = True
            clone = type(layer).from_config(config)
        elif isinstance(layer, keras.Model):
            inner = bool(_batch_norms(layer))
            clone = fold_model(layer) if inner else keras.models.clone_model(layer)
            clones[id(layer)] = (layer, clone, inner)
            return clone
        elif isinstance(layer, keras.layers.Layer):
            clone = type(layer).from_config(layer.get_config())
        else:
            return layer  # a stateless operation (keras.ops in a functional model)
        clones[id(layer)] = (layer, clone, False)
        return clone

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if id(layer) in folded:
            return args[0]
        return layer(*args, **kwargs)

    if sequential:
        input_layer = model.inputs[0]._keras_history[0]
        new = keras.Sequential(
            [
                keras.Input(
                    batch_shape=input_layer.batch_shape, dtype=model.inputs[0].dtype, name=input_layer.name
                )
            ]
            + [clone_function(layer) for layer in model.layers if id(layer) not in folded],
            name=model.name,
            trainable=model.trainable,
        )
        if model.compiled:
            new.compile_from_config(model.get_compile_config())
    else:
        new = keras.models.clone_model(model, clone_function=clone_function, call_function=call_function)
    for key, (layer, clone, done) in clones.items():
        if key in producers:
            try:
                _absorb(producers[key], clone)
            except ValueError as error:  # a statistic or parameter fold_weights refuses
                names = producers[key].batch_norm.name, producers[key].layer.name
                raise ValueError(f"{names[0]!r} (folded into {names[1]!r}): {error}") from None
        elif not done:
            clone.set_weights(layer.get_weights())
    left = [layer.name for layer in _batch_norms(new)]
    if left:  # every batch-norm call was folded or refused above
        raise AssertionError(f"batch norms left after folding: {left}")
    return new
