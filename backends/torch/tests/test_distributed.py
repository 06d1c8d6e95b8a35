r"""``normkit_torch.SyncBatchNorm`` over ``torch.distributed``: real processes, gloo on 127.0.0.1.

Each spawned group (``torch.multiprocessing``'s spawn context; a ``file://`` store in a fresh
temporary directory, so no port is raced for; ``GLOO_SOCKET_IFNAME=lo``, so gloo's connections
stay on the loopback interface) runs many checks in one go and sends every rank's results back
through a queue; the tests below judge them in this process. Every collective has a timeout
(``COLLECTIVE_TIMEOUT_S``) and every group a deadline (``GROUP_DEADLINE_S``) past which its
processes are killed and the test fails: a bug is an error, never a hang.

The oracles, on the concatenated global batch (the ranks' parts in rank order):

* ``normkit.reference.batch_norm`` (float64, NumPy): outputs and running statistics;
* ``torch.nn.BatchNorm2d`` in float64 (autograd): the exact gradients; in the float64 case ours
  are also checked against central differences of the reference (no autograd anywhere);
* ``torch.nn.BatchNorm2d`` and ``normkit_torch.BatchNorm2d`` in the input's dtype: two other
  implementations of the same call (each within the suite's bound of the exact value, so within
  twice it of ours).

Tolerances come from :mod:`normkit.testing.tolerances`: outputs ``output_tolerance`` with the
centering gain, running statistics ``statistics_tolerance``, each plus ``K`` times the case's
conditioning (how far the float64 oracle moves when ``x`` and the upstream gradient are perturbed
by one unit in the last place of the compute dtype, as the suite's runner measures it); the
gradients' bounds are derived in :func:`_gradient_bounds`; DDP training uses
``training_tolerance``.
"""

from __future__ import annotations

import copy
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit_torch
from normkit import reference
from normkit.distributed import CommunicatorError
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    CONDITIONING_FACTOR,
    EPS,
    assert_within,
    centering_gain,
    compute_dtype,
    normalization_gradient_tolerances,
    output_tolerance,
    reduction_growth,
    statistics_tolerance,
    training_tolerance,
)
from normkit_torch.distributed import BatchNormXd, SyncBatchNorm, TorchCommunicator, revert_sync_batchnorm

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

COLLECTIVE_TIMEOUT_S = 30
"""A collective waiting longer than this fails on the waiting ranks (an error, not a hang)."""
GROUP_DEADLINE_S = 120
"""A spawned group that has not reported by then is killed and its test fails."""
SKIP_TIMEOUT_S = 2
"""The timeout of the group in which one rank skips a collective (the error must come this soon)."""

CHANNELS = 3
SPATIAL = (4, 4)
BN_EPS = 1e-5
NAMES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


# --------------------------------------------------------------------------------------------
# the harness: spawn a group, run a scenario on every rank, collect the results
# --------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_file: str, scenario: str, results: Any, backend: str) -> None:
    """One rank: join the group, run ``scenario``, report ``(rank, "ok", result)`` or
    ``(rank, "error", traceback)``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    try:
        device = torch.device("cpu")
        if backend == "nccl":  # one GPU per rank
            device = torch.device("cuda", rank)
        elif SCENARIOS[scenario][1]:  # gloo on one GPU: every rank on cuda:0
            device = torch.device("cuda", 0)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before the group: NCCL binds a rank to its device
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            results.put((rank, "ok", SCENARIOS[scenario][0](rank, world, device)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _spawn(world: int, scenario: str, backend: str = "gloo") -> list[Any]:
    """Run ``scenario`` on ``world`` fresh processes; every rank's result, in rank order.
    Fails the test if any rank raised, crashed, or missed the deadline (then the group is
    killed)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    got: dict[int, tuple[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        processes = [
            ctx.Process(
                target=_rank_main, args=(rank, world, init_file, scenario, results, backend), daemon=True
            )
            for rank in range(world)
        ]
        for p in processes:
            p.start()
        deadline = time.monotonic() + GROUP_DEADLINE_S
        try:
            while len(got) < world and time.monotonic() < deadline:
                try:
                    rank, status, payload = results.get(timeout=1.0)
                    got[rank] = (status, payload)
                except queue.Empty:
                    crashed = [
                        r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in got
                    ]
                    if crashed:
                        break
        finally:
            for p in processes:
                p.join(timeout=10)
            for p in processes:
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = {r: payload for r, (status, payload) in got.items() if status == "error"}
    missing = [r for r in range(world) if r not in got]
    if errors or missing:
        text = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
        pytest.fail(
            f"scenario {scenario!r} on {world} ranks: missing ranks {missing} (crashed or past the "
            f"{GROUP_DEADLINE_S} s deadline; exit codes {[p.exitcode for p in processes]})\n{text}"
        )
    return [got[r][1] for r in range(world)]


class _CollectiveCounter:
    """Counts the collectives a rank makes (``torch.distributed``'s Python functions, patched in
    the spawned process only)."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            original = getattr(dist, name)

            def counted(*args: Any, _name: str = name, _original: Callable = original, **kwargs: Any) -> Any:
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def take(self) -> dict[str, int]:
        taken = {k: v for k, v in self.counts.items() if v}
        self.counts = dict.fromkeys(self.NAMES, 0)
        return taken


def _offsets(sizes: tuple[int, ...], rank: int) -> tuple[int, int]:
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# --------------------------------------------------------------------------------------------
# the cases: one layer, every rank a part of one global batch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple[int, ...]  # each rank's batch
    dtype: torch.dtype  # the input's; the layer is float32 (float64 for float64 input)
    offset: float = 0.0  # |mean| / std of the data
    momentum: float | None = 0.1
    steps: int = 1
    seed: int = 0
    channels_last: bool = False  # the input in channels-last memory

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32


CASES_FOUR = [
    Case("float32", (1, 7, 9, 13), torch.float32, seed=1),
    Case("float32-offset-1e4", (1, 7, 9, 13), torch.float32, offset=1e4, seed=2),
    Case("float16", (1, 7, 9, 13), torch.float16, seed=3),
    Case("float32-empty-ranks", (0, 5, 0, 11), torch.float32, seed=4),
    Case("float64-empty-ranks-cumulative", (0, 5, 0, 11), torch.float64, momentum=None, steps=2, seed=5),
]
SUBGROUPS = ((0, 1), (2, 3))
SUBGROUP_CASES = (  # one per subgroup of the four ranks: each synchronizes within its own group
    Case("float32-subgroup-0-1", (3, 8), torch.float32, seed=10),
    Case("float32-subgroup-2-3", (5, 0), torch.float32, seed=11),
)
CASES_TWO = [
    Case("float32-offset-1e4", (3, 13), torch.float32, offset=1e4, seed=6),
    Case("float32-empty-rank", (0, 11), torch.float32, seed=7),
    Case("float32-channels-last", (6, 10), torch.float32, seed=9, channels_last=True),
]


@dataclass(frozen=True)
class CaseData:
    xs: list[torch.Tensor]  # the global batch of each step, in the input dtype
    gs: list[torch.Tensor]  # the upstream gradient of each step, in the input dtype
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor


def _case_data(case: Case) -> CaseData:
    """The same numbers in every process: per-channel means ``offset`` standard deviations from
    0 (or small, without an offset), standard deviations 0.5, 2 and 1."""
    gen = torch.Generator().manual_seed(case.seed)
    f64 = torch.float64
    std = torch.tensor([0.5, 2.0, 1.0], dtype=f64).view(1, -1, 1, 1)
    if case.offset:
        mean = case.offset * std * torch.tensor([1.0, -1.0, 0.5], dtype=f64).view(1, -1, 1, 1)
    else:
        mean = torch.tensor([0.3, -1.2, 2.0], dtype=f64).view(1, -1, 1, 1)
    n = sum(case.sizes)
    xs, gs = [], []
    for _ in range(case.steps):
        xs.append((mean + std * torch.randn(n, CHANNELS, *SPATIAL, generator=gen, dtype=f64)).to(case.dtype))
        gs.append(torch.randn(n, CHANNELS, *SPATIAL, generator=gen, dtype=f64).to(case.dtype))
    p = case.param_dtype
    return CaseData(
        xs,
        gs,
        weight=(torch.randn(CHANNELS, generator=gen, dtype=f64) + 0.5).to(p),
        bias=torch.randn(CHANNELS, generator=gen, dtype=f64).to(p),
        running_mean=torch.randn(CHANNELS, generator=gen, dtype=f64).to(p),
        running_var=(torch.rand(CHANNELS, generator=gen, dtype=f64) + 0.5).to(p),
    )


def _load(layer: _BatchNorm, data: CaseData) -> None:
    with torch.no_grad():
        layer.weight.copy_(data.weight)
        layer.bias.copy_(data.bias)
        layer.running_mean.copy_(data.running_mean)
        layer.running_var.copy_(data.running_var)


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def _run_case(
    case: Case,
    rank: int,
    device: torch.device,
    counter: _CollectiveCounter,
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """This rank's part of ``case`` (``rank``: its rank in ``process_group``): train ``steps``
    steps (forward and backward), then one eval call; the last step's output and gradients, the
    state, and the collectives of each phase."""
    data = _case_data(case)
    lo, hi = _offsets(case.sizes, rank)
    layer = SyncBatchNorm(
        CHANNELS, momentum=case.momentum, process_group=process_group, dtype=case.param_dtype, device=device
    )
    _load(layer, data)
    counter.take()
    out: dict[str, Any] = {"collectives": [], "device": device.type}
    for x, g in zip(data.xs, data.gs, strict=True):
        layer.zero_grad()
        part = x[lo:hi].to(device)
        if case.channels_last:
            part = part.contiguous(memory_format=torch.channels_last)
        part.requires_grad_(True)
        y = layer(part)
        out["channels_last"] = y.is_contiguous(memory_format=torch.channels_last)
        forward = counter.take()
        y.backward(g[lo:hi].to(device))
        out["collectives"].append((forward, counter.take()))
        out.update(
            y=_numpy(y), dx=_numpy(part.grad), dw=_numpy(layer.weight.grad), db=_numpy(layer.bias.grad)
        )
    out["state"] = {k: _numpy(v) for k, v in layer.state_dict().items()}
    layer.eval()
    out["eval"] = _numpy(layer(data.xs[-1][lo:hi].to(device)))
    out["eval_collectives"] = counter.take()
    return out


# --------------------------------------------------------------------------------------------
# the scenarios (run in the spawned processes)
# --------------------------------------------------------------------------------------------


def _all_ranks_empty(rank: int) -> dict[str, Any]:
    layer = SyncBatchNorm(CHANNELS)
    data = _case_data(Case("empty", (0,), torch.float32, seed=8))
    _load(layer, data)
    x = torch.zeros(0, CHANNELS, *SPATIAL, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    return {
        "y_shape": tuple(y.shape),
        "dx_shape": tuple(x.grad.shape),
        "dw": _numpy(layer.weight.grad),
        "state": {k: _numpy(v) for k, v in layer.state_dict().items()},
    }


def _one_value(rank: int) -> dict[str, Any]:
    """A global batch of one value per channel (rank 0 holds it): an error on every rank under
    the torch preset, β under keras's (which allows it)."""
    x = torch.full((1 if rank == 0 else 0, CHANNELS), 3.0)
    torch_layer = SyncBatchNorm(CHANNELS)
    try:
        torch_layer(x)
        error = None
    except ValueError as e:
        error = str(e)
    keras_layer = SyncBatchNorm(CHANNELS, preset="keras")
    with torch.no_grad():
        keras_layer.bias.copy_(torch.tensor([0.25, -1.5, 2.0]))
    y = keras_layer(x)
    return {
        "error": error,
        "torch_state": {k: _numpy(v) for k, v in torch_layer.state_dict().items()},
        "keras_y": _numpy(y),
        "keras_state": {k: _numpy(v) for k, v in keras_layer.state_dict().items()},
    }


def _mismatched_channels(rank: int) -> dict[str, Any]:
    """Rank 1's model was built with 4 channels, the others' with 3."""
    channels = 4 if rank == 1 else CHANNELS
    layer = SyncBatchNorm(channels)
    start = time.monotonic()
    try:
        layer(torch.randn(5, channels, *SPATIAL))
        error = None
    except ValueError as e:
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": time.monotonic() - start}


def _packing(rank: int, counter: _CollectiveCounter) -> dict[str, Any]:
    """TorchCommunicator's two gathers: arrays of three dtypes and shapes in one collective,
    and a few ints (one beyond 2**32)."""
    comm = TorchCommunicator()
    arrays = [
        torch.tensor([rank, 10 * rank + 1]),
        torch.full((3, 2), rank + 0.5, dtype=torch.float32),
        torch.tensor([rank * 0.25], dtype=torch.float16),
    ]
    counter.take()
    gathered = comm.all_gather(arrays)
    collectives = counter.take()
    return {
        "gathered": [[(_numpy(a), str(a.dtype)) for a in part] for part in gathered],
        "collectives": collectives,
        "ints": comm.all_gather_ints([rank, -rank, 2**40 + rank]),
        "who": (comm.engine, comm.rank, comm.size),
    }


EPS_ZERO_SIZES = (2, 3, 0, 4)


def _eps_zero_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch for ``eps=0``: channel 1 constant (5) on rank 0, the rest plain; and the
    upstream gradient."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(sum(EPS_ZERO_SIZES), CHANNELS, 2, 2, generator=gen, dtype=torch.float64)
    x[: EPS_ZERO_SIZES[0], 1] = 5.0
    return x.float(), torch.randn(x.shape, generator=gen)


def _eps_zero(rank: int) -> dict[str, Any]:
    x, g = _eps_zero_data()
    lo, hi = _offsets(EPS_ZERO_SIZES, rank)
    layer = SyncBatchNorm(CHANNELS, eps=0.0)
    part = x[lo:hi].clone().requires_grad_(True)
    y = layer(part)
    y.backward(g[lo:hi])
    return {"y": _numpy(y), "state": {k: _numpy(v) for k, v in layer.state_dict().items()}}


def _scenario_four(rank: int, world: int, device: torch.device) -> dict[str, Any]:
    counter = _CollectiveCounter()
    out: dict[str, Any] = {"packing": _packing(rank, counter)}
    out["cases"] = {c.name: _run_case(c, rank, device, counter) for c in CASES_FOUR}
    groups = [dist.new_group(list(ranks)) for ranks in SUBGROUPS]  # every rank creates every group
    mine = next(i for i, ranks in enumerate(SUBGROUPS) if rank in ranks)
    case = SUBGROUP_CASES[mine]
    out["cases"][case.name] = _run_case(case, SUBGROUPS[mine].index(rank), device, counter, groups[mine])
    out["all_empty"] = _all_ranks_empty(rank)
    out["eps_zero"] = _eps_zero(rank)
    out["one_value"] = _one_value(rank)
    out["mismatch"] = _mismatched_channels(rank)
    out["recalibrated"] = _recalibrated_shard(rank)
    return out


RECALIBRATION_SHARDS = ((0, 2), (2, 4), (4, 4), (4, 5))
"""Rank r recalibrates on batches [lo, hi) of RECALIBRATION_BATCHES (rank 2's shard is empty)."""
RECALIBRATION_BATCHES = (2, 5, 3, 4, 6)


def _recalibration_model() -> nn.Module:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, CHANNELS, 1), nn.BatchNorm2d(CHANNELS), nn.ReLU(), nn.BatchNorm2d(CHANNELS)
    )
    return model.eval()


def _recalibration_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return [torch.randn(n, 3, *SPATIAL, generator=g) * 2 + 1 for n in RECALIBRATION_BATCHES]


def _recalibrated_shard(rank: int) -> dict[str, np.ndarray]:
    """recalibrate over this rank's shard of a data set, with a TorchCommunicator."""
    from normkit.testtime import recalibrate

    model, batches = _recalibration_model(), _recalibration_batches()
    lo, hi = RECALIBRATION_SHARDS[rank]
    recalibrate(model, batches[lo:hi], progress=False, communicator=TorchCommunicator())
    return {k: _numpy(v) for k, v in model.state_dict().items() if "running" in k}


# DDP: Conv2d -> BatchNorm2d -> ReLU -> Flatten -> Linear, the global batch of 12 split 5 | 7
DDP_SIZES = (5, 7)
DDP_STEPS = 5
DDP_LR = 0.1


def _ddp_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )


def _ddp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    n = sum(DDP_SIZES)
    x = torch.randn(n, 3, *SPATIAL, generator=gen) * 1.5 + 0.7
    return x, torch.randn(n, 2, generator=gen)


def _ddp_train(rank: int, world: int, device: torch.device, *, synchronized: bool) -> dict[str, np.ndarray]:
    """5 SGD steps under DDP, each rank on its part of the global batch; the loss is scaled by
    ``world / global batch`` so that DDP's average of the ranks' gradients is the gradient of
    the mean loss over the global batch."""
    model = _ddp_model()
    if synchronized:
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    else:  # the contrast: each rank's own statistics (a local normkit batch norm)
        model = normkit_torch.convert_norm_layers(model)
    model = model.to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    lo, hi = _offsets(DDP_SIZES, rank)
    for step in range(DDP_STEPS):
        x, target = (t.to(device) for t in _ddp_batch(step))
        loss = ((ddp(x[lo:hi]) - target[lo:hi]) ** 2).sum() * (world / sum(DDP_SIZES))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: _numpy(v) for k, v in model.state_dict().items()}


def _torch_sync_batch_norm_under_cpu_ddp() -> str | None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    try:
        nn.parallel.DistributedDataParallel(model)
    except ValueError as e:
        return str(e)
    return None


def _skipped_collective(rank: int) -> dict[str, Any]:
    """Rank 1 switches to eval after one training step while rank 0 keeps training: rank 0's
    all-gather must fail within the group's timeout, naming the layer and the engine."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=SKIP_TIMEOUT_S))
    layer = SyncBatchNorm(CHANNELS, process_group=group, layer_name="encoder.bn1")
    layer(torch.randn(4, CHANNELS, *SPATIAL))
    if rank == 1:
        layer.eval()
    start = time.monotonic()
    try:
        layer(torch.randn(4, CHANNELS, *SPATIAL))
        error = None
    except CommunicatorError as e:
        error = str(e)
    seconds = time.monotonic() - start
    dist.barrier()  # the world group still works
    return {"error": error, "seconds": seconds}


def _scenario_two(rank: int, world: int, device: torch.device) -> dict[str, Any]:
    counter = _CollectiveCounter()
    out: dict[str, Any] = {"cases": {c.name: _run_case(c, rank, device, counter) for c in CASES_TWO}}
    out["ddp_sync"] = _ddp_train(rank, world, device, synchronized=True)
    out["ddp_local"] = _ddp_train(rank, world, device, synchronized=False)
    out["torch_sync_bn_ddp_error"] = _torch_sync_batch_norm_under_cpu_ddp()
    out["skipped"] = _skipped_collective(rank)  # last: it leaves a timed-out group behind
    return out


def _scenario_gpu(rank: int, world: int, device: torch.device) -> dict[str, Any]:
    # float32 arithmetic, as on the CPU (TF32 convolutions and matmuls would round to 10 bits)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    counter = _CollectiveCounter()
    out: dict[str, Any] = {"cases": {c.name: _run_case(c, rank, device, counter) for c in CASES_TWO}}
    out["ddp_sync"] = _ddp_train(rank, world, device, synchronized=True)
    return out


SCENARIOS: dict[str, tuple[Callable[[int, int, torch.device], Any], bool]] = {
    # name: (function, runs on a GPU)
    "four": (_scenario_four, False),
    "two": (_scenario_two, False),
    "gpu": (_scenario_gpu, True),
}


@pytest.fixture(scope="module")
def four_ranks() -> list[dict[str, Any]]:
    return _spawn(4, "four")


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return _spawn(2, "two")


# --------------------------------------------------------------------------------------------
# the oracles, and the comparison of a case with them
# --------------------------------------------------------------------------------------------


def _stock(
    case: Case, data: CaseData, kind: type[_BatchNorm], dtype: torch.dtype | None = None, perturb: float = 0.0
) -> dict[str, np.ndarray]:
    """``kind`` (``torch.nn.BatchNorm2d`` or normkit's) on the concatenated batch, in ``dtype``
    (default: the case's), trained the case's steps: the last step's output and gradients, and
    the running statistics. ``perturb``: every x and upstream gradient times ``1 + perturb*u``,
    ``u`` uniform in [-1, 1] (the conditioning)."""
    dtype = dtype or case.dtype
    param = torch.float64 if dtype == torch.float64 else case.param_dtype
    layer = kind(CHANNELS, eps=BN_EPS, momentum=case.momentum, dtype=param)
    _load(layer, data)
    gen = torch.Generator().manual_seed(1234)
    out: dict[str, np.ndarray] = {}
    for x, g in zip(data.xs, data.gs, strict=True):
        x, g = x.to(dtype), g.to(dtype)
        if perturb:
            x = x * (1 + perturb * (2 * torch.rand(x.shape, generator=gen, dtype=dtype) - 1))
            g = g * (1 + perturb * (2 * torch.rand(g.shape, generator=gen, dtype=dtype) - 1))
        layer.zero_grad()
        x = x.clone().requires_grad_(True)
        y = layer(x)
        y.backward(g)
        out.update(y=_numpy(y), dx=_numpy(x.grad), dw=_numpy(layer.weight.grad), db=_numpy(layer.bias.grad))
    out.update(running_mean=_numpy(layer.running_mean), running_var=_numpy(layer.running_var))
    return out


def _reference(case: Case, data: CaseData) -> dict[str, np.ndarray]:
    """normkit's float64 reference: the last step's output, the running statistics after all
    steps (``momentum=None``: the cumulative average, weight ``1/k`` at step ``k``)."""
    rm, rv = data.running_mean.double().numpy(), data.running_var.double().numpy()
    y = None
    for k, x in enumerate(data.xs, start=1):
        momentum = 1.0 / k if case.momentum is None else case.momentum
        y, rm, rv = reference.batch_norm(
            x.double().numpy(), data.weight.double().numpy(), data.bias.double().numpy(), rm, rv,
            training=True, momentum=momentum, eps=BN_EPS, axis=1, unbiased_running_var=True,
        )  # fmt: skip
    return {"y": y, "running_mean": rm, "running_var": rv}


def _batch_statistics(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of the global batch, float64, shaped (1, C, 1, 1)."""
    x = x.double().numpy()
    return x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)


def _gradient_bounds(
    case: Case, data: CaseData, exact: dict[str, np.ndarray], conditioning: dict[str, float]
) -> dict[str, np.ndarray]:
    r"""How far gradients computed in the case's dtype may be from the exact (float64) ones, per
    element, for :math:`dx = \frac{\gamma}{s}(dy - \overline{dy} - \hat x\,\overline{dy\,\hat x})`,
    :math:`d\gamma = \sum dy\,\hat x`, :math:`d\beta = \sum dy` over the global batch
    (:math:`s = \sqrt{\sigma^2+\epsilon}`, :math:`n` values per channel):

    * rounding: each is a few sums of at most :math:`n` terms (:math:`\sum dy` and
      :math:`\sum dy (x-\mu)`, per rank and then over the ranks, and the elementwise formula),
      :math:`r = \epsilon_d + \sqrt{4n}\,\epsilon_c` (:func:`reduction_growth`, as
      ``training_tolerance(steps=0, reduction_size=4n)``) of the magnitudes summed:
      :math:`\frac{|\gamma|}{s}(|dy| + \overline{|dy|} + |\hat x|\,\overline{|dy\,\hat x|})` for
      :math:`dx`, :math:`\sum|dy\,\hat x|` and :math:`\sum|dy|` for γ and β; and :math:`r` of the
      value (the rounding of :math:`1/s` and of the result);
    * centering: the mean subtracted is known to :math:`2\epsilon_c|\mu|` (``CENTERING_FACTOR``,
      as for the outputs), so :math:`\hat x` to :math:`\delta = 2\epsilon_c|\mu|/s`, which moves
      :math:`dx` by :math:`\frac{|\gamma|}{s}\,\delta\,(\overline{|dy\,\hat x|} + |\hat x|\,\overline{|dy|})`
      and :math:`d\gamma` by :math:`\delta\sum|dy|`;
    * ``K`` times the conditioning measured on the float64 oracle.
    """
    d = NAMES[case.dtype]
    eps_c = EPS[compute_dtype(d)]
    x, g = data.xs[-1].double().numpy(), np.abs(data.gs[-1].double().numpy())
    mean, var = _batch_statistics(data.xs[-1])
    s = np.sqrt(var + BN_EPS)
    xhat = np.abs(x - mean) / s
    gamma = np.abs(data.weight.double().numpy()).reshape(1, -1, 1, 1)
    n = x.size // CHANNELS
    axes = (0, 2, 3)
    mean_g, mean_gx = g.mean(axis=axes, keepdims=True), (g * xhat).mean(axis=axes, keepdims=True)
    delta = CENTERING_FACTOR * eps_c * np.abs(mean) / s
    bounds = {}
    for name, eps_d, magnitude, centering in (
        (
            "dx",
            EPS[d],
            gamma / s * (g + mean_g + xhat * mean_gx),
            gamma / s * delta * (mean_gx + xhat * mean_g),
        ),
        ("dw", EPS[NAMES[case.param_dtype]], (g * xhat).sum(axis=axes), (delta * g).sum(axis=axes)),
        ("db", EPS[NAMES[case.param_dtype]], g.sum(axis=axes), 0.0),
    ):
        r = eps_d + reduction_growth(4 * n) * eps_c
        bounds[name] = (
            r * np.abs(exact[name]) + r * magnitude + centering + CONDITIONING_FACTOR * conditioning[name]
        )
    return bounds


def _assert_case(case: Case, ranks: list[dict[str, Any]]) -> None:
    """One case's results from every rank against the oracles on the concatenated batch."""
    data = _case_data(case)
    d = NAMES[case.dtype]
    eps_c = EPS[compute_dtype(d)]
    got = {
        "y": np.concatenate([r["y"] for r in ranks]),
        "dx": np.concatenate([r["dx"] for r in ranks]),
        "dw": np.sum([r["dw"] for r in ranks], axis=0),  # each rank's partial sum, as DDP adds them
        "db": np.sum([r["db"] for r in ranks], axis=0),
        "running_mean": ranks[0]["state"]["running_mean"],
        "running_var": ranks[0]["state"]["running_var"],
    }
    # bit-identical running statistics on every rank, and the same count
    for r, result in enumerate(ranks):
        for name, value in result["state"].items():
            assert torch.equal(torch.from_numpy(value), torch.from_numpy(ranks[0]["state"][name])), (
                case.name,
                r,
                name,
            )
        assert int(result["state"]["num_batches_tracked"]) == case.steps
    exact = _stock(case, data, nn.BatchNorm2d, torch.float64)
    shifted = _stock(case, data, nn.BatchNorm2d, torch.float64, perturb=eps_c)
    conditioning = {k: float(np.abs(shifted[k] - exact[k]).max(initial=0.0)) for k in exact}
    ref = _reference(case, data)
    mean, var = _batch_statistics(data.xs[-1])
    gain = centering_gain(mean, var, BN_EPS, data.weight.double().numpy().reshape(1, -1, 1, 1))
    magnitude = max(float(x.double().abs().max()) for x in data.xs)
    # outputs: the reference, then two other implementations in the same dtype
    out_tol = output_tolerance(d, centering_gain=gain)
    assert_within(
        np.abs(got["y"] - ref["y"]),
        out_tol.bound(ref["y"], conditioning["y"]),
        f"{case.name}: y vs reference",
    )
    for kind in (nn.BatchNorm2d, normkit_torch.BatchNorm2d):
        other = _stock(case, data, kind)
        what = f"{case.name}: y vs {kind.__module__}.{kind.__name__}"
        y_other = other["y"].astype(np.float64)
        assert_within(
            np.abs(got["y"] - y_other), out_tol.pairwise().bound(y_other, 2 * conditioning["y"]), what
        )
        for stat in ("running_mean", "running_var"):
            tol = statistics_tolerance(d, stat.removeprefix("running_"), magnitude).pairwise()
            bound = tol.bound(other[stat], 2 * conditioning[stat])
            assert_within(np.abs(got[stat] - other[stat]), bound, f"{case.name}: {stat} vs {kind.__name__}")
    # running statistics: the reference
    for stat in ("running_mean", "running_var"):
        tol = statistics_tolerance(d, stat.removeprefix("running_"), magnitude)
        bound = tol.bound(ref[stat], conditioning[stat])
        assert_within(np.abs(got[stat] - ref[stat]), bound, f"{case.name}: {stat} vs reference")
    # gradients: exact (float64 torch.nn on the concatenated batch), and torch.nn in the same dtype
    bounds = _gradient_bounds(case, data, exact, conditioning)
    same_dtype = _stock(case, data, nn.BatchNorm2d)
    for name in ("dx", "dw", "db"):
        assert_within(np.abs(got[name] - exact[name]), bounds[name], f"{case.name}: {name} vs exact")
        assert_within(
            np.abs(got[name] - same_dtype[name]), 2 * bounds[name], f"{case.name}: {name} vs torch.nn"
        )
    # each rank's gamma and beta gradients are the partial sums over its own part
    x, g = data.xs[-1].double().numpy(), data.gs[-1].double().numpy()
    xhat = (x - mean) / np.sqrt(var + BN_EPS)
    for r, result in enumerate(ranks):
        lo, hi = _offsets(case.sizes, r)
        partial_w, partial_b = (g * xhat)[lo:hi].sum(axis=(0, 2, 3)), g[lo:hi].sum(axis=(0, 2, 3))
        assert_within(np.abs(result["dw"] - partial_w), bounds["dw"], f"{case.name}: rank {r} dw")
        assert_within(np.abs(result["db"] - partial_b), bounds["db"], f"{case.name}: rank {r} db")
    # one all-gather per training call (and the layout check on the first), one all-reduce per
    # backward pass, nothing in eval
    for r, result in enumerate(ranks):
        for step, (forward, backward) in enumerate(result["collectives"]):
            gathers = forward.pop("all_gather", 0) + forward.pop("all_gather_into_tensor", 0)  # gloo | NCCL
            assert (gathers, forward) == (2 if step == 0 else 1, {}), (case.name, r, step, gathers, forward)
            assert backward == {"all_reduce": 1}, (case.name, r, step, backward)
        assert result["eval_collectives"] == {}, (case.name, r)
    if case.channels_last:  # the output keeps the input's memory format
        assert all(result["channels_last"] for result in ranks)
    # eval is local: normkit's own batch norm with this rank's state, bit for bit (on a GPU, within
    # the agreement of two implementations: CPU and GPU kernels)
    for r, result in enumerate(ranks):
        local = normkit_torch.BatchNorm2d(CHANNELS, momentum=case.momentum, dtype=case.param_dtype)
        local.load_state_dict({k: torch.from_numpy(v) for k, v in result["state"].items()})
        local.eval()
        lo, hi = _offsets(case.sizes, r)
        expected = local(data.xs[-1][lo:hi]).detach().numpy()
        if result["device"] == "cpu":
            assert np.array_equal(result["eval"], expected), (case.name, r)
        else:
            rm, rv = result["state"]["running_mean"], result["state"]["running_var"]
            gain = centering_gain(
                rm.reshape(1, -1, 1, 1), rv.reshape(1, -1, 1, 1), BN_EPS, data.weight.numpy()
            )
            tolerance = output_tolerance(d, centering_gain=gain).pairwise()
            np.testing.assert_allclose(result["eval"], expected, **tolerance.kwargs)


def _finite_difference_check(case: Case, ranks: list[dict[str, Any]]) -> None:
    """The float64 case's gradients against central differences of normkit's reference (no
    autograd anywhere), within ``normalization_gradient_tolerances``."""
    data = _case_data(case)
    step = 1e-6
    x, g = data.xs[-1].numpy(), data.gs[-1].numpy()
    w, b = data.weight.numpy(), data.bias.numpy()
    # the running statistics going into the last step do not affect its output in training
    rm, rv = np.zeros(CHANNELS), np.ones(CHANNELS)

    def loss(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
        y, _, _ = reference.batch_norm(
            x, w, b, rm, rv, training=True, momentum=0.1, eps=BN_EPS, axis=1, unbiased_running_var=True
        )
        return float(np.sum(g * y))

    numeric = []
    arrays = [x, w, b]
    for k, a in enumerate(arrays):
        grad = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus, minus = [v.copy() for v in arrays], [v.copy() for v in arrays]
            plus[k][idx] += step
            minus[k][idx] -= step
            grad[idx] = (loss(*plus) - loss(*minus)) / (2 * step)
        numeric.append(grad)
    mean, var = _batch_statistics(data.xs[-1])
    tolerances = normalization_gradient_tolerances(
        x, w.reshape(1, -1, 1, 1), b.reshape(1, -1, 1, 1), g, mean, np.sqrt(var + BN_EPS),
        batch_statistics=True, step=step,
    )  # fmt: skip
    got = [
        np.concatenate([r["dx"] for r in ranks]),
        np.sum([r["dw"] for r in ranks], axis=0),
        np.sum([r["db"] for r in ranks], axis=0),
    ]
    for name, a, n, (rtol, atol) in zip(("x", "weight", "bias"), got, numeric, tolerances, strict=True):
        np.testing.assert_allclose(a, n, rtol=rtol, atol=atol, err_msg=name)


# --------------------------------------------------------------------------------------------
# multi-process tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES_FOUR, ids=lambda c: c.name)
def test_four_ranks_match_one_process_on_the_whole_batch(
    case: Case, four_ranks: list[dict[str, Any]]
) -> None:
    _assert_case(case, [r["cases"][case.name] for r in four_ranks])


@pytest.mark.parametrize("group", [0, 1])
def test_each_process_group_synchronizes_within_itself(group: int, four_ranks: list[dict[str, Any]]) -> None:
    case = SUBGROUP_CASES[group]
    _assert_case(case, [four_ranks[r]["cases"][case.name] for r in SUBGROUPS[group]])


def test_four_ranks_float64_gradients_match_finite_differences_of_the_reference(
    four_ranks: list[dict[str, Any]],
) -> None:
    case = CASES_FOUR[-1]
    assert case.dtype == torch.float64
    _finite_difference_check(case, [r["cases"][case.name] for r in four_ranks])


@pytest.mark.parametrize("case", CASES_TWO, ids=lambda c: c.name)
def test_two_ranks_match_one_process_on_the_whole_batch(case: Case, two_ranks: list[dict[str, Any]]) -> None:
    _assert_case(case, [r["cases"][case.name] for r in two_ranks])


def test_the_communicator_gathers_every_ranks_arrays_in_one_collective(
    four_ranks: list[dict[str, Any]],
) -> None:
    for r, result in enumerate(four_ranks):
        out = result["packing"]
        assert out["who"] == ("torch.distributed (gloo)", r, 4)
        assert out["collectives"] == {"all_gather": 1}
        assert out["ints"] == [(j, -j, 2**40 + j) for j in range(4)]
        for j, part in enumerate(out["gathered"]):  # rank order, each array's shape and dtype
            (a, a_dtype), (b, b_dtype), (c, c_dtype) = part
            assert (a_dtype, b_dtype, c_dtype) == ("torch.int64", "torch.float32", "torch.float16")
            assert np.array_equal(a, [j, 10 * j + 1])
            assert np.array_equal(b, np.full((3, 2), j + 0.5, np.float32))
            assert np.array_equal(c, np.array([j * 0.25], np.float16))


def test_all_ranks_empty_leaves_running_statistics_unchanged(four_ranks: list[dict[str, Any]]) -> None:
    data = _case_data(Case("empty", (0,), torch.float32, seed=8))
    for r, result in enumerate(four_ranks):
        out = result["all_empty"]
        assert out["y_shape"] == out["dx_shape"] == (0, CHANNELS, *SPATIAL)
        assert np.array_equal(out["dw"], np.zeros(CHANNELS, np.float32))
        state = out["state"]
        assert np.array_equal(state["running_mean"], data.running_mean.numpy()), r  # not decayed toward 0
        assert np.array_equal(state["running_var"], data.running_var.numpy()), r
        assert int(state["num_batches_tracked"]) == 1  # counted, as torch.nn counts an empty batch


def test_eps_zero_with_a_constant_rank_is_exact(four_ranks: list[dict[str, Any]]) -> None:
    r"""``eps=0`` and a rank whose part of a channel is constant: its variance travels as
    :math:`M_2 = 0`, not as :math:`1/\sqrt{0}` (``torch.nn.SyncBatchNorm`` rebuilds each rank's
    variance from that inverse standard deviation). Outputs and running statistics against the
    reference within the usual bounds."""
    x, _ = _eps_zero_data()
    ref_y, ref_mean, ref_var = reference.batch_norm(
        x.double().numpy(), None, None, np.zeros(CHANNELS), np.ones(CHANNELS),
        training=True, momentum=0.1, eps=0.0, axis=1, unbiased_running_var=True,
    )  # fmt: skip
    y = np.concatenate([r["eps_zero"]["y"] for r in four_ranks])
    mean, var = _batch_statistics(x)
    tolerance = output_tolerance("float32", centering_gain=centering_gain(mean, var, 0.0))
    assert_within(np.abs(y - ref_y), tolerance.bound(ref_y, 0.0), "y")
    magnitude = float(x.abs().max())
    for name, expected in (("running_mean", ref_mean), ("running_var", ref_var)):
        tol = statistics_tolerance("float32", name.removeprefix("running_"), magnitude)
        for r, result in enumerate(four_ranks):
            got = result["eps_zero"]["state"][name]
            assert_within(np.abs(got - expected), tol.bound(expected, 0.0), f"{name} on rank {r}")


def test_a_global_batch_of_one_value_is_an_error_on_every_rank(four_ranks: list[dict[str, Any]]) -> None:
    for r, result in enumerate(four_ranks):
        out = result["one_value"]
        assert out["error"] is not None, f"rank {r} raised nothing"
        assert "1 value per channel" in out["error"] and "torch.distributed (gloo)" in out["error"], out[
            "error"
        ]
        assert int(out["torch_state"]["num_batches_tracked"]) == 0  # the failed call changed nothing
        assert np.array_equal(out["torch_state"]["running_var"], np.ones(CHANNELS, np.float32))
        # keras's preset allows one value: y = beta exactly; biased variance M2/N = 0
        assert np.array_equal(out["keras_state"]["running_mean"], np.full(CHANNELS, 0.01 * 3.0, np.float32))
        assert np.array_equal(out["keras_state"]["running_var"], np.full(CHANNELS, 0.99, np.float32))
    assert np.array_equal(four_ranks[0]["one_value"]["keras_y"], np.array([[0.25, -1.5, 2.0]], np.float32))


def test_mismatched_channel_counts_are_a_clear_error_on_every_rank(four_ranks: list[dict[str, Any]]) -> None:
    for r, result in enumerate(four_ranks):
        out = result["mismatch"]
        assert out["error"] is not None, f"rank {r} raised nothing"
        assert out["error"].startswith("ValueError: layer 'SyncBatchNorm("), out["error"]
        for needle in (
            "torch.distributed (gloo)",
            "rank 0: 3 channels",
            "rank 1: 4 channels",
            "rank 3: 3 channels",
        ):
            assert needle in out["error"], (needle, out["error"])
        assert out["error"].startswith("ValueError"), out["error"]  # the layout check, not a timeout


def _assert_ddp_matches_one_process(
    sync: list[dict[str, np.ndarray]], local: dict[str, np.ndarray] | None
) -> None:
    """5 SGD steps under DDP (2 ranks, batches 5 | 7) reach the parameters and running
    statistics of the same model trained in this process on the whole batch of 12 (with
    ``torch.nn.BatchNorm2d``), within ``training_tolerance``: 5 steps of ``step_terms`` terms,
    relative to the largest change one step made to any weight or buffer. The same training with
    a local (unsynchronized) batch norm on each rank (``local``) falls outside it."""
    model = _ddp_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    largest = 0.0
    for step in range(DDP_STEPS):
        before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        x, target = _ddp_batch(step)
        loss = ((model(x) - target) ** 2).sum() / sum(DDP_SIZES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = model.state_dict()
        largest = max(largest, *(float((after[k] - v).abs().max()) for k, v in before.items()))
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    # Terms summed per value along one step on the batch of 12 4x4 images: the conv 3*3*3, batch
    # norm's two passes over 12*16 (and the merge), the linear layer 64, the loss 12*2; the
    # backward pass about as many again, plus the conv's and the linear layer's weight gradients
    # over the 12*16 positions and the 12 samples, and DDP's sum of 2 ranks.
    forward_terms = 27 + 2 * 12 * 16 + 64 + 12 * 2
    step_terms = 2 * forward_terms + 12 * 16 + 12 + 2
    tolerance = training_tolerance("float32", steps=DDP_STEPS, reduction_size=step_terms, scale=largest)
    for name, value in expected.items():
        for r in range(len(sync)):  # DDP keeps every rank's parameters and buffers bit-identical
            assert np.array_equal(sync[r][name], sync[0][name]), (name, r)
        if name == "1.num_batches_tracked":
            assert int(sync[0][name]) == DDP_STEPS
            continue
        np.testing.assert_allclose(sync[0][name], value, **tolerance.kwargs, err_msg=name)
        assert np.abs(sync[0][name] - value).max() <= 1e-5, name  # the acceptance bound
    if local is not None:
        outside = [
            name
            for name, value in expected.items()
            if name != "1.num_batches_tracked" and not np.allclose(local[name], value, **tolerance.kwargs)
        ]
        assert outside, "training with per-rank statistics should not match the whole batch's"


def test_ddp_on_cpu_trains_like_one_process_on_the_whole_batch(two_ranks: list[dict[str, Any]]) -> None:
    _assert_ddp_matches_one_process([r["ddp_sync"] for r in two_ranks], two_ranks[0]["ddp_local"])


def test_torch_sync_batch_norm_is_refused_by_ddp_on_cpu(two_ranks: list[dict[str, Any]]) -> None:
    """Why ``SyncBatchNorm`` does not subclass ``torch.nn.SyncBatchNorm``: DDP refuses it on CPU."""
    assert two_ranks[0]["torch_sync_bn_ddp_error"] == "SyncBatchNorm layers only work with GPU modules"


def test_a_rank_that_skips_a_collective_leaves_the_others_an_error_not_a_hang(
    two_ranks: list[dict[str, Any]],
) -> None:
    out = two_ranks[0]["skipped"]
    assert out["error"] is not None
    for needle in (
        "layer 'encoder.bn1'",
        "torch.distributed (gloo)",
        "all-gather of the moments",
        "rank 0 of 2",
    ):
        assert needle in out["error"], (needle, out["error"])
    assert two_ranks[1]["skipped"]["error"] is None  # the rank in eval never communicated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path (NCCL) needs one")
def test_gpu_ranks_match_one_process_on_the_whole_batch() -> None:
    """The same comparisons on GPU: NCCL with one GPU per rank where there are two GPUs, else
    gloo with both ranks on ``cuda:0`` (NCCL refuses two ranks on one GPU)."""
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    ranks = _spawn(2, "gpu", backend=backend)
    for case in CASES_TWO:
        _assert_case(case, [r["cases"][case.name] for r in ranks])
    _assert_ddp_matches_one_process([r["ddp_sync"] for r in ranks], None)


# --------------------------------------------------------------------------------------------
# single-process tests: the drop-in, the conversions
# --------------------------------------------------------------------------------------------


def test_without_torch_distributed_it_is_normkits_local_batch_norm_bit_for_bit() -> None:
    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(3)
    ours, local = SyncBatchNorm(CHANNELS), normkit_torch.BatchNorm2d(CHANNELS)
    for step in range(2):
        x = (torch.randn(6, CHANNELS, *SPATIAL, generator=gen) * 2 + 1).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        g = torch.randn(x.shape, generator=gen)
        ours(x).backward(g)
        local(x2).backward(g)
        assert torch.equal(x.grad, x2.grad), step
    for (name, a), b in zip(ours.state_dict().items(), local.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(ours.weight.grad, local.weight.grad) and torch.equal(ours.bias.grad, local.bias.grad)
    with pytest.raises(RuntimeError, match="not initialized"):
        TorchCommunicator()


def test_it_is_a_drop_in_for_torch_sync_batch_norm_but_not_a_subclass() -> None:
    ours, theirs = (
        SyncBatchNorm(8, 1e-3, None, True, False, None),
        nn.SyncBatchNorm(8, 1e-3, None, True, False, None),
    )
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    tracked_ours, tracked_theirs = SyncBatchNorm(8), nn.SyncBatchNorm(8)
    assert tracked_ours.state_dict().keys() == tracked_theirs.state_dict().keys()
    assert list(tracked_ours.state_dict()) == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    tracked_ours.load_state_dict(tracked_theirs.state_dict())
    assert isinstance(ours, _BatchNorm) and not isinstance(ours, nn.SyncBatchNorm)
    assert repr(SyncBatchNorm(4, preset="keras")) == (
        "SyncBatchNorm(4, eps=0.001, momentum=0.01, affine=True, bias=True, track_running_stats=True, preset='keras')"
    )
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(4)(torch.randn(4))
    SyncBatchNorm(4)(torch.randn(3, 4, 2, 2, 2))  # any rank >= 2, as torch.nn.SyncBatchNorm


class _BatchNormAct(nn.BatchNorm2d):
    """A subclass whose forward does more (timm's BatchNormAct2d)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(input))


def test_convert_and_revert_keep_state_presets_and_classes() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Linear(4, 5), normkit_torch.BatchNorm1d(5, preset="keras")),
        nn.SyncBatchNorm(4, momentum=None),
        nn.BatchNorm3d(2, affine=False),
        _BatchNormAct(4),
    )
    model[1].eval()
    stock = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    group = object()  # stands for a torch.distributed process group (no forward call here)
    with pytest.warns(RuntimeWarning, match="5 .*_BatchNormAct.* overrides forward"):
        converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    bn, keras_bn, sync_bn, bn3 = converted[1], converted[2][1], converted[3], converted[4]
    for layer in (bn, keras_bn, sync_bn, bn3):
        assert type(layer) is SyncBatchNorm and layer.process_group is group
    assert type(converted[5]) is _BatchNormAct  # left as it is
    assert (bn.layer_name, keras_bn.layer_name, sync_bn.layer_name) == ("1", "2.1", "3")
    assert keras_bn.preset == "keras" and not keras_bn.unbiased_running_var and keras_bn.eps == 1e-3
    assert sync_bn.momentum is None and bn3.affine is False and bn3.weight is None
    assert not bn.training and keras_bn.training
    for name, p in converted.named_parameters():  # the same Parameter objects
        assert p is params[name], name
    assert converted.state_dict().keys() == stock.state_dict().keys()
    # back: the recorded classes; torch.nn.SyncBatchNorm's rank is unknown -> BatchNormXd
    reverted = revert_sync_batchnorm(converted)
    assert type(reverted[1]) is nn.BatchNorm2d and not reverted[1].training
    assert type(reverted[2][1]) is normkit_torch.BatchNorm1d and reverted[2][1].preset == "keras"
    assert type(reverted[3]) is BatchNormXd and reverted[3].momentum is None
    assert type(reverted[4]) is nn.BatchNorm3d
    assert reverted[1].weight is params["1.weight"]
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(reverted[1](reverted[0](x)), stock[1](stock[0](x)))  # eval: identical
    # the classmethod form, a layer built directly, and a lone layer
    assert type(SyncBatchNorm.revert_sync_batchnorm(SyncBatchNorm(3))) is BatchNormXd
    lone = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert type(lone) is SyncBatchNorm and lone.layer_name == "SyncBatchNorm(3)"
    assert type(revert_sync_batchnorm(lone)) is nn.BatchNorm1d


def test_recalibration_over_shards_equals_one_process_over_the_whole_data_set(
    four_ranks: list[dict[str, Any]],
) -> None:
    """recalibrate(..., communicator=TorchCommunicator()) on 4 ranks, one shard empty: the same
    bits on every rank, and one process's recalibration over every batch within the pairwise
    statistics tolerance (the ranks merge per rank, then across ranks, in another order)."""
    from normkit.testtime import recalibrate

    got = [r["recalibrated"] for r in four_ranks]
    for other in got[1:]:
        assert all(np.array_equal(other[k], got[0][k]) for k in got[0])
    model, batches = _recalibration_model(), _recalibration_batches()
    recalibrate(model, batches, progress=False)
    probe = copy.deepcopy(model)  # the second batch norm's inputs: the first's outputs in training
    with torch.no_grad():
        magnitude = max(
            float(t.abs().max())
            for b in batches
            for t in (b, probe[0](b), probe[2](probe[1].train()(probe[0](b))))
        )
    for key, value in model.state_dict().items():
        if "running" in key:
            tolerance = statistics_tolerance(
                "float32", "mean" if "mean" in key else "var", magnitude
            ).pairwise()
            np.testing.assert_allclose(got[0][key], _numpy(value), **tolerance.kwargs)
