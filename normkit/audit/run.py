"""Run the audit: every conformance case on every installed implementation, and the preset
each one's own defaults match.

An adapter whose framework must be configured before import (``environment``: Keras's
backend, JAX's 64-bit mode) runs in a subprocess (:mod:`normkit.audit.worker`) that reports
its results as JSON; the others run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from normkit.audit.adapter import OPS, Adapter
from normkit.audit.play import play
from normkit.testing.cases import CASES, Case, get_case
from normkit.testing.runner import CaseResult

__all__ = [
    "AUDIT_CASES",
    "AuditReport",
    "ImplementationReport",
    "audit_adapter",
    "preset_probes",
    "run_audit",
]

AUDIT_CASES: tuple[Case, ...] = tuple(case for case in CASES if case.op in OPS)
"""The conformance cases the audit plays: every layer case, and ``moments``."""

MAIN_PRESETS = ("torch", "keras", "flax", "onnx")
"""The frameworks' presets; RMS norm's probes add the model-family ones (``llama``, ``gemma``)."""


def preset_probes(op: str) -> list[Case]:
    """One case per preset for ``op``: float32, train, train, train, eval, small variance and
    (for RMS norm) mean square, so that every preset's eps shows, and equal sizes on axes 1 and -1 (so that a layer built with
    its own default axis takes the same parameters)."""
    presets = [*MAIN_PRESETS, "llama", "gemma"] if op == "rms_norm" else list(MAIN_PRESETS)
    shape = {"batch_norm": (8, 4, 5, 4), "instance_norm": (4, 4, 6, 4), "group_norm": (4, 6, 5, 6)}.get(
        op, (4, 5, 8)
    )
    extra: dict[str, Any] = {
        "group_norm": {"num_groups": 3},
        "layer_norm": {"normalized_shape": 8},
        "rms_norm": {"normalized_shape": 8},
    }.get(op, {})
    steps = ("train",) * 3 + ("eval",)
    return [
        Case(
            id=f"preset-probe-{op}-{name}",
            op=op,
            shape=shape,
            options={"preset": name, **extra},
            steps=steps,
            loc=0.0 if op == "rms_norm" else 0.5,
            scale=0.01,
            purpose=f"{op} with the implementation's own defaults against the {name} preset",
        )
        for name in presets
    ]


@dataclass
class ImplementationReport:
    """The audit of one implementation."""

    name: str
    description: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    results: list[CaseResult] = field(default_factory=list)
    presets: dict[str, list[str]] = field(default_factory=dict)
    """Per op: the presets whose reference the implementation's own defaults reproduce."""
    error: str | None = None
    """Why the implementation could not be audited at all (its subprocess failed)."""
    seconds: float = 0.0


@dataclass
class AuditReport:
    """All results of one ``normkit audit`` run."""

    implementations: list[ImplementationReport]
    missing: dict[str, list[str]]
    """Implementations not installed here, with the modules they lack."""
    cases: tuple[Case, ...]
    seconds: float = 0.0

    @property
    def failures(self) -> list[tuple[str, CaseResult]]:
        return [
            (report.name, result)
            for report in self.implementations
            for result in report.results
            if not result.passed and not result.skipped
        ]


def _quiet_play(case: Case, adapter: Adapter, **options: Any) -> CaseResult:
    with warnings.catch_warnings():  # the frameworks' own warnings are not findings
        warnings.simplefilter("ignore")
        return play(case, adapter, **options)


def audit_adapter(
    adapter: Adapter,
    cases: Iterable[Case] = AUDIT_CASES,
    *,
    presets: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ImplementationReport:
    """Play ``cases`` on ``adapter`` in this process (and, with ``presets``, find which presets
    its defaults match)."""
    start = time.perf_counter()
    report = ImplementationReport(adapter.name, adapter.description, adapter.versions())
    cases = [c for c in cases if adapter.cases is None or c.id in adapter.cases]
    for index, case in enumerate(cases):
        if progress:
            progress(f"{adapter.name}: {index + 1}/{len(cases)} {case.id}")
        report.results.append(_quiet_play(case, adapter))
    if presets:
        for op in adapter.ops:
            if op == "moments":
                continue
            probes = preset_probes(op)
            outcomes = [_quiet_play(probe, adapter, native_defaults=True) for probe in probes]
            if all(outcome.skipped for outcome in outcomes):
                continue
            report.presets[op] = [
                probe.options["preset"]
                for probe, outcome in zip(probes, outcomes, strict=True)
                if outcome.passed
            ]
    report.seconds = time.perf_counter() - start
    return report


def _result_to_json(result: CaseResult) -> dict[str, Any]:
    return {
        "case": result.case.id,
        "skipped": result.skipped,
        "failures": result.failures,
        "worst_error": result.worst_error,
        "worst_tolerance": result.worst_tolerance,
        "max_abs_error": result.max_abs_error,
        "max_rel_error": result.max_rel_error,
        "notes": result.notes,
    }


def _result_from_json(data: dict[str, Any], name: str) -> CaseResult:
    result = CaseResult(
        get_case(data["case"]),
        name,
        None,
        skipped=data["skipped"],
        failures=data["failures"],
        notes=data.get("notes", []),
    )
    for key in ("worst_error", "worst_tolerance", "max_abs_error", "max_rel_error"):
        setattr(result, key, float(data[key]))
    return result


def report_to_json(report: ImplementationReport) -> dict[str, Any]:
    return {
        "name": report.name,
        "description": report.description,
        "versions": report.versions,
        "presets": report.presets,
        "error": report.error,
        "seconds": report.seconds,
        "results": [_result_to_json(r) for r in report.results],
    }


def report_from_json(data: dict[str, Any]) -> ImplementationReport:
    return ImplementationReport(
        name=data["name"],
        description=data["description"],
        versions=data["versions"],
        presets=data["presets"],
        error=data["error"],
        seconds=data["seconds"],
        results=[_result_from_json(r, data["name"]) for r in data["results"]],
    )


def _in_subprocess(
    adapter: Adapter, case_ids: Sequence[str], progress: Callable[[str], None] | None
) -> ImplementationReport:
    env = {
        **os.environ,
        **adapter.environment,
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
    }
    command = [sys.executable, "-m", "normkit.audit.worker", adapter.name, *case_ids]
    if progress:
        progress(
            f"{adapter.name}: running in a subprocess ({', '.join(f'{k}={v}' for k, v in adapter.environment.items())})"
        )
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return ImplementationReport(
            adapter.name,
            adapter.description,
            error=f"subprocess exited with {done.returncode}: {' | '.join(tail)}",
            seconds=time.perf_counter() - start,
        )
    return report_from_json(json.loads(lines[-1]))


def run_audit(
    adapters: Iterable[Adapter] | None = None,
    cases: Iterable[Case] = AUDIT_CASES,
    *,
    presets: bool = True,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Audit ``adapters`` (default: every built-in one that is installed) on ``cases``."""
    from normkit.audit.builtin import builtin_adapters

    start = time.perf_counter()
    chosen = list(adapters) if adapters is not None else builtin_adapters()
    cases = tuple(cases)
    missing: dict[str, list[str]] = {}
    reports = []
    for adapter in chosen:
        lacking = adapter.missing()
        if lacking:
            missing[adapter.name] = lacking
            continue
        if adapter.environment and any(os.environ.get(k) != v for k, v in adapter.environment.items()):
            ids = [c.id for c in cases if adapter.cases is None or c.id in adapter.cases]
            reports.append(_in_subprocess(adapter, ids, progress))
        else:
            reports.append(audit_adapter(adapter, cases, presets=presets, progress=progress))
    return AuditReport(reports, missing, cases, time.perf_counter() - start)
