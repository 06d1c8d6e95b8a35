"""normkit.testtime.diagnose on normkit's own layers: the per-channel data statistics, mean
shift, log variance ratio and KL against a float64 computation from each layer's input written
here (the data itself for a layer at the model's input; a float64 replay with the reference for
a deeper one), a known shift against its analytic values within the sampling error, zero after
recalibrating on the same data, the model unchanged, the table, Markdown, plot and JSON forms,
and bad input refused. The float64 formulas and their bounds are
:func:`normkit.testing.testtime.assert_shift_matches`'s, shared with the backends' tests."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import pytest

import normkit
from normkit import reference
from normkit.testing.testtime import assert_shift_matches, shift_bounds
from normkit.testing.tolerances import EPS, assert_within
from normkit.testtime import recalibrate
from normkit.testtime.diagnose import LayerShift, ShiftReport, _x_minus_log1p, diagnose, shift_statistics

W = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)


class TwoLayerModel:
    """x (N, 3) -> bn1 (torch preset: unbiased running variance) -> tanh -> @W -> bn2 (keras
    preset: biased)."""

    def __init__(self) -> None:
        self.bn1 = normkit.BatchNorm(3)
        self.bn2 = normkit.BatchNorm(4, preset="keras", axis=1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.bn2(np.tanh(self.bn1(x)) @ W)


def batches(sizes: tuple[int, ...], loc: Any = 0.0, scale: Any = 1.0, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(loc, scale, size=(n, 3)).astype(np.float32) for n in sizes]


def trained() -> TwoLayerModel:
    model = TwoLayerModel()
    for x in batches((16,) * 8, seed=2):
        model(x)
    return model


def replay(data: list[np.ndarray], model: TwoLayerModel) -> dict[str, np.ndarray]:
    """Each layer's inputs over all batches in float64, batch by batch with the reference (bn1
    normalizing with its batch statistics, as in training)."""
    first, second = [], []
    for x in data:
        x64 = x.astype(np.float64)
        first.append(x64)
        y1, _, _ = reference.batch_norm(
            x64, model.bn1.weight, model.bn1.bias, training=True, momentum=0.0, eps=model.bn1.eps,
            axis=1, unbiased_running_var=True,
        )  # fmt: skip
        second.append(np.tanh(y1) @ W.astype(np.float64))
    return {"bn1": np.concatenate(first), "bn2": np.concatenate(second)}


def test_a_layer_at_the_input_against_the_float64_statistics_of_the_data() -> None:
    """The layer's input is the data: its statistics over unequal batches, shifted and scaled
    per channel, against the concatenated batches in float64."""
    layer = normkit.BatchNorm(3)
    for x in batches((16,) * 8, seed=2):
        layer(x)
    data = batches((2, 7, 30, 5), loc=[1.5, -0.5, 0.0], scale=[1.0, 3.0, 0.5])
    report = diagnose(layer, data, forward=layer, progress=False)
    (shift,) = report.layers
    assert shift.name == "" and shift.label == "(model)" and shift.channels == 3
    assert_shift_matches(
        shift,
        np.concatenate(data).astype(np.float64),
        layer.running_mean,
        layer.running_var,
        layer.eps,
        ddof=1,
    )
    assert shift.max_kl == shift.kl.max() and shift.worst_channel == int(np.argmax(shift.kl))
    assert shift.max_abs_z == np.abs(shift.z).max() and shift.max_abs_z_channel == int(
        np.argmax(np.abs(shift.z))
    )
    assert shift.mean_kl == pytest.approx(shift.kl.mean(), rel=4 * EPS["float64"])
    assert shift.mean_abs_log_ratio == pytest.approx(np.abs(shift.log_ratio).mean(), rel=4 * EPS["float64"])


def test_every_layer_in_model_order_against_a_float64_replay_in_both_variance_conventions() -> None:
    model = trained()
    data = batches((3, 9, 20), loc=2.0, scale=1.5, seed=5)
    report = diagnose(model, [(x, "label") for x in data], forward=model, progress=False)
    assert [layer.name for layer in report.layers] == ["bn1", "bn2"]
    inputs = replay(data, model)
    # bn1 (torch preset) stores the unbiased variance, bn2 (keras preset) the biased one
    for layer, bn, ddof in zip(report.layers, (model.bn1, model.bn2), (1, 0), strict=True):
        assert_shift_matches(layer, inputs[layer.name], bn.running_mean, bn.running_var, bn.eps, ddof=ddof)


def test_a_known_shift_gives_its_analytic_values_within_the_sampling_error() -> None:
    """Running statistics exactly N(0, 1); data N(3, 1), N(0, 4), N(0, 1) per channel. With n
    values, the sample mean's standard error is sigma/sqrt(n) and the log of the sample
    variance's about sqrt(2/(n-1)); the KL moves by its first-order change plus its second-order
    part (which is all there is for the unshifted channel). Five standard errors each."""
    layer = normkit.BatchNorm(3)
    layer(np.zeros((2, 3), np.float32))
    state = layer.state_dict()
    state.update(running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32))
    layer.load_state_dict(state)
    loc, scale = np.array([3.0, 0.0, 0.0]), np.array([1.0, 2.0, 1.0])
    data = batches((500,) * 20, loc=loc, scale=scale, seed=11)
    (shift,) = diagnose(layer, data, forward=layer, progress=False).layers
    n, eps = 10_000, layer.eps
    s_r = math.sqrt(1 + eps)
    ratio = (scale**2 + eps) / (1 + eps)
    z = loc / s_r
    kl = 0.5 * (ratio + z**2 - 1 - np.log(ratio))
    se_z = scale / math.sqrt(n) / s_r
    se_l = math.sqrt(2 / (n - 1))
    k = 5.0
    np.testing.assert_allclose(z, [3 / s_r, 0, 0])
    assert_within(np.abs(shift.z - z), k * se_z, "z")
    assert_within(np.abs(shift.log_ratio - np.log(ratio)), k * se_l, "log ratio")
    first = np.abs(z) * k * se_z + 0.5 * np.abs(ratio - 1) * k * se_l
    second = 0.5 * (k * se_z) ** 2 + 0.5 * ratio * (k * se_l) ** 2
    assert_within(np.abs(shift.kl - kl), first + second, "KL")
    assert shift.worst_channel == 0 and shift.max_abs_z_channel == 0
    assert shift.kl[0] == pytest.approx(4.5, abs=float(first[0] + second[0]) + 4.5 * eps)
    assert shift.log_ratio[1] == pytest.approx(math.log(4), abs=k * se_l + eps)


def test_recalibrating_on_the_same_data_leaves_nothing_to_diagnose() -> None:
    """After recalibrate, the running statistics are the data's (in the layer's convention), up
    to their storage in float32: every value within what that rounding allows, and KL >= 0."""
    model = trained()
    data = batches((4, 11, 6), loc=-1.0, scale=2.0, seed=3)
    before = diagnose(model, data, forward=model, progress=False)
    assert min(layer.max_kl for layer in before.layers) > 0.1
    recalibrate(model, data, forward=model, progress=False)
    after = diagnose(model, data, forward=model, progress=False)
    inputs = replay(data, model)
    for layer in after.layers:
        zero = np.zeros(layer.channels)
        magnitude = float(np.abs(inputs[layer.name]).max())
        bounds = shift_bounds(
            magnitude, layer.data_mean, layer.data_var, layer.running_var, layer.eps, z=zero, log_ratio=zero
        )
        for key in ("z", "log_ratio", "kl"):
            assert_within(np.abs(getattr(layer, key)), bounds[key], f"{layer.name} {key}")
        assert np.all(layer.kl >= 0)


def test_x_minus_log1p_to_a_few_ulps_where_subtraction_cancels() -> None:
    """KL's scale part d - log(1 + d) against 700-digit decimal arithmetic. The series (|d| <=
    1/4) rounds once per Horner step on terms that shrink 4-fold: a few ulps; the subtraction
    above loses at most x/(x - log1p x) < 10 ulps. Bound: 32 ulps. Subtracting everywhere
    loses everything near 0 (shown last)."""
    points = [
        1e-300,
        -1e-12,
        1e-12,
        3e-8,
        -1e-4,
        1e-3,
        -0.2,
        0.25,
        -0.25,
        0.2500001,
        0.3,
        -0.9,
        1.0,
        7.5,
        1e12,
    ]
    got = _x_minus_log1p(np.array(points))
    with localcontext() as context:
        context.prec = 700  # 1 + 1e-300 and its log exactly enough for x^2/2 = 5e-601
        exact = np.array([float(Decimal(p) - (1 + Decimal(p)).ln()) for p in points])
    assert_within(np.abs(got - exact), 32 * EPS["float64"] * exact, "x - log1p(x)")
    assert np.all(got >= 0)
    assert _x_minus_log1p(np.array([np.inf]))[0] == np.inf
    naive = 1e-12 - math.log1p(1e-12)
    assert abs(naive - exact[2]) > 1e6 * EPS["float64"] * exact[2]


def test_zero_variances_with_eps_zero_give_zero_where_the_statistics_agree_and_infinity_where_not() -> None:
    """eps = 0 (allowed by PyTorch and Keras): a channel constant at its running mean with a
    zero running variance diverges by 0; a zero variance on one side only, or a mean shift
    over a zero running variance, by infinity. No NaN, no warning."""
    z, log_ratio, kl = shift_statistics(
        data_mean=[1.0, 2.0, 1.0, 1.0], data_var=[0.0, 0.0, 0.0, 1.0],
        running_mean=[1.0, 1.0, 1.0, 1.0], running_var=[0.0, 0.0, 1.0, 0.0], eps=0.0,
    )  # fmt: skip
    np.testing.assert_array_equal(z, [0.0, np.inf, 0.0, 0.0])
    np.testing.assert_array_equal(log_ratio, [0.0, 0.0, -np.inf, np.inf])
    np.testing.assert_array_equal(kl, [0.0, np.inf, np.inf, np.inf])


def snapshot(model: TwoLayerModel) -> list[Any]:
    return [
        (
            layer.training,
            layer.momentum,
            {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in layer.state_dict().items()},
        )
        for layer in (model.bn1, model.bn2)
    ]


def same(a: list[Any], b: list[Any]) -> bool:
    for (mode_a, momentum_a, state_a), (mode_b, momentum_b, state_b) in zip(a, b, strict=True):
        if (mode_a, momentum_a) != (mode_b, momentum_b) or state_a.keys() != state_b.keys():
            return False
        for key in state_a:
            equal = (
                np.array_equal(state_a[key], state_b[key])
                if isinstance(state_a[key], np.ndarray)
                else state_a[key] == state_b[key]
            )
            if not equal:
                return False
    return True


def test_the_model_is_unchanged() -> None:
    model = trained()
    model.bn2.eval()  # a mixed state, kept
    before = snapshot(model)
    diagnose(model, batches((4, 6), loc=5.0), forward=model, progress=False)
    assert same(before, snapshot(model))
    assert (model.bn1.training, model.bn2.training) == (True, False)
    assert model.bn1._input_observers == () and model.bn2._input_observers == ()


def report_of_two() -> ShiftReport:
    model = trained()
    return diagnose(
        model, batches((8, 8), loc=[3.0, 0.0, 0.0], scale=[1.0, 2.0, 1.0]), forward=model, progress=False
    )


def within_printed_precision(text: str, value: float) -> bool:
    """``text`` is ``value`` to 3 significant digits (``{:.3g}``): within half a unit of the
    third digit."""
    return (
        abs(float(text) - value) <= 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 2)
        if value
        else float(text) == 0
    )


def check_row(cells: list[str], layer: LayerShift) -> None:
    name, channels, values, z_cell, log_ratio, mean_kl, max_kl = cells
    assert (
        name.strip("`") == layer.label and int(channels) == layer.channels and int(values) == layer.count[0]
    )
    z_text, channel = re.fullmatch(r"(\S+) \((\d+)\)", z_cell).groups()  # type: ignore[union-attr]
    assert int(channel) == layer.max_abs_z_channel and within_printed_precision(z_text, layer.max_abs_z)
    for text, value in (
        (log_ratio, layer.mean_abs_log_ratio),
        (mean_kl, layer.mean_kl),
        (max_kl, layer.max_kl),
    ):
        assert within_printed_precision(text, value)


def test_the_table_and_markdown_hold_the_numbers_in_model_order() -> None:
    report = report_of_two()
    header, columns, *rows = str(report).splitlines()
    assert header.startswith("diagnose: 2 layers;")
    assert re.split(r"\s{2,}", columns) == [
        "layer",
        "channels",
        "values",
        "max |z| (channel)",
        "mean |log ratio|",
        "mean KL",
        "max KL",
    ]
    assert len({len(columns)} | {len(row) for row in rows}) <= 2  # aligned (trailing blanks stripped)
    for row, layer in zip(rows, report.layers, strict=True):
        check_row(re.split(r"\s{2,}", row.strip()), layer)
    header, blank, columns, rule, *rows = report.to_markdown().splitlines()
    assert blank == "" and columns.startswith("| layer | channels |") and r"max \|z\| (channel)" in columns
    assert rule == "|:--|--:|--:|--:|--:|--:|--:|"
    for row, layer in zip(rows, report.layers, strict=True):
        check_row([cell.strip() for cell in row.strip("|").split("|")], layer)


def test_worst_and_to_dict() -> None:
    report = report_of_two()
    by_kl = sorted(report.layers, key=lambda layer: -layer.mean_kl)
    assert [layer.name for layer in report.worst(1)] == [by_kl[0].name]
    assert [layer.name for layer in report.worst(5)] == [layer.name for layer in by_kl]
    assert str(ShiftReport(report.worst(1))).splitlines()[2].startswith(by_kl[0].name)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(f"k={k!r}: expected a positive int")):
            report.worst(k)  # type: ignore[arg-type]
    loaded = json.loads(json.dumps(report.to_dict()))
    for entry, layer in zip(loaded["layers"], report.layers, strict=True):
        assert entry["name"] == layer.name and entry["count"] == layer.count.tolist()
        for key in ("data_mean", "data_var", "running_mean", "running_var", "z", "log_ratio", "kl"):
            np.testing.assert_array_equal(entry[key], getattr(layer, key))  # floats round-trip exactly
        assert entry["mean_kl"] == layer.mean_kl and entry["worst_channel"] == layer.worst_channel


def test_plot_draws_one_bar_per_layer_and_statistic() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = report_of_two()
    figure = report.plot()
    try:
        assert isinstance(figure, matplotlib.figure.Figure)
        kl_ax, z_ax = figure.axes
        heights = [bar.get_height() for bar in kl_ax.patches]
        assert heights == [layer.mean_kl for layer in report.layers] + [
            layer.max_kl for layer in report.layers
        ]
        assert [bar.get_height() for bar in z_ax.patches] == [layer.max_abs_z for layer in report.layers]
        assert kl_ax.get_yscale() == "log"
        assert [label.get_text() for label in z_ax.get_xticklabels()] == ["bn1", "bn2"]
    finally:
        plt.close(figure)
    figure, ax = plt.subplots()
    try:
        assert report.plot(ax) is figure and len(ax.patches) == 2 * len(report.layers)
        with pytest.raises(ValueError, match="ax is a sequence of 1 Axes; expected 2"):
            report.plot([ax])
    finally:
        plt.close(figure)


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ("no-norm", batches((4,)), "with no batch norm that tracks running statistics"),
        ("model", [], "batches is empty"),
        (
            "model",
            [*batches((4, 3)), np.ones((4, 5), np.float32)],
            "5 channels on axis 1, but this layer has 3",
        ),
        ("skips-bn2", batches((4,)), "no batch reached the layer(s) ['bn2']"),
    ],
    ids=["no-normalization-layer", "empty-batches", "channel-count", "unreached-layer"],
)
def test_bad_input_is_refused_and_the_layers_are_unchanged(model: str, data: list[Any], message: str) -> None:
    trained_model = trained()
    before = snapshot(trained_model)
    target: object = object() if model == "no-norm" else trained_model
    forward = (lambda x: trained_model.bn1(x)) if model == "skips-bn2" else trained_model
    with pytest.raises(ValueError, match=re.escape(message)):
        diagnose(target, data, forward=forward, progress=False)
    assert same(before, snapshot(trained_model))
    assert all(getattr(bn, "_input_observers", ()) == () for bn in (trained_model.bn1, trained_model.bn2))


def test_a_layer_without_running_statistics_is_refused_by_name_before_any_batch_runs() -> None:
    model = TwoLayerModel()
    for x in batches((8,)):
        model.bn1(x)  # bn1 trained, bn2 never called
    calls = []

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(x)
        return model(x)

    with pytest.raises(ValueError, match=re.escape("layer 'bn2' has no running statistics yet")):
        diagnose(model, batches((4,)), forward=forward, progress=False)
    assert calls == [] and model.bn2.running_mean is None and model.bn2.num_batches_tracked == 0
