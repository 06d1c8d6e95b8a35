r"""``normkit bench``: each backend's ops against the framework's native op and the memory floor.

For every workload and mode, three things are timed in the same run, interleaved round by
round (in a shuffled order each round) so that machine noise hits them alike:

* the normkit op on the backend's arrays (:func:`normkit.batch_norm` etc.);
* the *native* ops on the same data (:mod:`normkit.bench_baselines`): PyTorch's
  ``F.batch_norm``, ``F.layer_norm``, ``F.instance_norm`` for the NumPy and PyTorch backends;
  Keras's layers and ``tf.nn`` for the TensorFlow backend, in ``tf.function`` like the normkit
  op itself;
* the *bandwidth floor*: a copy of the input into a preallocated output in the backend's own
  framework. Normalization reads ``x`` and writes ``y`` at least once, so an implementation in
  that framework cannot beat its copy (a fused, multithreaded native op can come close to or
  under NumPy's single-threaded copy).

*Module* workloads (``module=True``) time the frameworks' layers instead of the functional
ops: the drop-in ``normkit_torch`` modules against their ``torch.nn`` namesakes, and the
``normkit_tensorflow`` Keras layers against Keras's own, each called eagerly as a model calls
it (:func:`normkit.bench_baselines.build_modules`); the NumPy backend has no module workload.

Every timed callable is stored under a label of its own kind (``normkit:<backend>``,
``native:<name>``, ``floor``) and :func:`timed_calls` refuses two labels that collide or share
one callable, so that no implementation can be timed against itself.

Reported: the median time of each, the medians of the per-round ratios normkit/native and
normkit/floor, and the median per-round difference normkit - native in microseconds: on the
``tiny`` workloads (where the arithmetic costs nothing) that is what normkit's dispatch and
validation add to each call. The spread of the floor's times (interquartile range / median) is
reported as the machine's noise. These are measurements, never assertions.

Workloads carry *targets* (:class:`Target`; :data:`ISSUE_12_TARGETS`, :data:`ISSUE_17_TARGETS`,
:data:`MODULE_TARGETS`): a limit on one of those ratios, or on the microseconds a layer adds per
call, for one backend's rows, which each row reports as met or missed. The floor writes into a
preallocated array, so workloads with ``with_out=True`` also time the NumPy backend's compiled
kernels writing into a preallocated ``out=`` (row ``numpy-out``), the row that the floor target
is for.
"""

from __future__ import annotations

import functools
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import normkit
from normkit import bench_baselines as baselines
from normkit._registry import load_backend

__all__ = [
    "ISSUE_12_TARGETS",
    "ISSUE_17_TARGETS",
    "LEGEND",
    "MODULE_TARGETS",
    "WORKLOADS",
    "BenchResult",
    "Target",
    "Workload",
    "format_startup",
    "format_table",
    "format_target",
    "format_time",
    "judge_targets",
    "measure_startup",
    "noise_warning",
    "run_bench",
    "target_misses",
    "timed_calls",
    "workload_input",
]


@dataclass(frozen=True)
class Target:
    """A goal for the rows of one backend variant: the median per-round ratio of its time to a
    yardstick (``"native"`` or ``"floor"``) at most ``limit``, or (yardstick ``"added"``) the
    median per-round difference to the native at most ``limit`` microseconds per call."""

    variant: str
    """The row's backend column: ``numpy`` (compiled kernels), ``numpy-out`` (compiled, with
    ``out=``), ``numpy-pure``, ``torch``, ..."""
    yardstick: str
    """``"native"`` (the ``x native`` column), ``"floor"`` (the ``x floor`` column) or ``"added"``
    (the ``+µs/call`` column)."""
    limit: float
    native: str | None = None
    """For a ``"native"`` or ``"added"`` target: the native it is against (``"torch"``: PyTorch's
    ATen op, ``"torch.nn"``: its module, ``"keras"``: Keras's layer, ``"flax"``: Flax's)."""
    torch_threads: int | None = None
    """The number of PyTorch threads the target is stated for; a run with another number
    reports the target as not applicable instead of met or missed."""
    source: str = ""
    modes: tuple[str, ...] = ("train", "eval")
    """The modes whose rows the target holds (the floor target is for training)."""

    def applies_to(self, variant: str, native: str | None, mode: str = "train") -> bool:
        return (
            self.variant == variant
            and mode in self.modes
            and (self.yardstick == "floor" or self.native == native)
        )


ISSUE_12_TARGETS: tuple[Target, ...] = (
    # the compiled NumPy backend at most 1.0x torch's native CPU op (2 threads) ...
    Target("numpy", "native", 1.0, native="torch", torch_threads=2, source="issue 12"),
    # ... and at most 1.3x the bandwidth floor with out=
    Target("numpy-out", "floor", 1.3, source="issue 12"),
    # the torch backend at most 1.05x its ATen op
    Target("torch", "native", 1.05, native="torch", source="issue 12"),
)
"""Issue 12's "Must show" for the group norm and RMS norm workloads, in one place."""

ISSUE_17_TARGETS: tuple[Target, ...] = (
    # the compiled NumPy backend at most 1.0x torch's native CPU op (2 threads), train and eval ...
    Target("numpy", "native", 1.0, native="torch", torch_threads=2, source="issue 17"),
    # ... and at most 1.3x the bandwidth floor with out= on every training workload
    Target("numpy-out", "floor", 1.3, source="issue 17", modes=("train",)),
    # the JAX backend in jit at most 1.05x Flax's layer with use_fast_variance=False
    Target("jax", "native", 1.05, native="flax", source="issue 17"),
)
"""Issue 17's "Must show" for the functional workloads."""

MODULE_TARGETS: tuple[Target, ...] = (
    # the drop-in torch.nn layers add at most 2 us per call over their namesakes, train and eval
    Target("torch", "added", 2.0, native="torch.nn", source="issue 17"),
    # the Keras layers the same over Keras's own, in eager calls
    Target("tensorflow", "added", 2.0, native="keras", source="issue 17"),
)
"""Issue 17's per-call bound for the layers, on the tiny module workloads."""

_TORCH_OP = (Target("torch", "native", 1.05, native="torch", source="issue 12"),)


@dataclass(frozen=True)
class Workload:
    """An input shape for one op; ``axis`` is the channel axis (batch/instance/group norm) or
    the normalized axis (layer and RMS norm: the last)."""

    name: str
    op: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    axis: int = 1
    repeats: int = 1
    """Calls per timed sample (many for inputs so small that one call is a few microseconds)."""
    module: bool = False
    """Time the frameworks' layers (``normkit_torch`` against ``torch.nn``, normkit's Keras layers
    against Keras's) instead of the functional ops."""
    num_groups: int | None = None
    """Group norm's ``G`` (required for ``op="group_norm"``)."""
    preset: str | None = None
    """For a module workload: normkit's layer built with this preset (the native with the same
    eps, momentum and affine), to show what a non-default preset costs; ``None``: defaults."""
    with_out: bool = False
    """Also time the NumPy backend's compiled kernels writing into a preallocated ``out=`` (row
    ``numpy-out``), as the floor writes into one."""
    targets: tuple[Target, ...] = ()
    """The goals its rows are held to (:data:`ISSUE_12_TARGETS`)."""

    def __post_init__(self) -> None:
        if (self.op == "group_norm") != (self.num_groups is not None):
            raise ValueError(f"workload {self.name!r}: num_groups is for group_norm, and group_norm needs it")
        if self.num_groups is not None and self.channels % self.num_groups:
            raise ValueError(
                f"workload {self.name!r}: {self.num_groups} groups do not divide {self.channels}"
            )

    @property
    def modes(self) -> tuple[str, ...]:
        """``("train", "eval")`` for the ops with running statistics and for every layer (a
        layer's eval call runs under ``torch.no_grad()`` or ``training=False``: another path);
        ``("train",)`` for the other functional ops, which compute the same thing in both."""
        stateful = self.op in ("batch_norm", "instance_norm")
        return ("train", "eval") if stateful or self.module else ("train",)

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def param_size(self) -> int:
        """The length of the weight (and bias): the last axis for layer and RMS norm, else the
        channels."""
        return self.shape[-1] if self.op in ("layer_norm", "rms_norm") else self.channels


_FUNCTIONAL = {"with_out": True, "targets": ISSUE_17_TARGETS}
_SPEC_2 = {"with_out": True, "targets": ISSUE_17_TARGETS + _TORCH_OP}
_TINY_MODULE = {"repeats": 100, "module": True, "targets": MODULE_TARGETS}

WORKLOADS: tuple[Workload, ...] = (
    Workload("bn2d-nchw", "batch_norm", (32, 64, 56, 56), **_FUNCTIONAL),
    Workload("bn2d-nchw-256", "batch_norm", (8, 256, 28, 28), **_FUNCTIONAL),
    Workload("bn2d-nhwc", "batch_norm", (32, 56, 56, 64), axis=-1, **_FUNCTIONAL),
    Workload("bn1d", "batch_norm", (4096, 1024), **_FUNCTIONAL),
    Workload("ln-768", "layer_norm", (64, 512, 768), axis=-1, **_FUNCTIONAL),
    Workload("ln-1024", "layer_norm", (4096, 1024), axis=-1, **_FUNCTIONAL),
    Workload("in2d", "instance_norm", (16, 64, 64, 64), **_FUNCTIONAL),
    Workload("bn2d-nchw-f64", "batch_norm", (32, 64, 56, 56), dtype="float64", **_FUNCTIONAL),
    Workload("ln-1024-f64", "layer_norm", (4096, 1024), dtype="float64", axis=-1, **_FUNCTIONAL),
    Workload("tiny", "batch_norm", (2, 4), repeats=200, targets=ISSUE_17_TARGETS),
    Workload("bn2d-module-tiny", "batch_norm", (2, 8, 8, 8), **_TINY_MODULE),
    Workload("bn2d-module", "batch_norm", (8, 256, 28, 28), module=True),
    Workload("in2d-module-tiny", "instance_norm", (2, 8, 8, 8), **_TINY_MODULE),
    Workload("in2d-module", "instance_norm", (16, 64, 64, 64), module=True),
    Workload("ln-module-tiny", "layer_norm", (2, 8, 8), axis=-1, **_TINY_MODULE),
    Workload("ln-module", "layer_norm", (64, 512, 768), axis=-1, module=True),
    Workload("gn-nchw", "group_norm", (32, 256, 28, 28), num_groups=32, **_SPEC_2),
    Workload("gn-nhwc", "group_norm", (8, 64, 64, 512), axis=-1, num_groups=32, **_SPEC_2),
    Workload("rms-4096", "rms_norm", (4096, 4096), axis=-1, **_SPEC_2),
    Workload("rms-768", "rms_norm", (64, 512, 768), axis=-1, **_SPEC_2),
    Workload("gn-module-tiny", "group_norm", (2, 8, 8, 8), num_groups=4, **_TINY_MODULE),
    Workload("gn-module", "group_norm", (8, 256, 28, 28), num_groups=32, module=True),
    Workload("rms-module-tiny", "rms_norm", (2, 8, 8), axis=-1, **_TINY_MODULE),
    Workload("rms-module", "rms_norm", (64, 512, 768), axis=-1, module=True),
    # non-default presets, untargeted (issue 17: "may cost more, and the bench says how much")
    Workload("bn2d-module-tiny-keras", "batch_norm", (2, 8, 8, 8), repeats=100, module=True, preset="keras"),
    Workload(
        "rms-module-tiny-gemma", "rms_norm", (2, 8, 8), axis=-1, repeats=100, module=True, preset="gemma"
    ),
)
"""Every workload ``normkit bench`` knows, by name (``--workload NAME``)."""

NORMKIT, NATIVE, FLOOR = "normkit:", "native:", "floor"
"""The label kinds of :func:`timed_calls`."""


def timed_calls(
    mine: dict[str, Callable[[], Any]], floor: Callable[[], Any], natives: dict[str, Callable[[], Any]]
) -> dict[str, Callable[[], Any]]:
    """The callables of one job under labels that cannot collide: ``normkit:<variant>`` for
    normkit's implementations, ``native:<name>`` for the frameworks' own ops, ``floor``.

    Raises ``ValueError`` when two labels coincide or one callable object is given under two
    labels: either would time a thing against itself (a native named like a backend once
    overwrote normkit's own op, and every ratio read 1.00)."""
    labelled = [(NORMKIT + name, call) for name, call in mine.items()]
    labelled += [(FLOOR, floor)]
    labelled += [(NATIVE + name, call) for name, call in natives.items()]
    calls: dict[str, Callable[[], Any]] = {}
    for label, call in labelled:
        if label in calls:
            raise ValueError(f"two timed callables share the label {label!r}")
        twin = next((other for other, c in calls.items() if c is call), None)
        if twin is not None:
            raise ValueError(
                f"{label!r} and {twin!r} are the same callable: it would be timed against itself"
            )
        calls[label] = call
    return calls


@dataclass
class BenchResult:
    """Timings (milliseconds) of one workload, mode and backend."""

    workload: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    backend: str
    native: str | None
    normkit_ms: float
    native_ms: float | None
    floor_ms: float
    ratio_to_native: float | None
    ratio_to_floor: float
    overhead_us: float | None
    noise: float
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    """The workload's targets for this row (:func:`judge_targets`): ``yardstick``, ``limit``,
    ``ratio``, ``met`` (``None`` where the target's conditions do not hold) and ``source``."""


def _normkit_op(
    workload: Workload, mode: str, backend: str, params: dict[str, Any], out: Any = None
) -> Callable[[Any], Any]:
    """The normkit op of the workload as a function of its input (writing into ``out``, when
    given)."""
    training = mode == "train"
    if workload.op == "group_norm":
        return lambda x: normkit.group_norm(
            x, workload.num_groups, params["weight"], params["bias"], eps=baselines.EPS,
            axis=workload.axis, backend=backend, out=out,
        )  # fmt: skip
    if workload.op == "rms_norm":
        return lambda x: normkit.rms_norm(
            x, params["weight"], axis=workload.axis, eps=baselines.EPS, backend=backend, out=out
        )
    into = {} if out is None else {"out": out}  # the backends without out= never get the keyword
    if workload.op == "layer_norm":
        return lambda x: normkit.layer_norm(
            x, workload.shape[-1], params["weight"], params["bias"], backend=backend, **into
        )
    if workload.op == "batch_norm":
        op = lambda x: normkit.batch_norm(  # noqa: E731
            x, params["running_mean"], params["running_var"], params["weight"], params["bias"],
            training=training, axis=workload.axis, backend=backend, **into,
        )  # fmt: skip
    else:
        op = lambda x: normkit.instance_norm(  # noqa: E731
            x, params["running_mean"], params["running_var"], params["weight"], params["bias"],
            use_input_stats=training, axis=workload.axis, backend=backend, **into,
        )  # fmt: skip
    if training:
        return op
    # eval returns the running statistics as given: y alone is the result, as every native's eval
    # returns (under jax.jit the two pass-through outputs would cost copies and 5 us a call)
    return lambda x: op(x).y


def _time_interleaved(
    calls: dict[str, Callable[[], Any]], rounds: int, repeats: int = 1
) -> dict[str, list[float]]:
    """Per-call milliseconds of each callable, ``rounds`` samples of ``repeats`` calls each."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: caches, allocators, lazy imports
        call()
        call()
    order = list(calls.items())
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # no implementation always runs first (or right after the same one)
        for name, call in order:
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            times[name].append((time.perf_counter() - start) * 1e3 / repeats)
    return times


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _median_difference_us(a: list[float], b: list[float]) -> float:
    return 1e3 * statistics.median(x - y for x, y in zip(a, b, strict=True))


def _noise(samples: list[float]) -> float:
    q = statistics.quantiles(samples, n=4)
    return (q[2] - q[0]) / statistics.median(samples)


def run_bench(
    backends: list[str],
    workloads: tuple[Workload, ...] = WORKLOADS,
    rounds: int = 20,
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Time every workload and mode on every backend (a workload in a dtype the backend lacks,
    such as float64 on JAX without x64, is left out); see the module docstring."""
    dtypes = {b: load_backend(b).dtypes for b in backends}
    jobs = [
        (w, m, b)
        for w in workloads
        for m in w.modes
        for b in backends
        if (not w.module or baselines.has_modules(b, w)) and w.dtype in dtypes[b]
    ]
    from normkit import numpy_backend

    kernels = numpy_backend.kernels_in_use() if "numpy" in backends else None
    try:
        return _run_jobs(jobs, rounds, progress)
    finally:
        if kernels is not None:
            numpy_backend.use_kernels(kernels)  # the NumPy variants switch kernels per call


def _run_jobs(
    jobs: list[tuple[Workload, str, str]], rounds: int, progress: Callable[[str], None] | None
) -> list[BenchResult]:
    results = []
    for index, (workload, mode, backend) in enumerate(jobs, 1):
        if progress:
            progress(f"[{index}/{len(jobs)}] {workload.name} {mode} on {backend}")
        info = load_backend(backend)
        x_np = workload_input(workload)
        x = info.asarray(x_np, workload.dtype, None)
        params = {
            k: info.asarray(np.full(workload.param_size, v, dtype=np.float32), "float32", None)
            for k, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))
        }
        framework = baselines.framework_of(backend)
        if workload.module:
            mine, natives = baselines.build_modules(backend, workload, mode, x)
            variants = {backend: mine}
        else:
            op = baselines.compiled(
                framework, functools.partial(_normkit_op, workload, mode, backend), params
            )
            into = None
            if workload.with_out and backend == "numpy":
                into = _normkit_op(workload, mode, backend, params, out=np.empty_like(x_np))
            variants = {
                name: (lambda op=op, x=x: op(x)) for name, op in _kernel_variants(backend, op, into).items()
            }
            natives = baselines.build_natives(backend, workload, mode, x, x_np)
        calls = timed_calls(variants, baselines.floor(framework, x), natives)
        times = _time_interleaved(calls, rounds, workload.repeats)
        for variant in variants:
            mine = times[NORMKIT + variant]
            common = {
                "workload": workload.name,
                "shape": workload.shape,
                "dtype": workload.dtype,
                "mode": mode,
                "backend": variant,
                "normkit_ms": statistics.median(mine),
                "floor_ms": statistics.median(times[FLOOR]),
                "ratio_to_floor": _median_ratio(mine, times[FLOOR]),
                "noise": _noise(times[FLOOR]),
                "rounds": rounds,
                "extra": baselines.settings(framework)
                | baselines.device_bandwidth(framework, x, statistics.median(mine) / 1e3),
            }
            rows = [
                BenchResult(
                    native=name,
                    native_ms=statistics.median(times[NATIVE + name]),
                    ratio_to_native=_median_ratio(mine, times[NATIVE + name]),
                    overhead_us=_median_difference_us(mine, times[NATIVE + name]),
                    **common,
                )
                for name in natives
            ] or [BenchResult(native=None, native_ms=None, ratio_to_native=None, overhead_us=None, **common)]
            for row in rows:
                row.targets = judge_targets(workload.targets, row)
            results += rows
    return results


def workload_input(workload: Workload) -> np.ndarray:
    """The input every implementation of a workload is timed on: standard normal values of the
    workload's shape and dtype, the same in every run."""
    return np.random.default_rng(0).standard_normal(workload.shape).astype(workload.dtype)


def judge_targets(targets: tuple[Target, ...], result: BenchResult) -> list[dict[str, Any]]:
    """Each target that applies to ``result``'s row, with the ratio it measured and whether it
    is met (``None``: the run's conditions are not the target's, e.g. another number of PyTorch
    threads, or the row has no such ratio)."""
    judged = []
    for target in targets:
        if not target.applies_to(result.backend, result.native, result.mode):
            continue
        ratio = {
            "floor": result.ratio_to_floor,
            "native": result.ratio_to_native,
            "added": result.overhead_us,
        }[target.yardstick]
        threads = result.extra.get("torch_threads")
        applicable = ratio is not None and target.torch_threads in (None, threads)
        judged.append({
            "yardstick": target.yardstick,
            "limit": target.limit,
            "ratio": ratio,
            "met": (ratio <= target.limit) if applicable else None,
            "torch_threads": target.torch_threads,
            "source": target.source,
        })  # fmt: skip
    return judged


def target_misses(results: list[BenchResult]) -> str | None:
    """A line naming every row that missed a target, with its ratio and the limit, if any."""
    misses = [
        f"{r.workload} {r.mode} on {r.backend}: "
        + (
            f"+{t['ratio']:.1f} µs/call > {t['limit']:.1f}"
            if t["yardstick"] == "added"
            else f"x {t['yardstick']} {t['ratio']:.2f} > {t['limit']:.2f}"
        )
        + (f" ({t['source']})" if t["source"] else "")
        for r in results
        for t in r.targets
        if t["met"] is False
    ]
    if not misses:
        return None
    return f"targets missed in {len(misses)} row(s): " + "; ".join(misses)


def _kernel_variants(
    backend: str, op: Callable[[Any], Any], into: Callable[[Any], Any] | None = None
) -> dict[str, Callable[[Any], Any]]:
    """The implementations of a backend to time: for the NumPy backend with numba installed, its
    compiled kernels as ``numpy`` and its pure-NumPy ones as ``numpy-pure``, each call switching
    to its kernels (so both pay the same switch), and ``into`` (the op writing into a
    preallocated ``out=``) on the compiled kernels as ``numpy-out``; otherwise the backend itself."""
    if backend != "numpy":
        return {backend: op}
    from normkit import numpy_backend

    available = ["pure"]
    try:
        numpy_backend.use_kernels("compiled")
        available.insert(0, "compiled")
    except ModuleNotFoundError:
        numpy_backend.use_kernels("pure")

    def using(kernels: str, op: Callable[[Any], Any] = op) -> Callable[[Any], Any]:
        def call(x: Any) -> Any:
            numpy_backend.use_kernels(kernels)
            return op(x)

        return call

    variants = {}
    for k in available:
        if k == "compiled":
            variants["numpy"] = using(k)
            if into is not None:
                variants["numpy-out"] = using(k, into)
        else:
            variants["numpy-pure"] = using(k)
    return variants


def format_time(ms: float) -> str:
    """A median time with its unit: microseconds below 0.1 ms (the tiny workloads), else ms."""
    return f"{1e3 * ms:.1f} µs" if ms < 0.1 else f"{ms:.2f} ms"


NOISY = 0.25
"""A row whose floor times spread more than this (IQR / median) gets a warning."""

LEGEND = """\
normkit    median time of one call of normkit's op (module rows: normkit's layer, called eagerly)
native     the framework's own op or layer on the same data, timed in the same rounds; in brackets:
           torch = PyTorch's ATen op (torch.nn.functional), torch.nn = its module, keras = Keras's
           layer, tf.nn = tf.nn.moments + tf.nn.batch_normalization (RMS norm: x * rsqrt(mean(x²) + eps)
           * w in TensorFlow ops), flax = flax.linen's layer with use_fast_variance=False (two-pass, as
           normkit), flax-fast = with Flax's default use_fast_variance=True (E[x²] - E[x]²: faster, and
           inaccurate far from 0); one row per native
floor      copying the input once in the backend's framework: no normalization can cost less
x native   median of the per-round ratios normkit / native (below 1: normkit is faster)
x floor    median of the per-round ratios normkit / floor
+µs/call   median per-round difference normkit - native, per call (the tiny rows: normkit's overhead)
noise      spread of the floor's times in this run (interquartile range / median)
target     the most that row's x native or x floor (or +µs/call: "+µs") may be, from the issue named
           in the JSON: ✓ met, ✗ missed, n/a where the run differs from the target's conditions
           (PyTorch's thread count); backend numpy-out = compiled NumPy kernels with out="""


def format_table(results: list[BenchResult], markdown: bool = False) -> str:
    """The results as an aligned text table, or a Markdown table."""
    header = [
        "workload",
        "shape",
        "mode",
        "backend",
        "normkit",
        "native",
        "floor",
        "x native",
        "x floor",
        "+µs/call",
        "noise",
    ]
    rows = []
    for r in results:
        native = f"{format_time(r.native_ms)} ({r.native})" if r.native_ms is not None else "n/a"
        ratio = f"{r.ratio_to_native:.2f}" if r.ratio_to_native is not None else "n/a"
        rows.append([
            r.workload, "x".join(map(str, r.shape)) + f" {r.dtype}", r.mode, r.backend, format_time(r.normkit_ms),
            native, format_time(r.floor_ms), ratio, f"{r.ratio_to_floor:.2f}",
            f"{r.overhead_us:+.1f}" if r.overhead_us is not None else "n/a", f"{100 * r.noise:.0f}%",
        ])  # fmt: skip
    if any("fraction_of_peak" in r.extra for r in results):  # a GPU backend: bandwidth against peak
        header.append("% peak BW")
        for row, r in zip(rows, results, strict=True):
            fraction = r.extra.get("fraction_of_peak")
            row.append(f"{100 * fraction:.0f}%" if fraction is not None else "")
    if any(r.targets for r in results):
        header.append("target")
        for row, r in zip(rows, results, strict=True):
            row.append("; ".join(format_target(t) for t in r.targets))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def format_target(target: dict[str, Any]) -> str:
    """One judged target as a table cell: ``native ≤ 1.00 ✓``, ``floor ≤ 1.30 ✗``, or ``n/a``
    with the reason."""
    verdict = {True: "✓", False: "✗"}.get(target["met"])
    if verdict is None:
        threads = target.get("torch_threads")
        verdict = f"n/a (stated for {threads} torch threads)" if threads else "n/a"
    if target["yardstick"] == "added":
        return f"+µs ≤ {target['limit']:.1f} {verdict}"
    return f"{target['yardstick']} ≤ {target['limit']:.2f} {verdict}"


def noise_warning(results: list[BenchResult]) -> str | None:
    """A warning naming the rows measured with more than :data:`NOISY` noise, if any."""
    noisy = list(dict.fromkeys(f"{r.workload} {r.mode} on {r.backend}" for r in results if r.noise > NOISY))
    if not noisy:
        return None
    return (
        f"warning: noise above {100 * NOISY:.0f} % in {len(noisy)} row(s) ({', '.join(noisy)}): the machine "
        "was busy while they ran; their ratios are unreliable. Rerun on an idle machine or with more --rounds."
    )


def write_plot(results: list[BenchResult], path: str) -> None:
    """A PNG of each result's time as a multiple of the bandwidth floor, per workload and mode:
    one bar per backend, and a marker for each native op measured in the same run (matplotlib,
    imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(f"{r.workload} {r.mode}" for r in results))
    backends = list(dict.fromkeys(r.backend for r in results))
    natives = list(dict.fromkeys(str(r.native) for r in results if r.ratio_to_native is not None))
    markers = dict(zip(natives, "_x+.1dv^", strict=False))  # one marker per native op
    width = 0.8 / max(len(backends), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * len(keys) + 2), 4.5))
    drawn: set[str] = set()
    for index, backend in enumerate(backends):
        mine = {f"{r.workload} {r.mode}": r for r in results if r.backend == backend}
        positions = [k + index * width for k, key in enumerate(keys) if key in mine]
        values = [mine[key].ratio_to_floor for key in keys if key in mine]
        axes.bar(positions, values, width, label=f"normkit ({backend})")
        for r in results:  # every native of every row (a backend may have several per workload)
            if r.backend != backend or r.ratio_to_native is None:
                continue
            native = str(r.native)
            x = keys.index(f"{r.workload} {r.mode}") + index * width
            label = f"native: {native}" if native not in drawn else None
            drawn.add(native)
            axes.plot(
                x, r.ratio_to_floor / r.ratio_to_native, "k" + markers[native], markersize=8, label=label
            )
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xticks(
        [k + width * (len(backends) - 1) / 2 for k in range(len(keys))],
        keys,
        fontsize=7,
        rotation=60,
        ha="right",
    )
    axes.set_yscale("log")
    axes.set_ylabel("time / bandwidth floor (log)")
    axes.set_title("time as a multiple of a copy of the input; lower is better", fontsize=10)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_json(results: list[BenchResult], path: str, startup: dict[str, Any] | None = None) -> None:
    """Save the results (and the startup measurements) with the machine they ran on."""
    import os
    import platform

    payload = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "numpy": np.__version__,
        "normkit": normkit.__version__,
        "results": [asdict(r) for r in results],
        "startup": startup,
    }
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)


_FIRST_CALL = """
import sys, time
import numpy as np
x = np.random.default_rng(0).standard_normal({shape}).astype(np.float32)
start = time.perf_counter()
import normkit
{call}
print(time.perf_counter() - start)
"""

FIRST_CALLS = {
    "batch_norm train (32, 64, 56, 56)": "normkit.batch_norm(x, np.zeros(64, np.float32), np.ones(64, np.float32), training=True)",
    "batch_norm eval (32, 64, 56, 56)": "normkit.batch_norm(x, np.zeros(64, np.float32), np.ones(64, np.float32))",
    "batch_norm train channels-last (32, 56, 56, 64)": "normkit.batch_norm(x.reshape(32, 56, 56, 64), training=True, axis=-1)",
    "layer_norm (32, 64, 56, 56) over 56": "normkit.layer_norm(x, 56)",
}
"""The first NumPy op of a fresh process, timed from ``import normkit`` to its result."""

HEAVY_MODULES = ("numba", "llvmlite", "torch", "tensorflow", "keras", "cupy", "jax", "matplotlib")


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )


def _import_ms(code: str) -> float:
    """The cumulative milliseconds of normkit's line in ``python -X importtime -c code``."""
    lines = _python(code, "-X", "importtime").stderr.splitlines()
    line = next(line for line in lines if line.rstrip().endswith("| normkit"))
    return int(line.split("|")[1]) / 1e3


def measure_startup(runs: int = 5) -> dict[str, Any]:
    """What a new process pays: ``python -X importtime -c "import normkit"`` (cumulative
    milliseconds of normkit's line, median of ``runs``), the heavy modules that import brings
    in (none is the goal), what it adds to a process that has imported NumPy already (``import
    numpy; import normkit``: issue 17's bound is 30 ms), and the first call of each of :data:`FIRST_CALLS` in a fresh process
    with a warm numba cache (each is run once first to fill the cache; median of ``runs``)."""
    import_ms, added_ms = [], []
    for _ in range(runs):
        import_ms.append(_import_ms("import normkit"))
        added_ms.append(_import_ms("import numpy; import normkit"))  # numpy is already loaded
    listing = "import sys, normkit; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(_python(listing).stdout.split())
    first_call_s = {}
    for name, call in FIRST_CALLS.items():
        code = _FIRST_CALL.format(shape=(32, 64, 56, 56), call=call)
        _python(code)  # fills the compilation cache if it is cold
        first_call_s[name] = statistics.median(float(_python(code).stdout) for _ in range(runs))
    from normkit import numpy_backend

    return {
        "import_normkit_ms": statistics.median(import_ms),
        "import_normkit_ms_runs": import_ms,
        "import_normkit_after_numpy_ms": statistics.median(added_ms),
        "import_normkit_after_numpy_ms_runs": added_ms,
        "heavy_modules_imported": sorted(loaded.intersection(HEAVY_MODULES)),
        "numpy_kernels": numpy_backend.planned_kernels(),
        "first_call_s": first_call_s,
    }


def format_startup(startup: dict[str, Any]) -> str:
    """The startup measurements as lines of text."""
    runs = ", ".join(f"{ms:.0f}" for ms in startup["import_normkit_ms_runs"])
    added = startup.get("import_normkit_after_numpy_ms_runs")
    lines = [
        f"import normkit: {startup['import_normkit_ms']:.0f} ms cumulative (python -X importtime; runs: {runs})",
    ]
    if added:
        lines.append(
            f"import normkit after import numpy: {startup['import_normkit_after_numpy_ms']:.0f} ms (runs: "
            + ", ".join(f"{ms:.0f}" for ms in added)
            + ")"
        )
    lines += [
        f"modules it imports among {', '.join(HEAVY_MODULES)}: {', '.join(startup['heavy_modules_imported']) or 'none'}",
        f"first call in a fresh process, warm cache, NumPy kernels {startup['numpy_kernels']}:",
    ]
    lines += [f"  {name}: {seconds:.3f} s" for name, seconds in startup["first_call_s"].items()]
    return "\n".join(lines)
