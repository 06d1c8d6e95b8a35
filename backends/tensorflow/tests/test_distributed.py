r"""``normkit_tensorflow.BatchNormalization(synchronized=True)`` under ``tf.distribute``: real
replicas, in processes of their own.

* ``MirroredStrategy`` over two logical CPU devices (configured before TensorFlow initializes,
  so in a fresh process: this file run as a script, ``python test_distributed.py mirrored``);
* ``MultiWorkerMirroredStrategy`` with two worker processes on 127.0.0.1 (free ports,
  ``TF_CONFIG``).

Each launch runs every case in one go (TensorFlow starts in seconds) and writes every replica's
results to a file; the tests below judge them in this process, which never imports TensorFlow.
Every subprocess has a timeout: a bug is an error, never a hang.

Per-replica batches are unequal, one of them empty ([1, 7], [0, 5]), fed to ``strategy.run``
through ``experimental_distribute_values_from_function``, float32 at 1e4 σ from 0 and float16;
each case trains two steps, eagerly and inside ``tf.function`` (as Keras's ``fit`` runs its
step). The oracles, on the concatenated global batch (the replicas' parts in replica order):

* ``normkit.reference`` (float64, NumPy): outputs, moving statistics, masked statistics;
* the textbook gradients of batch norm in float64 NumPy (checked against central differences
  of the reference in ``test_gradients.py``): :math:`\partial/\partial x` on every replica, the
  replicas' :math:`\partial/\partial\gamma`, :math:`\partial/\partial\beta` as the partial sums
  over their own parts (the strategy sums them);
* normkit's own layer in one replica (no strategy) on the concatenated batch, in the case's dtype:
  another implementation of the same call, within twice the bound of ours.

Tolerances are derived from :mod:`normkit.testing.tolerances` (outputs: :func:`output_bound`, the
core's ``tests/test_distributed.py`` bound; statistics: ``statistics_tolerance``; gradients:
:func:`gradient_bounds`, as the torch engine's test derives them, plus ``K`` times the case's
conditioning measured on the float64 oracle). Keras's own ``synchronized=True`` fails the same
bounds at 1e4 (:math:`E[x^2] - E[x]^2`) and, with a mask, does not synchronize at all.

Also: Keras's ``fit`` under MirroredStrategy against ``fit`` in one replica (``training_tolerance``);
the refusals, on every replica, of a global batch of one value (torch preset), of workers whose
dtypes disagree and of parts of different lengths (the layout travels in the all-gather's
header); all replicas empty; and a worker that skips the collective, which leaves the other a
timeout error.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from normkit import reference
from normkit.testing.distributed import output_bound as shared_output_bound
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    CONDITIONING_FACTOR,
    EPS,
    assert_within,
    compute_dtype,
    reduction_growth,
    statistics_tolerance,
    training_tolerance,
)

HERE = Path(__file__).resolve()
CHANNELS, POSITIONS = 3, 4
BN_EPS, MOMENTUM = 1e-5, 0.1  # the torch preset: Keras momentum 0.9, unbiased moving variance
STEPS = 2
LAUNCH_TIMEOUT_S = 150  # a whole launch, TensorFlow's start-up included; never an endless wait

WEIGHTS = {
    "gamma": np.array([0.5, 1.0, 2.0], np.float32),
    "beta": np.array([0.25, 0.0, -1.0], np.float32),
    "moving_mean": np.array([1.0, -2.0, 0.5], np.float32),
    "moving_variance": np.array([2.0, 0.5, 1.0], np.float32),
}


# --------------------------------------------------------------------------------------------
# the cases (made here, run in the subprocesses, judged here)
# --------------------------------------------------------------------------------------------


def make_case(
    name: str,
    sizes: tuple[int, ...],
    dtype: str,
    loc: float,
    *,
    traced: bool,
    seed: int,
    masked: bool = False,
    keras_too: bool = False,
    positions: int = POSITIONS,
    dtypes: tuple[str, ...] | None = None,
    preset: str = "torch",
) -> dict[str, Any]:
    """Every replica's part (``(n, POSITIONS, C)``, channels last), upstream gradient (in the
    case's dtype, so that it reaches the layer exactly), and mask (Keras's, of positions)."""
    rng = np.random.default_rng(seed)
    dtypes = dtypes or (dtype,) * len(sizes)
    parts = [
        rng.normal(loc, 1.0, size=(n, positions, CHANNELS)).astype(t)
        for n, t in zip(sizes, dtypes, strict=True)
    ]
    upstream = [rng.normal(size=p.shape).astype(p.dtype) for p in parts]
    masks = [rng.random(p.shape[:-1]) < 0.6 for p in parts] if masked else None
    return {
        "name": name,
        "dtype": dtype,
        "loc": loc,
        "traced": traced,
        "parts": parts,
        "upstream": upstream,
        "masks": masks,
        "keras": keras_too,
        "preset": preset,
    }


def numeric_cases() -> list[dict[str, Any]]:
    cases = []
    for sizes, sizes_name in (((1, 7), "1-7"), ((0, 5), "0-5")):
        for dtype, loc in (("float32", 1e4), ("float16", 3.0)):
            for traced in (False, True):
                name = f"{sizes_name}-{dtype}-{'function' if traced else 'eager'}"
                cases.append(
                    make_case(
                        name,
                        sizes,
                        dtype,
                        loc,
                        traced=traced,
                        seed=len(cases),
                        keras_too=dtype == "float32" and not traced,
                    )
                )
    return cases


def mirrored_spec() -> dict[str, Any]:
    cases = numeric_cases()
    cases.append(
        make_case("masked", (4, 6), "float32", 2.0, traced=True, seed=50, masked=True, keras_too=True)
    )
    cases.append(make_case("masked-eager", (3, 0), "float32", 2.0, traced=False, seed=51, masked=True))
    cases.append(make_case("all-empty", (0, 0), "float32", 0.0, traced=True, seed=52))
    for traced in (False, True):
        cases.append(
            make_case(f"single-value-{traced}", (1, 0), "float32", 0.0, traced=traced, seed=53, positions=1)
        )
    # the communicator's own checks, after the cases
    return {"strategy": "mirrored", "cases": cases, "probes": [False, True]}


def multiworker_spec() -> dict[str, Any]:
    cases = [
        make_case("0-5-float32-function", (0, 5), "float32", 1e4, traced=True, seed=60),
        make_case("1-7-float16-eager", (1, 7), "float16", 3.0, traced=False, seed=61),
        make_case("masked", (4, 6), "float32", 2.0, traced=True, seed=62, masked=True),
        # Workers that disagree on the dtype (channel counts that differ never get this far:
        # MultiWorkerMirroredStrategy broadcasts each new variable from worker 0, which fails on
        # the shapes and aborts the workers' collectives; the communicator's own check covers them)
        make_case(
            "mismatch-eager", (2, 2), "float32", 0.0, traced=False, seed=63, dtypes=("float32", "float16")
        ),
        make_case(
            "mismatch-function", (2, 2), "float32", 0.0, traced=True, seed=64, dtypes=("float32", "float16")
        ),
    ]
    return {"strategy": "multiworker", "cases": cases, "probes": [False]}


# --------------------------------------------------------------------------------------------
# the subprocesses: this file run as a script
# --------------------------------------------------------------------------------------------


def _run_case(strategy: Any, case: dict[str, Any], local_ids: list[int]) -> dict[str, Any]:
    """Two training steps of normkit's layer (and Keras's, if asked) under ``strategy``, and of
    normkit's layer in one replica on the concatenated batch: each local replica's output,
    gradients and copy of the moving statistics."""
    import keras
    import tensorflow as tf

    import normkit_tensorflow as nt

    parts, upstream, masks = case["parts"], case["upstream"], case["masks"]
    me = local_ids[0]
    policy = "mixed_float16" if parts[me].dtype == np.float16 else "float32"

    def make(library: Any, positions: int = parts[me].shape[1]) -> Any:
        options = (
            {"preset": case["preset"]} if library is nt else {"momentum": 1 - MOMENTUM, "epsilon": BN_EPS}
        )
        layer = library.BatchNormalization(synchronized=True, dtype=policy, **options)
        layer.build((None, positions, CHANNELS))
        layer.set_weights([WEIGHTS[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
        return layer

    def steps(run: Any, inputs: tuple) -> tuple:
        for _ in range(STEPS):
            outputs = run(*inputs)
        return outputs

    def step_fn(layer: Any) -> Any:
        def step(x: Any, g: Any, *mask: Any) -> tuple:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=mask[0] if mask else None)
                loss = tf.reduce_sum(y * g)
            dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
            return y, dx, dgamma, dbeta

        return step

    out: dict[str, Any] = {}
    per_replica = lambda arrays: strategy.experimental_distribute_values_from_function(  # noqa: E731
        lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group])
    )
    inputs = (per_replica(parts), per_replica(upstream)) + ((per_replica(masks),) if masks else ())
    libraries = [("normkit", nt)] + ([("keras", keras.layers)] if case["keras"] else [])
    for label, library in libraries:
        with strategy.scope():
            layer = make(library)
        step = step_fn(layer)

        def run(*args: Any, step: Any = step) -> Any:
            return strategy.run(step, args=args)

        try:
            outputs = steps(tf.function(run) if case["traced"] else run, inputs)
        except Exception as error:  # judged by the tests: some cases must fail, on every replica
            out[label] = {
                "error": type(error).__name__,
                "message": str(error),
                "trace": traceback.format_exc(),
            }
            continue
        local = [strategy.experimental_local_results(o) for o in outputs]
        out[label] = {
            "replicas": {
                rid: {
                    name: (None if value is None else np.asarray(value[i].numpy()))
                    for name, value in zip(("y", "dx", "dgamma", "dbeta"), local, strict=True)
                }
                | {
                    name: strategy.experimental_local_results(getattr(layer, name).value)[i].numpy()
                    for name in ("moving_mean", "moving_variance")
                }
                for i, rid in enumerate(local_ids)
            }
        }
    if case["name"].startswith(("mismatch", "single-value", "all-empty")) or me != 0:
        return out
    # one replica, no strategy (the default one: a replica context of one), the whole batch
    layer = make(nt)
    whole = [np.concatenate(a) for a in (parts, upstream) + ((masks,) if masks else ())]
    step = step_fn(layer)
    y, dx, dgamma, dbeta = steps(
        tf.function(step) if case["traced"] else step, tuple(map(tf.constant, whole))
    )
    out["single"] = {
        "y": y.numpy(),
        "dx": dx.numpy(),
        "dgamma": dgamma.numpy(),
        "dbeta": dbeta.numpy(),
        "moving_mean": layer.moving_mean.numpy(),
        "moving_variance": layer.moving_variance.numpy(),
    }
    return out


def _probe_layouts(strategy: Any, traced: bool) -> dict[str, str]:
    """The communicator on its own, each replica gathering ``3 + rank`` numbers (and saying so):
    vectors of different lengths, which ``all_gather`` accepts; every replica must refuse them."""
    import tensorflow as tf

    from normkit_tensorflow.distributed import ReplicaCommunicator

    def gather() -> Any:
        channels = 3 + ReplicaCommunicator().rank
        comm = ReplicaCommunicator(layer="probe", channels=channels, dtype="float32")
        return comm.all_gather([tf.zeros([channels], tf.float64)])[0][0]

    def run() -> Any:
        return strategy.run(gather)

    try:
        (tf.function(run) if traced else run)()
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": "none", "message": ""}


FIT = {"samples": 16, "features": 5, "hidden": 4, "batch": 8, "epochs": 2, "rate": 0.05}
FIT_STEPS = FIT["epochs"] * FIT["samples"] // FIT["batch"]
FIT_TERMS = 2 * (2 * FIT["batch"] + FIT["features"] + FIT["hidden"] + FIT["batch"]) + FIT["batch"]
"""Terms summed per value along one training step of the fit model: batch norm's two passes over
the global batch, the dense layers' inputs, the loss's mean over the batch; backward about as
many again, plus the dense kernels' gradients over the batch."""


SKIP_TIMEOUT_S = 5.0


def _probe_skip(strategy: Any, me: int) -> dict[str, Any]:
    """Worker 1 never joins the all-gather worker 0 makes (a replica in eval while the others
    train); worker 0's communicator waits ``SKIP_TIMEOUT_S`` and fails. Worker 1 stays alive past
    that, so the failure is the timeout, not a lost peer."""
    import tensorflow as tf

    from normkit_tensorflow.distributed import ReplicaCommunicator

    if me == 1:
        time.sleep(SKIP_TIMEOUT_S + 5)
        return {"error": "skipped"}

    def gather() -> Any:
        comm = ReplicaCommunicator(layer="probe", timeout=SKIP_TIMEOUT_S)
        return comm.all_gather([tf.zeros([3], tf.float64)])

    start = time.monotonic()
    try:
        strategy.run(gather)
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {"error": "none", "seconds": time.monotonic() - start}


def _fit(strategy: Any) -> dict[str, Any]:
    """Keras's ``fit`` (its train step in a ``tf.function`` under ``strategy.run``; the global
    batch of 8 split 4 + 4) of Dense -> BatchNormalization -> Dense, synchronized, and not; and
    the same model in one replica on the whole batches. Every weight after the steps, and the
    largest change one step made to a weight."""
    import keras

    import normkit_tensorflow as nt

    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 1.0, size=(FIT["samples"], FIT["features"])).astype("float32")
    y = rng.normal(size=(FIT["samples"], 1)).astype("float32")

    def model(synchronized: bool) -> Any:
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((FIT["features"],)),
                keras.layers.Dense(FIT["hidden"]),
                nt.BatchNormalization(synchronized=synchronized, preset="torch"),
                keras.layers.Dense(1),
            ]
        )

    class LargestStep(keras.callbacks.Callback):
        largest, before = 0.0, []

        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            self.before = [np.array(w) for w in self.model.get_weights()]

        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            for w, before in zip(self.model.get_weights(), self.before, strict=True):
                self.largest = max(self.largest, float(np.abs(w - before).max()))

    out: dict[str, Any] = {}
    largest = LargestStep()
    for label, synchronized, scope in (
        ("single", True, None),
        ("synchronized", True, strategy),
        ("local", False, strategy),
    ):
        if scope is None:
            m = model(synchronized)
        else:
            with scope.scope():
                m = model(synchronized)
        m.compile(optimizer=keras.optimizers.SGD(FIT["rate"]), loss="mse", jit_compile=False)
        callbacks = [largest] if scope is None else []
        m.fit(
            x, y, batch_size=FIT["batch"], epochs=FIT["epochs"], shuffle=False, verbose=0, callbacks=callbacks
        )
        out[label] = m.get_weights()
        out["names"] = [w.path for w in m.weights]
        if scope is None:  # what batch norm's statistics are statistics of: the first layer's outputs
            out["activations"] = float(np.abs(np.asarray(m.layers[0](x))).max())
    out["largest"] = largest.largest
    return out


def _worker(mode: str, spec_path: str, out_path: str) -> None:
    """The subprocess: set up the strategy, run every case, pickle the results."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]  # before anything initializes TensorFlow
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
        local_ids = [0, 1]
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # TF_CONFIG names the cluster and this task
        local_ids = [json.loads(os.environ["TF_CONFIG"])["task"]["index"]]
    from normkit_tensorflow.distributed import ReplicaCommunicator, engine_name

    results: dict[str, Any] = {"engine": engine_name(strategy), "replicas": strategy.num_replicas_in_sync}
    # the communicator itself: replica order and the ints of the layout check, eagerly
    results["gathered"] = [
        [tuple(t) for t in strategy.experimental_local_results(r)]
        for r in strategy.run(
            lambda: tuple(ReplicaCommunicator().all_gather_ints([7, ReplicaCommunicator().rank]))
        )
    ]
    for case in spec["cases"]:
        start = time.monotonic()
        results[case["name"]] = _run_case(strategy, case, local_ids)
        results[case["name"]]["seconds"] = time.monotonic() - start
    if mode == "mirrored":
        results["fit"] = _fit(strategy)
    results["probes"] = {traced: _probe_layouts(strategy, traced) for traced in spec["probes"]}
    if mode == "multiworker":  # last: a collective that timed out leaves the worker's collectives aborted
        results["skip"] = _probe_skip(strategy, local_ids[0])
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return env | {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _launch_all(tmp: Path) -> dict[str, Any]:
    """The MirroredStrategy process and the two MultiWorkerMirroredStrategy workers, started
    together (their start-ups overlap) under one deadline, past which every one still running is
    killed and the launch fails; each one's output goes to a log file that a failure shows."""
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    runs = {"mirrored": ("mirrored", mirrored_spec(), {})}
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        runs[f"worker{index}"] = ("multiworker", multiworker_spec(), {"TF_CONFIG": config})
    processes = {}
    for name, (mode, spec, extra) in runs.items():
        (tmp / f"{name}.spec").write_bytes(pickle.dumps(spec))
        command = [sys.executable, str(HERE), mode, str(tmp / f"{name}.spec"), str(tmp / f"{name}.out")]
        with open(tmp / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(
                command, env=_env(**extra), stdout=log, stderr=subprocess.STDOUT
            )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for p in processes.values():
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {}
    for name, p in processes.items():
        log = (tmp / f"{name}.log").read_text()[-6000:]
        assert p.returncode == 0, (
            f"{name} exited with {p.returncode} (killed past {LAUNCH_TIMEOUT_S} s if < 0):\n{log}"
        )
        results[name] = pickle.loads((tmp / f"{name}.out").read_bytes())
    return results


@pytest.fixture(scope="module")
def launched() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return _launch_all(Path(tmp))


@pytest.fixture(scope="module")
def mirrored(launched: dict[str, Any]) -> dict[str, Any]:
    return launched["mirrored"]


@pytest.fixture(scope="module")
def multiworker(launched: dict[str, Any]) -> dict[str, Any]:
    """The two workers' results, merged: each case's replicas from the worker that ran them."""
    workers = [launched["worker0"], launched["worker1"]]
    merged: dict[str, Any] = {
        "engine": workers[0]["engine"],
        "replicas": workers[0]["replicas"],
        "workers": workers,
    }
    for case in multiworker_spec()["cases"]:
        name = case["name"]
        merged[name] = dict(workers[0][name])
        if "replicas" in workers[0][name].get("normkit", {}):
            merged[name]["normkit"] = {
                "replicas": workers[0][name]["normkit"]["replicas"] | workers[1][name]["normkit"]["replicas"]
            }
    return merged


# --------------------------------------------------------------------------------------------
# the oracles
# --------------------------------------------------------------------------------------------


def output_bound(
    x: np.ndarray, y_ref: np.ndarray, mean: np.ndarray, var: np.ndarray, weight: np.ndarray, dtype: str
) -> np.ndarray:
    """:func:`normkit.testing.distributed.output_bound` for channels last and this file's eps."""
    return shared_output_bound(x, y_ref, mean, var, weight, dtype, eps=BN_EPS, axis=-1)


def exact(
    case: dict[str, Any], x: np.ndarray | None = None, g: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The float64 oracle on the concatenated batch: the last step's output, the textbook
    gradients (:math:`dx = \\frac{\\gamma}{s}(dy - \\overline{dy} - \\hat x\\,\\overline{dy\\,\\hat x})`,
    :math:`d\\gamma = \\sum dy\\,\\hat x`, :math:`d\\beta = \\sum dy`, over the selected values
    where masked), the moving statistics after the steps, and the batch statistics."""
    x = np.concatenate(case["parts"]).astype(np.float64) if x is None else x
    g = np.concatenate(case["upstream"]).astype(np.float64) if g is None else g
    w = WEIGHTS["gamma"].astype(np.float64)
    m = (np.concatenate(case["masks"]) if case["masks"] else np.ones(x.shape[:-1], bool))[..., None]
    count, mean, m2 = reference.moments(x, (0, 1), m)
    var = m2 / np.maximum(count, 1)
    y = reference.normalize(x, mean, var, w, WEIGHTS["beta"], eps=BN_EPS, axis=2)
    s = np.sqrt(var + BN_EPS)
    xhat = (x - mean) / s
    u = g * w  # every position's output depends on the statistics, which depend on the selected x
    n = np.maximum(count, 1)
    dx = w * g / s - m * (u.sum(axis=(0, 1)) + xhat * (u * xhat).sum(axis=(0, 1))) / (n * s)
    rm, rv = (WEIGHTS[k].astype(np.float64) for k in ("moving_mean", "moving_variance"))
    for _ in range(STEPS):
        if count.min() > 0:
            rm = (1 - MOMENTUM) * rm + MOMENTUM * mean
        if count.min() > 1:
            rv = (1 - MOMENTUM) * rv + MOMENTUM * m2 / (count - 1)
    return {
        "y": y,
        "dx": dx,
        "dgamma": (g * xhat).sum(axis=(0, 1)),
        "dbeta": g.sum(axis=(0, 1)),
        "moving_mean": rm,
        "moving_variance": rv,
        "mean": mean,
        "var": var,
        "xhat": xhat,
        "g": g,
        "count": n,
    }


def conditioning(case: dict[str, Any], oracle: dict[str, np.ndarray]) -> dict[str, float]:
    """How far the float64 oracle moves when every input and upstream gradient is perturbed by
    one unit in the last place of the compute dtype, :math:`x(1 + \\epsilon_c u)` (the suite's
    runner's measure of what a backward-stable algorithm cannot avoid)."""
    eps_c = EPS[compute_dtype(case["dtype"])]
    rng = np.random.default_rng(99)
    x, g = np.concatenate(case["parts"]).astype(np.float64), oracle["g"]
    shifted = exact(
        case, x * (1 + eps_c * rng.uniform(-1, 1, x.shape)), g * (1 + eps_c * rng.uniform(-1, 1, g.shape))
    )
    return {k: float(np.abs(shifted[k] - oracle[k]).max(initial=0.0)) for k in ("y", "dx", "dgamma", "dbeta")}


def gradient_bounds(
    case: dict[str, Any], oracle: dict[str, np.ndarray], cond: dict[str, float]
) -> dict[str, Any]:
    r"""How far gradients computed in the case's dtype may be from the exact ones, per element
    (as the torch engine's test derives them): each is a few sums of at most :math:`n` terms per
    channel, :math:`r = \epsilon_d + \sqrt{4n}\,\epsilon_c` of the magnitudes summed
    (:math:`\frac{|\gamma|}{s}(|dy| + \overline{|dy|} + |\hat x|\,\overline{|dy\,\hat x|})` for
    :math:`dx`, :math:`\sum|dy\,\hat x|` and :math:`\sum|dy|` for γ and β) and of the value; the
    mean subtracted is known to :math:`2\epsilon_c|\mu|`, which moves :math:`\hat x` by
    :math:`\delta = 2\epsilon_c|\mu|/s`; plus ``K`` times the conditioning."""
    d = case["dtype"]
    eps_c = EPS[compute_dtype(d)]
    g, xhat = np.abs(oracle["g"]), np.abs(oracle["xhat"])
    s = np.sqrt(oracle["var"] + BN_EPS)
    gamma = np.abs(WEIGHTS["gamma"].astype(np.float64))
    n = g.shape[0] * g.shape[1]
    mean_g, mean_gx = g.sum(axis=(0, 1)) / oracle["count"], (g * xhat).sum(axis=(0, 1)) / oracle["count"]
    delta = CENTERING_FACTOR * eps_c * np.abs(oracle["mean"]) / s
    bounds = {}
    for name, eps_d, magnitude, centering in (
        (
            "dx",
            EPS[d],
            gamma / s * (g + mean_g + xhat * mean_gx),
            gamma / s * delta * (mean_gx + xhat * mean_g),
        ),
        ("dgamma", EPS["float32"], (g * xhat).sum(axis=(0, 1)), delta * g.sum(axis=(0, 1))),
        ("dbeta", EPS["float32"], g.sum(axis=(0, 1)), 0.0),
    ):
        r = eps_d + reduction_growth(4 * n) * eps_c
        bounds[name] = r * np.abs(oracle[name]) + r * magnitude + centering + CONDITIONING_FACTOR * cond[name]
    return bounds


def offsets(case: dict[str, Any], replica: int) -> tuple[int, int]:
    sizes = [len(p) for p in case["parts"]]
    return sum(sizes[:replica]), sum(sizes[: replica + 1])


def judge(case: dict[str, Any], result: dict[str, Any], *, single: bool = True) -> None:
    """normkit's replicas against the oracles on the concatenated batch (module docstring)."""
    name, d = case["name"], case["dtype"]
    assert "error" not in result["normkit"], result["normkit"].get("trace")
    replicas = [result["normkit"]["replicas"][r] for r in range(len(case["parts"]))]
    oracle = exact(case)
    cond = conditioning(case, oracle)
    x = np.concatenate(case["parts"]).astype(np.float64)
    magnitude = float(np.abs(x).max())
    # moving statistics: the same bits on every replica, and the reference's within the suite's
    # tolerance per step
    for r, replica in enumerate(replicas):
        for stat in ("moving_mean", "moving_variance"):
            assert np.array_equal(replica[stat], replicas[0][stat]), (name, r, stat)
    for stat in ("moving_mean", "moving_variance"):
        tol = statistics_tolerance(d, stat.removeprefix("moving_").replace("variance", "var"), magnitude)
        bound = STEPS * tol.bound(oracle[stat], 0.0)
        assert_within(np.abs(replicas[0][stat] - oracle[stat]), bound, f"{name}: {stat} vs reference")
    # outputs, in the input's dtype
    y = np.concatenate([r["y"] for r in replicas])
    assert y.dtype == np.dtype(d) and y.shape == x.shape, (name, y.dtype, y.shape)
    bound = output_bound(
        x, oracle["y"], oracle["mean"], oracle["var"], WEIGHTS["gamma"].astype(np.float64), d
    )
    assert_within(np.abs(y - oracle["y"]), bound, f"{name}: y vs reference")
    # gradients: dx on every replica is the concatenated batch's; dgamma, dbeta the partial sums
    bounds = gradient_bounds(case, oracle, cond)
    dx = np.concatenate([r["dx"] for r in replicas])
    assert dx.dtype == np.dtype(d), (name, dx.dtype)
    assert_within(np.abs(dx - oracle["dx"]), bounds["dx"], f"{name}: dx vs exact")
    g, xhat = oracle["g"], oracle["xhat"]
    for r, replica in enumerate(replicas):
        lo, hi = offsets(case, r)
        partial = {"dgamma": (g * xhat)[lo:hi].sum(axis=(0, 1)), "dbeta": g[lo:hi].sum(axis=(0, 1))}
        for grad in ("dgamma", "dbeta"):
            assert_within(np.abs(replica[grad] - partial[grad]), bounds[grad], f"{name}: replica {r} {grad}")
    for grad in ("dgamma", "dbeta"):
        total = np.sum([r[grad] for r in replicas], axis=0)
        assert_within(np.abs(total - oracle[grad]), bounds[grad], f"{name}: summed {grad} vs exact")
    if not single:
        return
    # normkit's layer in one replica on the concatenated batch: within twice each bound of ours
    one = result["single"]
    assert_within(np.abs(y - one["y"]), 2 * bound, f"{name}: y vs one replica")
    for grad in ("dx", "dgamma", "dbeta"):
        got = dx if grad == "dx" else np.sum([r[grad] for r in replicas], axis=0)
        assert_within(np.abs(got - one[grad]), 2 * bounds[grad], f"{name}: {grad} vs one replica")
    for stat in ("moving_mean", "moving_variance"):
        tol = statistics_tolerance(d, stat.removeprefix("moving_").replace("variance", "var"), magnitude)
        bound_stat = STEPS * tol.pairwise().bound(one[stat], 0.0)
        assert_within(np.abs(replicas[0][stat] - one[stat]), bound_stat, f"{name}: {stat} vs one replica")


# --------------------------------------------------------------------------------------------
# MirroredStrategy over two logical CPU devices
# --------------------------------------------------------------------------------------------


def test_mirrored_communicator_gathers_in_replica_order(mirrored: dict[str, Any]) -> None:
    assert mirrored["engine"] == "tf.distribute (MirroredStrategy)" and mirrored["replicas"] == 2
    # every replica gets every replica's ints, in replica order (its rank is the second)
    assert mirrored["gathered"] == [[(7, 0), (7, 0)], [(7, 1), (7, 1)]]


@pytest.mark.parametrize("name", [c["name"] for c in numeric_cases()])
def test_mirrored_replicas_normalize_with_the_global_batch(mirrored: dict[str, Any], name: str) -> None:
    case = next(c for c in mirrored_spec()["cases"] if c["name"] == name)
    judge(case, mirrored[name])


def test_keras_synchronized_fails_far_from_zero_where_normkit_passes(mirrored: dict[str, Any]) -> None:
    """Keras's own ``synchronized=True`` (``E[x^2] - E[x]^2`` over all-reduced sums) at 1e4 σ
    from 0 in float32: its outputs and moving variance fall far outside the bounds normkit's
    meet (test above) on the same replicas and data."""
    for name in ("1-7-float32-eager", "0-5-float32-eager"):
        case = next(c for c in mirrored_spec()["cases"] if c["name"] == name)
        oracle = exact(case)
        x = np.concatenate(case["parts"]).astype(np.float64)
        keras_replicas = mirrored[name]["keras"]["replicas"]
        y = np.concatenate([keras_replicas[r]["y"] for r in range(2)])
        bound = output_bound(
            x, oracle["y"], oracle["mean"], oracle["var"], WEIGHTS["gamma"].astype(np.float64), "float32"
        )
        assert np.max(np.abs(y - oracle["y"]) / bound) > 100, name
        # Keras's moving variance is biased: the reference with M2/N
        count = x.shape[0] * x.shape[1]
        rv = WEIGHTS["moving_variance"].astype(np.float64)
        for _ in range(STEPS):
            rv = (1 - MOMENTUM) * rv + MOMENTUM * oracle["var"]
        tol = statistics_tolerance("float32", "var", float(np.abs(x).max()))
        error = np.abs(keras_replicas[0]["moving_variance"] - rv)
        assert np.max(error / (STEPS * tol.bound(rv, 0.0))) > 100, (name, count, error)


def test_mirrored_masks_select_values_across_replicas(mirrored: dict[str, Any]) -> None:
    """Keras's mask of positions: normkit's statistics are the masked values of the global batch
    (every replica's), the same bits on both replicas; Keras's own layer, given the same mask,
    normalizes each replica with its own masked statistics and its replicas' moving statistics
    part ways."""
    case = next(c for c in mirrored_spec()["cases"] if c["name"] == "masked")
    judge(case, mirrored["masked"])
    eager = next(c for c in mirrored_spec()["cases"] if c["name"] == "masked-eager")
    judge(eager, mirrored["masked-eager"])
    oracle = exact(case)
    x = np.concatenate(case["parts"]).astype(np.float64)
    w = WEIGHTS["gamma"].astype(np.float64)
    bound = output_bound(x, oracle["y"], oracle["mean"], oracle["var"], w, "float32")
    keras_replicas = mirrored["masked"]["keras"]["replicas"]
    y = np.concatenate([keras_replicas[r]["y"] for r in range(2)])
    assert np.max(np.abs(y - oracle["y"]) / bound) > 100
    # what Keras computes instead: each replica's own masked statistics
    for r, (part, mask) in enumerate(zip(case["parts"], case["masks"], strict=True)):
        count, mean, m2 = reference.moments(part, (0, 1), mask[..., None])
        local = reference.normalize(part, mean, m2 / count, w, WEIGHTS["beta"], eps=BN_EPS, axis=2)
        lo, hi = offsets(case, r)
        assert np.max(np.abs(keras_replicas[r]["y"] - local)) < np.max(
            np.abs(keras_replicas[r]["y"] - oracle["y"][lo:hi])
        )
    assert not np.array_equal(keras_replicas[0]["moving_mean"], keras_replicas[1]["moving_mean"])


def test_mirrored_keras_fit_trains_as_one_replica_on_the_whole_batch(mirrored: dict[str, Any]) -> None:
    """Keras's ``fit`` under MirroredStrategy (each global batch of 8 split 4 + 4, the train step
    in a ``tf.function``) with normkit's synchronized batch norm: every weight, the moving
    statistics included, equals the same model trained in one replica on the whole batches,
    within ``training_tolerance``. Without ``synchronized`` each replica normalizes with its own
    half, and the weights end outside it."""
    fit = mirrored["fit"]
    assert fit["largest"] > 0

    def tolerance(name: str) -> dict[str, float]:
        # a weight's rounding is relative to the largest step; a moving statistic's to the values
        # it is a statistic of, the first layer's outputs (of magnitude M; the variance's terms
        # are squares of differences of them, up to (2M)^2)
        m = fit["activations"]
        scale = (
            m if name.endswith("moving_mean") else (2 * m) ** 2 if name.endswith("moving_variance") else None
        )
        t = training_tolerance(
            "float32", steps=FIT_STEPS, reduction_size=FIT_TERMS, scale=scale or fit["largest"]
        )
        return t.kwargs

    for name, got, expected in zip(fit["names"], fit["synchronized"], fit["single"], strict=True):
        np.testing.assert_allclose(got, expected, **tolerance(name), err_msg=name)
    assert any(
        not np.allclose(got, expected, **tolerance(name))
        for name, got, expected in zip(fit["names"], fit["local"], fit["single"], strict=True)
    )


def test_mirrored_all_replicas_empty_leave_the_moving_statistics_alone(mirrored: dict[str, Any]) -> None:
    result = mirrored["all-empty"]["normkit"]
    assert "error" not in result, result.get("trace")
    for replica in result["replicas"].values():
        assert replica["y"].shape == (0, POSITIONS, CHANNELS)
        np.testing.assert_array_equal(replica["moving_mean"], WEIGHTS["moving_mean"])
        np.testing.assert_array_equal(replica["moving_variance"], WEIGHTS["moving_variance"])


@pytest.mark.parametrize(("traced", "error"), [(False, "ValueError"), (True, "InvalidArgumentError")])
def test_mirrored_a_global_single_value_is_refused(
    mirrored: dict[str, Any], traced: bool, error: str
) -> None:
    """One value per channel in the global batch (one row of one position on the first replica,
    nothing on the second) under the torch preset: an error naming the layer and the engine
    (eagerly a ValueError; inside ``tf.function`` TensorFlow's InvalidArgumentError with the
    same words), on every replica, never a NaN moving variance."""
    result = mirrored[f"single-value-{traced}"]["normkit"]
    assert result.get("error") == error, result
    assert (
        "the global batch over tf.distribute (MirroredStrategy) has 1 value per channel" in result["message"]
    )
    assert "preset='torch'" in unescaped(result["message"])


# --------------------------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1
# --------------------------------------------------------------------------------------------


def test_multiworker_communicator_gathers_in_replica_order(multiworker: dict[str, Any]) -> None:
    assert multiworker["engine"] == "tf.distribute (MultiWorkerMirroredStrategy)"
    assert multiworker["replicas"] == 2
    for worker in multiworker["workers"]:  # each worker's one replica gets both workers' ints
        assert worker["gathered"] == [[(7, 0)], [(7, 1)]]


@pytest.mark.parametrize("name", ["0-5-float32-function", "1-7-float16-eager", "masked"])
def test_multiworker_replicas_normalize_with_the_global_batch(multiworker: dict[str, Any], name: str) -> None:
    case = next(c for c in multiworker_spec()["cases"] if c["name"] == name)
    judge(case, multiworker[name])


@pytest.mark.parametrize(
    ("name", "error"), [("mismatch-eager", "LayoutMismatch"), ("mismatch-function", "InvalidArgumentError")]
)
def test_multiworker_mismatched_dtypes_are_an_error_on_every_worker(
    multiworker: dict[str, Any], name: str, error: str
) -> None:
    """Worker 0 trains in float32, worker 1 in mixed_float16: the same shapes, other dtypes. The
    layout travels in the header of the one all-gather, so every worker refuses the step, naming
    the layer, the engine and each worker's layout (inside ``tf.function``: each rank's
    ``[rank, channels, dtype code]``)."""
    for worker in multiworker["workers"]:
        result = worker[name]["normkit"]
        assert result.get("error") == error, result
        message = unescaped(result["message"])
        assert "disagree on the input's layout" in message and "layer 'batch_normalization" in message
        assert "tf.distribute (MultiWorkerMirroredStrategy)" in message
        if error == "LayoutMismatch":
            assert "(rank 0: 3 channels, float32, rank 1: 3 channels, float16)" in message
        else:
            assert "[[0 3 2][1 3 0]]" in message  # rank, channels, dtype code (2 float32, 0 float16)


def unescaped(message: str) -> str:
    """An error's message as written: TensorFlow's graph errors escape quotes."""
    return message.replace("\\'", "'")


def _assert_probe_refused(result: dict[str, str], engine: str) -> None:
    message = unescaped(result["message"])
    assert f"layer 'probe': the replicas over {engine} disagree on the input's layout" in message, result
    if result["error"] == "LayoutMismatch":
        assert "(rank 0: 3 channels, float32, rank 1: 4 channels, float32)" in message
    else:
        assert result["error"] == "InvalidArgumentError" and "[[0 3 2][1 4 2]]" in message, result


def test_multiworker_vectors_of_different_lengths_are_refused_on_every_worker(
    multiworker: dict[str, Any],
) -> None:
    """Channel counts that differ: ``all_gather`` accepts parts of different lengths, so nothing
    hangs, and the walk by each part's length finds every header on every worker."""
    for worker in multiworker["workers"]:
        _assert_probe_refused(worker["probes"][False], "tf.distribute (MultiWorkerMirroredStrategy)")


def test_multiworker_a_worker_that_skips_the_collective_leaves_the_other_a_timeout_error(
    multiworker: dict[str, Any],
) -> None:
    """With a timeout (``CommunicationOptions(timeout_seconds=...)``, here the communicator's own;
    on the strategy, ``communication_options=``, it covers the layer's collective too), a worker
    that never joins leaves the other TensorFlow's ``DeadlineExceededError`` after that time,
    never an endless wait."""
    skipped, waiting = multiworker["workers"][1]["skip"], multiworker["workers"][0]["skip"]
    assert skipped["error"] == "skipped"
    assert waiting["error"] == "DeadlineExceededError", waiting
    assert "Collective has timed out" in waiting["message"]
    assert waiting["seconds"] >= SKIP_TIMEOUT_S  # it waited for the deadline; no upper bound


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "function"])
def test_mirrored_vectors_of_different_lengths_are_refused(mirrored: dict[str, Any], traced: bool) -> None:
    _assert_probe_refused(mirrored["probes"][traced], "tf.distribute (MirroredStrategy)")


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
