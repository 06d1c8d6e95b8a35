r"""Graph capture for export: how the kernels notice it, and what they write then.

``torch.onnx.export`` captures a model in one of two ways. The dynamo exporter (``dynamo=True``,
the default) runs ``torch.export`` and translates the ATen graph with onnxscript; the TorchScript
exporter (``dynamo=False``) traces with ``torch.jit.trace`` and translates each traced op by its
"symbolic". Either way the kernels run once, in Python, and what they call is what gets written.
Some of their eager choices translate badly, so they choose otherwise while a graph is captured
(measured with torch 2.13, onnxscript 0.7.2, onnxruntime 1.32):

* **Group norm.** ``torch.group_norm`` becomes ONNX ``GroupNormalization`` under the dynamo
  exporter at opset >= 21, which onnxruntime runs through the op's one-pass
  :math:`E[x^2] - E[x]^2` function body (error 0.59 at mean 1000, NaN at mean 1e4). Under
  ``torch.export`` the kernel therefore writes group norm as instance norm over the
  ``(N, G, -1)`` view (``InstanceNormalization``, a primitive op that onnxruntime computes
  two-pass), then the per-channel affine; layer norm over the view is more accurate still in
  onnxruntime, but ``LayerNormalization``'s function body is one-pass and the TorchScript
  exporter cannot write it for dynamic sizes. Under the TorchScript exporter
  ``torch.group_norm``'s own symbolic writes the instance-norm form at every opset, so it is
  called there, with the channels on dimension 1, whatever the memory layout (an ONNX graph has
  none; the eager two-pass path for channels-last memory, traced with dynamic axes, would bake
  the group size into the graph: error 2.2 at another spatial size).
* **RMS norm.** The TorchScript exporter has no symbolic for ``aten::rms_norm``; under
  ``torch.jit.trace`` the kernel writes the same operations out (no mean is subtracted, so
  they are accurate as they stand). The dynamo exporter translates ``rms_norm`` itself
  (``RMSNormalization`` at opset 23, onnxruntime's native kernel).
* **Instance norm** without running statistics to update is ATen's ``instance_norm`` under
  either capture (``InstanceNormalization``), instead of batch norm on the ``(1, N*C, ...)``
  view, which the exporters write as ``ReduceMean`` arithmetic around a ``BatchNormalization``.
* **Layer norm** under ``torch.jit.trace`` passes ``normalized_shape`` as constants (the
  parameters' shape, or plain ints): the TorchScript exporter refuses a traced size of an input
  with dynamic axes there.

Axes are moved by ``permute`` with non-negative dimensions at all times
(:func:`normkit_torch.kernels.moved`): the TorchScript exporter writes ``movedim(-1, 1)`` as
``Transpose(perm=[0, -1, 1, 2])``, which onnxruntime refuses to load.

And one eager call cannot be exported faithfully at all: batch or instance norm that updates
running statistics. The dynamo exporter writes training-mode batch norm as inference-mode
``BatchNormalization`` over the running-statistics *inputs* and drops the update; for
``torch.nn.BatchNorm2d`` that silently gives eval outputs, and for a kernel that passes zeroed
buffers (the biased estimator's path) it gives garbage. :func:`check_no_update` raises instead.
The TorchScript exporter with ``training=torch.onnx.TrainingMode.TRAINING`` writes
``BatchNormalization(training_mode=1)``, which normalizes by the batch statistics, so it is left
alone.

Outside capture each check is one or two flag reads (about 0.03 µs for ``torch.compiler.
is_exporting``, 0.13 µs for ``torch.jit.is_tracing``); ``torch.compile`` folds both to
constants, so compiled graphs keep the eager paths and have no graph break.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

__all__ = ["check_no_update", "in_onnx_export", "jit_tracing", "torch_exporting"]


def _never() -> bool:
    return False


torch_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", _never)
"""Whether ``torch.export`` (and so ``torch.onnx.export(dynamo=True)``) is capturing the call:
``torch.compiler.is_exporting`` itself (a function that reads a flag)."""

jit_tracing: Callable[[], bool] = torch.jit.is_tracing
"""Whether ``torch.jit.trace`` (and so ``torch.onnx.export(dynamo=False)``) is tracing the call:
``torch.jit.is_tracing`` itself."""


def in_onnx_export() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is running; call it only under capture
    (:func:`torch_exporting` or :func:`jit_tracing`): it imports ``torch.onnx`` and costs 1.6 µs.

    ``torch.onnx.is_in_onnx_export()``, and the flag it reads for the dynamo exporter read
    directly: when ``torch.export``'s non-strict capture fails, the exporter retries in strict
    mode, where Dynamo folds ``is_in_onnx_export()`` to ``False`` but reads a module's attribute
    as it is. Without that flag (another torch version) the public function alone decides."""
    if torch.onnx.is_in_onnx_export():
        return True
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


def check_no_update(op: str) -> None:
    """Raise where the dynamo ONNX exporter captures a call that updates running statistics
    (see the module docstring); nothing in eager mode, under ``torch.compile``, plain
    ``torch.export`` or the TorchScript exporter.

    :param op: the operation, for the message (``"batch norm"``, ``"instance norm"``).
    :raises RuntimeError: under ``torch.onnx.export(dynamo=True)``.
    """
    if torch_exporting() and in_onnx_export():
        raise RuntimeError(
            f"{op} would update running statistics (a layer in training mode with "
            f"track_running_stats=True, or a call given running_mean and running_var with batch "
            f"statistics) while torch.onnx.export(dynamo=True) captures it; that exporter writes it "
            f"as inference-mode BatchNormalization and drops the update, so the ONNX model would "
            f"compute neither this call's output nor its state. Call model.eval() before exporting, "
            f"or export training mode with torch.onnx.export(..., dynamo=False, "
            f"training=torch.onnx.TrainingMode.TRAINING), which writes "
            f"BatchNormalization(training_mode=1)"
        )
