"""The spec-version-2 kernels (moments, normalize, group norm, RMS norm, astype) against normkit's
float64 reference, on NumPy arrays (the glue with NumPy expressions standing in for the CUDA
kernels, on every machine) and on CuPy arrays (the CUDA kernels themselves; skipped, with the
reason, without a CUDA device). Every tolerance comes from :mod:`normkit.testing.tolerances`.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu import unavailable

from normkit import hookspecs, reference
from normkit.testing.tolerances import (
    EPS,
    assert_within,
    centering_gain,
    compute_dtype,
    output_tolerance,
    statistics_tolerance,
)
from normkit_cupy import kernels

REASON = unavailable()


class _NumPy:
    """NumPy arrays: the glue runs with the NumPy stand-ins."""

    @staticmethod
    def put(array: np.ndarray) -> np.ndarray:
        return np.array(array)

    @staticmethod
    def get(array: np.ndarray) -> np.ndarray:
        return np.asarray(array)


class _CuPy:
    """CuPy arrays on the current GPU: the CUDA kernels."""

    @staticmethod
    def put(array: np.ndarray):
        import cupy

        return cupy.asarray(array)

    @staticmethod
    def get(array) -> np.ndarray:
        import cupy

        assert isinstance(array, cupy.ndarray)
        return cupy.asnumpy(array)


@pytest.fixture(
    params=[
        pytest.param(_NumPy, id="numpy-standin"),
        pytest.param(_CuPy, id="cupy", marks=pytest.mark.skipif(REASON is not None, reason=str(REASON))),
    ]
)
def dev(request):
    """Where the kernels run: ``put`` a NumPy array there, ``get`` a result back as NumPy."""
    return request.param


# (dtype, offset of the data's mean): float16 values >= 256 and |mean|/std = 1e4/3 in float32
DATA = [("float16", 2.0), ("float16", 300.0), ("float32", 2.0), ("float32", 1e4), ("float64", 1e4)]
DATA_IDS = [f"{dtype}-{loc:g}" for dtype, loc in DATA]
LAYOUTS = {"channels-first": ((4, 6, 5, 3), 1), "channels-last": ((4, 5, 3, 6), 3)}


def _inputs(shape, dtype, loc=2.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(loc, 3.0, size=shape).astype(dtype)


def _affine(channels, dtype="float32", seed=1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=channels).astype(dtype), rng.normal(size=channels).astype(dtype)


def _reduced(form: str, ndim: int, axis: int) -> tuple[int, ...]:
    """The reduced axes of batch norm (all but the channel), instance norm (the spatial axes) and
    layer norm (all but the batch)."""
    if form == "batch":
        return tuple(a for a in range(ndim) if a != axis)
    if form == "instance":
        return tuple(a for a in range(1, ndim) if a != axis)
    return tuple(range(1, ndim))


def _unequal_mask(shape, axes, seed=3) -> np.ndarray:
    """A mask whose groups keep different fractions of their values: the first group nothing,
    the second exactly one value, the others between 10 % and 90 %."""
    rng = np.random.default_rng(seed)
    kept = [a for a in range(len(shape)) if a not in axes]
    groups = int(np.prod([shape[a] for a in kept]))
    density = np.linspace(0.1, 0.9, groups).reshape([shape[a] for a in kept])
    mask = rng.random(shape) < np.expand_dims(density, tuple(axes))
    by_group = np.moveaxis(mask, kept, range(len(kept)))  # a view: writes reach mask
    first, second = np.unravel_index(0, density.shape), np.unravel_index(1, density.shape)
    by_group[first] = False
    by_group[second] = False
    by_group[second][np.unravel_index(by_group[second].size // 2, by_group[second].shape)] = True
    return mask


def _kept_magnitude(x: np.ndarray, mask: np.ndarray | None) -> float:
    """The largest magnitude among the values that enter the statistics."""
    values = np.abs(x.astype(np.float64))
    if mask is not None:
        values = np.where(np.broadcast_to(mask, x.shape), values, 0.0)
    return float(values.max())


def _assert_moments(got, ref, dtype: str, magnitude: float) -> None:
    """``count`` exactly (int64); the mean within the suite's statistics tolerance for a mean;
    ``M2 = n sigma^2`` within ``n`` times the suite's tolerance for a variance (its relative part
    applies to ``M2`` as it is). An empty group's tolerance is 0: exactly (0, 0, 0)."""
    count, mean, m2 = got
    ref_count, ref_mean, ref_m2 = ref
    assert count.dtype == np.int64
    assert mean.dtype == m2.dtype == np.dtype(compute_dtype(dtype))
    assert count.shape == mean.shape == m2.shape == ref_mean.shape
    np.testing.assert_array_equal(count, ref_count)
    empty = ref_count == 0
    mean_bound = np.where(empty, 0.0, statistics_tolerance(dtype, "mean", magnitude).bound(ref_mean, 0.0))
    assert_within(np.abs(mean.astype(np.float64) - ref_mean), mean_bound, "mean")
    var = statistics_tolerance(dtype, "var", magnitude)
    assert_within(
        np.abs(m2.astype(np.float64) - ref_m2), var.rtol * np.abs(ref_m2) + ref_count * var.atol, "m2"
    )


@pytest.mark.parametrize(("dtype", "loc"), DATA, ids=DATA_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("form", ["batch", "instance", "layer"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "unequal-mask"])
def test_moments_follow_the_reference(dev, dtype, loc, layout, form, masked) -> None:
    shape, axis = LAYOUTS[layout]
    x = _inputs(shape, dtype, loc)
    axes = _reduced(form, x.ndim, axis)
    mask = _unequal_mask(shape, axes) if masked else None
    xd, maskd = dev.put(x), None if mask is None else dev.put(mask)
    got = kernels.moments(xd, axes, maskd, None, None)
    _assert_moments(
        [dev.get(a) for a in got], reference.moments(x, axes, mask), dtype, _kept_magnitude(x, mask)
    )
    np.testing.assert_array_equal(dev.get(xd), x)  # pure
    if mask is not None:
        np.testing.assert_array_equal(dev.get(maskd), mask)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_moments_mask_broadcast_along_the_channels(dev, dtype) -> None:
    """A padding mask ``(N, 1, H, W)`` counts the same positions in every channel."""
    x = _inputs((4, 6, 5, 3), dtype, loc=-7.0)
    mask = np.random.default_rng(5).random((4, 1, 5, 3)) < np.linspace(0.2, 0.8, 4)[:, None, None, None]
    got = kernels.moments(dev.put(x), (0, 2, 3), dev.put(mask), None, None)
    _assert_moments(
        [dev.get(a) for a in got], reference.moments(x, (0, 2, 3), mask), dtype, _kept_magnitude(x, mask)
    )


def test_masked_values_never_enter_the_sums(dev) -> None:
    """Whatever a masked position holds (NaN, inf, 1e30), the statistics are those of the kept
    values, bit for bit the same as with zeros there."""
    x = _inputs((8, 3, 10), "float32", loc=1e4)
    mask = np.random.default_rng(6).random(x.shape) < 0.5
    junk = x.copy()
    junk[~mask] = np.resize(np.array([np.nan, np.inf, -np.inf, 1e30], dtype="float32"), int((~mask).sum()))
    zeros = np.where(mask, x, np.float32(0))
    with_junk = [dev.get(a) for a in kernels.moments(dev.put(junk), (0, 2), dev.put(mask), None, None)]
    with_zeros = [dev.get(a) for a in kernels.moments(dev.put(zeros), (0, 2), dev.put(mask), None, None)]
    for a, b in zip(with_junk, with_zeros, strict=True):
        np.testing.assert_array_equal(a, b)
    _assert_moments(with_junk, reference.moments(x, (0, 2), mask), "float32", _kept_magnitude(x, mask))


def _block_moments(x: np.ndarray, axis: int, groups: int, mask: np.ndarray | None = None):
    """The reference's moments of each sample's block of ``C/G`` consecutive channels, taken by
    slicing the blocks out one by one: ``(N, G)`` arrays."""
    size = x.shape[axis] // groups
    parts = []
    for g in range(groups):
        index = [slice(None)] * x.ndim
        index[axis] = slice(g * size, (g + 1) * size)
        block_mask = None
        if mask is not None:
            block_mask = mask if mask.shape[axis] == 1 else mask[tuple(index)]
        parts.append(reference.moments(x[tuple(index)], tuple(range(1, x.ndim)), block_mask))
    return tuple(np.stack([part[i] for part in parts], axis=1) for i in range(3))


@pytest.mark.parametrize(("dtype", "loc"), DATA, ids=DATA_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("mask_kind", ["no-mask", "full-mask", "channel-broadcast-mask"])
def test_grouped_moments_pool_contiguous_channel_blocks(dev, dtype, loc, layout, groups, mask_kind) -> None:
    shape, axis = LAYOUTS[layout]
    x = _inputs(shape, dtype, loc)
    axes = tuple(a for a in range(1, x.ndim) if a != axis)
    mask = None
    if mask_kind != "no-mask":
        mask_shape = list(shape)
        if mask_kind == "channel-broadcast-mask":
            mask_shape[axis] = 1
        mask = np.random.default_rng(7).random(mask_shape) < 0.6
        mask[0] = False  # the first sample counts nothing: every one of its groups is empty
    maskd = None if mask is None else dev.put(mask)
    got = [dev.get(a) for a in kernels.moments(dev.put(x), axes, maskd, axis, groups)]
    assert got[0].shape == (shape[0], groups)
    _assert_moments(got, _block_moments(x, axis, groups, mask), dtype, _kept_magnitude(x, mask))


@pytest.mark.parametrize("masked", [False, True])
def test_moments_of_empty_input(dev, masked) -> None:
    """No value: every group is (0, 0, 0); no group: empty results."""
    for shape, axes, kept in (
        ((0, 3, 4), (0, 2), (3,)),
        ((2, 0, 4), (0, 2), (0,)),
        ((2, 3, 0), (2,), (2, 3)),
    ):
        x = np.zeros(shape, dtype="float32")
        mask = dev.put(np.ones(shape, dtype=bool)) if masked else None
        count, mean, m2 = (dev.get(a) for a in kernels.moments(dev.put(x), axes, mask, None, None))
        assert count.shape == mean.shape == m2.shape == kept
        assert count.dtype == np.int64 and mean.dtype == m2.dtype == np.float32
        assert not count.any() and not mean.any() and not m2.any()


def _broadcast(values: np.ndarray, ndim: int, axes: tuple[int, ...]) -> np.ndarray:
    """``values`` spanning ``axes`` of an ``ndim``-array, with size 1 elsewhere."""
    shape = [1] * ndim
    for a, size in zip(axes, values.shape, strict=True):
        shape[a] = size
    return values.reshape(shape)


def _normalize_case(form: str, x: np.ndarray, axis: int, eps: float):
    """For one form of :func:`normkit.hookspecs.normkit_normalize`: its ``axes`` and
    ``param_axes``, the exact statistics and affine, the reference output computed by the
    reference's own function for that form, and the statistics and affine broadcast to ``x``."""
    groups = 2
    if form == "layer":
        axes = param_axes = tuple(range(1, x.ndim))
        w, b = _affine(tuple(x.shape[a] for a in axes))
        count, mean, m2 = reference.moments(x, axes)
        expected = reference.layer_norm(x, w, b, axes=axes, eps=eps)
    else:
        param_axes = (axis,)
        w, b = _affine(x.shape[axis])
        axes = _reduced("batch" if form == "batch" else "instance", x.ndim, axis)
        if form == "group":
            count, mean, m2 = _block_moments(x, axis, groups)
            expected = reference.group_norm(x, groups, w, b, eps=eps, axis=axis)
        else:
            count, mean, m2 = reference.moments(x, axes)
            if form == "batch":
                expected = reference.normalize(x, mean, m2 / count, w, b, eps=eps, axis=axis)
            else:
                expected, _, _ = reference.instance_norm(
                    x, w, b, None, None, use_input_stats=True, momentum=0.1, eps=eps, axis=axis,
                    unbiased_running_var=False,
                )  # fmt: skip
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    mean_x, var_x = _broadcast(mean, x.ndim, kept), _broadcast(m2 / count, x.ndim, kept)
    if form == "group":  # statistic g for each channel of block g
        mean_x, var_x = (np.repeat(s, x.shape[axis] // groups, axis=axis) for s in (mean_x, var_x))
    return (
        axes,
        param_axes,
        mean,
        m2 / count,
        w,
        b,
        expected,
        (mean_x, var_x, _broadcast(w, x.ndim, param_axes)),
    )


@pytest.mark.parametrize(("dtype", "loc"), DATA, ids=DATA_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("form", ["batch", "instance", "layer", "group"])
@pytest.mark.parametrize("stats", ["float64", "compute"])
def test_normalize_follows_the_reference(dev, dtype, loc, layout, form, stats) -> None:
    """Exact statistics in float64 are applied with their full precision (the mean's float32
    rounding is subtracted after ``x - s``), so the output is held to the suite's bound without a
    centering term; statistics already rounded to the compute dtype carry their mean's rounding,
    which the suite's centering term covers."""
    shape, axis = LAYOUTS[layout]
    eps = 1e-5
    x = _inputs(shape, dtype, loc)
    axes, param_axes, mean, var, w, b, expected, (mean_x, var_x, w_x) = _normalize_case(form, x, axis, eps)
    gain = 0.0
    if stats == "compute":
        mean, var = mean.astype(compute_dtype(dtype)), var.astype(compute_dtype(dtype))
        gain = centering_gain(mean_x, var_x, eps, w_x)
    args = [dev.put(a) for a in (x, mean, var, w, b)]
    y = dev.get(kernels.normalize(*args, eps, axes, param_axes))
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    bound = output_tolerance(dtype, centering_gain=gain).bound(expected, 0.0)
    assert_within(np.abs(y.astype(np.float64) - expected), bound, f"y ({form} form)")
    for original, now in zip((x, mean, var, w, b), args, strict=True):
        np.testing.assert_array_equal(dev.get(now), original)  # pure


def test_normalize_without_affine_and_with_float16_statistics(dev) -> None:
    """Statistics narrower than the compute dtype are widened, then applied as given (the
    reference applies the same float16 mean, so there is no centering term)."""
    x = _inputs((3, 4, 7), "float16", loc=5.0)
    count, mean, m2 = reference.moments(x, (0, 2))
    mean, var = mean.astype("float16"), (m2 / count).astype("float16")
    y = dev.get(kernels.normalize(dev.put(x), dev.put(mean), dev.put(var), None, None, 1e-3, (0, 2), (1,)))
    expected = reference.normalize(x, mean, var, eps=1e-3, axis=1)
    assert_within(
        np.abs(y.astype(np.float64) - expected), output_tolerance("float16").bound(expected, 0.0), "y"
    )


@pytest.mark.parametrize(("dtype", "loc"), DATA, ids=DATA_IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_follows_the_reference(dev, dtype, loc, layout, groups, affine) -> None:
    shape, axis = LAYOUTS[layout]
    eps = 1e-5
    x = _inputs(shape, dtype, loc)
    w, b = _affine(shape[axis]) if affine else (None, None)
    args = [None if a is None else dev.put(a) for a in (x, w, b)]
    y = dev.get(kernels.group_norm(args[0], groups, args[1], args[2], eps, axis))
    expected = reference.group_norm(x, groups, w, b, eps=eps, axis=axis)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    count, mean, m2 = _block_moments(x, axis, groups)
    per_channel = [
        np.repeat(_broadcast(s, x.ndim, (0, axis)), shape[axis] // groups, axis=axis)
        for s in (mean, m2 / count)
    ]
    gain = centering_gain(*per_channel, eps, None if w is None else _broadcast(w, x.ndim, (axis,)))
    bound = output_tolerance(dtype, centering_gain=gain).bound(expected, 0.0)
    assert_within(np.abs(y.astype(np.float64) - expected), bound, "y")
    np.testing.assert_array_equal(dev.get(args[0]), x)  # pure


def test_group_norm_of_a_constant_group_is_exactly_beta(dev) -> None:
    x = _inputs((2, 6, 4, 4), "float32", loc=1e4)
    x[1, 2:4] = 12345.678  # sample 1, group 1 of 3: constant
    w, b = np.full(6, 3.0, "float32"), np.linspace(-1, 1, 6).astype("float32")
    y = dev.get(kernels.group_norm(dev.put(x), 3, dev.put(w), dev.put(b), 1e-5, 1))
    np.testing.assert_array_equal(y[1, 2:4], np.broadcast_to(b[2:4, None, None], (2, 4, 4)))


def _rms_case(dtype, axes_kind, seed=0):
    x = _inputs((4, 3, 64), dtype, loc=0.5, seed=seed)
    axes = (2,) if axes_kind == "last" else (1, 2)
    w = np.random.default_rng(seed + 1).uniform(-2, 2, size=tuple(x.shape[a] for a in axes)).astype(dtype)
    return x, axes, w


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("axes_kind", ["last", "last-two"])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("cast_before_weight", [False, True], ids=["after_weight", "before_weight"])
@pytest.mark.parametrize("eps", [2.0**-23, 1e-6], ids=["eps-machine", "eps-1e-6"])
def test_rms_norm_follows_the_reference(
    dev, dtype, axes_kind, weight_offset, weighted, cast_before_weight, eps
) -> None:
    """Either cast order rounds to the input dtype at most twice, each within half an ulp: the
    suite's output bound (one ``eps_d`` plus the compute allowance) holds for both."""
    x, axes, w = _rms_case(dtype, axes_kind)
    w = w if weighted else None
    args = [None if a is None else dev.put(a) for a in (x, w)]
    y = dev.get(kernels.rms_norm(args[0], args[1], axes, eps, weight_offset, cast_before_weight))
    # the spec: without a weight the offset is ignored (normkit.reference.rms_norm multiplies by
    # 1 + o there, so it is given o = 0)
    expected = reference.rms_norm(x, w, axes=axes, eps=eps, weight_offset=weight_offset if weighted else 0.0)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    assert_within(np.abs(y.astype(np.float64) - expected), output_tolerance(dtype).bound(expected, 0.0), "y")
    np.testing.assert_array_equal(dev.get(args[0]), x)  # pure


def _undecided(t: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """Where a value within ``slack`` of the exact ``t`` may round to another float16 than ``t``
    does: ``t`` is within ``slack`` of a midpoint between two float16 neighbours."""
    nearest = t.astype(np.float16)
    toward = np.where(t >= nearest, np.float16(np.inf), np.float16(-np.inf))
    neighbour = np.nextafter(nearest, toward)
    midpoint = (nearest.astype(np.float64) + neighbour.astype(np.float64)) / 2
    return np.abs(t - midpoint) <= slack


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("cast_before_weight", [False, True], ids=["after_weight", "before_weight"])
def test_rms_norm_rounds_float16_where_the_cast_order_says(dev, weight_offset, cast_before_weight) -> None:
    r"""Against an emulation of each order from the reference's exact :math:`\hat x`:
    after the weight, ``f16(x_hat (w + o))``; before it, ``f16(f32(f16(x_hat)) * (w + o))`` with
    ``w + o`` in float32. The kernel computes ``x_hat`` in float32, off by at most the suite's
    compute allowance (``output_tolerance``'s rtol less ``eps_d``) relative: wherever the exact
    value is farther than that from a float16 rounding midpoint, both roundings are decided, and
    the output must equal the emulation of its own order exactly. The other order must differ
    from it on some of those elements (the test can tell the orders apart)."""
    x, axes, w = _rms_case("float16", "last", seed=4)
    eps = 1e-6
    y = dev.get(kernels.rms_norm(dev.put(x), dev.put(w), axes, eps, weight_offset, cast_before_weight))
    x_hat = reference.rms_norm(x, None, axes=axes, eps=eps)
    scale = (w.astype(np.float32) + np.float32(weight_offset)).astype(np.float64)  # w + o in float32
    allowance = output_tolerance("float16").rtol - EPS["float16"]
    before = (x_hat.astype(np.float16).astype(np.float32) * scale.astype(np.float32)).astype(np.float16)
    after = (x_hat * scale).astype(np.float16)
    if cast_before_weight:
        decided = ~_undecided(x_hat, allowance * np.abs(x_hat))
        own, other = before, after
    else:
        decided = ~_undecided(x_hat * scale, allowance * np.abs(x_hat * scale))
        own, other = after, before
    np.testing.assert_array_equal(y[decided], own[decided])
    assert np.any(other[decided] != y[decided])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_rms_norm_orders_agree_above_half_precision_and_without_weight(dev, dtype) -> None:
    x, axes, w = _rms_case(dtype, "last", seed=8)
    for weight in (w, None):
        if dtype == "float16" and weight is not None:
            continue
        ys = [
            dev.get(
                kernels.rms_norm(dev.put(x), None if weight is None else dev.put(weight), axes, 1e-6, 1.0, c)
            )
            for c in (False, True)
        ]
        np.testing.assert_array_equal(ys[0], ys[1])


@pytest.mark.parametrize("target", ["float64", "float32", "int64", "bool"])
def test_astype_converts_on_the_array_device(dev, target) -> None:
    x = np.array([[0.0, 1.5, -2.0], [3.0, 0.0, 7.25]], dtype="float32")
    xd = dev.put(x)
    got = kernels.astype(xd, target)
    assert got is not xd
    np.testing.assert_array_equal(dev.get(got), x.astype(target))
    assert dev.get(got).dtype == np.dtype(target)


def test_kernels_take_exactly_the_spec_parameters() -> None:
    import inspect

    for op in ("moments", "normalize", "group_norm", "rms_norm"):
        spec = list(inspect.signature(getattr(hookspecs, f"normkit_{op}")).parameters)
        assert list(inspect.signature(getattr(kernels, op)).parameters) == spec, op
