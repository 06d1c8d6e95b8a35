"""``normkit audit``: the conformance suite run against the frameworks' own layers.

Each implementation (``torch.nn``, Keras on each of its backends, Flax, Equinox, MLX,
onnxruntime, ONNX's reference evaluator, or your own) is reached through a small
:class:`Adapter`; the audit plays every conformance case it can express against the float64
reference with the suite's tolerances, and finds which preset its own defaults reproduce.

>>> from normkit.audit import Adapter, Config, Unsupported, run_audit
>>> report = run_audit([])          # no implementations: an empty report
>>> report.failures
[]

``import normkit`` does not import this package; the adapters import their frameworks only when
they run.
"""

from normkit.audit.adapter import OPS, Adapter, Config, Layer, Unsupported
from normkit.audit.builtin import builtin_adapters
from normkit.audit.play import case_config, play
from normkit.audit.run import (
    AUDIT_CASES,
    AuditReport,
    ImplementationReport,
    audit_adapter,
    preset_probes,
    run_audit,
)

__all__ = [
    "AUDIT_CASES",
    "OPS",
    "Adapter",
    "AuditReport",
    "Config",
    "ImplementationReport",
    "Layer",
    "Unsupported",
    "audit_adapter",
    "builtin_adapters",
    "case_config",
    "play",
    "preset_probes",
    "run_audit",
]
