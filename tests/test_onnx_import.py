"""``normkit.onnx.load_states``: ONNX normalization nodes into normkit layers.

One-node models built with ``onnx.helper`` (every operator, old and new versions, random
initializers) load into normkit layers whose eval outputs are compared with the float64
reference (:mod:`normkit.reference`, applied with the ONNX spec's formulas: per-group scale for
GroupNormalization-18, broadcasting Scale for LayerNormalization) and with onnxruntime where it
is accurate (not GroupNormalization far from 0: its function body is one-pass
:math:`E[x^2]-E[x]^2`), at mean/std 1 and 1e4 in float32, with tolerances derived from machine
epsilon and each case's conditioning as the conformance runner does. Then models exported from
PyTorch round-trip: each normkit layer built from a node evaluates as the torch module it came
from.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    agreement_tolerance,
    assert_within,
    centering_gain,
    output_tolerance,
    statistics_tolerance,
)

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from normkit.onnx import NodeState, OnnxImportError, load_states  # noqa: E402

N, C, H, W, G = 3, 6, 4, 5, 3
EPS_C = EPS["float32"]
RATIOS = (1.0, 1e4)
"""|mean|/std of the input (and of the running statistics for batch norm)."""


# -- building one-node models -------------------------------------------------------------------
def _model(
    op_type: str,
    opset: int,
    params: dict[str, np.ndarray | None],
    attributes: dict[str, Any],
    *,
    x_shape: tuple[int | str, ...] | None = (N, C, H, W),
    elem_type: int = TensorProto.FLOAT,
    name: str = "norm",
    outputs: int = 1,
) -> Any:
    """A model of one ``op_type`` node on graph input ``x``; ``params`` in input order become
    initializers (``None``: the optional input is left out)."""
    inputs, initializers = ["x"], []
    for key, value in params.items():
        inputs.append("" if value is None else key)
        if value is not None:
            initializers.append(numpy_helper.from_array(value, key))
    while inputs[-1] == "":
        inputs.pop()
    output_names = ["y"] + [f"extra{i}" for i in range(1, outputs)]
    node = helper.make_node(op_type, inputs, output_names, name=name, **attributes)
    graph = helper.make_graph(
        [node],
        "one_node",
        [helper.make_tensor_value_info("x", elem_type, x_shape)],
        [helper.make_tensor_value_info(o, elem_type, x_shape) for o in output_names],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)  # onnxruntime reads IR versions up to 10 at least
    if (op_type, opset) != ("GroupNormalization", 18):  # the checker refuses the deprecated version 18,
        onnx.checker.check_model(model)  # which exporters wrote and onnxruntime still runs
    return model


def _onnxruntime(model: Any, x: np.ndarray) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": x})[0], dtype=np.float64)


def _only(records: dict[str, NodeState]) -> NodeState:
    assert len(records) == 1, records
    return next(iter(records.values()))


# -- the cases: parameters, and the float64 reference with the ONNX spec's formulas ----------------
@dataclass(frozen=True)
class Case:
    """One ONNX operator version: its parameters and attributes for a given input, and its
    float64 output with the per-element centering gain :math:`|\\mu|\\,|\\gamma|/\\sqrt{\\sigma^2+\\epsilon}`
    (0 for RMS norm, which subtracts no mean)."""

    id: str
    op_type: str
    opset: int
    layer: str
    attributes: dict[str, Any]
    make: Callable[[np.random.Generator, float], dict[str, np.ndarray | None]]
    exact: Callable[[np.ndarray, dict[str, np.ndarray | None], float], tuple[np.ndarray, np.ndarray | float]]
    shape: tuple[int, ...] = (N, C, H, W)
    ort_accurate_far_from_zero: bool = True

    @property
    def eps(self) -> float:
        return self.attributes.get("epsilon", 1e-5)


def _channel_shape(ndim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (ndim - 2)


def _affine(rng: np.random.Generator, size: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return (
        rng.uniform(0.5, 1.5, size).astype(np.float32) * rng.choice([-1, 1], size).astype(np.float32),
        rng.normal(0.0, 1.0, size).astype(np.float32),
    )


def _bn_params(rng: np.random.Generator, ratio: float) -> dict[str, np.ndarray | None]:
    scale, bias = _affine(rng, C)
    mean = (ratio + rng.normal(0.0, 0.3, C)).astype(np.float32)  # running statistics near the data's
    var = rng.uniform(0.5, 2.0, C).astype(np.float32)
    return {"scale": scale, "B": bias, "mean": mean, "var": var}


def _bn_exact(x: np.ndarray, p: dict[str, Any], eps: float) -> tuple[np.ndarray, np.ndarray]:
    y, _, _ = reference.batch_norm(
        x, p["scale"], p["B"], p["mean"], p["var"],
        training=False, momentum=0.0, eps=eps, axis=1, unbiased_running_var=False,
    )  # fmt: skip
    shape = _channel_shape(x.ndim)
    gain = np.abs(p["mean"].astype(np.float64)) * np.abs(p["scale"]) / np.sqrt(p["var"] + eps)
    return y, np.broadcast_to(gain.reshape(shape), x.shape)


def _gain(x: np.ndarray, axes: tuple[int, ...], gamma: np.ndarray | float, eps: float) -> np.ndarray:
    """Centering gain with batch statistics over ``axes`` (one group per other index)."""
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    return np.broadcast_to(np.abs(mean) * np.abs(gamma) / np.sqrt(var + eps), x.shape)


def _in_params(rng: np.random.Generator, ratio: float) -> dict[str, np.ndarray | None]:
    scale, bias = _affine(rng, C)
    return {"scale": scale, "B": bias}


def _in_exact(x: np.ndarray, p: dict[str, Any], eps: float) -> tuple[np.ndarray, np.ndarray]:
    y, _, _ = reference.instance_norm(
        x, p["scale"], p["B"], use_input_stats=True, momentum=0.0, eps=eps, axis=1, unbiased_running_var=False
    )
    gamma = np.abs(p["scale"].astype(np.float64)).reshape(_channel_shape(x.ndim))
    return y, _gain(x, tuple(range(2, x.ndim)), gamma, eps)


def _ln_params(scale_shape: tuple[int, ...], with_bias: bool = True) -> Callable[..., dict[str, Any]]:
    def make(rng: np.random.Generator, ratio: float) -> dict[str, np.ndarray | None]:
        scale, bias = _affine(rng, scale_shape)
        return {"Scale": scale, "B": bias if with_bias else None}

    return make


def _ln_exact(axis: int) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    def exact(x: np.ndarray, p: dict[str, Any], eps: float) -> tuple[np.ndarray, np.ndarray]:
        axes = tuple(range(axis % x.ndim, x.ndim))
        z = reference.layer_norm(x, axes=axes, eps=eps)  # then ONNX's Mul(Scale), Add(B), broadcast
        y = z * p["Scale"].astype(np.float64) + (0.0 if p["B"] is None else p["B"].astype(np.float64))
        gamma = np.broadcast_to(np.abs(p["Scale"].astype(np.float64)), x.shape)
        return y, _gain(x, axes, gamma, eps)

    return exact


def _gn_params(per_group: bool) -> Callable[..., dict[str, Any]]:
    def make(rng: np.random.Generator, ratio: float) -> dict[str, np.ndarray | None]:
        scale, bias = _affine(rng, G if per_group else C)
        return {"scale": scale, "bias": bias}

    return make


def _gn_exact(per_group: bool) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    def exact(x: np.ndarray, p: dict[str, Any], eps: float) -> tuple[np.ndarray, np.ndarray]:
        blocks = (x.shape[0], G, x.shape[1] // G, *x.shape[2:])
        group_shape = (1, G, 1) + (1,) * (x.ndim - 2)
        scale, bias = (p[k].astype(np.float64) for k in ("scale", "bias"))
        if per_group:  # ONNX GroupNormalization-18: one scale and bias per group of channels
            z = reference.group_norm(x, G, eps=eps, axis=1).reshape(blocks)
            y = (z * scale.reshape(group_shape) + bias.reshape(group_shape)).reshape(x.shape)
            gamma = np.broadcast_to(np.abs(scale).reshape(group_shape), blocks).reshape(x.shape)
        else:
            y = reference.group_norm(x, G, scale, bias, eps=eps, axis=1)
            gamma = np.broadcast_to(np.abs(scale).reshape(_channel_shape(x.ndim)), x.shape)
        grouped = x.reshape(blocks)
        mean = np.broadcast_to(grouped.mean(axis=tuple(range(2, grouped.ndim)), keepdims=True), blocks)
        var = np.broadcast_to(grouped.var(axis=tuple(range(2, grouped.ndim)), keepdims=True), blocks)
        gain = np.abs(mean.reshape(x.shape)) * gamma / np.sqrt(var.reshape(x.shape) + eps)
        return y, gain

    return exact


def _rms_params(scale_shape: tuple[int, ...]) -> Callable[..., dict[str, Any]]:
    def make(rng: np.random.Generator, ratio: float) -> dict[str, np.ndarray | None]:
        return {"scale": _affine(rng, scale_shape)[0]}

    return make


def _rms_exact(axis: int) -> Callable[..., tuple[np.ndarray, float]]:
    def exact(x: np.ndarray, p: dict[str, Any], eps: float) -> tuple[np.ndarray, float]:
        axes = tuple(range(axis % x.ndim, x.ndim))
        return reference.rms_norm(x, axes=axes, eps=eps) * p["scale"].astype(np.float64), 0.0

    return exact


CASES = [
    Case(
        "BN-15",
        "BatchNormalization",
        15,
        "BatchNorm",
        {"epsilon": 1e-3, "momentum": 0.8},
        _bn_params,
        _bn_exact,
    ),
    Case("BN-14", "BatchNormalization", 14, "BatchNorm", {"training_mode": 0}, _bn_params, _bn_exact),
    Case(
        "BN-9",
        "BatchNormalization",
        9,
        "BatchNorm",
        {"epsilon": 1e-4, "momentum": 0.95},
        _bn_params,
        _bn_exact,
    ),
    Case("BN-7", "BatchNormalization", 7, "BatchNorm", {"spatial": 1}, _bn_params, _bn_exact),
    Case("IN-6", "InstanceNormalization", 13, "InstanceNorm", {"epsilon": 1e-3}, _in_params, _in_exact),
    Case("IN-22", "InstanceNormalization", 22, "InstanceNorm", {}, _in_params, _in_exact),
    Case("LN-17 axis=-1", "LayerNormalization", 17, "LayerNorm", {}, _ln_params((W,)), _ln_exact(-1)),
    Case(
        "LN-17 axis=1",
        "LayerNormalization",
        17,
        "LayerNorm",
        {"axis": 1, "epsilon": 1e-3},
        _ln_params((C, H, W)),
        _ln_exact(1),
    ),
    Case(
        "LN-17 axis=-2, Scale broadcast, no B",
        "LayerNormalization",
        17,
        "LayerNorm",
        {"axis": -2},
        _ln_params((W,), with_bias=False),
        _ln_exact(-2),
    ),
    Case(
        "GN-18 per-group scale",
        "GroupNormalization",
        18,
        "GroupNorm",
        {"num_groups": G},
        _gn_params(per_group=True),
        _gn_exact(per_group=True),
        ort_accurate_far_from_zero=False,
    ),
    Case(
        "GN-21",
        "GroupNormalization",
        21,
        "GroupNorm",
        {"num_groups": G, "epsilon": 1e-4},
        _gn_params(per_group=False),
        _gn_exact(per_group=False),
        ort_accurate_far_from_zero=False,
    ),
    Case("RMS-23 axis=-1", "RMSNormalization", 23, "RMSNorm", {}, _rms_params((W,)), _rms_exact(-1)),
    Case(
        "RMS-23 axis=-2",
        "RMSNormalization",
        23,
        "RMSNorm",
        {"axis": -2, "epsilon": 1e-6},
        _rms_params((H, W)),
        _rms_exact(-2),
    ),
]


def _bound(case: Case, x64: np.ndarray, params: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(exact output, bound)``: the runner's policy, :math:`r|y| + r + K\\Delta` plus the
    centering term :math:`2\\epsilon_c g`, with the conditioning :math:`\\Delta` measured by
    perturbing every input by one unit in the last place of float32."""
    y_ref, gain = case.exact(x64, params, case.eps)
    u = np.random.default_rng([seed, 7]).uniform(-1.0, 1.0, size=x64.shape)
    y_perturbed, _ = case.exact(x64 * (1.0 + EPS_C * u), params, case.eps)
    conditioning = float(np.abs(y_ref - y_perturbed).max())
    bound = output_tolerance("float32").bound(y_ref, conditioning) + CENTERING_FACTOR * EPS_C * gain
    return y_ref, bound


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"mean/std={r:g}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_one_node_evaluates_as_the_reference_and_onnxruntime(case: Case, ratio: float) -> None:
    seed = CASES.index(case) * 10 + RATIOS.index(ratio)
    rng = np.random.default_rng(seed)
    params = case.make(rng, ratio)
    model = _model(case.op_type, case.opset, params, case.attributes, x_shape=case.shape)
    record = _only(load_states(model))

    assert (record.name, record.op_type, record.opset, record.layer_name) == (
        "norm", case.op_type, case.opset, case.layer,
    )  # fmt: skip
    assert record.options["preset"] == "onnx"
    assert record.options["eps"] == case.eps  # the float32 attribute read back as the number written
    if case.op_type == "BatchNormalization":
        assert record.options["momentum"] == case.attributes.get("momentum", 0.9)

    x = (ratio + rng.normal(0.0, 1.0, case.shape)).astype(np.float32)
    x64 = x.astype(np.float64)
    layer = record.layer()
    assert not layer.training
    y = np.asarray(layer(x), dtype=np.float64)
    assert y.dtype == np.float64 and layer(x).dtype == np.float32
    y_ref, bound = _bound(case, x64, params, seed)
    assert_within(np.abs(y - y_ref), bound, f"{case.id}: normkit vs the float64 reference")

    if ratio > 1 and not case.ort_accurate_far_from_zero:
        return  # onnxruntime's GroupNormalization is one-pass E[x^2]-E[x]^2: NaN here
    y_ort = _onnxruntime(model, x)
    assert_within(np.abs(y_ort - y_ref), bound, f"{case.id}: onnxruntime vs the float64 reference")
    assert_within(np.abs(y - y_ort), 2 * bound, f"{case.id}: normkit vs onnxruntime")


def test_group_norm_18_scale_is_repeated_over_each_group() -> None:
    scale, bias = np.arange(1, G + 1, dtype=np.float32), -np.arange(1, G + 1, dtype=np.float32)
    record = _only(load_states(_model("GroupNormalization", 18, {"s": scale, "b": bias}, {"num_groups": G})))
    state = record.state_dict()
    per_group = C // G
    assert state["weight"].tolist() == [float(1 + c // per_group) for c in range(C)]
    assert state["bias"].tolist() == [-float(1 + c // per_group) for c in range(C)]
    assert record.options["num_channels"] == C and record.options["num_groups"] == G


def test_double_parameters_give_a_float64_state_and_half_ones_float32() -> None:
    rng = np.random.default_rng(3)
    params = {k: v.astype(np.float64) for k, v in _bn_params(rng, 1.0).items()}
    model = _model("BatchNormalization", 15, params, {}, elem_type=TensorProto.DOUBLE)
    record = _only(load_states(model))
    state = record.state_dict()
    assert {state[k].dtype for k in ("weight", "bias", "running_mean", "running_var")} == {
        np.dtype(np.float64)
    }
    x = rng.normal(1.0, 1.0, (N, C, H, W))
    y_ref, gain = _bn_exact(x, params, 1e-5)
    bound = output_tolerance("float64").bound(y_ref, 0.0) + CENTERING_FACTOR * EPS["float64"] * gain
    assert_within(np.abs(record.layer()(x) - y_ref), bound, "float64 batch norm vs the reference")
    # BatchNormalization-15 lets the statistics' type differ from X's: float16 ones are widened
    mixed = dict(params, scale=params["scale"].astype(np.float32), B=params["B"].astype(np.float32))
    mixed.update(mean=params["mean"].astype(np.float16), var=params["var"].astype(np.float16))
    state = _only(load_states(_model("BatchNormalization", 15, mixed, {}))).state_dict()
    assert state["running_var"].dtype == np.float32
    assert np.array_equal(state["running_var"], mixed["var"].astype(np.float32))


def test_training_mode_batch_norm_updates_running_statistics_as_the_spec_and_onnxruntime() -> None:
    """ONNX's momentum weights the old running value, and the running variance takes the
    population (biased) batch variance: the ``onnx`` preset's conventions, so a loaded layer
    trains on as the node does."""
    rng = np.random.default_rng(5)
    params = _bn_params(rng, 1.0)
    momentum = 0.8
    model = _model("BatchNormalization", 15, params, {"training_mode": 1, "momentum": momentum}, outputs=3)
    for output, shape in zip(model.graph.output[1:], ([C], [C]), strict=True):  # running_mean, running_var
        output.CopyFrom(helper.make_tensor_value_info(output.name, TensorProto.FLOAT, shape))
    record = _only(load_states(model))
    assert record.attributes["training_mode"] == 1
    layer = record.layer().train()
    x = rng.normal(3.0, 2.0, (N, C, H, W)).astype(np.float32)
    y = layer(x)

    def exact(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return reference.batch_norm(  # type: ignore[return-value]
            data, params["scale"], params["B"], params["mean"], params["var"],
            training=True, momentum=1.0 - momentum, eps=1e-5, axis=1, unbiased_running_var=False,
        )  # fmt: skip

    x64 = x.astype(np.float64)
    y_ref, mean_ref, var_ref = exact(x64)
    y_pert, mean_pert, var_pert = exact(x64 * (1.0 + EPS_C * rng.uniform(-1.0, 1.0, x.shape)))
    gain = _gain(x64, (0, 2, 3), np.abs(params["scale"]).reshape(1, C, 1, 1), 1e-5)
    bound = (
        output_tolerance("float32").bound(y_ref, float(np.abs(y_ref - y_pert).max()))
        + CENTERING_FACTOR * EPS_C * gain
    )
    magnitude = float(np.abs(x64).max())
    statistics = {
        "running_mean": (
            mean_ref,
            statistics_tolerance("float32", "mean", magnitude).bound(
                mean_ref, float(np.abs(mean_ref - mean_pert).max())
            ),
        ),
        "running_var": (
            var_ref,
            statistics_tolerance("float32", "var", magnitude).bound(
                var_ref, float(np.abs(var_ref - var_pert).max())
            ),
        ),
    }
    assert_within(np.abs(y - y_ref), bound, "training output vs the reference")
    for key, (ref, statistic_bound) in statistics.items():
        assert_within(np.abs(getattr(layer, key) - ref), statistic_bound, f"{key} vs the reference")
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ort, mean_ort, var_ort = session.run(None, {"x": x})
    assert_within(np.abs(y_ort - y_ref), bound, "onnxruntime's training output vs the reference")
    for got, (key, (ref, statistic_bound)) in zip((mean_ort, var_ort), statistics.items(), strict=True):
        assert_within(np.abs(got - ref), statistic_bound, f"onnxruntime's {key} vs the reference")


# -- records --------------------------------------------------------------------------------------
def _bn_model(**kwargs: Any) -> Any:
    return _model("BatchNormalization", 15, _bn_params(np.random.default_rng(0), 1.0), {}, **kwargs)


def test_records_are_keyed_by_name_in_graph_order_and_immutable(tmp_path: pathlib.Path) -> None:
    model = _bn_model(name="")
    ln = helper.make_node("LayerNormalization", ["y", "ln_scale"], ["z"], name="ln", axis=-1)
    model.graph.node.append(ln)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(W, np.float32), "ln_scale"))
    model.graph.output[0].name = "z"
    relu = helper.make_node("Relu", ["z"], ["r"])  # not a normalization: ignored
    model.graph.node.append(relu)
    model.graph.output[0].name = "r"
    model.opset_import[0].version = 17
    onnx.checker.check_model(model)
    records = load_states(model)
    assert list(records) == ["BatchNormalization_0", "ln"]
    assert records["BatchNormalization_0"].version == 15 and records["BatchNormalization_0"].opset == 17
    assert records["ln"].options["bias"] is False and records["ln"].options["normalized_shape"] == (W,)

    record = records["BatchNormalization_0"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.options["eps"] = 1.0  # type: ignore[index]
    state = record.state_dict()
    state["weight"][:] = 0.0
    assert record.state_dict()["weight"].any(), "state_dict() must hand out copies"
    assert state["num_batches_tracked"] == 0 and state["_metadata"]["preset"] == "onnx"

    path = tmp_path / "model.onnx"  # a path, as str or os.PathLike, loads the same records
    onnx.save(model, path)
    for given in (path, str(path)):
        again = load_states(given)
        assert list(again) == list(records)
        assert np.array_equal(again["ln"].state_dict()["weight"], records["ln"].state_dict()["weight"])


def test_state_round_trips_through_normkit_state_files(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("safetensors")
    record = _only(load_states(_bn_model()))
    normkit.save_state(record.state_dict(), tmp_path / "bn.safetensors")
    layer = normkit.BatchNorm.from_state_dict(normkit.load_state(tmp_path / "bn.safetensors")).eval()
    x = np.random.default_rng(1).normal(1.0, 1.0, (N, C, H, W)).astype(np.float32)
    assert np.array_equal(layer(x), record.layer()(x))


def test_layer_puts_the_state_in_another_backend() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("normkit_torch")
    record = _only(load_states(_bn_model()))
    layer = record.layer(backend="torch")
    assert isinstance(layer.running_var, torch.Tensor) and not layer.training
    x = np.random.default_rng(2).normal(1.0, 1.0, (N, C, H, W)).astype(np.float32)
    state = record.state_dict()
    gain = centering_gain(state["running_mean"], state["running_var"], 1e-5, state["weight"])
    expected = record.layer()(x)
    tolerance = agreement_tolerance("float32", centering_gain=gain)
    assert_within(
        np.abs(layer(torch.from_numpy(x)).numpy() - expected),
        tolerance.bound(expected, 0.0),
        "torch vs NumPy",
    )
    with pytest.raises(ValueError, match="device='cpu' needs backend="):
        record.layer(device="cpu")


def test_constant_node_parameters_are_read() -> None:
    model = _bn_model()
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "scale"))
    del model.graph.initializer[[t.name for t in model.graph.initializer].index("scale")]
    constant = helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(scale))
    model.graph.node.insert(0, constant)
    record = load_states(model)["norm"]
    assert np.array_equal(record.state_dict()["weight"], scale)


def test_other_domains_and_models_without_norms_give_nothing() -> None:
    node = helper.make_node("LayerNormalization", ["x", "s"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.ones(3, np.float32), "s")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    assert load_states(model) == {}


# -- bad input ------------------------------------------------------------------------------------
def test_a_scale_that_is_not_a_constant_is_an_error_naming_the_node_and_input() -> None:
    model = _bn_model()
    del model.graph.initializer[[t.name for t in model.graph.initializer].index("scale")]
    model.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, [C]))
    with pytest.raises(
        OnnxImportError,
        match=r"node 'norm' \(BatchNormalization-15\): input 1 \(scale\) is 'scale', a graph input",
    ):
        load_states(model)
    model = _bn_model()
    model.graph.node.insert(0, helper.make_node("Identity", ["scale"], ["scale_copy"], name="copy"))
    model.graph.node[1].input[1] = "scale_copy"
    with pytest.raises(
        OnnxImportError, match=r"input 1 \(scale\) is 'scale_copy', the output of Identity node 'copy'"
    ):
        load_states(model)


@pytest.mark.parametrize("model", [3, b"\x08\x07", None, "not-a-model.txt"], ids=repr)
def test_model_of_the_wrong_type_or_missing_is_an_error_naming_model(model: Any) -> None:
    expected = FileNotFoundError if isinstance(model, str) else TypeError
    with pytest.raises(expected, match="model"):
        load_states(model)
    with pytest.raises(
        TypeError, match=r"model is a onnx\.onnx_ml_pb2\.GraphProto; expected an onnx\.ModelProto"
    ):
        load_states(_bn_model().graph)


def test_unsupported_versions_and_attributes_are_refused_clearly() -> None:
    params = _bn_params(np.random.default_rng(0), 1.0)
    old = _model("BatchNormalization", 6, params, {"is_test": 1})
    with pytest.raises(OnnxImportError, match=r"BatchNormalization-6\): version 6 .* versions 7, 9, 14, 15"):
        load_states(old)
    spatial = _model("BatchNormalization", 7, params, {"spatial": 0})
    with pytest.raises(OnnxImportError, match="spatial=0"):
        load_states(spatial)
    scale, bias = _affine(np.random.default_rng(0), G)
    unknown_channels = _model(
        "GroupNormalization", 18, {"s": scale, "b": bias}, {"num_groups": G}, x_shape=("n", "c", H, W)
    )
    with pytest.raises(OnnxImportError, match=r"GroupNormalization-18\).*number of channels X\.shape\[1\]"):
        load_states(unknown_channels)
    bad_shape = _model(
        "InstanceNormalization", 13, {"s": np.ones((C, 1), np.float32), "b": np.zeros(C, np.float32)}, {}
    )
    with pytest.raises(OnnxImportError, match=r"input 1 \(scale\) has shape \(6, 1\); expected \(C,\)"):
        load_states(bad_shape)
    across = _model("LayerNormalization", 17, {"s": np.ones((C, 1, 1), np.float32)}, {"axis": -1})
    with pytest.raises(
        OnnxImportError, match=r"Scale has shape \(6, 1, 1\), which varies along axes outside"
    ):
        load_states(across)
    twice = _bn_model()
    twice.graph.node.append(
        helper.make_node("BatchNormalization", ["y", "scale", "B", "mean", "var"], ["y2"], name="norm")
    )
    with pytest.raises(OnnxImportError, match="same key"):
        load_states(twice)


# -- round trips from PyTorch -------------------------------------------------------------------
def _torch_model(torch: Any, layers: dict[str, Any]) -> Any:
    """``layers`` in sequence, their affine parameters random and their running statistics
    trained on N(3, 2) data for a few batches; in eval mode."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleDict(layers)

        def forward(self, x: Any) -> Any:
            for layer in self.layers.values():
                x = layer(x)
            return x

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for module in net.layers.values():
            if getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                module.bias.normal_()
        net.train()
        for _ in range(5):
            net(torch.randn(N, C, H, W) * 2 + 3)
    return net.eval()


def _torch_gain(torch: Any, name: str, module: Any, x: np.ndarray) -> float:
    """Centering gain of one module's eval call: running statistics for batch norm (and instance
    norm that tracks them), the input's own per-group statistics otherwise; 0 for RMS norm."""
    weight = (
        None if getattr(module, "weight", None) is None else module.weight.detach().numpy().astype(np.float64)
    )
    if isinstance(module, torch.nn.RMSNorm):
        return 0.0
    if getattr(module, "track_running_stats", False):
        return centering_gain(module.running_mean.numpy(), module.running_var.numpy(), module.eps, weight)
    if isinstance(module, torch.nn.LayerNorm):
        return centering_gain(x.mean(-1), x.var(-1), module.eps, None) * float(np.abs(weight).max())
    groups = module.num_groups if isinstance(module, torch.nn.GroupNorm) else C
    blocks = x.reshape(N, groups, -1)
    return centering_gain(blocks.mean(-1), blocks.var(-1), module.eps, None) * float(np.abs(weight).max())


def _check_round_trip(torch: Any, net: Any, records: dict[str, NodeState], expected_ops: list[str]) -> None:
    assert [r.op_type for r in records.values()] == expected_ops
    x = (torch.randn(N, C, H, W) * 2 + 3).numpy()
    for (name, module), record in zip(net.layers.items(), records.values(), strict=True):
        with torch.no_grad():
            y_torch = module(torch.from_numpy(x)).numpy()
        layer = record.layer()
        if name == "instance_tracked":
            # eval with running statistics: torch decomposes it into a batch norm of a (1, N*C, H, W)
            # view with the statistics and affine tiled N times, and exports that node
            assert record.op_type == "BatchNormalization" and record.options["num_features"] == N * C
            y = layer(x.reshape(1, N * C, H, W)).reshape(x.shape)
        else:
            y = layer(x)
        tolerance = agreement_tolerance("float32", centering_gain=_torch_gain(torch, name, module, x))
        assert_within(
            np.abs(y.astype(np.float64) - y_torch), tolerance.bound(y_torch, 0.0), f"{name} ({record.name})"
        )


def _norms(torch: Any, *names: str) -> dict[str, Any]:
    make = {
        "batch": lambda: torch.nn.BatchNorm2d(C),
        "instance_tracked": lambda: torch.nn.InstanceNorm2d(C, affine=True, track_running_stats=True),
        "instance": lambda: torch.nn.InstanceNorm2d(C, affine=True),
        "group": lambda: torch.nn.GroupNorm(G, C),
        "layer": lambda: torch.nn.LayerNorm(W),
        "rms": lambda: torch.nn.RMSNorm(W),
    }
    return {name: make[name]() for name in names}


# the dynamo exporter's pytree helpers call a deprecated torch API (a torch matter, not normkit's)
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_torch_dynamo_export_round_trips() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    net = _torch_model(torch, _norms(torch, "batch", "instance_tracked", "instance", "group", "layer", "rms"))
    program = torch.onnx.export(net, (torch.randn(N, C, H, W),), dynamo=True, opset_version=23, verbose=False)
    records = load_states(program.model_proto)
    expected = ["BatchNormalization", "BatchNormalization", "InstanceNormalization"]
    _check_round_trip(
        torch, net, records, [*expected, "GroupNormalization", "LayerNormalization", "RMSNormalization"]
    )
    assert records[list(records)[-1]].options["cast"] == "before_weight"


# the TorchScript exporter is deprecated and says so; it traces, and warns about the instance
# norm it exports with batch statistics as it should (torch's own messages, not normkit's)
@pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"
)
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:ONNX export mode is set to TrainingMode.EVAL:UserWarning")
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean might cause the trace")
def test_torch_torchscript_export_round_trips_and_refuses_computed_statistics() -> None:
    torch = pytest.importorskip("torch")
    # TorchScript cannot export nn.RMSNorm; it exports GroupNorm as InstanceNormalization on a
    # reshape with the affine in separate Mul/Add nodes (not a GroupNormalization)
    net = _torch_model(torch, _norms(torch, "batch", "instance", "layer"))
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(N, C, H, W),), buffer, dynamo=False, opset_version=17)
    records = load_states(onnx.load_from_string(buffer.getvalue()))
    _check_round_trip(
        torch, net, records, ["BatchNormalization", "InstanceNormalization", "LayerNormalization"]
    )

    # an instance norm that tracks running statistics: TorchScript computes the tiled statistics
    # with Expand/Tile nodes at run time, so they are not constants
    net = _torch_model(torch, _norms(torch, "instance_tracked"))
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(N, C, H, W),), buffer, dynamo=False, opset_version=17)
    with pytest.raises(
        OnnxImportError, match=r"\(BatchNormalization-15\): input 1 \(scale\) is .*the output of Tile node"
    ):
        load_states(onnx.load_from_string(buffer.getvalue()))
