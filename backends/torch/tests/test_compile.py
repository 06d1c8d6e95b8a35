"""``torch.compile`` on models built from normkit's layers.

The layers call the pure kernels directly, so Dynamo traces the whole normkit path into one
graph: ``fullgraph=True`` (any graph break is an error) compiles a CNN with batch, instance and
layer norm in training and in eval, with either running-variance estimator, and with dynamic
batch sizes. Compiled results are checked against an eager deep copy of the same model (outputs,
gradients, running statistics and ``num_batches_tracked``) and, for the torch preset, against the
same network built from ``torch.nn``'s own layers.

Documented exceptions (tests below pin them down):

* ``BatchNorm*d(momentum=None)`` (the cumulative average) reads ``num_batches_tracked`` as a
  Python float, as ``torch.nn`` does: a data-dependent value, so a graph break; ``fullgraph=True``
  fails for ``torch.nn.BatchNorm2d`` and ours alike. Without ``fullgraph`` the results are eager's.
* The public functions (``normkit.batch_norm`` …) resolve the backend on their first call in a
  registry guarded by a lock, which Dynamo cannot trace: compiled as the very first normkit call
  they graph-break (an error under ``fullgraph=True``). Once the backend is resolved (any eager
  call) the lookup is a dict read and ``fullgraph=True`` works.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import normkit
import normkit_torch
from normkit.testing.tolerances import Tolerance, training_tolerance

COMPILE_ERRORS = (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_model(lib: object = normkit_torch, *, bn_kw: dict | None = None, **kw: object) -> nn.Sequential:
    """A small CNN with every kind of normalization layer; ``lib`` is ``normkit_torch`` or ``torch.nn``.
    ``kw`` go to every norm layer (``preset=``: the preset's default eps and momentum), ``bn_kw``
    to the batch norm only."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        lib.BatchNorm2d(8, **kw, **(bn_kw or {})),  # type: ignore[attr-defined]
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        lib.InstanceNorm2d(8, affine=True, track_running_stats=True, **kw),  # type: ignore[attr-defined]
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        lib.LayerNorm(128, **kw),  # type: ignore[attr-defined]
        nn.Linear(128, 10),
    )


def _randomize(model: nn.Module, seed: int) -> None:
    """Random affine parameters (not the 1/0 defaults), so γ and β matter in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def _batches(seed: int, sizes: tuple[int, ...] = (4, 4, 4)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 8, 8, generator=g) * 2 + 1, torch.randn(n, 10, generator=g)) for n in sizes]


def _step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward pass: the output and the parameters' gradients (then zeroed)."""
    y = model(x)
    y.backward(g)
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return y.detach(), grads


def step_terms(batch: int) -> int:
    """Terms summed per value along one training step of make_model on ``batch`` 8x8 images:
    forward, the convs 3*3*3 and 3*3*8, batch norm's two passes over batch*8*8, instance norm's
    over 8*8, the pooling 2*2, layer norm's two passes over 128 and the linear layer's 128; the
    backward pass about as many again, plus the conv kernels' gradients over batch*8*8."""
    forward = 27 + 72 + 2 * batch * 64 + 2 * 64 + 4 + 2 * 128 + 128
    return 2 * forward + 2 * batch * 64


def _tolerance(batch: int, scale: float, steps: int = 0) -> Tolerance:
    """:func:`training_tolerance` for make_model: a compiled graph may sum in another order than
    eager (or torch.nn's kernels), a sqrt(N) eps of the magnitudes summed per pass."""
    return training_tolerance("float32", steps=steps, reduction_size=step_terms(batch), scale=scale)


def _assert_same_state(actual: nn.Module, expected: nn.Module, *, steps: int = 0, batch: int = 4) -> None:
    """Identical parameters (no optimizer runs) and counters; running statistics after ``steps``
    training steps within :func:`_tolerance`, relative to what their batch statistics summed:
    ``|mean| + std`` for a running mean, the variance for a running variance."""
    a, e = actual.state_dict(), expected.state_dict()
    assert a.keys() == e.keys()
    for key, value in e.items():
        if key.endswith("num_batches_tracked") or not key.endswith(("running_mean", "running_var")):
            assert torch.equal(a[key], value), key
            continue
        prefix = key.rsplit(".", 1)[0]
        mean, var = e[prefix + ".running_mean"].abs(), e[prefix + ".running_var"]
        scale = float((mean + var.sqrt()).max() if key.endswith("running_mean") else var.max())
        tolerance = _tolerance(batch, scale, steps) if steps else Tolerance(0.0, 0.0)
        torch.testing.assert_close(a[key], value, **tolerance.kwargs, msg=key)


def _assert_no_graph_breaks(graphs: int = 1) -> None:
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


# aot_eager runs the traced ATen ops without fusing them: results are eager's to the last bit on
# CPU, but room is left for decompositions in other torch versions: the bound of a graph that
# sums in another order (_tolerance).


def _assert_outputs_match(y: torch.Tensor, y_expected: torch.Tensor) -> None:
    tolerance = _tolerance(len(y), float(y_expected.detach().abs().max()))
    torch.testing.assert_close(y, y_expected, **tolerance.kwargs)


def _assert_step_matches(compiled: nn.Module, eager: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """One training step of each model on the same batch: outputs and parameter gradients within
    :func:`_tolerance`, relative to the outputs' magnitude and to the largest gradient (the
    rounding of a gradient is relative to the terms it sums: the first conv's bias, in front of
    a batch norm, has an exact gradient of 0)."""
    y, grads = _step(compiled, x, g)
    y_eager, grads_eager = _step(eager, x, g)
    _assert_outputs_match(y, y_eager)
    tolerance = _tolerance(len(x), max(float(e.abs().max()) for e in grads_eager.values()))
    for name, expected in grads_eager.items():
        torch.testing.assert_close(grads[name], expected, **tolerance.kwargs, msg=name)


@pytest.mark.parametrize(
    ("preset", "channels_last"),
    [("torch", False), ("keras", False), ("flax", False), ("torch", True)],
    ids=["torch", "keras", "flax", "torch-channels-last"],
)
def test_fullgraph_training_matches_eager(preset: str, channels_last: bool) -> None:
    torch.manual_seed(0)
    model = make_model(preset=preset)
    _randomize(model, seed=1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for x, g in _batches(seed=2):
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        _assert_step_matches(compiled, eager, x, g)
    _assert_same_state(model, eager, steps=3)
    assert int(model[1].num_batches_tracked) == 3
    assert not torch.equal(model[4].running_var, torch.ones(8))  # instance norm's statistics moved too
    _assert_no_graph_breaks()  # one graph, reused for every step: no recompilation either


@pytest.mark.parametrize("preset", ["torch", "keras"])
def test_fullgraph_eval_matches_eager(preset: str) -> None:
    torch.manual_seed(3)
    model = make_model(preset=preset)
    _randomize(model, seed=4)
    for x, _ in _batches(seed=5):  # running statistics away from their initial 0 and 1
        model(x)
    model.eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for x, g in _batches(seed=6):
        _assert_step_matches(compiled, eager, x, g)
    _assert_same_state(model, eager)  # eval never writes the buffers
    _assert_no_graph_breaks()


def test_fullgraph_switching_modes_matches_eager() -> None:
    """train → eval → train on one compiled model: a graph per mode, results as eager's."""
    torch.manual_seed(7)
    model = make_model()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for training, (x, _) in zip(
        (True, False, True, False), _batches(seed=8, sizes=(4, 4, 4, 4)), strict=True
    ):
        compiled.train(training)
        eager.train(training)
        _assert_outputs_match(compiled(x), eager(x))
        _assert_same_state(model, eager, steps=2)
    _assert_no_graph_breaks(graphs=2)


def test_fullgraph_matches_torch_nn_model() -> None:
    """The compiled normkit model against the eager torch.nn model with the same weights."""
    torch.manual_seed(9)
    theirs = make_model(nn)
    _randomize(theirs, seed=10)
    model = make_model()
    model.load_state_dict(theirs.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for x, g in _batches(seed=11):
        _assert_step_matches(compiled, theirs, x, g)
    _assert_same_state(model, theirs, steps=3)
    model.eval()
    theirs.eval()
    x, _ = _batches(seed=12, sizes=(2,))[0]
    _assert_outputs_match(compiled(x), theirs(x))


@pytest.mark.parametrize("preset", ["torch", "keras"])
def test_fullgraph_dynamic_batch_size(preset: str) -> None:
    """Symbolic batch sizes (instance norm repeats γ and β per sample): one graph for all."""
    torch.manual_seed(13)
    model = make_model(preset=preset)
    _randomize(model, seed=14)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for x, g in _batches(seed=15, sizes=(2, 3, 5)):
        _assert_step_matches(compiled, eager, x, g)
    _assert_same_state(model, eager, steps=3, batch=5)
    _assert_no_graph_breaks()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("preset", ["torch", "keras"])
def test_explain_reports_no_graph_breaks(preset: str, training: bool) -> None:
    model = make_model(preset=preset).train(training)
    x, _ = _batches(seed=16, sizes=(4,))[0]
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# --------------------------------------------------------------------------------------------
# Documented graph breaks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lib", [nn, normkit_torch], ids=["torch.nn", "normkit_torch"])
def test_cumulative_momentum_cannot_compile_fullgraph(lib: object) -> None:
    """``momentum=None`` divides by ``float(num_batches_tracked)``, a data-dependent scalar: a
    graph break in torch.nn's BatchNorm2d and in ours (same semantics, same state_dict)."""
    model = make_model(lib, bn_kw={"momentum": None})
    x, _ = _batches(seed=17, sizes=(4,))[0]
    with pytest.raises(COMPILE_ERRORS):
        torch.compile(model, fullgraph=True, backend="aot_eager")(x)


# Dynamo resumes the frame after the graph break with the conv output (a non-leaf tensor) as an
# input and reads its .grad while wrapping it (variables/builder.py: safe_has_grad). It hides that
# warning by replacing warnings.showwarning, which an "error" filter bypasses: the warning raises.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_cumulative_momentum_compiles_with_graph_breaks() -> None:
    """Without fullgraph the cumulative average is eager's, step after step (10 steps: past
    Dynamo's recompile limit, since the factor 1/(k+1) is a new constant every step)."""
    torch.manual_seed(18)
    model = make_model(bn_kw={"momentum": None})
    _randomize(model, seed=19)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for step, (x, g) in enumerate(_batches(seed=20, sizes=(3,) * 10)):
        _assert_step_matches(compiled, eager, x, g)
        _assert_same_state(model, eager, steps=step + 1, batch=3)
    assert int(model[1].num_batches_tracked) == 10
    assert sum(counters["graph_break"].values()) > 0  # the break this test documents


def _functional_step(
    x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    y, new_mean, new_var = normkit.batch_norm(
        x, rm, rv, w, None, training=True, momentum=0.1, eps=1e-5, axis=-1, preset="torch"
    )
    z = normkit.instance_norm(
        y, new_mean, new_var, w, None, use_input_stats=True, momentum=0.1, eps=1e-5, axis=-1, preset="keras"
    )[0]
    return normkit.layer_norm(z, (6, 3)), new_mean, new_var


def _functional_args() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(21)
    x = torch.randn(4, 6, 3, generator=g) * 2 + 1
    return x, torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5, torch.rand(3, generator=g) + 0.5


def test_functional_api_fullgraph_once_backend_resolved() -> None:
    """After a first eager call, resolving the backend is one dict lookup, which Dynamo traces."""
    args = _functional_args()
    eager = _functional_step(*args)
    compiled = torch.compile(_functional_step, fullgraph=True, backend="aot_eager")(*args)
    # batch norm's two passes over 4*6, instance norm's over 6, layer norm's over 6*3
    terms = 2 * (4 * 6 + 6 + 6 * 3)
    for a, e in zip(compiled, eager, strict=True):
        tolerance = training_tolerance("float32", steps=0, reduction_size=terms, scale=float(e.abs().max()))
        torch.testing.assert_close(a, e, **tolerance.kwargs)
    _assert_no_graph_breaks()


_COLD_FULLGRAPH = """
import torch, normkit
x, rm, rv = torch.randn(4, 6, 3), torch.zeros(3), torch.ones(3)
def f(x):
    return normkit.batch_norm(x, rm, rv, training=True, momentum=0.1, eps=1e-5, axis=-1)[0]
torch.compile(f, fullgraph=True, backend="aot_eager")(x)
"""


def test_functional_api_fullgraph_as_first_call() -> None:
    """In a fresh interpreter the first normkit call is the compiled one: the registry is cold.
    Known break (xfail); any other failure fails the test, and a fix makes it pass."""
    run = subprocess.run(
        [sys.executable, "-c", _COLD_FULLGRAPH], capture_output=True, text=True, timeout=120, check=False
    )
    if run.returncode != 0:
        assert "torch._dynamo.exc.Unsupported" in run.stderr and "RLock" in run.stderr, run.stderr[-2000:]
        pytest.xfail(
            "the first call resolves the backend in normkit's registry under an RLock, which Dynamo "
            "cannot enter: a graph break there, an error under fullgraph=True"
        )


# --------------------------------------------------------------------------------------------
# Inductor (the default backend): one test; it compiles C++ kernels (about 23 s on two CPU cores
# with a cold cache, 2-3 s once ~/.cache or /tmp/torchinductor_$USER holds them)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
# importing inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_training_step_matches_eager() -> None:
    torch.manual_seed(22)
    model = make_model()
    _randomize(model, seed=23)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for x, g in _batches(seed=24, sizes=(4, 4)):
        # fused float32 kernels reassociate sums: agreement to float32 rounding, not bit-for-bit
        _assert_step_matches(compiled, eager, x, g)
    _assert_same_state(model, eager, steps=2)
    _assert_no_graph_breaks()
