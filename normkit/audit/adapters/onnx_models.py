"""ONNX's normalization operators, one node per model, run in onnxruntime and in ONNX's own
reference evaluator.

Two opsets per runtime, so that every version of the operators is audited:

========================  =====================  ======================
operator                  opset 23               opset 18
========================  =====================  ======================
BatchNormalization        15                     15
LayerNormalization        17                     17
InstanceNormalization     22                     6
GroupNormalization        21 (scale per channel) 18 (scale per group)
RMSNormalization          23                     (none)
========================  =====================  ======================

Conventions: channel axis 1 (a channels-last case is moved there and back in NumPy, exactly);
``momentum`` weighs the running value (``1 -`` normkit's); the running variance is the
population (biased) one, so an unbiased-estimator case is ``n/a``. BatchNormalization in
training is ``training_mode=1`` (outputs ``Y``, ``running_mean``, ``running_var``); without
tracked statistics it is ``training_mode=1`` in eval too (batch statistics) and its running
outputs are discarded. InstanceNormalization and GroupNormalization need a scale and a bias:
ones and zeros without an affine. GroupNormalization-18's scale is per group: the node gets
ones and zeros and the per-channel affine follows as ``Mul`` and ``Add`` nodes.
LayerNormalization and RMSNormalization normalize trailing axes from ``axis`` on; RMS norm's
spec rounds the normalized value to the input type before the scale (normkit's
``before_weight``), so a half-precision ``after_weight`` case is ``n/a``; a weight offset
enters as ``scale = 1 + w``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported

__all__ = ["OnnxAdapter", "adapters"]

_ELEMENT_TYPES = {"float16": 10, "bfloat16": 16, "float32": 1, "float64": 11}
"""``onnx.TensorProto`` element types."""


def _channels_first(x: np.ndarray, config: Config) -> np.ndarray:
    return (
        np.ascontiguousarray(np.moveaxis(x, config.axis, 1)) if config.axis != 1 else np.ascontiguousarray(x)
    )


def _back(y: np.ndarray, config: Config) -> np.ndarray:
    return np.moveaxis(y, 1, config.axis) if config.axis != 1 else y


class _Graph:
    """A one-node model, built once per case and run per call."""

    def __init__(self, adapter: OnnxAdapter, config: Config, state: Mapping[str, np.ndarray]) -> None:
        self.adapter, self.config = adapter, config
        self.state = {k: np.array(v) for k, v in state.items()}
        self._sessions: dict[bool, Any] = {}

    def _model(self, training: bool) -> Any:
        from onnx import helper, numpy_helper

        c, opset = self.config, self.adapter.opset
        x_type = _ELEMENT_TYPES[c.dtype]
        state_type = _ELEMENT_TYPES["float64" if c.dtype == "float64" else "float32"]
        nodes: list[Any] = []
        inits: list[Any] = []
        x_shape = list(c.shape)
        if c.op in ("batch_norm", "instance_norm", "group_norm"):
            x_shape.insert(1, x_shape.pop(c.axis))
        outputs = [helper.make_tensor_value_info("Y", x_type, x_shape)]

        def constant(name: str, value: np.ndarray) -> str:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            return name

        channels = c.shape[c.axis] if c.op not in ("layer_norm", "rms_norm") else None
        ones = np.ones(channels or 1, self._param_dtype())
        weight = self.state.get("weight", ones).astype(self._param_dtype())
        bias = self.state.get("bias", np.zeros_like(ones)).astype(self._param_dtype())
        # statistics in double for double input (the attribute's default, 1, is float)
        stash = {"stash_type": 11} if c.dtype == "float64" else {}
        if c.op == "batch_norm":
            if c.momentum is None:
                raise Unsupported("BatchNormalization has no cumulative average (momentum=None)")
            if c.unbiased and c.track_running_stats:
                raise Unsupported("BatchNormalization stores the population (biased) running variance")
            batch = training or not c.track_running_stats
            mean = self.state.get("running_mean", np.zeros(channels, self._param_dtype()))
            var = self.state.get("running_var", np.ones(channels, self._param_dtype()))
            names = [
                "X",
                constant("scale", weight),
                constant("B", bias),
                constant("mean", mean),
                constant("var", var),
            ]
            outs = ["Y", "running_mean", "running_var"] if batch else ["Y"]
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    names,
                    outs,
                    epsilon=c.eps,
                    momentum=1.0 - c.momentum,
                    training_mode=int(batch),
                )
            )
            if batch:
                outputs += [
                    helper.make_tensor_value_info("running_mean", state_type, [channels]),
                    helper.make_tensor_value_info("running_var", state_type, [channels]),
                ]
        elif c.op == "instance_norm":
            if c.track_running_stats:
                raise Unsupported("InstanceNormalization has no running statistics")
            if opset < 22 and c.dtype == "bfloat16":
                raise Unsupported("InstanceNormalization-6 has no bfloat16 (added in version 22)")
            names = [
                "X",
                constant("scale", weight.astype(self._x_dtype())),
                constant("B", bias.astype(self._x_dtype())),
            ]
            nodes.append(helper.make_node("InstanceNormalization", names, ["Y"], epsilon=c.eps))
        elif c.op == "group_norm":
            if opset >= 21:
                names = [
                    "X",
                    constant("scale", weight.astype(self._x_dtype())),
                    constant("B", bias.astype(self._x_dtype())),
                ]
                nodes.append(
                    helper.make_node("GroupNormalization", names, ["Y"], epsilon=c.eps, num_groups=c.groups)
                )
            else:  # per-group scale: ones and zeros, then the per-channel affine
                unit = np.ones(c.groups, self._x_dtype())
                names = ["X", constant("scale", unit), constant("B", np.zeros_like(unit))]
                nodes.append(
                    helper.make_node("GroupNormalization", names, ["Z"], epsilon=c.eps, num_groups=c.groups)
                )
                per_channel = (channels,) + (1,) * (len(c.shape) - 2)
                nodes.append(
                    helper.make_node(
                        "Mul",
                        ["Z", constant("w", weight.astype(self._x_dtype()).reshape(per_channel))],
                        ["ZW"],
                    )
                )
                nodes.append(
                    helper.make_node(
                        "Add", ["ZW", constant("b", bias.astype(self._x_dtype()).reshape(per_channel))], ["Y"]
                    )
                )
        else:
            if not c.trailing_axes:
                raise Unsupported(f"{self.adapter.operator(c.op)} normalizes trailing axes only")
            ones = np.ones(c.normalized_shape, self._x_dtype())
            scale = self.state.get("weight", ones).astype(np.float64) + c.weight_offset
            names = ["X", constant("scale", scale.astype(self._x_dtype()))]
            if c.op == "layer_norm" and c.bias and "bias" in self.state:
                names.append(constant("B", self.state["bias"].astype(self._x_dtype())))
            if c.op == "rms_norm":
                if opset < 23:
                    raise Unsupported("RMSNormalization needs opset 23")
                if not c.cast_before_weight and c.dtype in ("float16", "bfloat16") and "weight" in self.state:
                    raise Unsupported("RMSNormalization rounds to the input type before the scale")
            op = "LayerNormalization" if c.op == "layer_norm" else "RMSNormalization"
            nodes.append(helper.make_node(op, names, ["Y"], axis=c.axes[0], epsilon=c.eps, **stash))
        graph = helper.make_graph(
            nodes, "audit", [helper.make_tensor_value_info("X", x_type, x_shape)], outputs, initializer=inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 10)
        return model

    def _x_dtype(self) -> Any:
        from normkit.numpy_backend import numpy_dtype

        return numpy_dtype(self.config.dtype)

    def _param_dtype(self) -> Any:
        return np.float64 if self.config.dtype == "float64" else np.float32

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        c = self.config
        batch = c.op == "batch_norm" and (training or not c.track_running_stats)
        key = batch if c.op == "batch_norm" else False
        if key not in self._sessions:
            self._sessions[key] = self.adapter.session(self._model(key))
        if c.op in ("batch_norm", "instance_norm", "group_norm"):
            x = _channels_first(x, c)
        results = self.adapter.run(self._sessions[key], {"X": np.ascontiguousarray(x)})
        if batch and training and c.track_running_stats:
            # the next call starts from the updated statistics
            self.state["running_mean"], self.state["running_var"] = results[1], results[2]
            self._sessions.clear()
        y = results[0]
        return _back(y, c) if c.op in ("batch_norm", "instance_norm", "group_norm") else y

    def running_stats(self) -> dict[str, np.ndarray]:
        return {"running_mean": self.state["running_mean"], "running_var": self.state["running_var"]}


class OnnxAdapter(Adapter):
    """One runtime (onnxruntime's CPU provider or ``onnx.reference``) at one opset."""

    runtime: ClassVar[str] = ""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.name = f"{self.runtime} (opset {opset})"
        base = ("batch_norm", "instance_norm", "layer_norm", "group_norm")
        self.ops = (*base, "rms_norm") if opset >= 23 else base

    @staticmethod
    def operator(op: str) -> str:
        return {"layer_norm": "LayerNormalization", "rms_norm": "RMSNormalization"}.get(op, op)

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Any:
        if config.native_defaults:
            raise Unsupported("a one-node model has no defaults beyond the operator's attributes")
        graph = _Graph(self, config, state)
        graph._model(training=False)  # raises Unsupported before any call
        return graph

    def session(self, model: Any) -> Any:
        raise NotImplementedError

    def run(self, session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class OnnxRuntime(OnnxAdapter):
    """onnxruntime's CPU execution provider, default graph optimizations."""

    runtime = "onnxruntime"
    requires = ("onnx", "onnxruntime")

    def session(self, model: Any) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def run(self, session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime

        # onnxruntime's Python API has no bfloat16 arrays: pass and read back their bits
        values = {
            name: onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
                array.view(np.uint16), _ELEMENT_TYPES["bfloat16"]
            )
            if array.dtype.name == "bfloat16"
            else onnxruntime.OrtValue.ortvalue_from_numpy(array)
            for name, array in feeds.items()
        }
        binding = session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        buffers: dict[str, np.ndarray] = {}
        x = feeds["X"]
        for output in session.get_outputs():
            if output.type == "tensor(bfloat16)":  # written into a uint16 buffer of X's shape
                buffers[output.name] = np.empty(x.shape, np.uint16)
                binding.bind_ortvalue_output(
                    output.name,
                    onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
                        buffers[output.name], _ELEMENT_TYPES["bfloat16"]
                    ),
                )
            else:
                binding.bind_output(output.name)
        session.run_with_iobinding(binding)
        results = []
        for output, value in zip(session.get_outputs(), binding.get_outputs(), strict=True):
            if output.name in buffers:
                import ml_dtypes

                results.append(buffers[output.name].view(ml_dtypes.bfloat16))
            else:
                results.append(np.asarray(value.numpy()))
        return results


class OnnxReference(OnnxAdapter):
    """``onnx.reference.ReferenceEvaluator``: ONNX's own pure-NumPy evaluator, which expands
    function operators (GroupNormalization) into their bodies."""

    runtime = "onnx.reference"
    requires = ("onnx",)

    def session(self, model: Any) -> Any:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model)

    def run(self, session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, feeds))


def adapters() -> list[Adapter]:
    """onnxruntime and the reference evaluator, each at opsets 23 and 18."""
    return [OnnxRuntime(23), OnnxRuntime(18), OnnxReference(23), OnnxReference(18)]
