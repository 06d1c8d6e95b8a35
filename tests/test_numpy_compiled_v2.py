"""The compiled (numba) kernels of spec v2 against the float64 reference, called through their glue
(:func:`normkit.numpy_backend.compiled.group_norm`, ``rms_norm``, ``moments``) so that each test
knows which layout it reaches and that the compiled path took it (the glue returns ``None`` for a
call it leaves to the pure-NumPy path).

Layouts: group norm in rows (channels-first: one contiguous run per group, written channel by
channel or through per-value coefficients when a channel's run is short; runs over several rows)
and columns (channels-last: ``C/G`` adjacent channels of every row); RMS norm over one and
several trailing axes with both cast orders; moments over trailing (rows) and leading (columns)
axes, the batch-norm and instance-norm layouts, channel groups, masks (random, broadcast, a group
with nothing kept, NaN under the mask) and a whole-array reduction cut into parallel ranges.
Every output is held to the bounds of :mod:`normkit.testing.tolerances` (the output tolerance,
the case's conditioning from a perturbed input, the centering term for the mean subtracted) and
every statistic to :func:`normkit.testing.primitives.moments_bounds`.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from normkit import reference
from normkit.numpy_backend import numpy_dtype
from normkit.testing.primitives import moments_bounds
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    assert_within,
    compute_dtype,
    output_tolerance,
)

numba = pytest.importorskip("numba")
glue = pytest.importorskip("normkit.numpy_backend.compiled")
loops = pytest.importorskip("normkit.numpy_backend.numba_loops")

HAS_BFLOAT16 = importlib.util.find_spec("ml_dtypes") is not None
HALF_DTYPES = [
    "float16",
    pytest.param("bfloat16", marks=pytest.mark.skipif(not HAS_BFLOAT16, reason="ml_dtypes")),
]


def _data(seed: int, shape: tuple[int, ...], dtype: str, loc: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(loc, scale, size=shape).astype(numpy_dtype(dtype))


def _conditioning(function, x64: np.ndarray, dtype: str, seed: int) -> float:
    r"""How far the exact output moves when every input is perturbed by one unit in the last place
    of the compute dtype, :math:`x(1 + \epsilon_c u)` (the runner's definition)."""
    u = np.random.default_rng([seed, 7]).uniform(-1.0, 1.0, size=x64.shape)
    return float(np.abs(function(x64) - function(x64 * (1.0 + EPS[compute_dtype(dtype)] * u))).max())


# --- group norm ----------------------------------------------------------------------------------


def _group_statistics(x64: np.ndarray, num_groups: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-channel float64 mean and biased variance of each channel's group, shaped
    to broadcast against ``x`` (from :func:`normkit.reference.moments`)."""
    moved = np.moveaxis(x64, axis, 1)
    blocks = moved.reshape(moved.shape[0], num_groups, -1)
    count, mean, m2 = reference.moments(blocks, (2,))
    per_group = moved.shape[1] // num_groups
    shape = moved.shape[:2] + (1,) * (moved.ndim - 2)
    mean = np.repeat(mean, per_group, axis=1).reshape(shape)
    var = np.repeat(m2 / count, per_group, axis=1).reshape(shape)
    return np.moveaxis(mean, 1, axis), np.moveaxis(var, 1, axis)


def _check_group_norm(
    y: np.ndarray, x: np.ndarray, num_groups: int, weight, bias, eps: float, axis: int, seed: int = 0
) -> None:
    """``y`` against :func:`normkit.reference.group_norm`, within the output tolerance plus K times
    the case's conditioning plus the centering term :math:`2\\epsilon_c|\\mu||\\gamma|/\\sqrt{\\sigma^2+\\epsilon}`
    of each element's group (the runner's bound)."""
    dtype = x.dtype.name
    assert y.dtype == x.dtype and y.shape == x.shape
    x64 = x.astype(np.float64)

    def exact(values: np.ndarray) -> np.ndarray:
        return reference.group_norm(values, num_groups, weight, bias, eps=eps, axis=axis)

    expected = exact(x64)
    mean, var = _group_statistics(x64, num_groups, axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    gamma = 1.0 if weight is None else np.abs(np.asarray(weight, np.float64)).reshape(shape)
    centering = CENTERING_FACTOR * EPS[compute_dtype(dtype)] * np.abs(mean) * gamma / np.sqrt(var + eps)
    bound = output_tolerance(dtype).bound(expected, _conditioning(exact, x64, dtype, seed)) + centering
    assert_within(np.abs(y.astype(np.float64) - expected), bound, f"group norm {x.shape} axis={axis} {dtype}")


def _affine(channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 1])
    return rng.uniform(0.5, 2.0, channels).astype(np.float32), rng.normal(0.0, 1.0, channels).astype(
        np.float32
    )


GROUP_LAYOUTS = [
    # (id, shape, axis, groups, layout): "rows/channel" and "rows/value" are group_norm_rows writing
    # y channel by channel or through per-value coefficients; "rows/ranges" the statistics of
    # ranges of few groups, then y; "columns" the channels-last path
    ("nchw-rows", (4, 32, 9, 9), 1, 8, "rows/channel"),  # a run of 4 x 81 values per group
    ("nchw-rows-blocks", (2, 4, 700), 1, 2, "rows/channel"),  # runs of 1400: 2 blocks of 512 + a tail
    ("nchw-short-runs", (6, 12, 3, 3), 1, 3, "rows/value"),  # 9 values per channel
    ("nc", (5, 64), 1, 4, "rows/value"),  # one value per channel
    ("middle-axis-rows", (2, 5, 4, 300), 2, 2, "rows/channel"),  # 5 runs of 600 per group
    ("nhwc-columns", (4, 10, 10, 32), 3, 8, "columns"),  # 4 adjacent channels of 100 rows
    ("nhwc-many-parts", (2, 64, 64, 64), 3, 16, "columns"),  # 16 blocks of 256 rows, 4 ranges per sample
    ("nlc-columns", (3, 50, 6), 2, 2, "columns"),  # 3-D channels-last
    ("nhwc-one-group", (2, 8, 8, 600), 3, 1, "rows/value"),  # one group: 64 runs of 600
    ("one-sample-one-group", (1, 6, 70, 70), 1, 1, "rows/ranges"),  # fewer groups than threads
]


@pytest.mark.parametrize(
    ("shape", "axis", "groups"), [case[1:4] for case in GROUP_LAYOUTS], ids=[c[0] for c in GROUP_LAYOUTS]
)
@pytest.mark.parametrize("dtype", ["float32", "float64", *HALF_DTYPES])
def test_group_norm_layouts_match_the_reference(shape, axis, groups, dtype) -> None:
    x = _data(1, shape, dtype, loc=3.0, scale=2.0)
    weight, bias = _affine(shape[axis], 1)
    y = glue.group_norm(x, groups, weight, bias, 1e-5, axis, None)
    assert y is not None, "the compiled path must take this layout"
    _check_group_norm(y, x, groups, weight, bias, 1e-5, axis)


def test_the_layouts_are_the_ones_named() -> None:
    """The layout table above is what the glue decides (a change of thresholds must update it)."""
    for _, shape, axis, groups, layout in GROUP_LAYOUTS:
        rows, channels, inner = glue._split(shape, axis, 1)
        run = channels // groups * inner
        if not glue._rows_layout(run, rows):
            taken = "columns"
        elif inner < loops.GROUP_INNER:
            taken = "rows/value"
        elif shape[0] * groups < numba.get_num_threads():
            taken = "rows/ranges"
        else:
            taken = "rows/channel"
        if layout == "rows/ranges" and numba.get_num_threads() == 1:
            layout = "rows/channel"  # one thread: every group count is enough
        assert taken == layout, (shape, axis, groups)


@pytest.mark.parametrize(
    ("shape", "axis", "groups"),
    [((4, 32, 12, 12), 1, 8), ((4, 12, 12, 32), 3, 8), ((2, 6, 40, 40), 1, 2)],
    ids=["channels-first", "channels-last", "channels-first-1600"],
)
@pytest.mark.parametrize(("dtype", "loc"), [("float32", 1e4), ("float64", 1e4), ("float16", 300.0)])
def test_group_norm_at_a_large_offset(shape, axis, groups, dtype, loc) -> None:
    """|mean|/std = 1e4 in float32 and float64 (E[x²]−E[x]² loses every digit there), and
    float16 values around 300 (their squares overflow float16)."""
    x = _data(2, shape, dtype, loc=loc)
    weight, bias = _affine(shape[axis], 2)
    y = glue.group_norm(x, groups, weight, bias, 1e-5, axis, None)
    _check_group_norm(y, x, groups, weight, bias, 1e-5, axis, seed=2)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((3, 16, 8, 8), 1), ((3, 8, 8, 16), 3), ((3, 16, 3, 3), 1), ((1, 16, 40, 40), 1)],
    ids=["rows", "columns", "short-runs", "ranges"],
)
@pytest.mark.parametrize("dtype", ["float32", "float64", *HALF_DTYPES])
def test_a_constant_group_normalizes_to_beta_exactly(shape, axis, dtype) -> None:
    x = _data(3, shape, dtype, loc=7.0)
    moved = np.moveaxis(x, axis, 1)  # a view: writes land in x
    sample = x.shape[0] // 2  # 1 of 3, or the only one
    moved[sample, 4:8] = np.asarray(7.1, dtype=x.dtype)  # group 1 of 4
    weight, bias = _affine(shape[axis], 3)
    y = glue.group_norm(x, 4, weight, bias, 1e-5, axis, None)
    beta = bias[4:8].astype(x.dtype).reshape((4,) + (1,) * (x.ndim - 2))
    got = np.moveaxis(y, axis, 1)[sample, 4:8]
    np.testing.assert_array_equal(got, np.broadcast_to(beta, got.shape))
    _check_group_norm(y, x, 4, weight, bias, 1e-5, axis)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((4, 16, 9, 9), 1), ((4, 9, 9, 16), 3), ((1, 4, 40, 40), 1)],
    ids=["rows", "columns", "ranges"],
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_group_norm_writes_exactly_y_into_out(shape, axis, dtype) -> None:
    x = _data(4, shape, dtype, loc=1.0)
    weight, bias = _affine(shape[axis], 4)
    expected = glue.group_norm(x, 4, weight, bias, 1e-5, axis, None)
    out = np.empty_like(x)
    assert glue.group_norm(x, 4, weight, bias, 1e-5, axis, out) is out
    np.testing.assert_array_equal(out, expected)
    inplace = x.copy()
    assert glue.group_norm(inplace, 4, weight, bias, 1e-5, axis, inplace) is inplace
    np.testing.assert_array_equal(inplace, expected)
    _check_group_norm(expected, x, 4, weight, bias, 1e-5, axis)


def test_group_norm_without_affine_and_on_strided_input() -> None:
    wide = _data(5, (4, 12, 6, 20), "float32", loc=-2.0)
    x = wide[..., ::2]
    before = x.copy()
    y = glue.group_norm(x, 3, None, None, 1e-5, 1, None)
    np.testing.assert_array_equal(x, before)
    _check_group_norm(y, x, 3, None, None, 1e-5, 1)


def test_group_norm_leaves_empty_input_to_the_pure_path() -> None:
    assert glue.group_norm(np.empty((0, 8, 4), np.float32), 2, None, None, 1e-5, 1, None) is None


# --- RMS norm ------------------------------------------------------------------------------------


def _check_rms_norm(
    y: np.ndarray, x: np.ndarray, weight, axes, eps, offset, before: bool, seed: int = 0
) -> None:
    """``y`` against :func:`normkit.reference.rms_norm` within the output tolerance plus K times
    the conditioning. For ``before`` on half-precision input with a weight the reference rounds
    the normalized value to the input dtype first (the spec's named rounding), and the bound
    adds one unit in the last place of the input dtype of it, times the weight (the float32 value
    may round to the neighbour of the exact value's rounding), as the conformance runner does."""
    dtype = x.dtype.name
    assert y.dtype == x.dtype and y.shape == x.shape
    x64 = x.astype(np.float64)

    def exact(values: np.ndarray) -> np.ndarray:
        return reference.rms_norm(values, weight, axes=axes, eps=eps, weight_offset=offset)

    expected = exact(x64)
    bound = output_tolerance(dtype).bound(expected, _conditioning(exact, x64, dtype, seed))
    if before and weight is not None and dtype in ("float16", "bfloat16"):
        unit = reference.rms_norm(x64, None, axes=axes, eps=eps)
        scale = np.asarray(weight, np.float64) + offset
        expected = unit.astype(x.dtype).astype(np.float64) * scale
        bound = bound + EPS[dtype] * np.abs(unit) * np.abs(scale)
    assert_within(
        np.abs(y.astype(np.float64) - expected), bound, f"rms norm {x.shape} {dtype} before={before}"
    )


RMS_SHAPES = [((16, 768), (1,)), ((4, 6, 70), (1, 2)), ((3, 1500), (1,)), ((64, 5), (1,)), ((10,), (0,))]


@pytest.mark.parametrize(
    ("shape", "axes"), RMS_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None
)
@pytest.mark.parametrize("dtype", ["float32", "float64", *HALF_DTYPES])
@pytest.mark.parametrize("before", [False, True], ids=["after-weight", "before-weight"])
def test_rms_norm_matches_the_reference(shape, axes, dtype, before) -> None:
    x = _data(6, shape, dtype, loc=0.5, scale=3.0)
    weight = np.random.default_rng(6).uniform(-1.0, 2.0, [shape[a] for a in axes]).astype(numpy_dtype(dtype))
    y = glue.rms_norm(x, weight, axes, 1e-6, 0.0, before, None)
    assert y is not None
    _check_rms_norm(y, x, weight, axes, 1e-6, 0.0, before)


@pytest.mark.parametrize("dtype", ["float32", *HALF_DTYPES])
@pytest.mark.parametrize("before", [False, True], ids=["after-weight", "before-weight"])
def test_rms_norm_gemma_offset_and_no_weight(dtype, before) -> None:
    x = _data(7, (8, 256), dtype, scale=2.0)
    weight = np.random.default_rng(7).normal(0.0, 0.1, 256).astype(numpy_dtype(dtype))
    _check_rms_norm(
        glue.rms_norm(x, weight, (1,), 1e-6, 1.0, before, None), x, weight, (1,), 1e-6, 1.0, before
    )
    _check_rms_norm(glue.rms_norm(x, None, (1,), 1e-6, 1.0, before, None), x, None, (1,), 1e-6, 0.0, before)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_the_cast_orders_differ_as_named(dtype) -> None:
    """``before_weight`` is the Llama composite exactly: x̂ from the ``after_weight`` kernel without
    a weight (the same float32 x̂), rounded to the input dtype, times w in float32, rounded."""
    x = _data(8, (32, 512), dtype, scale=3.0)
    weight = np.random.default_rng(8).uniform(0.0, 2.0, 512).astype(numpy_dtype(dtype))
    unit = glue.rms_norm(x, None, (1,), 1e-6, 0.0, False, None)
    llama = (unit.astype(np.float32) * weight.astype(np.float32)).astype(x.dtype)
    before = glue.rms_norm(x, weight, (1,), 1e-6, 0.0, True, None)
    after = glue.rms_norm(x, weight, (1,), 1e-6, 0.0, False, None)
    np.testing.assert_array_equal(before, llama)
    assert np.mean(before != after) > 0.01  # the orders differ on some outputs (26 % in float16 on N(0, 3))


def test_the_cast_orders_agree_on_float32() -> None:
    x = _data(9, (8, 300), "float32")
    weight = np.random.default_rng(9).normal(1.0, 0.5, 300).astype(np.float32)
    np.testing.assert_array_equal(
        glue.rms_norm(x, weight, (1,), 1e-6, 0.0, True, None),
        glue.rms_norm(x, weight, (1,), 1e-6, 0.0, False, None),
    )


@pytest.mark.parametrize(
    ("loc", "scale"), [(1e4, 1.0), (0.0, 1e20), (0.0, 1e-20)], ids=["offset-1e4", "huge", "tiny"]
)
def test_rms_norm_mean_square_in_float64(loc, scale) -> None:
    """float32 values whose squares overflow (1e20) or underflow (1e-20) float32: the mean square
    accumulates in float64. With ε = 1e-45 the tiny row still normalizes to unit RMS."""
    x = _data(10, (6, 1000), "float32", loc=loc, scale=scale)
    weight = np.random.default_rng(10).uniform(0.5, 1.5, 1000).astype(np.float32)
    eps = 1e-45
    y = glue.rms_norm(x, weight, (1,), eps, 0.0, False, None)
    _check_rms_norm(y, x, weight, (1,), eps, 0.0, False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rms_norm_writes_exactly_y_into_out(dtype) -> None:
    x = _data(11, (16, 384), dtype, scale=2.0)
    weight = np.random.default_rng(11).uniform(0.5, 1.5, 384).astype(numpy_dtype(dtype))
    for before in (False, True):
        expected = glue.rms_norm(x, weight, (1,), 1e-6, 0.0, before, None)
        out = np.empty_like(x)
        assert glue.rms_norm(x, weight, (1,), 1e-6, 0.0, before, out) is out
        np.testing.assert_array_equal(out, expected)
        inplace = x.copy()
        assert glue.rms_norm(inplace, weight, (1,), 1e-6, 0.0, before, inplace) is inplace
        np.testing.assert_array_equal(inplace, expected)


def test_rms_norm_on_strided_input() -> None:
    wide = _data(12, (5, 6, 80), "float32")
    x = wide[..., ::2]
    before = x.copy()
    weight = np.linspace(0.5, 1.5, 6 * 40).reshape(6, 40).astype(np.float32)
    y = glue.rms_norm(x, weight, (1, 2), 1e-6, 0.0, False, None)
    np.testing.assert_array_equal(x, before)
    _check_rms_norm(y, x, weight, (1, 2), 1e-6, 0.0, False)


def test_rms_norm_leaves_leading_axes_and_empty_input_to_the_pure_path() -> None:
    x = _data(13, (4, 6), "float32")
    assert glue.rms_norm(x, None, (0,), 1e-6, 0.0, False, None) is None
    assert glue.rms_norm(np.empty((0, 6), np.float32), None, (1,), 1e-6, 0.0, False, None) is None


# --- moments -------------------------------------------------------------------------------------


def _check_moments(result, x: np.ndarray, axes, mask=None, group_axis=None, num_groups=None) -> None:
    """``(count, mean, m2)`` against :func:`normkit.testing.primitives.moments_bounds` (the
    reference on ``x`` with the group axis split into ``(G, C/G)`` when grouped): count exact and
    int64, mean and M2 in the compute dtype within their derived bounds."""
    assert result is not None, "the compiled path must take this layout"
    count, mean, m2 = result
    dtype = x.dtype.name
    x64 = x.astype(np.float64)
    if group_axis is not None:
        split = (
            *x.shape[:group_axis],
            num_groups,
            x.shape[group_axis] // num_groups,
            *x.shape[group_axis + 1 :],
        )
        x64 = x64.reshape(split)
        if mask is not None:
            mask = np.broadcast_to(mask, x.shape).reshape(split)
        axes = tuple(sorted({a + (a > group_axis) for a in axes} | {group_axis + 1}))
    ref_count, ref_mean, ref_m2, mean_bound, m2_bound = moments_bounds(x64, axes, mask, dtype)
    assert count.dtype == np.int64
    assert mean.dtype == m2.dtype == np.dtype(compute_dtype(dtype))
    np.testing.assert_array_equal(count, ref_count)
    assert_within(np.abs(mean.astype(np.float64) - ref_mean), mean_bound, f"mean {x.shape} over {axes}")
    assert_within(np.abs(m2.astype(np.float64) - ref_m2), m2_bound, f"m2 {x.shape} over {axes}")


MOMENT_LAYOUTS = [
    # (id, shape, axes, group_axis, num_groups)
    ("trailing-rows", (6, 5, 700), (2,), None, None),
    ("layer-axes", (4, 6, 70), (1, 2), None, None),
    ("leading-columns", (300, 7), (0,), None, None),
    ("batch-norm-nchw", (8, 6, 9, 40), (0, 2, 3), None, None),
    ("batch-norm-nhwc", (8, 9, 9, 6), (0, 1, 2), None, None),
    ("instance-nchw", (4, 3, 20, 20), (2, 3), None, None),
    ("instance-nhwc", (4, 10, 10, 3), (1, 2), None, None),
    ("groups-channels-first", (4, 8, 9, 9), (2, 3), 1, 4),
    ("groups-channels-last", (4, 9, 9, 8), (1, 2), 3, 2),
    ("whole-array", (70000,), (0,), None, None),
    ("whole-matrix-in-ranges", (300, 400), (0, 1), None, None),
]


@pytest.mark.parametrize(
    ("shape", "axes", "group_axis", "groups"),
    [c[1:] for c in MOMENT_LAYOUTS],
    ids=[c[0] for c in MOMENT_LAYOUTS],
)
@pytest.mark.parametrize("dtype", ["float32", "float64", *HALF_DTYPES])
def test_moments_layouts_match_the_reference(shape, axes, group_axis, groups, dtype) -> None:
    x = _data(14, shape, dtype, loc=5.0, scale=2.0)
    _check_moments(glue.moments(x, axes, None, group_axis, groups), x, axes, None, group_axis, groups)


@pytest.mark.parametrize(
    ("shape", "axes", "group_axis", "groups"),
    [c[1:] for c in MOMENT_LAYOUTS],
    ids=[c[0] for c in MOMENT_LAYOUTS],
)
def test_masked_moments_layouts_match_the_reference(shape, axes, group_axis, groups) -> None:
    x = _data(15, shape, "float32", loc=5.0, scale=2.0)
    mask = np.random.default_rng(15).random(shape) < 0.3
    _check_moments(glue.moments(x, axes, mask, group_axis, groups), x, axes, mask, group_axis, groups)


@pytest.mark.parametrize(("shape", "axes"), [((3000, 4), (0,)), ((4, 3000), (1,)), ((16, 40, 3), (0, 1))])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_moments_at_a_large_offset(shape, axes, dtype) -> None:
    """|mean|/std = 1e4 (Σx² − nμ² would be off by n·ε·μ², far outside the bound)."""
    x = _data(16, shape, dtype, loc=1e4)
    _check_moments(glue.moments(x, axes, None, None, None), x, axes)
    mask = np.random.default_rng(16).random(shape) < 0.5
    _check_moments(glue.moments(x, axes, mask, None, None), x, axes, mask)


@pytest.mark.parametrize(("shape", "axes"), [((6, 50, 4), (1,)), ((6, 600), (1,))], ids=["columns", "rows"])
def test_a_broadcast_mask_and_a_group_with_nothing_kept(shape, axes) -> None:
    """Keras's mask (one value per time step, broadcast over the channels) with unequal counts per
    sample and sample 2 fully masked: count 0, mean 0, M2 0 there (the merge's identity); the
    values under the mask are NaN and must not leak into any statistic."""
    x = _data(17, shape, "float32", loc=3.0)
    steps = shape[1]
    keep = np.arange(steps)[None, :] < np.array([steps, 3, 0, 1, steps // 2, steps - 1])[:, None]
    mask = keep if len(shape) == 2 else keep[:, :, None]
    x[~np.broadcast_to(mask, shape)] = np.nan
    count, mean, m2 = glue.moments(x, axes, mask, None, None)
    assert np.all(count[2] == 0) and np.all(mean[2] == 0) and np.all(m2[2] == 0)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))
    _check_moments((count, mean, m2), np.where(np.isnan(x), 0, x).astype(np.float32), axes, mask)


def test_moments_of_empty_input_are_the_identity() -> None:
    count, mean, m2 = glue.moments(np.empty((0, 3), np.float32), (0,), None, None, None)
    np.testing.assert_array_equal(count, np.zeros(3, np.int64))
    assert count.dtype == np.int64 and mean.dtype == m2.dtype == np.float32
    assert not mean.any() and not m2.any()


def test_moments_leave_layouts_beyond_four_runs_to_the_pure_path() -> None:
    """Reduced, kept, reduced, kept, reduced: more runs than the kernels' ``(G, A, C, B)``."""
    x = _data(18, (2, 3, 4, 5, 6), "float32")
    assert glue.moments(x, (0, 2, 4), None, None, None) is None


def test_moments_with_size_one_axes_anywhere() -> None:
    """Size-1 axes (kept or reduced) drop out of the layout but stay in the result's shape."""
    x = _data(19, (1, 5, 1, 40, 1), "float32", loc=2.0)
    for axes in ((0, 3), (2, 3, 4), (1,), (0, 2, 4)):
        _check_moments(glue.moments(x, axes, None, None, None), x, axes)
