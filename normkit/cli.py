"""The ``normkit`` command (also ``python -m normkit``).

``normkit info``
    normkit's version, and every backend: installed, loaded or blocked, with the versions of
    its distribution and its framework. Reads package metadata only; imports no framework.
``normkit check [--backend NAME ...] [--device DEVICE]``
    runs the conformance cases on every installed backend and prints the agreement matrix
    (largest error against the float64 reference per operation x dtype x backend) and, with
    several backends, the pairwise matrix. Exits with 1 if anything fails.
``normkit bench [--backend NAME ...] [--workload NAME ...] [--rounds N] [--json PATH] [--plot PATH] [--markdown]``
    times each backend's ops against the framework's native op and a memory-bandwidth floor
    measured in the same run, and prints the ratios.
``normkit audit [--implementation NAME ...] [--case ID ...] [--json PATH] [--markdown]``
    runs the conformance cases against the frameworks' own layers (torch.nn, Keras on each
    backend, Flax, Equinox, MLX, onnxruntime, ONNX's reference evaluator: whatever is
    installed) and prints the matrix of cases by implementations, and the preset each
    implementation's defaults match. Exits with 0 whatever the frameworks do; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Sequence

import normkit
from normkit import numpy_backend
from normkit._registry import AUTOLOAD_ENV, BLOCK_ENV, registry

__all__ = ["main"]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _framework_version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return f"{module} not installed"
    distributions = importlib.metadata.packages_distributions().get(module)
    return f"{module} {_version(distributions[0])}" if distributions else module


def cmd_info(args: argparse.Namespace) -> int:
    reg = registry()
    reg.manager()
    print(f"normkit {normkit.__version__} (spec version {normkit.SPEC_VERSION})")
    print(
        f"autoload: {'on' if reg.autoload else 'off'} ({AUTOLOAD_ENV}={os.environ.get(AUTOLOAD_ENV, '')!r})"
    )
    print(f"blocked:  {', '.join(sorted(reg.blocked)) or 'none'} ({BLOCK_ENV})")
    print(f"numpy kernels: {numpy_backend.planned_kernels()} (choose with {numpy_backend.KERNELS_ENV})")
    print()
    loaded = set(reg.loaded())
    numpy_status = "loaded (built in)" if "numpy" in loaded else f"blocked by {BLOCK_ENV}"
    rows = [
        ["backend", "provided by", "framework", "status"],
        ["numpy", f"normkit {normkit.__version__}", _framework_version("numpy"), numpy_status],
    ]
    for ep in reg.entry_points():
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in reg.blocked:
            status = f"blocked by {BLOCK_ENV}"
        elif ep.name in loaded:
            status = "loaded"
        elif ep.name in reg.load_errors:
            status = f"failed to load: {reg.load_errors[ep.name]}"
        elif not reg.autoload:
            status = "installed; autoloading is off"
        else:
            status = f"installed; loads when {ep.name} is imported"
        rows.append([ep.name, f"{dist} {_version(dist)}", _framework_version(ep.name), status])
    for name in sorted(loaded - {"numpy"} - {ep.name for ep in reg.entry_points()}):
        rows.append([name, "registered by hand", "", "loaded"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from normkit.check import run_check
    from normkit.testing.cases import CASES

    report = run_check(args.backend or None, device=args.device)
    print(
        f"normkit check: {len(CASES)} conformance cases on {', '.join(report.backends)}, against the float64 reference"
    )
    for name in report.no_device:
        print(f"{name}: installed, but has no device on this machine (skipped)")
    print(
        "each row gathers the cases of one op and dtype; each cell: the error against the reference that\n"
        "comes nearest its tolerance, and that tolerance, derived from the dtype's epsilon and the case's\n"
        "conditioning (so it differs between backends that come nearest at different values).\n"
        "How cases are judged: docs/conformance.md"
    )
    print()
    print(report.agreement_matrix())
    pairwise = report.pairwise_matrix()
    if pairwise:
        print()
        print("pairwise agreement on the same inputs (allowed: the sum of both tolerances)")
        print(pairwise)
    print()
    if not report.passed:
        print(report.failures())
        print("\nnormkit check: FAILED")
        return 1
    print("normkit check: every case passes on every backend")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from normkit.bench import (
        LEGEND,
        WORKLOADS,
        format_startup,
        format_table,
        measure_startup,
        noise_warning,
        run_bench,
        target_misses,
        write_json,
        write_plot,
    )
    from normkit.check import available_backends

    workloads = tuple(w for w in WORKLOADS if not args.workload or w.name in args.workload)
    unknown = set(args.workload or ()) - {w.name for w in WORKLOADS}
    if unknown:
        print(f"unknown workload(s) {sorted(unknown)}; known: {[w.name for w in WORKLOADS]}", file=sys.stderr)
        return 2
    interactive = sys.stderr.isatty()

    def progress(message: str) -> None:
        if interactive:
            print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)
        else:
            print(message, file=sys.stderr, flush=True)

    backends = []
    for name in args.backend or available_backends():
        try:
            info = registry().info(name)
        except ValueError as error:
            print(f"normkit bench: {error}", file=sys.stderr)
            return 2
        if info.devices:
            backends.append(name)
        else:
            print(f"{name}: installed, but has no device on this machine (skipped)", file=sys.stderr)
    results = run_bench(backends, workloads, args.rounds, progress)
    if interactive:
        print("\r\033[K", end="", file=sys.stderr)
    print(format_table(results, markdown=args.markdown))
    print()
    print(LEGEND)
    for message in (noise_warning(results), target_misses(results)):
        if message:
            print()
            print(message)
    startup = None
    if args.startup:
        progress("startup: import time and first calls in fresh processes")
        startup = measure_startup()
        print()
        print(format_startup(startup))
    if args.json:
        write_json(results, args.json, startup)
        print(f"\nresults written to {args.json}")
    if args.plot:
        write_plot(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from normkit.audit import AUDIT_CASES, builtin_adapters, run_audit
    from normkit.audit.report import to_json, to_markdown, to_text

    adapters = builtin_adapters()
    known = [a.name for a in adapters]
    unknown = sorted(set(args.implementation or ()) - set(known))
    if unknown:
        print(f"normkit audit: unknown implementation(s) {unknown}; known: {known}", file=sys.stderr)
        return 2
    if args.implementation:
        adapters = [a for a in adapters if a.name in args.implementation]
    cases = AUDIT_CASES
    if args.case:
        ids = {c.id for c in AUDIT_CASES}
        unknown = sorted(set(args.case) - ids)
        if unknown:
            print(
                f"normkit audit: unknown case(s) {unknown}; see `normkit.audit.AUDIT_CASES`", file=sys.stderr
            )
            return 2
        cases = tuple(c for c in AUDIT_CASES if c.id in args.case)
    interactive = sys.stderr.isatty()

    def progress(message: str) -> None:
        if interactive:
            print(f"\r\033[K{message[:120]}", end="", file=sys.stderr, flush=True)
        elif "running in a subprocess" in message or message.split(": ", 1)[-1].startswith("1/"):
            print(message, file=sys.stderr, flush=True)

    report = run_audit(adapters, cases, progress=progress)
    if interactive:
        print("\r\033[K", end="", file=sys.stderr)
    print(to_markdown(report) if args.markdown else to_text(report))
    if args.json:
        with open(args.json, "w") as file:
            file.write(to_json(report))
        print(f"\nresults written to {args.json}")
    return 0


def _rounds(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"--rounds={value}: need at least 2 rounds for a median and a spread"
        )
    return value


def _workload_listing() -> str:
    from normkit.bench import WORKLOADS

    lines = ["workloads (default: all):"]
    for w in WORKLOADS:
        shape = "x".join(map(str, w.shape))
        kind = "layers (torch, tensorflow backends)" if w.module else "functional op"
        lines.append(f"  {w.name:<18} {w.op:<14} {shape} {w.dtype}, {kind}, {'/'.join(w.modes)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normkit", description="normalization layers with one exact specification"
    )
    parser.add_argument("--version", action="version", version=f"normkit {normkit.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "info", help="installed, loaded and blocked backends (imports no framework)"
    ).set_defaults(run=cmd_info)
    check = commands.add_parser("check", help="every backend against the float64 reference, and pairwise")
    check.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    check.add_argument("--device", default=None, help="device for the arrays (default: the backend's first)")
    check.set_defaults(run=cmd_check)
    bench = commands.add_parser(
        "bench",
        help="time the ops against the native op and the memory-bandwidth floor",
        description="Time each backend's ops (and, for the torch and tensorflow backends, their "
        "layers) against the framework's native op and a copy of the input, interleaved in the same "
        "rounds. A legend under the table explains its columns; see docs/performance.md.",
        epilog=_workload_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--backend", action="append", help="bench only this backend (repeatable)")
    bench.add_argument(
        "--workload",
        action="append",
        metavar="NAME",
        help="run only this workload (repeatable; listed below)",
    )
    bench.add_argument(
        "--rounds", type=_rounds, default=20, help="interleaved timing rounds, at least 2 (default 20)"
    )
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.add_argument(
        "--plot", default=None, help="also plot time / floor per workload to this PNG (matplotlib)"
    )
    bench.add_argument("--markdown", action="store_true", help="print a Markdown table")
    bench.add_argument(
        "--startup",
        action="store_true",
        help="also time `import normkit` and each op's first call in a fresh process (warm numba cache)",
    )
    bench.set_defaults(run=cmd_bench)
    audit = commands.add_parser(
        "audit",
        help="the conformance cases against the frameworks' own layers (torch.nn, Keras, Flax, onnxruntime, ...)",
        description="Run the conformance cases against every installed native implementation through "
        "its adapter (normkit.audit), and print the matrix of cases by implementations with each "
        "cell's error against the float64 reference and its tolerance, and the preset each "
        "implementation's own defaults match. See docs/audit.md.",
    )
    audit.add_argument(
        "--implementation",
        action="append",
        metavar="NAME",
        help="audit only this implementation (repeatable)",
    )
    audit.add_argument("--case", action="append", metavar="ID", help="play only this case (repeatable)")
    audit.add_argument(
        "--json", default=None, help="also write every result (with reasons) to this JSON file"
    )
    audit.add_argument("--markdown", action="store_true", help="print Markdown tables")
    audit.set_defaults(run=cmd_audit)
    return parser


QUIET_TENSORFLOW = {"TF_CPP_MIN_LOG_LEVEL": "2"}
"""Set for ``check`` and ``bench`` unless the user set it: TensorFlow's C++ start-up notices
(INFO and WARNING) would otherwise be the first lines these commands print."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("check", "bench", "audit"):
        for name, value in QUIET_TENSORFLOW.items():
            os.environ.setdefault(name, value)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a pipe is block-buffered: its write can fail here, not only in run
        return status
    except BrokenPipeError:  # the reader went away (`normkit check | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's final flush cannot fail again
        return 1
