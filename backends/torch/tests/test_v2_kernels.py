"""The spec-v2 kernels of the torch backend (moments, normalize, group norm, RMS norm) against
independent oracles:

* the float64 reference, :mod:`normkit.reference`, on exactly the values the kernel saw (the
  input rounded to its dtype first), within bounds derived from the dtypes' epsilons
  (:mod:`normkit.testing.tolerances`): float16, bfloat16, float32 and float64, channels-first,
  channels-last memory and a channels-last axis, data at ``|mean|/std = 1e4`` in float32, masks
  with unequal counts, empty groups, groups of channels;
* for the cast orders of RMS norm in float16/bfloat16, the two roundings themselves: every
  output must be the rounding of :math:`\\hat x (w + o)` (after) or of
  :math:`\\mathrm{round}(\\hat x)(w + o)` (before), computed from the float64 :math:`\\hat x`, up to
  the float32 computation's own rounding of :math:`\\hat x`;
* ``torch.autograd.gradcheck`` (finite differences of the kernels) in float64, and the gradients
  of ``torch.nn.GroupNorm`` / ``torch.nn.RMSNorm`` where the kernel does not run their ATen op.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit
from normkit import reference
from normkit._registry import backend_named, load_backend
from normkit.numpy_backend import numpy_dtype
from normkit.testing.tolerances import (
    CENTERING_FACTOR,
    EPS,
    assert_within,
    compute_dtype,
    output_tolerance,
    reduction_growth,
)
from normkit_torch import group_norm as group_norm_module
from normkit_torch import plugin, statistics
from normkit_torch.group_norm import group_norm, strides_like_channels_last
from normkit_torch.rms_norm import rms_norm

F64 = torch.float64
DTYPES = ("float16", "bfloat16", "float32", "float64")
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def stored(x64: np.ndarray, dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """``x64`` as a tensor of ``dtype`` (rounded once) and the float64 values it holds."""
    t = plugin.normkit_backend_info().asarray(x64, dtype, None)
    return t, as64(t)


def as64(t: torch.Tensor) -> np.ndarray:
    """The exact float64 values of a tensor of any float dtype."""
    return t.detach().to(F64).numpy()


def rows(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``a`` as one row per index of the axes not in ``axes`` (the reduced axes along the row)."""
    kept = tuple(i for i in range(a.ndim) if i not in axes)
    moved = np.transpose(a, kept + tuple(axes))
    groups = int(np.prod([a.shape[i] for i in kept]))
    return moved.reshape(groups, -1)


LAYOUTS = {
    # name: (how a (N, C, H, W) array is handed to the kernel, the channel axis)
    "channels-first": (lambda t: t, 1),
    "channels-last-memory": (lambda t: t.contiguous(memory_format=torch.channels_last), 1),
    "channels-last-axis": (lambda t: t.movedim(1, -1).contiguous(), 3),
}


def laid_out(x64: np.ndarray, dtype: str, layout: str) -> tuple[torch.Tensor, np.ndarray, int]:
    """``x64`` (N, C, H, W) in ``dtype`` and ``layout``: the tensor, its float64 values in the same
    axis order, and the channel axis."""
    to_layout, axis = LAYOUTS[layout]
    t, _ = stored(x64, dtype)
    t = to_layout(t)
    return t, as64(t), axis


# --------------------------------------------------------------------------------------------
# moments
# --------------------------------------------------------------------------------------------


def moments_bounds(
    x64: np.ndarray, axes: tuple[int, ...], mask: np.ndarray | None, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    r"""Allowed errors of the mean and M2 of each group, from the corrected two-pass algorithm
    in the compute dtype (:math:`\epsilon_c`, :math:`g = \sqrt n`, :func:`reduction_growth`):

    * the provisional mean :math:`s` is off by :math:`\delta_s \le (g + 1)\epsilon_c\,\overline{|x|}`
      (a sum of n terms and a division);
    * the correction :math:`c = \frac1n\sum (x_i - s)` recovers :math:`\mu - s` to
      :math:`(g + 2)\epsilon_c\,\overline{|x - s|}` (each difference rounds once, the sum g times,
      the division once), and :math:`s + c` rounds once more, by :math:`\epsilon_c|\mu|`:
      :math:`B_\mu = \epsilon_c(|\mu| + (g + 2)(\overline{|x - \mu|} + \delta_s))`;
    * :math:`M_2 = \sum d_i^2 - c\sum d_i` rounds each square (3 roundings per term with the
      difference) and the sum (g), relative to :math:`M_2`; a mean off by :math:`e` adds
      :math:`n e^2` exactly: :math:`B_{M_2} = (g + 4)\epsilon_c M_2 + n B_\mu^2`.

    :math:`E[x^2] - E[x]^2` is off by about :math:`\epsilon_c n \mu^2`, which at
    :math:`|\mu|/\sigma = 10^4` is :math:`10^8\epsilon_c M_2`: far outside.
    """
    eps_c = EPS[compute_dtype(dtype)]
    count, mean, m2 = reference.moments(x64, axes, mask)
    weights = np.ones(x64.shape) if mask is None else np.broadcast_to(mask, x64.shape).astype(np.float64)
    w = rows(weights, axes)
    safe = np.maximum(w.sum(axis=1), 1.0)
    values = rows(x64, axes)
    magnitude = (np.abs(values) * w).sum(axis=1) / safe
    deviation = (np.abs(values - mean.reshape(-1, 1)) * w).sum(axis=1) / safe
    growth = np.sqrt(np.maximum(count.reshape(-1), 1.0))  # reduction_growth per group
    mean_bound = eps_c * (
        np.abs(mean.reshape(-1)) + (growth + 2) * (deviation + (growth + 1) * eps_c * magnitude)
    )
    m2_bound = (growth + 4) * eps_c * m2.reshape(-1) + count.reshape(-1) * mean_bound**2
    return mean_bound.reshape(mean.shape), m2_bound.reshape(m2.shape)


def assert_moments_match(
    got: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    x64: np.ndarray,
    axes: tuple[int, ...],
    mask: np.ndarray | None,
    dtype: str,
) -> None:
    count, mean, m2 = got
    ref_count, ref_mean, ref_m2 = reference.moments(x64, axes, mask)
    assert count.dtype == torch.int64
    assert mean.dtype == m2.dtype == (F64 if dtype == "float64" else torch.float32)
    np.testing.assert_array_equal(count.numpy(), ref_count)
    mean_bound, m2_bound = moments_bounds(x64, axes, mask, dtype)
    assert_within(np.abs(as64(mean) - ref_mean), mean_bound, "mean")
    assert_within(np.abs(as64(m2) - ref_m2), m2_bound, "m2")


MOMENT_CASES = [
    # (id, reduced axes of a (N, C, H, W) array, loc, scale, dtypes)
    ("per-channel", (0, 2, 3), 2.0, 3.0, DTYPES),
    ("per-instance", (2, 3), -1.0, 0.5, DTYPES),
    ("layer", (1, 2, 3), 0.0, 1.0, DTYPES),
    ("offset-1e4", (0, 2, 3), 1e4, 1.0, ("float32", "float64")),
    ("offset-1e4-layer", (1, 2, 3), -1e4, 1.0, ("float32",)),
    ("half-large-values", (0, 2, 3), 300.0, 2.0, ("float16", "bfloat16")),
]


@pytest.mark.parametrize(
    ("axes", "loc", "scale", "dtype"),
    [
        pytest.param(axes, loc, scale, dtype, id=f"{name}-{dtype}")
        for name, axes, loc, scale, dtypes in MOMENT_CASES
        for dtype in dtypes
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last-memory"])
def test_moments_match_the_reference(
    axes: tuple[int, ...], loc: float, scale: float, dtype: str, channels_last: bool
) -> None:
    x64 = np.random.default_rng(0).normal(loc, scale, size=(6, 5, 9, 7))
    x, x64 = stored(x64, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_moments_match(statistics.moments(x, axes, None, None, None), x64, axes, None, dtype)


def test_sum_of_squares_fails_the_moments_bound_at_offset_1e4() -> None:
    """The bound is tight enough to reject :math:`E[x^2] - E[x]^2` in float32 (what the spec
    forbids), which the kernel passes above."""
    x64 = np.random.default_rng(1).normal(1e4, 1.0, size=(6, 5, 9, 7))
    x, x64 = stored(x64, "float32")
    axes = (0, 2, 3)
    n = x64.size // 5
    naive = (x * x).sum(axes) - x.sum(axes) ** 2 / n
    _, m2_bound = moments_bounds(x64, axes, None, "float32")
    ref_m2 = reference.moments(x64, axes)[2]
    assert np.all(np.abs(as64(naive) - ref_m2) > 10 * m2_bound)


def unequal_mask(shape: tuple[int, ...], axis: int, seed: int) -> np.ndarray:
    """A mask keeping a share of each channel rising from 0 (channel 0: an empty group) to 1."""
    share = np.linspace(0.0, 1.0, shape[axis]).reshape(
        [shape[axis] if a == axis else 1 for a in range(len(shape))]
    )
    mask = np.random.default_rng(seed).random(shape) < share
    index = [slice(None)] * len(shape)
    index[axis] = 0
    mask[tuple(index)] = False  # channel 0 counts nothing
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("mask_shape", "axes"),
    [
        pytest.param((6, 5, 9, 7), (0, 2, 3), id="full-per-channel"),
        pytest.param((6, 1, 9, 7), (1, 2, 3), id="broadcast-channel-per-sample"),
        pytest.param((6, 5, 1, 1), (2, 3), id="broadcast-spatial-per-instance"),
        pytest.param((6, 5, 9, 7), (1, 2, 3), id="full-layer"),
    ],
)
def test_moments_with_masks_of_unequal_counts(
    mask_shape: tuple[int, ...], axes: tuple[int, ...], dtype: str
) -> None:
    rng = np.random.default_rng(2)
    x64 = rng.normal(3.0, 2.0, size=(6, 5, 9, 7))
    x, x64 = stored(x64, dtype)
    mask = unequal_mask(mask_shape, 1, seed=3) if mask_shape[1] > 1 else rng.random(mask_shape) < 0.4
    got = statistics.moments(x, axes, torch.from_numpy(mask), None, None)
    assert_moments_match(got, x64, axes, mask, dtype)
    counts = got[0].numpy()
    assert len(np.unique(counts)) > 1, "the counts differ between groups"
    if mask_shape[1] > 1 and axes == (0, 2, 3):  # channel 0 is an empty group: exactly (0, 0, 0)
        assert counts[0] == 0 and got[1][0].item() == 0.0 and got[2][0].item() == 0.0


def test_masked_out_values_never_enter_the_statistics() -> None:
    """inf and NaN where the mask is False change nothing, to the last bit (the kernel selects,
    it does not multiply by the mask)."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(4, 3, 6)))
    mask = torch.from_numpy(unequal_mask((4, 3, 6), 1, seed=5))
    poisoned = x.clone()
    masked_out = int((~mask).sum())
    poisoned[~mask] = torch.tensor([np.inf, -np.inf, np.nan], dtype=F64).repeat(masked_out)[:masked_out]
    for a, b in zip(
        statistics.moments(poisoned, (0, 2), mask, None, None),
        statistics.moments(x, (0, 2), mask, None, None),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_moments_of_empty_groups_and_empty_input() -> None:
    """A zero-size reduction gives (0, 0, 0) per group; a zero-size kept axis, empty results."""
    count, mean, m2 = statistics.moments(torch.ones(3, 4, 0), (0, 2), None, None, None)
    assert count.tolist() == [0] * 4 and mean.tolist() == [0.0] * 4 and m2.tolist() == [0.0] * 4
    count, mean, m2 = statistics.moments(torch.ones(0, 4, 5), (2,), None, None, None)
    assert count.shape == mean.shape == m2.shape == (0, 4)
    mask = torch.zeros(3, 4, 5, dtype=torch.bool)  # fully masked
    count, mean, m2 = statistics.moments(torch.randn(3, 4, 5), (0, 2), mask, None, None)
    assert count.tolist() == [0] * 4 and mean.tolist() == [0.0] * 4 and m2.tolist() == [0.0] * 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels-first", "channels-last-memory", "channels-last-axis"])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_moments_of_groups_of_channels(dtype: str, layout: str, groups: int, masked: bool) -> None:
    """``group_axis``/``num_groups`` pool contiguous blocks of channels: the reference's moments
    of the array with its channel axis split into ``(G, C/G)``."""
    rng = np.random.default_rng(6)
    x, x64, axis = laid_out(rng.normal(1.0, 2.0, size=(3, 6, 5, 4)), dtype, layout)
    mask64 = None
    mask = None
    if masked:
        mask_shape = list(x64.shape)
        mask_shape[axis] = 1  # the same positions in every channel
        mask64 = rng.random(mask_shape) < 0.5
        mask = torch.from_numpy(mask64)
    spatial = tuple(a for a in range(1, 4) if a != axis)
    got = statistics.moments(x, spatial, mask, axis, groups)
    split = x64.reshape((*x64.shape[:axis], groups, 6 // groups, *x64.shape[axis + 1 :]))
    split_mask = None if mask64 is None else np.expand_dims(mask64, axis + 1)
    reduced = tuple(sorted([a + 1 if a > axis else a for a in spatial] + [axis + 1]))
    assert got[1].shape == (3, groups)
    assert_moments_match(got, split, reduced, split_mask, dtype)


@pytest.mark.parametrize(
    ("axes", "mask_shape", "group"),
    [
        pytest.param((0, 2), None, None, id="plain"),
        pytest.param((0, 2), (3, 4, 5), None, id="masked"),
        pytest.param((2,), (3, 1, 5), (1, 2), id="grouped-masked"),
    ],
)
def test_gradcheck_moments(
    axes: tuple[int, ...], mask_shape: tuple[int, ...] | None, group: tuple | None
) -> None:
    """Autograd reaches the mean and M2 (torch operations only), checked by finite differences."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 4, 5, generator=g, dtype=F64) + 2).requires_grad_()
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g) < 0.6
    group_axis, num_groups = group if group is not None else (None, None)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, mean, m2 = statistics.moments(x, axes, mask, group_axis, num_groups)
        return mean, m2

    assert torch.autograd.gradcheck(f, (x,))


# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats_dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last-memory", "channels-last-axis"])
def test_normalize_per_channel_matches_the_reference(dtype: str, stats_dtype: str, layout: str) -> None:
    """Given statistics per channel (batch norm's form) against ``reference.normalize``: the
    statistics are exact inputs, so only the arithmetic's rounding is allowed (no conditioning,
    no centering term: :math:`x - \\mu` is formed first)."""
    rng = np.random.default_rng(8)
    x, x64, axis = laid_out(rng.normal(5.0, 2.0, size=(4, 3, 5, 6)), dtype, layout)
    mean, mean64 = stored(rng.normal(5.0, 1.0, size=3), stats_dtype)
    var, var64 = stored(rng.uniform(0.5, 4.0, size=3), stats_dtype)
    w, w64 = stored(rng.uniform(0.5, 1.5, size=3), "float32")
    b, b64 = stored(rng.normal(size=3), "float32")
    axes = tuple(a for a in range(4) if a != axis)
    y = statistics.normalize(x, mean, var, w, b, 1e-5, axes, (axis,))
    assert y.dtype == x.dtype and y.shape == x.shape
    ref = reference.normalize(x64, mean64, var64, w64, b64, eps=1e-5, axis=axis)
    assert_within(np.abs(as64(y) - ref), output_tolerance(dtype).bound(ref, 0.0), "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels-first", "channels-last-memory", "channels-last-axis"])
def test_normalize_per_group_is_group_norm_with_the_references_statistics(dtype: str, layout: str) -> None:
    """Statistics per (sample, group) with ``G`` on the channel axis: ``reference.group_norm``."""
    rng = np.random.default_rng(9)
    x, x64, axis = laid_out(rng.normal(-2.0, 3.0, size=(3, 6, 4, 5)), dtype, layout)
    spatial = tuple(a for a in range(1, 4) if a != axis)
    split = x64.reshape((*x64.shape[:axis], 2, 3, *x64.shape[axis + 1 :]))
    reduced = tuple(sorted([a + 1 if a > axis else a for a in spatial] + [axis + 1]))
    count, mean64, m2 = reference.moments(split, reduced)
    w, w64 = stored(rng.uniform(0.5, 1.5, size=6), "float32")
    b, b64 = stored(rng.normal(size=6), "float32")
    y = statistics.normalize(
        x, torch.from_numpy(mean64), torch.from_numpy(m2 / count), w, b, 1e-5, spatial, (axis,)
    )
    ref = reference.group_norm(x64, 2, w64, b64, eps=1e-5, axis=axis)
    assert_within(np.abs(as64(y) - ref), output_tolerance(dtype).bound(ref, 0.0), "y")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_normalize_layer_norm_form(dtype: str) -> None:
    """Statistics per row and element-wise parameters over the normalized axes (layer norm)."""
    rng = np.random.default_rng(10)
    x, x64 = stored(rng.normal(1.0, 2.0, size=(4, 5, 6)), dtype)
    axes = (1, 2)
    count, mean64, m2 = reference.moments(x64, axes)
    w, w64 = stored(rng.normal(size=(5, 6)), "float32")
    b, b64 = stored(rng.normal(size=(5, 6)), "float32")
    y = statistics.normalize(
        x, torch.from_numpy(mean64), torch.from_numpy(m2 / count), w, b, 1e-5, axes, axes
    )
    ref = reference.layer_norm(x64, w64, b64, axes=axes, eps=1e-5)
    assert_within(np.abs(as64(y) - ref), output_tolerance(dtype).bound(ref, 0.0), "y")


@pytest.mark.parametrize("grouped", [False, True], ids=["per-channel", "per-group"])
def test_gradcheck_normalize(grouped: bool) -> None:
    """Gradients to x, the statistics, γ and β, by finite differences."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 5, generator=g, dtype=F64).requires_grad_()
    shape, axes = ((3, 2), (2,)) if grouped else ((4,), (0, 2))
    mean = torch.randn(shape, generator=g, dtype=F64).requires_grad_()
    var = (torch.rand(shape, generator=g, dtype=F64) + 0.5).requires_grad_()
    w, b = (torch.randn(4, generator=g, dtype=F64).requires_grad_() for _ in range(2))

    def f(*args: torch.Tensor) -> torch.Tensor:
        return statistics.normalize(*args, 1e-5, axes, (1,))

    assert torch.autograd.gradcheck(f, (x, mean, var, w, b))


# --------------------------------------------------------------------------------------------
# group norm
# --------------------------------------------------------------------------------------------


def group_norm_bound(
    x64: np.ndarray,
    groups: int,
    w64: np.ndarray | None,
    b64: np.ndarray | None,
    eps: float,
    axis: int,
    dtype: str,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The reference output and the conformance runner's bound for it: ``output_tolerance``
    with the case's conditioning (how far the exact output moves when every input moves by one
    unit of the compute dtype, :math:`x(1 + \epsilon_c u)`), plus the centering term
    :math:`2\epsilon_c|\mu_{n,g}|\,|\gamma_c|/\sqrt{\sigma^2_{n,g} + \epsilon}` per element."""
    eps_c = EPS[compute_dtype(dtype)]
    ref = reference.group_norm(x64, groups, w64, b64, eps=eps, axis=axis)
    u = np.random.default_rng(12).uniform(-1.0, 1.0, size=x64.shape)
    conditioning = float(
        np.abs(reference.group_norm(x64 * (1 + eps_c * u), groups, w64, b64, eps=eps, axis=axis) - ref).max()
    )
    moved = np.moveaxis(x64, axis, 1)
    n, c = moved.shape[:2]
    blocks = moved.reshape(n, groups, -1)
    gain = np.abs(blocks.mean(axis=2)) / np.sqrt(blocks.var(axis=2) + eps)  # (N, G)
    gain = np.repeat(gain, c // groups, axis=1).reshape((n, c) + (1,) * (moved.ndim - 2))
    if w64 is not None:
        gain = gain * np.abs(w64).reshape((1, c) + (1,) * (moved.ndim - 2))
    gain = np.moveaxis(np.broadcast_to(gain, moved.shape), 1, axis)
    return ref, output_tolerance(dtype).bound(ref, conditioning) + CENTERING_FACTOR * eps_c * gain


GN_DATA = [
    # (id, loc, scale, dtypes)
    ("standard", 0.0, 1.0, DTYPES),
    ("offset-3-std-0.05", 3.0, 0.05, DTYPES),  # where a half-precision mean loses about 1 %
    ("offset-1e4", 1e4, 1.0, ("float32", "float64")),
    ("half-large-values", 300.0, 1.0, ("float16", "bfloat16")),
]


@pytest.mark.parametrize(
    ("loc", "scale", "dtype"),
    [
        pytest.param(loc, scale, dtype, id=f"{name}-{dtype}")
        for name, loc, scale, dtypes in GN_DATA
        for dtype in dtypes
    ],
)
@pytest.mark.parametrize("layout", ["channels-first", "channels-last-memory", "channels-last-axis"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_group_norm_matches_the_reference(
    loc: float, scale: float, dtype: str, layout: str, affine: bool
) -> None:
    rng = np.random.default_rng(13)
    x, x64, axis = laid_out(rng.normal(loc, scale, size=(3, 6, 8, 7)), dtype, layout)
    w = b = w64 = b64 = None
    if affine:
        w, w64 = stored(rng.uniform(0.5, 1.5, size=6), dtype)
        b, b64 = stored(rng.normal(size=6), dtype)
    y = group_norm(x, 2, w, b, 1e-5, axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref, bound = group_norm_bound(x64, 2, w64, b64, 1e-5, axis, dtype)
    assert_within(np.abs(as64(y) - ref), bound, "y")
    if layout == "channels-last-memory":
        assert y.is_contiguous(memory_format=torch.channels_last)  # the layout is kept


@pytest.mark.parametrize("groups", [1, 3, 6], ids=["layer-norm", "3-groups", "instance-norm"])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last-memory", "channels-last-axis"])
def test_group_norm_extreme_group_counts(groups: int, layout: str) -> None:
    rng = np.random.default_rng(14)
    x, x64, axis = laid_out(rng.normal(2.0, 3.0, size=(2, 6, 5, 4)), "float32", layout)
    w, w64 = stored(rng.normal(size=6), "float32")
    ref, bound = group_norm_bound(x64, groups, w64, None, 1e-5, axis, "float32")
    assert_within(np.abs(as64(group_norm(x, groups, w, None, 1e-5, axis)) - ref), bound, "y")


@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 2, 4), (5, 6)], ids=["3d", "5d", "2d"])
def test_group_norm_other_ranks(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(15)
    x, x64 = stored(rng.normal(-1.0, 2.0, size=shape), "float32")
    ref, bound = group_norm_bound(x64, 3, None, None, 1e-5, 1, "float32")
    assert_within(np.abs(as64(group_norm(x, 3, None, None, 1e-5, 1)) - ref), bound, "channels first")
    moved = x.movedim(1, -1).contiguous()
    ref, bound = group_norm_bound(as64(moved), 3, None, None, 1e-5, len(shape) - 1, "float32")
    y = group_norm(moved, 3, None, None, 1e-5, len(shape) - 1)
    assert_within(np.abs(as64(y) - ref), bound, "channels last")


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_first_runs_atens_group_norm(dtype: str) -> None:
    """On channels-first memory the kernel is ``torch.group_norm`` itself (bit for bit; γ and β in
    float32 beside half-precision input), as ``torch.nn.GroupNorm`` runs it."""
    rng = np.random.default_rng(16)
    x, _ = stored(rng.normal(1.0, 2.0, size=(3, 6, 5, 4)), dtype)
    w, b = (torch.from_numpy(rng.normal(size=6)).to(compute_dtype_of(x)) for _ in range(2))
    assert torch.equal(group_norm(x, 2, w, b, 1e-5, 1), F.group_norm(x, 2, w, b, 1e-5))
    assert not strides_like_channels_last(x)
    assert strides_like_channels_last(x.contiguous(memory_format=torch.channels_last))


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    return F64 if x.dtype == F64 else torch.float32


@pytest.mark.parametrize("loc", [1e3, 1e4])
def test_atens_channels_last_group_norm_fails_where_the_kernel_passes(loc: float) -> None:
    """The reason for the two-pass path: ATen's CPU group norm on channels-last memory computes
    :math:`E[x^2] - E[x]^2` in float32 and misses the reference's bound by orders of magnitude at
    mean 1e3-1e4 (std 1), where the kernel, on the same tensor, stays within it."""
    rng = np.random.default_rng(17)
    x, x64, axis = laid_out(rng.normal(loc, 1.0, size=(2, 8, 16, 16)), "float32", "channels-last-memory")
    w, w64 = stored(rng.uniform(0.5, 1.5, size=8), "float32")
    b, b64 = stored(rng.normal(size=8), "float32")
    ref, bound = group_norm_bound(x64, 4, w64, b64, 1e-5, axis, "float32")
    aten = F.group_norm(x, 4, w, b, 1e-5)
    assert np.max(np.abs(as64(aten) - ref) / bound) > 10
    assert_within(np.abs(as64(group_norm(x, 4, w, b, 1e-5, axis)) - ref), bound, "y")


def test_group_of_one_value_is_exactly_beta_on_the_two_pass_path() -> None:
    """``C/G`` = 1 and one spatial value: :math:`x - \\mu = 0` exactly, so :math:`y = \\beta`
    exactly (ATen's fused :math:`x a + (\\beta - \\mu a)` leaves a residue there, within the
    centering term)."""
    x = torch.randn(4, 1, 6) * 100  # channels on axis 2: the two-pass path
    b = torch.randn(6)
    y = group_norm(x, 6, torch.rand(6) + 0.5, b, 1e-5, 2)
    assert torch.equal(y, b.view(1, 1, 6).expand(4, 1, 6))


def test_group_norm_of_an_empty_batch() -> None:
    for x, axis in ((torch.randn(0, 4, 3, 3), 1), (torch.randn(0, 3, 3, 4), 3)):
        y = group_norm(x, 2, None, None, 1e-5, axis)
        assert y.shape == x.shape and y.dtype == x.dtype


GRADCHECK_GN = [
    # (id, shape, axis, channels-last memory): ATen's path, then the two-pass one
    pytest.param((2, 4, 3, 2), 1, False, id="aten-channels-first"),
    pytest.param((2, 4, 5), 1, False, id="aten-3d"),
    pytest.param((2, 4, 3, 2), 1, True, id="two-pass-channels-last-memory"),
    pytest.param((2, 3, 2, 4), 3, False, id="two-pass-channels-last-axis"),
    pytest.param((2, 3, 4), 2, False, id="two-pass-3d-axis-2"),
]


@pytest.mark.parametrize(("shape", "axis", "channels_last"), GRADCHECK_GN)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_gradcheck_group_norm(shape: tuple[int, ...], axis: int, channels_last: bool, affine: bool) -> None:
    g = torch.Generator().manual_seed(18)
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = shape[axis]
    params = [torch.randn(c, generator=g, dtype=F64).requires_grad_() for _ in range(2 if affine else 0)]

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        w, b = params if params else (None, None)
        return group_norm(x, 2, w, b, 1e-5, axis)

    assert torch.autograd.gradcheck(f, (x, *params))


def _gradients(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, call) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    x = x.detach().clone().requires_grad_()
    y = call(module, x)
    y.backward(upstream)
    return {"y": y.detach(), "x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}


def assert_gradients_match_torch_nn(theirs: nn.Module, ours_call, x: torch.Tensor, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Outputs and gradients (x and parameters) of ``ours_call(module, x)`` against ``theirs(x)``
    within the suite's float64 bound around torch.nn's, doubled (two implementations), with
    ``Delta`` how far torch.nn's results move when x and the upstream gradient move by one ulp
    (the conditioning; as ``test_gradients._assert_same_gradients``)."""
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(x.shape, generator=gen, dtype=F64)
    ulp = 2.0**-52 * (2 * torch.rand(x.shape, generator=gen, dtype=F64) - 1)
    expected = _gradients(theirs, x, upstream, lambda m, t: m(t))
    perturbed = _gradients(copy.deepcopy(theirs), x * (1 + ulp), upstream * (1 - ulp), lambda m, t: m(t))
    got = _gradients(copy.deepcopy(theirs), x, upstream, ours_call)
    tolerance = output_tolerance("float64").pairwise()
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        assert e.abs().max() > 1e-3, name  # something worth comparing
        conditioning = float((perturbed[name] - e).abs().max())
        assert_within((got[name] - e).abs().numpy(), tolerance.bound(e.numpy(), 2 * conditioning), name)


@pytest.mark.parametrize("layout", ["channels-last-memory", "channels-last-axis"])
def test_two_pass_group_norm_gradients_match_torch_nn(layout: str) -> None:
    """Where the kernel does not run ATen's op, its autograd gradients against
    ``torch.nn.GroupNorm``'s (on the same values, channels-first) in float64."""
    theirs = nn.GroupNorm(2, 4, dtype=F64)
    g = torch.Generator().manual_seed(19)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(4, generator=g, dtype=F64))
        theirs.bias.copy_(torch.randn(4, generator=g, dtype=F64))
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=F64) * 2 + 1

    def ours(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        to_layout, axis = LAYOUTS[layout]
        y = group_norm(to_layout(t), 2, module.weight, module.bias, module.eps, axis)
        return y if axis == 1 else y.movedim(axis, 1)

    assert_gradients_match_torch_nn(theirs, ours, x, seed=20)


# --------------------------------------------------------------------------------------------
# RMS norm
# --------------------------------------------------------------------------------------------


def rms_reference_bound(
    x64: np.ndarray, w64: np.ndarray | None, axes: tuple[int, ...], eps: float, offset: float, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """The reference output and ``output_tolerance``'s bound with the case's conditioning (no
    centering term: nothing is subtracted)."""
    eps_c = EPS[compute_dtype(dtype)]
    ref = reference.rms_norm(x64, w64, axes=axes, eps=eps, weight_offset=offset)
    u = np.random.default_rng(21).uniform(-1.0, 1.0, size=x64.shape)
    perturbed = reference.rms_norm(x64 * (1 + eps_c * u), w64, axes=axes, eps=eps, weight_offset=offset)
    return ref, output_tolerance(dtype).bound(ref, float(np.abs(perturbed - ref).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("before", [False, True], ids=["after-weight", "before-weight"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["offset-0", "offset-1"])
@pytest.mark.parametrize("weight_dtype", ["same", "float32", "none"])
def test_rms_norm_matches_the_reference(dtype: str, before: bool, offset: float, weight_dtype: str) -> None:
    rng = np.random.default_rng(22)
    x, x64 = stored(rng.normal(0.5, 3.0, size=(4, 3, 64)), dtype)
    w = w64 = None
    if weight_dtype != "none":
        w, w64 = stored(
            rng.uniform(0.5, 2.0, size=64) - offset, dtype if weight_dtype == "same" else "float32"
        )
    y = rms_norm(x, w, (2,), 1e-6, offset, before)
    assert y.dtype == x.dtype and y.shape == x.shape
    # the spec: without a weight the offset is ignored (y = x̂)
    ref, bound = rms_reference_bound(x64, w64, (2,), 1e-6, offset if w is not None else 0.0, dtype)
    assert_within(np.abs(as64(y) - ref), bound, "y")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(
    ("axes", "offset"),
    [
        pytest.param((1, 2), 0.0, id="trailing-2"),
        pytest.param((0, 2), 0.0, id="non-trailing"),
        pytest.param((1,), 1.0, id="middle-offset-1"),
        pytest.param((0, 1, 2), 0.0, id="all"),
    ],
)
def test_rms_norm_over_other_axes(dtype: str, axes: tuple[int, ...], offset: float) -> None:
    rng = np.random.default_rng(23)
    x, x64 = stored(rng.normal(-1.0, 2.0, size=(5, 6, 7)), dtype)
    w, w64 = stored(rng.normal(size=tuple(x64.shape[a] for a in axes)), dtype)
    ref, bound = rms_reference_bound(x64, w64, axes, 1e-5, offset, dtype)
    assert_within(np.abs(as64(rms_norm(x, w, axes, 1e-5, offset, False)) - ref), bound, "y")


def test_rms_norm_at_offset_1e4_in_float32() -> None:
    x, x64 = stored(np.random.default_rng(24).normal(1e4, 1.0, size=(8, 256)), "float32")
    ref, bound = rms_reference_bound(x64, None, (1,), 1.2e-7, 0.0, "float32")
    assert_within(np.abs(as64(rms_norm(x, None, (1,), 1.2e-7, 0.0, False)) - ref), bound, "y")


def _round(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` (NumPy's float16; ``ml_dtypes``' bfloat16), as float64."""
    return values.astype(numpy_dtype(dtype)).astype(np.float64)


def cast_order_brackets(
    xhat64: np.ndarray, gain64: np.ndarray, n: int, dtype: str, before: bool
) -> tuple[np.ndarray, np.ndarray]:
    r"""The interval each float16/bfloat16 output must lie in for one cast order, from the float64
    :math:`\hat x` and the gain :math:`w + o` (exact in float32 here).

    The float32 computation of :math:`\hat x` is off by at most :math:`r = (g + 4)\epsilon_{32}`
    relative (:math:`g = \sqrt n`, :func:`reduction_growth`): the squares are exact (half
    precision values), their sum rounds g times, the division, the ``+ eps``, the reciprocal
    square root (two roundings, halved by the root) and the product once each. Rounding is
    monotone, so the output lies between the results of the interval's two ends:

    * after the weight: :math:`\mathrm{rnd}(\hat x g)`, with the float32 product's own rounding
      (:math:`\epsilon_{32}` more);
    * before it: :math:`\mathrm{rnd}(\mathrm{rnd}(\hat x)\,g)`, the product exact in float32
      (a half-precision value times a gain of at most 13 significant bits).

    Where no rounding boundary falls inside the interval (almost everywhere) the bracket is one
    value: the output is pinned exactly."""
    r = (reduction_growth(n) + 4) * EPS["float32"]
    ends = []
    for side in (-1.0, 1.0):
        xhat = xhat64 * (1 + side * r)
        if before:
            ends.append(_round(_round(xhat, dtype) * gain64, dtype))
        else:
            ends.append(_round(xhat * gain64 * (1 + side * EPS["float32"]), dtype))
    return np.minimum(*ends), np.maximum(*ends)


def _outside(y: np.ndarray, bracket: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return (y < bracket[0]) | (y > bracket[1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("implementation", "offset"),
    [
        pytest.param(implementation, offset, id=f"{implementation}-offset-{offset:g}")
        for implementation in ("kernel", "kernel-float32-weight", "torch.nn.RMSNorm")
        for offset in (0.0, 1.0)
        if implementation != "torch.nn.RMSNorm" or offset == 0.0  # torch.nn has no offset
    ],
)
def test_rms_cast_orders_are_exactly_the_named_roundings(
    dtype: str, offset: float, implementation: str
) -> None:
    """Both cast orders against their definitions (:func:`cast_order_brackets`), and each order's
    outputs outside the other's brackets (the orders differ, and the test tells them apart).
    ``torch.nn.RMSNorm`` (``F.rms_norm``'s half-precision path, offset 0 only) is the after-weight
    order: it is the kernel's path for a weight of the input's dtype."""
    rng = np.random.default_rng(25)
    n = 256
    x, x64 = stored(rng.normal(0.0, 3.0, size=(32, n)), dtype)
    w, w64 = stored(rng.uniform(0.5, 2.0, size=n), dtype)
    gain64 = w64 + offset
    if implementation == "kernel-float32-weight":
        w = w.float()
    xhat64 = reference.rms_norm(x64, None, axes=(1,), eps=1e-6)
    results = {}
    for before in (False, True):
        if implementation == "torch.nn.RMSNorm":
            if before:
                continue
            layer = nn.RMSNorm(n, eps=1e-6, dtype=TORCH_DTYPES[dtype])
            with torch.no_grad():
                layer.weight.copy_(w)
            results[before] = as64(layer(x))
        else:
            results[before] = as64(rms_norm(x, w, (1,), 1e-6, offset, before))
    for before, y in results.items():
        assert not _outside(y, cast_order_brackets(xhat64, gain64, n, dtype, before)).any(), (
            f"{'before' if before else 'after'}-weight outputs outside their roundings"
        )
        other = cast_order_brackets(xhat64, gain64, n, dtype, not before)
        assert _outside(y, other).any(), "the other cast order's brackets reject some of these outputs"


@pytest.mark.parametrize(
    ("dtype", "weight_dtype", "offset", "before", "aten"),
    [
        pytest.param("float16", "float16", 0.0, False, True, id="half-after"),
        pytest.param("bfloat16", "bfloat16", 0.0, False, True, id="bf16-after"),
        pytest.param("float32", "float32", 0.0, True, True, id="float32-before-is-after"),
        pytest.param("float64", "float64", 0.0, False, True, id="float64"),
        pytest.param("float16", "float16", 0.0, True, False, id="half-before"),
        pytest.param("float16", "float32", 0.0, False, False, id="half-float32-weight"),
        pytest.param("float32", "float32", 1.0, False, False, id="offset"),
    ],
)
def test_rms_norm_runs_aten_exactly_where_it_is_the_spec(
    dtype: str, weight_dtype: str, offset: float, before: bool, aten: bool
) -> None:
    """``F.rms_norm`` for offset 0, the after-weight order (or float32/float64 input) and a weight
    of the input's dtype; elsewhere its own sequence of the same operations, which equals
    ``F.rms_norm`` with the weight :math:`w + o` where the orders agree."""
    g = torch.Generator().manual_seed(26)
    x = torch.randn(4, 3, 16, generator=g).to(TORCH_DTYPES[dtype])
    w = torch.rand(16, generator=g).to(TORCH_DTYPES[weight_dtype]) + 0.5
    y = rms_norm(x, w, (2,), 1e-6, offset, before)
    if aten:
        assert torch.equal(y, F.rms_norm(x, (16,), w, 1e-6))
    if not before:  # the same operations as ATen's composite, with the gain w + o in float32
        gain = w.to(compute_dtype_of(x)) + offset
        assert torch.equal(y, F.rms_norm(x.to(compute_dtype_of(x)), (16,), gain, 1e-6).to(x.dtype))


GRADCHECK_RMS = [
    pytest.param((3, 4, 5), (2,), 0.0, id="aten-trailing"),
    pytest.param((3, 4, 5), (1, 2), 0.0, id="aten-trailing-2"),
    pytest.param((3, 4, 5), (0, 2), 0.0, id="aten-non-trailing"),
    pytest.param((3, 4, 5), (2,), 1.0, id="offset"),
    pytest.param((3, 4, 5), (0, 1), 1.0, id="offset-non-trailing"),
]


@pytest.mark.parametrize(("shape", "axes", "offset"), GRADCHECK_RMS)
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
def test_gradcheck_rms_norm(
    shape: tuple[int, ...], axes: tuple[int, ...], offset: float, weighted: bool
) -> None:
    g = torch.Generator().manual_seed(27)
    x = (torch.randn(shape, generator=g, dtype=F64) + 0.5).requires_grad_()
    params = (
        [torch.randn(tuple(shape[a] for a in axes), generator=g, dtype=F64).requires_grad_()]
        if weighted
        else []
    )

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, params[0] if params else None, axes, 1e-5, offset, True)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize(
    ("axes", "offset"),
    [pytest.param((2, 3), 1.0, id="offset"), pytest.param((1, 2), 0.0, id="non-trailing")],
)
def test_rms_norm_gradients_match_torch_nn(axes: tuple[int, ...], offset: float) -> None:
    """Where the kernel computes the formula itself (weight offset, axes moved), its gradients
    against ``torch.nn.RMSNorm``'s on the same values, with the weight :math:`w + o` (the
    derivative of :math:`w + o` by :math:`w` is 1) in float64."""
    x = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(28), dtype=F64) + 0.5
    trailing = (2, 3)
    theirs = nn.RMSNorm([x.shape[a] for a in axes], eps=1e-5, dtype=F64)
    with torch.no_grad():
        theirs.weight.copy_(
            torch.randn(theirs.weight.shape, generator=torch.Generator().manual_seed(29), dtype=F64)
        )
    moved = x.movedim(axes, trailing)

    def ours(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        # torch.nn's layer sees t with the axes moved to the end; the kernel sees them in place
        weight = module.weight - offset  # a leaf's function: the gradient flows to module.weight
        y = rms_norm(t.movedim(trailing, axes), weight, axes, module.eps, offset, False)
        return y.movedim(axes, trailing)

    assert_gradients_match_torch_nn(theirs, ours, moved, seed=30)


# --------------------------------------------------------------------------------------------
# plugin: registration, astype, the public functions
# --------------------------------------------------------------------------------------------


def test_the_plugin_registers_every_v2_kernel() -> None:
    backend = backend_named("torch", torch.zeros(2))
    assert backend.moments is statistics.moments
    assert backend.normalize is statistics.normalize
    assert backend.group_norm is group_norm_module.group_norm
    assert backend.rms_norm is rms_norm
    assert not backend.composed  # nothing is composed from the primitives: every op is native


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, TORCH_DTYPES[name]) for name in DTYPES] + [("int64", torch.int64), ("bool", torch.bool)],
)
def test_astype(name: str, dtype: torch.dtype) -> None:
    astype = load_backend("torch").astype
    assert astype is not None
    t = torch.tensor([0.0, 1.0, 2.5])
    converted = astype(t, name)
    assert converted.dtype == dtype and converted.device == t.device
    assert astype(t, torch.float64).dtype == F64  # a torch dtype is taken as is
    if dtype.is_floating_point:  # differentiable
        leaf = t.clone().requires_grad_()
        astype(leaf, name).sum().backward()
        assert torch.equal(leaf.grad, torch.ones(3))


def test_public_functions_dispatch_to_the_kernels() -> None:
    """normkit's public functions on tensors run these kernels (same results, autograd kept)."""
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(3, 6, 4, 5, generator=g) + 2).requires_grad_()
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    y = normkit.group_norm(x, 2, w, b, eps=1e-5)
    assert torch.equal(y, F.group_norm(x, 2, w, b, 1e-5)) and y.requires_grad
    r = normkit.rms_norm(x, torch.rand(5, generator=g), normalized_shape=5)
    assert r.requires_grad and r.shape == x.shape
    mask = torch.rand(3, 1, 4, 5, generator=g) < 0.5
    m = normkit.moments(x, mask=mask)
    direct = statistics.moments(x, (0, 2, 3), mask, None, None)
    for a, e in zip(m, direct, strict=True):
        assert torch.equal(a, e)
    z = normkit.normalize(x, m.mean, m.var(), w, b, eps=1e-5)
    assert z.requires_grad and z.dtype == x.dtype
