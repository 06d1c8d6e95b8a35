"""The oracle checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normkit import reference


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
