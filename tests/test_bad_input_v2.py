"""Bad input to the spec-v2 operations gets an error naming the parameter, what it got and what
was expected; a layer call that fails leaves the layer as it was."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import normkit

X = np.random.default_rng(0).normal(size=(4, 6, 5)).astype(np.float32)
STATS = normkit.moments(X, axis=1)

BAD: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "groups-not-dividing",
        lambda: normkit.group_norm(X, 4),
        ValueError,
        "num_groups=4 does not divide the 6 channels",
    ),
    ("groups-zero", lambda: normkit.group_norm(X, 0), ValueError, "num_groups=0: expected a positive int"),
    ("groups-float", lambda: normkit.group_norm(X, 2.0), TypeError, "num_groups=2.0: expected an int"),
    ("group-axis-0", lambda: normkit.group_norm(X, 2, axis=0), ValueError, "axis=0 is the batch axis"),
    (
        "group-weight-shape",
        lambda: normkit.group_norm(X, 2, np.ones(5, np.float32)),
        ValueError,
        "weight has shape (5,); expected (6,)",
    ),
    (
        "group-1d",
        lambda: normkit.group_norm(X[0, 0], 1),
        ValueError,
        "group_norm expects an array with at least 2 dimensions",
    ),
    (
        "rms-cast",
        lambda: normkit.rms_norm(X, cast="middle"),
        ValueError,
        "cast='middle'; expected one of ('after_weight', 'before_weight')",
    ),
    (
        "rms-offset",
        lambda: normkit.rms_norm(X, np.ones(5, np.float32), weight_offset="1"),
        TypeError,
        "weight_offset='1': expected a finite number",
    ),
    (
        "rms-eps",
        lambda: normkit.rms_norm(X, eps=0.0),
        ValueError,
        "eps=0.0: expected a positive finite number",
    ),
    (
        "rms-weight-shape",
        lambda: normkit.rms_norm(X, np.ones(4, np.float32)),
        ValueError,
        "weight has shape (4,); expected (5,)",
    ),
    (
        "moments-axis-and-axes",
        lambda: normkit.moments(X, axis=2, axes=(0,)),
        ValueError,
        "pass axis (the kept axes) or axes",
    ),
    (
        "moments-no-axes",
        lambda: normkit.moments(X, axes=()),
        ValueError,
        "axes=() names no axis to reduce over",
    ),
    ("moments-keeps-all", lambda: normkit.moments(X, axis=(0, 1, 2)), ValueError, "keeps every axis of x"),
    ("moments-axis-range", lambda: normkit.moments(X, axis=3), ValueError, "axis=3 is out of range"),
    (
        "mask-dtype",
        lambda: normkit.moments(X, mask=np.ones(X.shape, np.float32)),
        TypeError,
        "mask has dtype float32; expected bool",
    ),
    (
        "mask-shape",
        lambda: normkit.moments(X, mask=np.ones((4, 6), bool)),
        ValueError,
        "mask has shape (4, 6); expected x's shape (4, 6, 5)",
    ),
    (
        "mask-type",
        lambda: normkit.moments(X, mask=[[True]]),
        TypeError,
        "mask is a list; expected a boolean array",
    ),
    (
        "mask-on-instance-norm",
        lambda: normkit.InstanceNorm()(X, mask=np.ones(X.shape, bool)),
        TypeError,
        "InstanceNorm takes no mask",
    ),
    ("merge-nothing", lambda: normkit.merge_moments(), ValueError, "merge_moments needs at least one part"),
    (
        "merge-shapes",
        lambda: normkit.merge_moments(STATS, normkit.moments(X, axis=2)),
        ValueError,
        "parts[1].count has shape (5,); expected (6,)",
    ),
    (
        "normalize-mean-shape",
        lambda: normkit.normalize(X, np.zeros(5, np.float32), np.ones(6, np.float32), eps=1e-5),
        ValueError,
        "mean has shape (5,); expected (6,)",
    ),
    (
        "normalize-eps",
        lambda: normkit.normalize(X, STATS.mean, STATS.var(), eps=-1.0),
        ValueError,
        "eps=-1.0",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_parameter(call: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()


@pytest.mark.parametrize(
    ("layer", "good", "bad"),
    [
        (normkit.GroupNorm(3), X, np.ones((4, 9, 5), np.float32)),
        (normkit.RMSNorm(5), X, np.ones((4, 6, 4), np.float32)),
    ],
    ids=["group-norm", "rms-norm"],
)
def test_a_failed_layer_call_changes_no_state(layer: Any, good: np.ndarray, bad: np.ndarray) -> None:
    layer(good)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"x has shape|x with shape"):
        layer(bad)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value)
        else:
            assert after[key] == value


def test_a_masked_batch_norm_that_fails_changes_no_state() -> None:
    layer = normkit.BatchNorm(preset="keras")
    layer(X.transpose(0, 2, 1).copy())
    before = {k: v.copy() for k, v in layer.state_dict().items() if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError, match="mask has shape"):
        layer(X.transpose(0, 2, 1).copy(), mask=np.ones((3, 3, 1), bool))
    for key, value in before.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)
    assert layer.num_batches_tracked == 1
