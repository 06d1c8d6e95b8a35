"""How ``normkit audit`` prints its results: a matrix of cases by implementations, the presets
each implementation's defaults match, one line per failure; as text, Markdown or JSON."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import normkit
from normkit.audit.run import AUDIT_CASES, AuditReport, report_from_json, report_to_json
from normkit.testing.cases import get_case
from normkit.testing.runner import CaseResult

__all__ = ["cell", "read_json", "to_json", "to_markdown", "to_text"]

LEGEND = (
    "each cell: pass or FAIL, then the error against the float64 reference at the value nearest its\n"
    "tolerance / that tolerance (derived from the dtype's epsilon and the case's conditioning, as in\n"
    "`normkit check`); FAIL raised: the implementation raised; FAIL dtype: the output's dtype is not\n"
    "the input's; FAIL order: half-precision RMS norm rounds in the other order; n/a: the\n"
    "implementation cannot express the case's configuration (the reason is in --json); blank: it\n"
    "has no such op. See docs/audit.md."
)


_TAGS = (
    ("raised", "raised"),
    ("output dtype", "dtype"),
    ("output shape", "shape"),
    ("rounds in the other order", "order"),
    ("differs between training and eval", "train != eval"),
    ("changed the running statistics", "eval wrote state"),
    ("the input was modified", "wrote input"),
)


def cell(result: CaseResult | None) -> str:
    """One matrix cell: ``pass e/t``, ``FAIL e/t`` (the error at the value nearest its
    tolerance, and that tolerance), ``FAIL <what>`` when what failed is not a value (``raised``,
    ``dtype``, ``order``, ...), ``n/a``, or blank when the implementation has no such op."""
    if result is None:
        return ""
    if result.skipped:
        return "" if result.skipped.endswith(f"has no {result.case.op}") else "n/a"
    numbers = f"{result.worst_error:.1g}/{result.worst_tolerance:.1g}"
    if result.passed:
        return f"pass {numbers}"
    if any("outside tolerance" in failure for failure in result.failures):
        return f"FAIL {numbers}"
    first = result.failures[0]
    tag = next((tag for text, tag in _TAGS if text in first), first.split(":")[0][:16])
    return f"FAIL {tag}"


def _rows(report: AuditReport, names: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    if names is None:
        names = [r.name for r in report.implementations if not r.error]
    by_name = {r.name: {res.case.id: res for res in r.results} for r in report.implementations}
    rows = []
    for case in report.cases:
        cells = [cell(by_name[name].get(case.id)) for name in names]
        if any(cells):
            rows.append([case.id, *cells])
    return ["case", *names], rows


def _column_groups(report: AuditReport, width: int = 5) -> list[list[str]]:
    """The implementations in runs of at most ``width``, for tables that fit a page."""
    names = [r.name for r in report.implementations if not r.error]
    return [names[i : i + width] for i in range(0, len(names), width)]


def _presets(report: AuditReport) -> tuple[list[str], list[list[str]]]:
    ops = sorted({op for r in report.implementations for op in r.presets})
    rows = []
    for r in report.implementations:
        if r.presets:
            rows.append(
                [r.name, *(", ".join(r.presets[op]) or "none" if op in r.presets else "" for op in ops)]
            )
    return ["implementation", *ops], rows


def _emitted(report: AuditReport) -> tuple[list[str], list[list[str]]]:
    """Per export path and op: the ONNX operators its exported models contained."""
    ops = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"]
    rows = []
    for r in report.implementations:
        found: dict[str, set[str]] = {}
        for result in r.results:
            found.setdefault(result.case.op, set()).update(result.notes)
        if any(found.values()):
            rows.append([r.name, *(" ".join(sorted(found.get(op, ()))) for op in ops)])
    return ["export path", *ops], rows


def _failure_lines(report: AuditReport) -> list[str]:
    lines = []
    for name, result in report.failures:
        values = [f for f in result.failures if "outside tolerance" in f]
        lines.append(f"{name} / {result.case.id}: {(values or result.failures)[0]}")
    for r in report.implementations:
        if r.error:
            lines.append(f"{r.name}: could not be audited: {r.error}")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _versions(report: AuditReport) -> str:
    found: dict[str, str] = {}
    for r in report.implementations:
        found.update(r.versions)
    return ", ".join(f"{k} {v}" for k, v in sorted(found.items()))


def _summary(report: AuditReport) -> str:
    ran = sum(1 for r in report.implementations for res in r.results if not res.skipped)
    return (
        f"normkit audit: {len(report.cases)} conformance cases on {len(report.implementations)} implementations "
        f"({ran} cells run, {len(report.failures)} failed) in {report.seconds:.0f} s"
    )


def to_text(report: AuditReport) -> str:
    """The report for a terminal."""
    parts = [_summary(report), f"versions: {_versions(report)}", LEGEND]
    for group in _column_groups(report):  # a terminal's width: five implementations a table
        parts += ["", _table(*_rows(report, group))]
    header, rows = _presets(report)
    if rows:
        parts += [
            "",
            "presets that each implementation's own defaults reproduce (float32, train and eval)",
            _table(header, rows),
        ]
    header, rows = _emitted(report)
    if rows:
        parts += ["", "ONNX operators in the exported models", _table(header, rows)]
    failures = _failure_lines(report)
    if failures:
        parts += ["", "failures (of each cell: the first wrong value, or else its first finding):", *failures]
    if report.missing:
        parts += ["", "not installed (not audited):"]
        parts += [f"  {name}: needs {', '.join(modules)}" for name, modules in report.missing.items()]
    return "\n".join(parts)


def to_markdown(report: AuditReport, *, failures: bool = True) -> str:
    """The report as Markdown (the tables of ``docs/audit.md`` are this, without ``failures``:
    the page describes each failure instead)."""
    parts = [f"{_summary(report)}.", "", f"Versions: {_versions(report)}."]
    for group in _column_groups(report):
        parts += ["", _markdown_table(*_rows(report, group))]
    header, rows = _presets(report)
    if rows:
        parts += [
            "",
            "Presets that each implementation's own defaults reproduce:",
            "",
            _markdown_table(header, rows),
        ]
    header, rows = _emitted(report)
    if rows:
        parts += ["", "ONNX operators in the exported models:", "", _markdown_table(header, rows)]
    lines = _failure_lines(report) if failures else []
    if lines:
        parts += ["", "Failures (of each cell: the first wrong value, or else its first finding):", ""] + [
            f"- {line}" for line in lines
        ]
    if report.missing:
        parts += [
            "",
            "Not installed: "
            + "; ".join(f"{n} (needs {', '.join(m)})" for n, m in report.missing.items())
            + ".",
        ]
    return "\n".join(parts)


def to_json(report: AuditReport) -> str:
    """Everything, including each cell's failure messages and each n/a cell's reason."""
    data: dict[str, Any] = {
        "normkit": normkit.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
        "seconds": report.seconds,
        "cases": [{"id": c.id, "op": c.op, "dtype": c.dtype, "purpose": c.purpose} for c in report.cases],
        "implementations": [report_to_json(r) for r in report.implementations],
        "missing": report.missing,
    }
    return json.dumps(data, indent=1)


def read_json(text: str) -> AuditReport:
    """The report that :func:`to_json` wrote (a recorded run, to render again)."""
    data = json.loads(text)
    known = {case.id for case in AUDIT_CASES}
    cases = tuple(get_case(c["id"]) for c in data["cases"] if c["id"] in known)
    implementations = [report_from_json(i) for i in data["implementations"]]
    return AuditReport(implementations, data["missing"], cases, data["seconds"])
