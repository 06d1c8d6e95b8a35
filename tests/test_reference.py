"""The oracle checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normkit import reference
from normkit.testing.primitives import moments_bounds
from normkit.testing.tolerances import EPS, centering_gain, output_tolerance


def test_batch_norm_by_hand() -> None:
    # one channel holding 1, 2, 3, 4: mean 2.5, biased variance 1.25, unbiased 5/3
    x = np.array([[1.0, 2.0], [3.0, 4.0]])[:, None, :]  # (N=2, C=1, L=2)
    y, mean, var = reference.batch_norm(
        x, [2.0], [1.0], [0.0], [1.0], training=True, momentum=0.5, eps=0.0, axis=1, unbiased_running_var=True
    )
    s = math.sqrt(1.25)
    np.testing.assert_allclose(y.ravel(), [2 * (v - 2.5) / s + 1 for v in (1, 2, 3, 4)])
    np.testing.assert_allclose(mean, [0.5 * 0 + 0.5 * 2.5])
    np.testing.assert_allclose(var, [0.5 * 1 + 0.5 * 5 / 3])
    _, _, biased = reference.batch_norm(
        x, None, None, [0.0], [1.0], training=True, momentum=1.0, eps=0.0, axis=1, unbiased_running_var=False
    )
    np.testing.assert_allclose(biased, [1.25])


def test_batch_norm_eval_by_hand() -> None:
    y, mean, _var = reference.batch_norm(
        np.array([[3.0, -1.0]]),
        None,
        [10.0, 0.0],
        [1.0, 2.0],
        [4.0, 0.5],
        training=False,
        momentum=0.1,
        eps=0.0,
        axis=1,
        unbiased_running_var=True,
    )
    np.testing.assert_allclose(y, [[(3 - 1) / 2 + 10, (-1 - 2) / math.sqrt(0.5)]])
    np.testing.assert_allclose(mean, [1.0, 2.0])


def test_channels_last_is_the_same_computation() -> None:
    x = np.arange(24.0).reshape(2, 3, 4)
    first, _, _ = reference.batch_norm(
        x, None, None, training=True, momentum=0.1, eps=1e-5, axis=1, unbiased_running_var=True
    )
    last, _, _ = reference.batch_norm(
        np.moveaxis(x, 1, -1),
        None,
        None,
        training=True,
        momentum=0.1,
        eps=1e-5,
        axis=-1,
        unbiased_running_var=True,
    )
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), first)


def test_instance_norm_by_hand() -> None:
    # two instances, one channel: [0, 2] and [10, 30]; means 1 and 20; biased variances 1 and 100
    x = np.array([[[0.0, 2.0]], [[10.0, 30.0]]])
    y, mean, var = reference.instance_norm(
        x,
        None,
        None,
        [0.0],
        [0.0],
        use_input_stats=True,
        momentum=1.0,
        eps=0.0,
        axis=1,
        unbiased_running_var=True,
    )
    np.testing.assert_allclose(y, [[[-1.0, 1.0]], [[-1.0, 1.0]]])
    np.testing.assert_allclose(mean, [10.5])  # the mean over instances of the instance means
    np.testing.assert_allclose(var, [(2.0 + 200.0) / 2])  # unbiased: 2 and 200


def test_layer_norm_by_hand() -> None:
    x = np.array([[1.0, 3.0], [2.0, 2.0]])
    y = reference.layer_norm(x, np.array([1.0, 2.0]), np.array([0.0, 1.0]), axes=(1,), eps=0.0 + 1e-300)
    np.testing.assert_allclose(y, [[-1.0, 3.0], [0.0, 1.0]])
    rows = reference.layer_norm(x, axes=(0,), eps=0.0 + 1e-300)  # over the first axis
    np.testing.assert_allclose(rows, [[-1.0, 1.0], [1.0, -1.0]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_reference_is_float64_whatever_the_input(dtype: type) -> None:
    y = reference.layer_norm(np.ones((2, 3), dtype), axes=(1,), eps=1e-5)
    assert y.dtype == np.float64


# --- spec version 2: statistics as values, group norm, RMS norm -----------------------------


def test_moments_by_hand_with_and_without_a_mask() -> None:
    # two groups (axis 1 kept): [1, 2, 3, 6] and [5, 5, 5, 5]
    x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [6.0, 5.0]])
    count, mean, m2 = reference.moments(x, axes=(0,))
    np.testing.assert_array_equal(count, [4, 4])
    np.testing.assert_array_equal(mean, [3.0, 5.0])
    np.testing.assert_array_equal(m2, [4 + 1 + 0 + 9, 0.0])
    mask = np.array([[True, False], [True, False], [False, False], [True, False]])
    count, mean, m2 = reference.moments(x, axes=(0,), mask=mask)  # group 0 keeps 1, 2, 6; group 1 nothing
    np.testing.assert_array_equal(count, [3, 0])
    np.testing.assert_array_equal(mean, [3.0, 0.0])  # an empty group is (0, 0, 0): the merge's identity
    np.testing.assert_array_equal(m2, [4 + 1 + 9, 0.0])


def test_moments_keep_the_other_axes_as_groups_in_order() -> None:
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(4, 3, 5))
    count, mean, m2 = reference.moments(x, axes=(0, 2))
    assert count.shape == mean.shape == m2.shape == (3,)
    np.testing.assert_array_equal(count, [20, 20, 20])
    _, _, _, mean_bound, m2_bound = moments_bounds(x, (0, 2), None, "float64")  # NumPy's sums against ours
    assert np.all(np.abs(mean - x.mean(axis=(0, 2))) <= mean_bound)
    assert np.all(np.abs(m2 - count * x.var(axis=(0, 2))) <= m2_bound)
    count, mean, m2 = reference.moments(x, axes=(2,))
    assert mean.shape == (4, 3) and np.all(count == 5)


def test_normalize_by_hand() -> None:
    x = np.array([[1.0, 10.0], [3.0, 20.0]])  # channels on axis 1
    y = reference.normalize(x, [2.0, 10.0], [1.0, 100.0], [2.0, 1.0], [0.0, -1.0], eps=0.0, axis=1)
    np.testing.assert_array_equal(y, [[-2.0, -1.0], [2.0, 0.0]])


def test_group_norm_by_hand_and_as_layer_and_instance_norm() -> None:
    # one sample, 4 channels of 2 values, 2 groups: group 0 holds 0, 2, 4, 6 (mean 3, var 5)
    x = np.array([[[0.0, 2.0], [4.0, 6.0], [1.0, 1.0], [1.0, 1.0]]])
    y = reference.group_norm(x, 2, [1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.5, 0.5], eps=0.0, axis=1)
    # mean 3 and variance 5 are exact; a square root and a division round on each side
    np.testing.assert_allclose(
        y[0, :2].ravel(), (np.array([0, 2, 4, 6]) - 3) / math.sqrt(5), rtol=4 * EPS["float64"]
    )
    np.testing.assert_array_equal(y[0, 2:], 0.5)  # a constant group gives beta
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(3, 6, 4, 5))
    one_group = reference.group_norm(x, 1, eps=1e-5, axis=1)
    layer = reference.layer_norm(x, axes=(1, 2, 3), eps=1e-5)
    tolerance = output_tolerance("float64", centering_gain=centering_gain(x.mean(), x.var(), 1e-5)).pairwise()
    np.testing.assert_allclose(one_group, layer, **tolerance.kwargs)
    per_channel = reference.group_norm(x, 6, eps=1e-5, axis=1)
    instance, _, _ = reference.instance_norm(
        x,
        None,
        None,
        None,
        None,
        use_input_stats=True,
        momentum=0.1,
        eps=1e-5,
        axis=1,
        unbiased_running_var=False,
    )
    np.testing.assert_allclose(per_channel, instance, **tolerance.kwargs)
    channels_last = reference.group_norm(np.moveaxis(x, 1, -1), 3, eps=1e-5, axis=-1)
    np.testing.assert_allclose(
        np.moveaxis(channels_last, -1, 1), reference.group_norm(x, 3, eps=1e-5, axis=1)
    )
    with pytest.raises(ValueError, match="num_groups=4 must be a positive divisor of the 6 channels"):
        reference.group_norm(x, 4, eps=1e-5, axis=1)


def test_rms_norm_by_hand() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]])  # mean square 12.5 and 0
    y = reference.rms_norm(x, [1.0, 2.0], axes=(1,), eps=0.0)
    # the mean square 12.5 is exact; a square root and a division round on each side
    np.testing.assert_allclose(y[0], [3 / math.sqrt(12.5), 8 / math.sqrt(12.5)], rtol=4 * EPS["float64"])
    zero = reference.rms_norm(x, axes=(1,), eps=1e-6)
    np.testing.assert_array_equal(zero[1], 0.0)  # no mean is subtracted; zeros stay zeros
    gemma = reference.rms_norm(x, [0.0, 1.0], axes=(1,), eps=0.0, weight_offset=1.0)  # (1 + w)
    np.testing.assert_array_equal(gemma, y)  # 1 + [0, 1] is exactly [1, 2]


def test_group_norm_and_rms_norm_against_torch_in_float64() -> None:
    """torch.nn's own layers, float64 contiguous input (where torch's CPU kernels are two-pass):
    two implementations of one formula agree within twice the suite's float64 bound, with the
    centering term of these statistics (agreement_tolerance)."""
    torch = pytest.importorskip("torch")
    from normkit.testing.tolerances import agreement_tolerance, centering_gain

    rng = np.random.default_rng(2)
    x = rng.normal(5.0, 3.0, size=(2, 8, 6, 6))
    weight, bias = rng.normal(size=8), rng.normal(size=8)
    module = torch.nn.GroupNorm(4, 8, eps=1e-5).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.copy_(torch.from_numpy(bias))
        expected = module(torch.from_numpy(x)).numpy()
    got = reference.group_norm(x, 4, weight, bias, eps=1e-5, axis=1)
    groups = x.reshape(2, 4, -1)
    gain = centering_gain(groups.mean(axis=2), groups.var(axis=2), 1e-5, np.abs(weight).max())
    np.testing.assert_allclose(got, expected, **agreement_tolerance("float64", centering_gain=gain).kwargs)
    rms = torch.nn.RMSNorm((6, 6), eps=1e-6).double()
    w = rng.normal(size=(6, 6))
    with torch.no_grad():
        rms.weight.copy_(torch.from_numpy(w))
        expected = rms(torch.from_numpy(x)).numpy()
    got = reference.rms_norm(x, w, axes=(2, 3), eps=1e-6)
    np.testing.assert_allclose(got, expected, **agreement_tolerance("float64").kwargs)  # no mean subtracted


def test_masked_moments_never_read_a_masked_value() -> None:
    """A NaN or inf under the mask leaves the moments those of the unmasked values (counted by
    hand: 1 + 2 + 6 over three values)."""
    x = np.array([[1.0, np.nan], [2.0, np.inf], [6.0, 5.0]])
    mask = np.array([[True, False], [True, False], [True, True]])
    count, mean, m2 = reference.moments(x, (0,), mask)
    np.testing.assert_array_equal(count, [3, 1])
    np.testing.assert_array_equal(mean, [3.0, 5.0])
    np.testing.assert_array_equal(m2, [14.0, 0.0])
