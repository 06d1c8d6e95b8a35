"""``normkit check``: every installed backend against the float64 reference, and pairwise.

Runs each conformance case (:data:`normkit.testing.cases.CASES`) on each backend, then prints
two matrices: per operation x dtype x backend, the error against the reference that comes
nearest its tolerance (largest error / allowed error), that tolerance, and a pass/fail verdict (the tolerance policy of
:mod:`normkit.testing.tolerances`; ``docs/conformance.md``), and, with two or
more backends, the largest difference between each pair on the same inputs (allowed: the sum
of both backends' tolerances).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from normkit._registry import registry
from normkit.testing.cases import CASES, Case
from normkit.testing.runner import CaseResult, run_case, tolerance_used

__all__ = ["CheckReport", "available_backends", "run_check"]


def available_backends() -> list[str]:
    """The built-in NumPy backend and every installed, unblocked entry-point backend."""
    reg = registry()
    reg.manager()
    names = ["numpy"] + [ep.name for ep in reg.entry_points() if ep.name not in reg.blocked]
    return list(dict.fromkeys(names))


@dataclass
class _Cell:
    cases: int = 0
    failed: int = 0
    skipped: int = 0
    error: float = 0.0
    tolerance: float = 0.0

    def add(self, result: CaseResult) -> None:
        if result.skipped:
            self.skipped += 1
            return
        self.cases += 1
        self.failed += not result.passed
        if tolerance_used(result.worst_error, result.worst_tolerance) >= tolerance_used(
            self.error, self.tolerance
        ):
            self.error, self.tolerance = result.worst_error, result.worst_tolerance

    def render(self) -> str:
        if self.cases == 0:
            return "skipped" if self.skipped else "-"
        verdict = "pass" if self.failed == 0 else f"FAIL {self.failed}/{self.cases}"
        if self.tolerance == 0.0:  # nothing compared: every case raised or returned nothing
            return f"{verdict:<5} (no values compared)"
        return f"{verdict:<5} {self.error:.1e} (tol {self.tolerance:.1e})"


@dataclass
class _PairCell:
    compared: int = 0
    outside: int = 0
    max_difference: float = 0.0
    cases: list[str] = field(default_factory=list)

    def render(self) -> str:
        if self.compared == 0:
            return "-"
        verdict = "pass" if self.outside == 0 else f"FAIL {self.outside}"
        return f"{verdict:<5} {self.max_difference:.1e}"


@dataclass
class CheckReport:
    """All results of one ``normkit check`` run."""

    backends: list[str]
    results: dict[str, list[CaseResult]] = field(default_factory=dict)
    load_errors: dict[str, str] = field(default_factory=dict)
    no_device: list[str] = field(default_factory=list)
    """Backends installed and loaded but with no device to run on here (CuPy without a GPU)."""

    @property
    def passed(self) -> bool:
        """Every backend loaded, ran at least one case, passed every case it ran, and agrees
        with every other backend."""
        return (
            self.pairs_agree
            and not self.load_errors
            and all(any(not r.skipped for r in rs) for rs in self.results.values())
            and all(r.passed or r.skipped for rs in self.results.values() for r in rs)
        )

    def _rows(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys((case.op, case.dtype) for case in CASES))

    def agreement_matrix(self) -> str:
        names = [b for b in self.backends if b in self.results]
        cells = {(op, dtype, b): _Cell() for op, dtype in self._rows() for b in names}
        for b in names:
            for result in self.results[b]:
                cells[result.case.op, result.case.dtype, b].add(result)
        header = ["op", "dtype", *[f"{b}  (error nearest its tolerance)" for b in names]]
        rows = [[op, dtype, *[cells[op, dtype, b].render() for b in names]] for op, dtype in self._rows()]
        return _table(header, rows)

    def _pair_cells(self) -> dict[tuple[str, str, tuple[str, str]], _PairCell]:
        names = [b for b in self.backends if b in self.results]
        pairs = list(itertools.combinations(names, 2))
        cells = {(op, dtype, pair): _PairCell() for op, dtype in self._rows() for pair in pairs}
        by_case = {b: {r.case.id: r for r in self.results[b]} for b in names}
        for a, b in pairs:
            for case in CASES:
                ra, rb = by_case[a].get(case.id), by_case[b].get(case.id)
                if ra is None or rb is None or ra.skipped or rb.skipped:
                    continue
                cell = cells[case.op, case.dtype, (a, b)]
                for oa, ob in zip(ra.outputs, rb.outputs, strict=False):
                    if oa.y.size == 0:
                        continue
                    difference = np.abs(oa.y - ob.y)
                    cell.compared += 1
                    cell.outside += int(np.any(~(difference <= oa.bound + ob.bound)))
                    cell.max_difference = max(cell.max_difference, float(np.max(difference)))
                    if cell.outside and case.id not in cell.cases:
                        cell.cases.append(case.id)
        return cells

    @property
    def pairs_agree(self) -> bool:
        """Every pair of backends agrees on every output both computed (within the sum of their
        tolerances)."""
        return all(cell.outside == 0 for cell in self._pair_cells().values())

    def pairwise_matrix(self) -> str | None:
        names = [b for b in self.backends if b in self.results]
        if len(names) < 2:
            return None
        pairs = list(itertools.combinations(names, 2))
        cells = self._pair_cells()
        header = ["op", "dtype", *[f"{a} vs {b}  (max difference)" for a, b in pairs]]
        rows = [
            [op, dtype, *[cells[op, dtype, pair].render() for pair in pairs]] for op, dtype in self._rows()
        ]
        return _table(header, rows)

    def failures(self) -> str:
        lines = [f"{b}: could not be loaded: {error}" for b, error in self.load_errors.items()]
        for b, results in self.results.items():
            if results and all(r.skipped for r in results):
                lines.append(f"{b}: no case ran ({results[0].skipped})")
        for results in self.results.values():
            lines += [r.report() for r in results if not r.passed and not r.skipped]
        for (op, dtype, (a, b)), cell in self._pair_cells().items():
            if cell.outside:
                lines.append(
                    f"{a} and {b} disagree on {op} {dtype} beyond tolerance in: {', '.join(cell.cases)}"
                )
        return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def run_check(
    backends: Iterable[str] | None = None, device: str | None = None, cases: Iterable[Case] = CASES
) -> CheckReport:
    """Run the cases on the backends (default: :func:`available_backends`)."""
    names = list(backends) if backends is not None else available_backends()
    report = CheckReport(names)
    for name in names:
        try:
            info = registry().info(name)
        except Exception as error:  # a broken install must not hide the others' results
            report.load_errors[name] = f"{type(error).__name__}: {error}"
            continue
        if not info.devices:
            report.no_device.append(name)
            continue
        report.results[name] = [run_case(case, name, device) for case in cases]
    return report
