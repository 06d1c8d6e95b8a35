"""Accuracy on large channels at large offsets, beyond the conformance cases (which keep every
channel small): TensorFlow's CPU reductions over outer axes add values one after another, so an
unshifted two-pass (Keras's) leaves the suite's bound here. The kernels' shifted two-pass must
not. Judged by the suite's own runner and tolerance against the float64 reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from normkit.testing import Case, run_case
from normkit_tensorflow.testing import register_function_backends

LARGE = [
    Case("bn-nhwc-65k-offset-100", "batch_norm", (16, 64, 64, 4), options={"axis": -1}, loc=100.0),
    Case("bn-nhwc-262k-offset-1e4", "batch_norm", (64, 64, 64, 2), options={"axis": -1}, loc=1e4),
    Case("bn-nchw-65k-offset-100", "batch_norm", (16, 4, 64, 64), loc=100.0),
    Case(
        "in-nhwc-65k-offset-100",
        "instance_norm",
        (2, 256, 256, 2),
        options={"axis": -1, "track_running_stats": True},
        loc=100.0,
    ),
    Case(
        "in-nchw-65k-offset-100",
        "instance_norm",
        (2, 2, 256, 256),
        options={"track_running_stats": True},
        loc=100.0,
    ),
    Case("ln-262k-offset-1e4", "layer_norm", (2, 262144), options={"normalized_shape": 262144}, loc=1e4),
    # float64 at 100: at 1e4 the float64 reference itself (a pairwise sum of x) is off by about
    # 13 eps|mu|, more than the bound, so it cannot judge a backend there
    Case(
        "bn-nhwc-65k-offset-100-f64",
        "batch_norm",
        (16, 64, 64, 4),
        dtype="float64",
        options={"axis": -1},
        loc=100.0,
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _function_backends() -> Iterator[None]:
    with register_function_backends():
        yield


@pytest.mark.parametrize("backend", ["tensorflow", "tensorflow-function"])
@pytest.mark.parametrize("case", LARGE, ids=lambda case: case.id)
def test_large_offset_channels_stay_within_the_suites_bound(case: Case, backend: str) -> None:
    result = run_case(case, backend)
    assert result.passed, result.report()
