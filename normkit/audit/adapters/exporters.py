"""Export paths: a framework's own layer exported to ONNX and run in onnxruntime.

* ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``, opset 17) and the
  dynamo exporter (``dynamo=True``) at opsets 18 and 23, of ``torch.nn`` layers configured as
  :mod:`normkit.audit.adapters.torch_nn` does, inside a module that moves a channels-last
  input with ``movedim(-1, 1)`` as user code does. Every call exports the module in that call's
  mode (training-mode calls with ``training=TrainingMode.TRAINING`` where the exporter has the
  flag) and runs the model in onnxruntime; the module's own running statistics then advance as
  PyTorch's would, so that later calls export the trained state.
* Keras's ``model.export(format="onnx")`` on TensorFlow (tf2onnx): an inference export with no
  training mode, so training calls run in Keras and only eval calls go through ONNX.

Exports are slow (a second or more with dynamo), so these adapters play a few cases
(:data:`EXPORT_CASES`) in float32.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported
from normkit.audit.adapters.keras import KerasLayers
from normkit.audit.adapters.keras import _Layer as _KerasLayer
from normkit.audit.adapters.torch_nn import TorchNN, _tensor

__all__ = ["EXPORT_CASES", "KerasExport", "TorchExport", "adapters"]

EXPORT_CASES = (
    "bn-eval-after-train",
    "bn-channels-last",
    "bn-keras-preset-ema",
    "bn-keras-preset-offset-1e4",
    "in-basic-f32",
    "ln-basic-f32",
    "gn-basic-f32",
    "gn-offset-1000-std-1",
    "gn-offset-1e4-channels-first",
    "rms-basic-f32",
    "rms-offset-1e4",
)


@contextlib.contextmanager
def _silenced() -> Any:
    """The exporters print progress, warnings and C++ graph dumps (to the file descriptors, past
    ``sys.stdout``); the audit's output is its report."""
    import sys
    import warnings

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _operators(model_bytes: bytes) -> set[str]:
    """The operator types in an exported model's main graph (and its local functions)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    found = {node.op_type for node in model.graph.node}
    for function in model.functions:
        found |= {node.op_type for node in function.node}
    return found


def _onnxruntime(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


class _Exported:
    def __init__(self, adapter: TorchExport, module: Any, config: Config) -> None:
        import torch

        class UserModel(torch.nn.Module):
            def __init__(self, norm: Any, channels_last: bool) -> None:
                super().__init__()
                self.norm, self.channels_last = norm, channels_last

            def forward(self, x: Any) -> Any:
                if self.channels_last:
                    return self.norm(x.movedim(-1, 1)).movedim(1, -1)
                return self.norm(x)

        moves = config.op not in ("layer_norm", "rms_norm") and config.channels_last and len(config.shape) > 2
        self.model = UserModel(module, moves)
        self.adapter, self.config = adapter, config
        self.stateful = config.track_running_stats
        self._exports: dict[Any, bytes] = {}
        self.emitted: set[str] = set()
        """The ONNX operators of every model exported for this case."""

    def _export(self, x: Any, training: bool) -> bytes:
        import torch

        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        key = (training if self.stateful else None, *(v.numpy().tobytes() for v in state.values()))
        if key not in self._exports:
            self.model.train(training)
            with _silenced():
                if self.adapter.dynamo:
                    program = torch.onnx.export(
                        self.model, (x,), dynamo=True, opset_version=self.adapter.opset
                    )
                    data = program.model_proto.SerializeToString()
                else:
                    buffer = io.BytesIO()
                    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
                    torch.onnx.export(
                        self.model,
                        (x,),
                        buffer,
                        dynamo=False,
                        opset_version=self.adapter.opset,
                        training=mode,
                    )
                    data = buffer.getvalue()
            self.model.load_state_dict(state)  # tracing may have run a training step
            self._exports[key] = data
            self.emitted |= _operators(data)
        return self._exports[key]

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        import torch

        tensor = _tensor(x)
        y = _onnxruntime(self._export(tensor, training), np.ascontiguousarray(x))
        self.model.train(training)
        with torch.no_grad():
            self.model(tensor)  # advance PyTorch's own state as a training step would
        return y


class TorchExport(Adapter):
    """``torch.nn`` layers through ``torch.onnx.export`` into onnxruntime."""

    ops = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm")
    dtypes = ("float32",)
    requires = ("torch", "onnx", "onnxruntime")
    cases = EXPORT_CASES

    def __init__(self, dynamo: bool, opset: int) -> None:
        self.dynamo, self.opset = dynamo, opset
        exporter = "dynamo" if dynamo else "TorchScript"
        self.name = f"torch.onnx {exporter} opset {opset} -> onnxruntime"
        if dynamo:
            self.requires = (*TorchExport.requires, "onnxscript")

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Any:
        if config.native_defaults:
            raise Unsupported("export paths are audited on configured layers only")
        import torch

        inner = TorchNN()._module(config, len(config.shape))
        with torch.no_grad():
            for key, value in state.items():
                getattr(inner, key).copy_(_tensor(value))
        return _Exported(self, inner, config)


class _KerasExported(_KerasLayer):
    """Keras's layer in a one-layer model: training calls run in Keras (through
    :class:`~normkit.audit.adapters.keras._Layer`), eval calls through the exported model."""

    def __init__(self, layer: Any, config: Config, opset: int | None) -> None:
        import keras

        super().__init__(layer, config)
        self.opset = opset
        self.model = keras.Sequential([keras.Input(config.shape[1:], batch_size=config.shape[0]), layer])
        self.emitted: set[str] = set()

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        import keras

        if training and self.config.op == "batch_norm":  # an inference export: training runs in Keras
            return super().__call__(x, training)
        self.model(
            keras.ops.convert_to_tensor(np.array(x)), training=False
        )  # Keras exports called models only
        with tempfile.TemporaryDirectory() as folder, _silenced():
            path = os.path.join(folder, "model.onnx")
            self.model.export(path, format="onnx", verbose=False, opset_version=self.opset)
            with open(path, "rb") as file:
                data = file.read()
        self.emitted |= _operators(data)
        return _onnxruntime(data, np.ascontiguousarray(x))


class KerasExport(KerasLayers):
    """Keras's layers through ``model.export(format="onnx")`` (tf2onnx) into onnxruntime."""

    ops = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm")
    dtypes = ("float32",)
    cases = EXPORT_CASES

    def __init__(self, opset: int | None = None) -> None:
        super().__init__("tensorflow")
        self.opset = opset
        at = "default opset" if opset is None else f"opset {opset}"
        self.name = f"keras model.export {at} (tensorflow) -> onnxruntime"
        self.requires = ("keras", "tensorflow", "tf2onnx", "onnxruntime")

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Any:
        if config.native_defaults:
            raise Unsupported("export paths are audited on configured layers only")
        built = super().build(config, state)
        return _KerasExported(built.layer, config, self.opset)


def adapters() -> list[Adapter]:
    """TorchScript (opset 17), dynamo (opsets 18 and 23), and Keras on TensorFlow (its default
    opset, and 21, where ONNX's GroupNormalization takes a per-channel scale)."""
    return [
        TorchExport(False, 17),
        TorchExport(True, 18),
        TorchExport(True, 23),
        KerasExport(),
        KerasExport(21),
    ]
