"""Hypothesis strategies: random conformance cases over shapes, dtypes and parameters."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from normkit.testing.cases import Case

__all__ = ["cases"]

_MODES = st.sampled_from(["train", "eval"])


@st.composite
def _batch_or_instance_case(draw: st.DrawFn, op: str, dtypes: Sequence[str]) -> Case:
    spatial = draw(st.lists(st.integers(1, 5), min_size=1 if op == "instance_norm" else 0, max_size=3))
    channels = draw(st.integers(1, 5))
    batch = draw(st.integers(2, 6))
    preset = draw(st.sampled_from(["torch", "keras", "flax", "onnx"]))
    channels_last = draw(st.booleans())
    shape = (batch, *spatial, channels) if channels_last else (batch, channels, *spatial)
    per_group = 1 if op == "instance_norm" else batch
    for size in spatial:
        per_group *= size
    options: dict[str, object] = {
        "preset": preset,
        "axis": -1 if channels_last else 1,
        "affine": draw(st.booleans()),
        "track_running_stats": draw(st.booleans()),
        "momentum": draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
    }
    if per_group < 2:  # one value per group: allowed under every preset but torch's rule
        options["allow_single_value"] = True
        options["running_var_estimator"] = "biased"
    return Case(
        id=f"random-{op}-{draw(st.integers(0, 2**16))}",
        op=op,
        shape=shape,
        dtype=draw(st.sampled_from(list(dtypes))),
        options=options,
        steps=tuple(draw(st.lists(_MODES, min_size=1, max_size=4))),
        loc=draw(st.sampled_from([0.0, 3.0, -50.0])),
        scale=draw(st.sampled_from([1.0, 0.1, 10.0])),
        noncontiguous=draw(st.booleans()),
    )


@st.composite
def _layer_norm_case(draw: st.DrawFn, dtypes: Sequence[str]) -> Case:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    ndim = len(shape)
    if draw(st.booleans()):
        trailing = draw(st.integers(1, ndim))
        options: dict[str, object] = {"normalized_shape": shape[ndim - trailing :]}
    else:
        axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        options = {"axis": tuple(sorted(axes))}
    options["preset"] = draw(st.sampled_from(["torch", "keras", "flax", "onnx"]))
    options["affine"] = draw(st.booleans())
    return Case(
        id=f"random-layer_norm-{draw(st.integers(0, 2**16))}",
        op="layer_norm",
        shape=shape,
        dtype=draw(st.sampled_from(list(dtypes))),
        options=options,
        steps=tuple(draw(st.lists(_MODES, min_size=1, max_size=2))),
        loc=draw(st.sampled_from([0.0, 3.0, -50.0])),
        scale=draw(st.sampled_from([1.0, 0.1, 10.0])),
        noncontiguous=draw(st.booleans()),
    )


def cases(dtypes: Sequence[str] = ("float16", "float32", "float64")) -> st.SearchStrategy[Case]:
    """Random :class:`~normkit.testing.cases.Case` records for all three operations."""
    return st.one_of(
        _batch_or_instance_case("batch_norm", dtypes),
        _batch_or_instance_case("instance_norm", dtypes),
        _layer_norm_case(dtypes),
    )
