"""Models with normkit's drop-in layers exported by ``torch.onnx.export`` and run in onnxruntime.

Every layer (batch, instance, layer, group and RMS norm; the default preset and others;
channels-first and channels-last memory; normkit's own ops at ``axis=-1``) is exported by both
exporters (TorchScript, ``dynamo=False``; dynamo, ``dynamo=True``, which needs onnxscript) at
their default opset, group and RMS norm also at opset 23, where the dynamo exporter would write
``GroupNormalization`` and writes ``RMSNormalization``. Each exported model must load in
onnxruntime and give the torch module's eval output at data with ``|mean|/std`` 1 and 1e4:

* within the pairwise float32 tolerance of the suite (:mod:`normkit.testing.tolerances`) of
  torch's own output: twice ``r|y| + r``, the centering term
  :math:`2\\epsilon|\\mu||\\gamma|/\\sqrt{\\sigma^2+\\epsilon}` of the statistics used, and the
  conditioning of the case (how far the float64 reference moves when the input is perturbed
  by one float32 unit in the last place), as the conformance runner measures it;
* and within the single tolerance of the float64 reference (:mod:`normkit.reference`).

The graphs' structure that this relies on is asserted too: no ``GroupNormalization`` node
(onnxruntime computes it one-pass: NaN at mean 1e4), no ``Transpose`` with a negative
permutation (onnxruntime refuses to load it), and the op each layer is meant to become.
Training mode: the dynamo exporter refuses a call that updates running statistics (it would
write inference-mode batch norm over the running-statistics inputs); the TorchScript exporter's
training mode writes ``BatchNormalization(training_mode=1)``, which onnxruntime runs with batch
statistics, as torch does.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import normkit
import normkit_torch
from normkit import reference
from normkit.testing.tolerances import EPS, assert_within, centering_gain, output_tolerance
from normkit_torch.kernels import moved

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

EPS32 = EPS["float32"]
RATIOS = (1.0, 1e4)  # |mean| / std of the data
STD = 2.0


def export(
    model: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    exporter: str,
    opset: int | None = None,
    **kwargs,
):
    """The ONNX ``ModelProto`` of ``model`` exported with the input(s) ``x`` by the named exporter."""
    args = x if isinstance(x, tuple) else (x,)
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        with warnings.catch_warnings():
            # torch 2.13's torch.export uses its own deprecated pytree API
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)`", FutureWarning)
            program = torch.onnx.export(
                model, args, dynamo=True, opset_version=opset, verbose=False, **kwargs
            )
        return program.model_proto
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated (it says so at each call), and its tracer warns
        # wherever a Python input check reads a traced size (torch.nn's layers too)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", "Setting `training` to something other", DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "ONNX Preprocess - Removing mutation", UserWarning)
        # instance norm normalizes by its own statistics in eval too (torch.nn.InstanceNorm2d's as well)
        warnings.filterwarnings("ignore", "ONNX export mode is set to TrainingMode.EVAL", UserWarning)
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=opset, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def run(proto, *inputs: np.ndarray) -> list[np.ndarray]:
    """``proto`` run by onnxruntime's CPU provider (loading it is part of the test)."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), inputs, strict=True)})


def op_types(proto) -> set[str]:
    return {node.op_type for node in proto.graph.node}


def assert_portable(proto) -> None:
    """No ``GroupNormalization`` node and no negative ``Transpose`` permutation."""
    assert "GroupNormalization" not in op_types(proto)
    for node in proto.graph.node:
        if node.op_type == "Transpose":
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            assert perm and min(perm[0]) >= 0, f"Transpose with perm {perm}"


# --- the layers and their float64 oracles --------------------------------------------------

Oracle = Callable[[nn.Module, np.ndarray], list[tuple[np.ndarray, float]]]
"""``(module, x in float64)`` -> for each output, the float64 reference and its centering gain
:math:`\\max|\\mu||\\gamma|/\\sqrt{\\sigma^2+\\epsilon}` over the statistics used."""


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


def _gain(x: np.ndarray, reduced: tuple[int, ...], eps: float, weight: np.ndarray | None) -> float:
    return centering_gain(x.mean(reduced, keepdims=True), x.var(reduced, keepdims=True), eps, weight)


def _channel(weight: np.ndarray | None, ndim: int) -> np.ndarray | None:
    return None if weight is None else weight.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_oracle(m: nn.Module, x: np.ndarray) -> list[tuple[np.ndarray, float]]:
    w, b, rm, rv = _np(m.weight), _np(m.bias), _np(m.running_mean), _np(m.running_var)
    y, _, _ = reference.batch_norm(
        x, w, b, rm, rv, training=False, momentum=0.0, eps=m.eps, axis=1, unbiased_running_var=True
    )
    return [(y, centering_gain(rm, rv, m.eps, w))]


def instance_norm_oracle(m: nn.Module, x: np.ndarray) -> list[tuple[np.ndarray, float]]:
    if m.track_running_stats:  # eval: the running statistics, as batch norm
        return batch_norm_oracle(m, x)
    w, b = _np(m.weight), _np(m.bias)
    y, _, _ = reference.instance_norm(
        x, w, b, use_input_stats=True, momentum=0.0, eps=m.eps, axis=1, unbiased_running_var=True
    )
    return [(y, _gain(x, tuple(range(2, x.ndim)), m.eps, _channel(w, x.ndim)))]


def layer_norm_oracle(m: nn.Module, x: np.ndarray) -> list[tuple[np.ndarray, float]]:
    axes = tuple(range(x.ndim - len(m.normalized_shape), x.ndim))
    w, b = _np(m.weight), _np(m.bias)
    return [(reference.layer_norm(x, w, b, axes=axes, eps=m.eps), _gain(x, axes, m.eps, w))]


def group_norm_oracle(m: nn.Module, x: np.ndarray) -> list[tuple[np.ndarray, float]]:
    w, b, groups = _np(m.weight), _np(m.bias), m.num_groups
    y = reference.group_norm(x, groups, w, b, eps=m.eps, axis=1)
    blocks = x.reshape(x.shape[0], groups, -1)
    per_channel = m.num_channels // groups
    mean = np.repeat(blocks.mean(2), per_channel, axis=1)
    var = np.repeat(blocks.var(2), per_channel, axis=1)
    return [(y, centering_gain(mean, var, m.eps, w))]


def rms_norm_oracle(m: nn.Module, x: np.ndarray) -> list[tuple[np.ndarray, float]]:
    axes = tuple(range(x.ndim - len(m.normalized_shape), x.ndim))
    eps = EPS32 if m.eps is None else m.eps  # eps=None: float32's machine epsilon
    y = reference.rms_norm(x, _np(m.weight), axes=axes, eps=eps, weight_offset=m.weight_offset)
    return [(y, 0.0)]  # no mean is subtracted


class ChannelsLastOps(nn.Module):
    """normkit's own ops under the keras preset (channel axis -1) on an NHWC view of NCHW input:
    batch norm in eval with running statistics, instance norm and group norm."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups, self.eps = groups, 1e-3  # the keras preset's eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = x.permute(0, 2, 3, 1)  # NHWC, not contiguous: the kernels permute it
        if self.training:  # learn the running statistics with normkit's own update
            _, mean, var = normkit.batch_norm(
                h, self.running_mean, self.running_var, training=True, preset="keras"
            )
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        bn = normkit.batch_norm(
            h, self.running_mean, self.running_var, self.weight, self.bias, training=False, preset="keras"
        ).y
        inst = normkit.instance_norm(h, weight=self.weight, bias=self.bias, preset="keras").y
        group = normkit.group_norm(h, self.groups, self.weight, self.bias, preset="keras")
        return bn, inst, group


def channels_last_ops_oracle(m: nn.Module, x: np.ndarray) -> list[tuple[np.ndarray, float]]:
    h = np.moveaxis(x, 1, -1)
    w, b, rm, rv, eps = _np(m.weight), _np(m.bias), _np(m.running_mean), _np(m.running_var), m.eps
    bn, _, _ = reference.batch_norm(
        h, w, b, rm, rv, training=False, momentum=0.0, eps=eps, axis=3, unbiased_running_var=False
    )
    inst, _, _ = reference.instance_norm(
        h, w, b, use_input_stats=True, momentum=0.0, eps=eps, axis=3, unbiased_running_var=False
    )
    group = reference.group_norm(h, m.groups, w, b, eps=eps, axis=3)
    blocks = x.reshape(x.shape[0], m.groups, -1)  # NCHW blocks of channels
    per_channel = x.shape[1] // m.groups
    group_mean = np.repeat(blocks.mean(2), per_channel, axis=1)
    group_var = np.repeat(blocks.var(2), per_channel, axis=1)
    return [
        (bn, centering_gain(rm, rv, eps, w)),
        (inst, _gain(h, (1, 2), eps, w)),
        (group, centering_gain(group_mean, group_var, eps, w)),
    ]


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    oracle: Oracle
    op: str | None  # the ONNX op the layer is meant to become
    stateful: bool = False  # running statistics: one model (and export) per data scale
    channels_last: bool = False


CASES = {
    "BatchNorm2d": Case(
        lambda: normkit_torch.BatchNorm2d(4), (3, 4, 5, 5), batch_norm_oracle, "BatchNormalization", True
    ),
    "BatchNorm2d-keras-channels_last": Case(
        lambda: normkit_torch.BatchNorm2d(4, preset="keras"),
        (3, 4, 5, 5),
        batch_norm_oracle,
        "BatchNormalization",
        True,
        True,
    ),
    "BatchNorm1d-onnx": Case(
        lambda: normkit_torch.BatchNorm1d(4, preset="onnx"),
        (16, 4),
        batch_norm_oracle,
        "BatchNormalization",
        True,
    ),
    "InstanceNorm2d": Case(
        lambda: normkit_torch.InstanceNorm2d(4, affine=True),
        (3, 4, 5, 5),
        instance_norm_oracle,
        "InstanceNormalization",
    ),
    "InstanceNorm2d-keras-channels_last": Case(
        lambda: normkit_torch.InstanceNorm2d(4, preset="keras"),
        (3, 4, 5, 5),
        instance_norm_oracle,
        "InstanceNormalization",
        False,
        True,
    ),
    "InstanceNorm1d-onnx-tracked": Case(
        lambda: normkit_torch.InstanceNorm1d(4, preset="onnx", track_running_stats=True),
        (3, 4, 7),
        instance_norm_oracle,
        "BatchNormalization",
        True,
    ),
    "LayerNorm": Case(lambda: normkit_torch.LayerNorm(8), (3, 5, 8), layer_norm_oracle, "LayerNormalization"),
    "LayerNorm-keras": Case(
        lambda: normkit_torch.LayerNorm((5, 8), preset="keras"),
        (3, 5, 8),
        layer_norm_oracle,
        "LayerNormalization",
    ),
    "GroupNorm": Case(
        lambda: normkit_torch.GroupNorm(2, 4), (3, 4, 5, 5), group_norm_oracle, "InstanceNormalization"
    ),
    "GroupNorm-channels_last": Case(
        lambda: normkit_torch.GroupNorm(2, 4),
        (3, 4, 5, 5),
        group_norm_oracle,
        "InstanceNormalization",
        False,
        True,
    ),
    "RMSNorm": Case(lambda: normkit_torch.RMSNorm(8), (3, 5, 8), rms_norm_oracle, None),
    "RMSNorm-gemma": Case(lambda: normkit_torch.RMSNorm(8, preset="gemma"), (3, 5, 8), rms_norm_oracle, None),
    "normkit ops, axis=-1": Case(
        lambda: ChannelsLastOps(4, 2), (3, 4, 5, 5), channels_last_ops_oracle, "InstanceNormalization", True
    ),
}

EXPORTS = [(name, exporter, None) for name in CASES for exporter in ("torchscript", "dynamo")] + [
    # opset 23: where the dynamo exporter writes GroupNormalization and RMSNormalization
    ("GroupNorm", "dynamo", 23),
    ("GroupNorm-channels_last", "dynamo", 23),
    ("RMSNorm", "dynamo", 23),
    ("RMSNorm-gemma", "dynamo", 23),
]


def data(case: Case, ratio: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g) * STD + ratio * STD
    return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x


def trained(case: Case, ratio: float) -> nn.Module:
    """A new layer with random affine parameters and, for a stateful one, running statistics
    learned from ten batches of the data, in eval mode."""
    module = case.make()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "bias":
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            else:  # γ, or an RMS weight, with w + offset in [0.5, 1.5]
                offset = getattr(module, "weight_offset", 0.0)
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 - offset)
    if case.stateful:
        module.train()
        for step in range(10):
            module(data(case, ratio, seed=100 + step))
    return module.eval()


def assert_matches(case: Case, module: nn.Module, proto, ratio: float, what: str) -> None:
    """onnxruntime's outputs against torch's (pairwise tolerance) and against the float64
    reference (single tolerance), on data of ``|mean|/std = ratio``."""
    x = data(case, ratio, seed=7)
    x64 = x.double().numpy()
    with torch.no_grad():
        ours = module(x)
    ours = [ours] if isinstance(ours, torch.Tensor) else list(ours)
    got = run(proto, x.numpy())
    u = np.random.default_rng(3).uniform(-1.0, 1.0, size=x64.shape)
    perturbed = case.oracle(module, x64 * (1.0 + EPS32 * u))
    assert len(got) == len(ours)
    for i, (y_ort, y_torch, (y_ref, gain), (y_pert, _)) in enumerate(
        zip(got, ours, case.oracle(module, x64), perturbed, strict=True)
    ):
        conditioning = float(np.abs(y_ref - y_pert).max())
        tolerance = output_tolerance("float32", centering_gain=gain)
        label = f"{what}, output {i}, |mean|/std = {ratio:g}"
        y_torch = y_torch.double().numpy()
        assert_within(
            np.abs(y_ort - y_torch),
            tolerance.pairwise().bound(y_torch, 2 * conditioning),
            f"{label}: ORT vs torch",
        )
        assert_within(np.abs(y_ort - y_ref), tolerance.bound(y_ref, conditioning), f"{label}: ORT vs float64")


@pytest.mark.parametrize(("name", "exporter", "opset"), EXPORTS)
def test_eval_export_runs_in_onnxruntime(name: str, exporter: str, opset: int | None) -> None:
    case = CASES[name]
    what = f"{name}, {exporter} exporter, opset {opset or 'default'}"
    models = {ratio: trained(case, ratio) for ratio in (RATIOS if case.stateful else RATIOS[:1])}
    for ratio in RATIOS:
        module = models[ratio] if case.stateful else models[RATIOS[0]]
        if ratio in models:  # one export per set of running statistics
            proto = export(module, data(case, ratio, seed=0), exporter, opset)
            assert_portable(proto)
            ops = op_types(proto)
            if case.op is not None:
                assert case.op in ops, f"{what}: {sorted(ops)}"
            if name == "RMSNorm":  # torch.rms_norm: onnxruntime's native kernel at opset 23
                assert (ops == {"RMSNormalization"}) == (exporter == "dynamo" and opset == 23), sorted(ops)
        assert_matches(case, module, proto, ratio, what)


class Moved(nn.Module):
    def __init__(self, source: tuple[int, ...], destination: tuple[int, ...]) -> None:
        super().__init__()
        self.source, self.destination = source, destination

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moved(x, self.source, self.destination) * 2


@pytest.mark.parametrize(
    ("source", "destination"), [((-1,), (1,)), ((1,), (-1,)), ((0, -1), (-1, 1)), ((-3, -1), (-2, -1))]
)
def test_moved_is_movedim_and_exports_non_negative_permutations(
    source: tuple[int, ...], destination: tuple[int, ...]
) -> None:
    """The kernels move axes with ``moved``: ``torch.movedim``'s result, as a permute the
    TorchScript exporter writes with non-negative dimensions (it writes ``movedim(-1, 1)`` as
    ``perm=[0, -1, 1, 2]``, which onnxruntime refuses to load)."""
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(moved(x, source, destination), torch.movedim(x, source, destination))
    proto = export(Moved(source, destination), x, "torchscript")
    assert_portable(proto)
    (got,) = run(proto, x.numpy())
    assert np.array_equal(got, torch.movedim(x, source, destination).numpy() * 2)


class EveryLayer(nn.Module):
    """One of each drop-in, side by side: ``(N, C, H, W)`` input to batch, group and instance
    norm, ``(N, L, C)`` input to layer and RMS norm."""

    def __init__(self) -> None:
        super().__init__()
        self.images = nn.ModuleList(
            [
                normkit_torch.BatchNorm2d(4),
                normkit_torch.GroupNorm(2, 4),
                normkit_torch.InstanceNorm2d(4, affine=True),
            ]
        )
        self.sequences = nn.ModuleList([normkit_torch.LayerNorm(6), normkit_torch.RMSNorm(6)])

    def forward(self, images: torch.Tensor, sequences: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*(m(images) for m in self.images), *(m(sequences) for m in self.sequences))


ORACLES = {
    normkit_torch.BatchNorm2d: batch_norm_oracle,
    normkit_torch.GroupNorm: group_norm_oracle,
    normkit_torch.InstanceNorm2d: instance_norm_oracle,
    normkit_torch.LayerNorm: layer_norm_oracle,
    normkit_torch.RMSNorm: rms_norm_oracle,
}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dynamic_batch_and_sizes(exporter: str) -> None:
    """Every drop-in exported with dynamic batch, spatial and sequence sizes runs in onnxruntime
    at other sizes (the TorchScript exporter needs layer norm's normalized_shape constant)."""
    model = EveryLayer()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    for _ in range(3):
        model(torch.randn(4, 4, 6, 6, generator=g) * STD + 3, torch.randn(4, 5, 6, generator=g))
    model.eval()
    if exporter == "dynamo":
        dim = torch.export.Dim
        kwargs = {
            "dynamic_shapes": ({0: dim("n"), 2: dim("h"), 3: dim("w")}, {0: dim("m"), 1: dim("length")})
        }
    else:
        dynamic = {"images": {0: "n", 2: "h", 3: "w"}, "sequences": {0: "m", 1: "length"}}
        kwargs = {"input_names": list(dynamic), "dynamic_axes": dynamic}
    example = (torch.randn(2, 4, 6, 6), torch.randn(2, 5, 6))
    proto = export(model, example, exporter, **kwargs)
    assert_portable(proto)
    images, sequences = torch.randn(5, 4, 7, 3) * STD + 3, torch.randn(3, 9, 6) * STD + 3
    got = run(proto, images.numpy(), sequences.numpy())
    with torch.no_grad():
        ours = model(images, sequences)
    layers = [*model.images, *model.sequences]
    for y_ort, y_torch, layer in zip(got, ours, layers, strict=True):
        x64 = (images if layer in model.images else sequences).double().numpy()
        ((y_ref, gain),) = ORACLES[type(layer)](layer, x64)
        u = np.random.default_rng(3).uniform(-1.0, 1.0, size=x64.shape)
        ((y_pert, _),) = ORACLES[type(layer)](layer, x64 * (1.0 + EPS32 * u))
        y_torch = y_torch.double().numpy()
        bound = output_tolerance("float32", centering_gain=gain).pairwise()
        conditioning = float(np.abs(y_ref - y_pert).max())
        assert_within(
            np.abs(y_ort - y_torch), bound.bound(y_torch, 2 * conditioning), f"{type(layer).__name__}"
        )


# --- training mode ------------------------------------------------------------------------


def batch_statistics_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Batch norm of ``x`` (channels on axis 1) by its own statistics, in float64."""
    y, _, _ = reference.batch_norm(
        x, w, b, training=True, momentum=0.0, eps=eps, axis=1, unbiased_running_var=True
    )
    return y


def batch_statistics_conditioning(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> float:
    """How far :func:`batch_statistics_reference` moves with ``x`` perturbed by one float32 ulp."""
    u = np.random.default_rng(3).uniform(-1.0, 1.0, size=x.shape)
    exact = batch_statistics_reference(x, w, b, eps)
    return float(np.abs(exact - batch_statistics_reference(x * (1.0 + EPS32 * u), w, b, eps)).max())


class FunctionalUpdate(nn.Module):
    """normkit.batch_norm with running statistics to update, called by a module of the user's."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normkit.batch_norm(x, self.running_mean, self.running_var, training=True).y


@pytest.mark.parametrize(
    "make",
    [
        lambda: normkit_torch.BatchNorm2d(4, preset="keras"),
        lambda: normkit_torch.InstanceNorm2d(4, track_running_stats=True),
        FunctionalUpdate,
    ],
    ids=["BatchNorm2d-keras", "InstanceNorm2d-tracked", "normkit.batch_norm"],
)
def test_dynamo_refuses_to_export_a_running_statistics_update(make: Callable[[], nn.Module]) -> None:
    """The dynamo exporter would write inference-mode BatchNormalization over the running
    statistics (for the keras preset: over zeroed temporaries, so garbage): an error instead,
    and nothing changes."""
    module = make().train()
    before = copy.deepcopy(module.state_dict())
    with (
        warnings.catch_warnings(),
        pytest.raises(Exception, match=r"update running statistics.*Call model\.eval\(\) before exporting"),
    ):
        warnings.filterwarnings("ignore", "Exporting a model while it is in training mode", UserWarning)
        export(module, torch.randn(3, 4, 5, 5) + 3, "dynamo")
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_plain_torch_export_keeps_training_mode() -> None:
    """Only ONNX export refuses: torch.export of a training-mode layer (quantization-aware
    training captures those) records the running-statistics update, and the exported module
    computes what the eager one does (the same ATen calls: the same bits)."""
    module = normkit_torch.BatchNorm2d(4, preset="keras").train()
    eager = copy.deepcopy(module)
    exported = torch.export.export(module, (torch.randn(3, 4, 5, 5),)).module()
    x = torch.randn(3, 4, 5, 5) * STD + 3
    assert torch.equal(exported(x), eager(x))
    state = exported.state_dict()
    assert int(state["num_batches_tracked"]) == 1
    for key, value in eager.state_dict().items():
        assert torch.equal(state[key], value), key


def test_dynamo_exports_batch_statistics_without_running_statistics() -> None:
    """A layer in training mode without running statistics to update normalizes by its batch
    statistics: that exports, and onnxruntime computes the same."""
    case = Case(lambda: normkit_torch.BatchNorm2d(4, track_running_stats=False), (3, 4, 5, 5), None, None)
    module = trained(case, 1.0).train()
    x = data(case, 1e4, seed=7)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Exporting a model while it is in training mode", UserWarning)
        proto = export(module, x, "dynamo")
    assert_portable(proto)
    (got,) = run(proto, x.numpy())
    x64, w, b = x.double().numpy(), _np(module.weight), _np(module.bias)
    y_ref = batch_statistics_reference(x64, w, b, module.eps)
    tolerance = output_tolerance("float32", centering_gain=_gain(x64, (0, 2, 3), module.eps, _channel(w, 4)))
    bound = tolerance.bound(y_ref, batch_statistics_conditioning(x64, w, b, module.eps))
    assert_within(np.abs(got - y_ref), bound, "ORT vs float64")


@pytest.mark.parametrize("preset", ["torch", "keras"])
def test_torchscript_exports_training_mode(preset: str) -> None:
    """training=TrainingMode.TRAINING: BatchNormalization(training_mode=1), which onnxruntime
    runs with the batch statistics, as the module's forward in training mode."""
    module = normkit_torch.BatchNorm2d(4, preset=preset)
    for _ in range(3):
        module(torch.randn(8, 4, 5, 5) * STD + 3)
    x = torch.randn(8, 4, 5, 5) * STD + 3
    with torch.no_grad():
        expected = copy.deepcopy(module)(x).double().numpy()  # the export itself runs forward once
    proto = export(
        module, x, "torchscript", training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False
    )
    modes = [a.i for n in proto.graph.node if n.op_type == "BatchNormalization" for a in n.attribute
             if a.name == "training_mode"]  # fmt: skip
    assert modes == [1]
    (got,) = run(proto, x.numpy())
    x64, w, b = x.double().numpy(), _np(module.weight), _np(module.bias)
    gain = _gain(x64, (0, 2, 3), module.eps, _channel(w, 4))
    conditioning = batch_statistics_conditioning(x64, w, b, module.eps)
    bound = output_tolerance("float32", centering_gain=gain).pairwise().bound(expected, 2 * conditioning)
    assert_within(np.abs(got - expected), bound, f"{preset}: ORT vs torch in training mode")
