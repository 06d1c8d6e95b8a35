"""Conformance cases: data records with stable ids.

A case names an operation, a layer configuration, an input (shape, dtype, distribution,
layout) and a sequence of calls (``"train"``/``"eval"``). The runner
(:mod:`normkit.testing.runner`) plays the sequence on a backend's layer and on the float64
reference and compares every output and the final state. Ids are stable: xfail files and the
docs refer to them. Every case also checks the invariants (inputs not mutated, output dtype
and shape, eval leaves the state unchanged, layer norm identical in training and eval); the
cases named after an invariant exist so that each rule of the spec has a case of its own.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from normkit.numpy_backend import numpy_dtype
from normkit.presets import get_preset

__all__ = ["CASES", "Case", "get_case"]

SHORT_DTYPE = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}
ALL_DTYPES = tuple(SHORT_DTYPE)


@dataclass(frozen=True)
class Case:
    """One conformance case. ``options`` are keyword arguments of the layer class."""

    id: str
    op: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    options: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[str, ...] = ("train", "train", "eval")
    loc: float = 0.0
    scale: float = 1.0
    noncontiguous: bool = False
    constant_channel: int | None = None
    purpose: str = ""

    @property
    def seed(self) -> int:
        """A seed derived from the id, so a case's data never depends on the case list."""
        return zlib.crc32(self.id.encode())

    @property
    def channel_axis(self) -> int:
        axis = self.options.get("axis")
        if axis is None:
            axis = get_preset(self.options.get("preset", "torch")).axis
        return axis % len(self.shape)

    @property
    def state_dtype(self) -> str:
        return "float64" if self.dtype == "float64" else "float32"

    def input(self, step: int) -> np.ndarray:
        """The input of call ``step`` as a NumPy array of the case's dtype. For a
        non-contiguous case this is the wide array; the call uses ``x[..., ::2]``."""
        rng = np.random.default_rng([self.seed, step])
        shape = (*self.shape[:-1], 2 * self.shape[-1]) if self.noncontiguous else self.shape
        x = rng.normal(self.loc, self.scale, size=shape)
        if self.constant_channel is not None:
            index = [slice(None)] * len(shape)
            index[self.channel_axis] = self.constant_channel
            x[tuple(index)] = self.loc + 0.1 * self.scale
        return x.astype(numpy_dtype(self.dtype))

    def mask(self) -> np.ndarray | None:
        """The boolean mask of a ``moments`` case (``options["mask"]``): ``"unequal"`` keeps a
        share of each channel rising from 20 % to 90 %, ``"broadcast"`` is a random mask with size
        1 on the channel axis, ``"none"`` keeps nothing; ``None`` without the option."""
        kind = self.options.get("mask")
        if kind is None:
            return None
        rng = np.random.default_rng([self.seed, 2_000_000])
        axis = self.channel_axis
        if kind == "none":
            return np.zeros(self.shape, dtype=bool)
        if kind == "broadcast":
            shape = list(self.shape)
            shape[axis] = 1
            return rng.random(shape) < 0.6
        share = np.linspace(0.2, 0.9, self.shape[axis]).reshape(
            [self.shape[axis] if a == axis else 1 for a in range(len(self.shape))]
        )
        return rng.random(self.shape) < share

    def param_shape(self) -> tuple[int, ...]:
        """Shape of weight and bias."""
        if self.op not in ("layer_norm", "rms_norm"):
            return (self.shape[self.channel_axis],)
        normalized = self.options.get("normalized_shape")
        if normalized is not None:
            return (normalized,) if isinstance(normalized, int) else tuple(normalized)
        axis = self.options.get("axis", -1)
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        return tuple(self.shape[a % len(self.shape)] for a in sorted(a % len(self.shape) for a in axes))

    def initial_state(self) -> dict[str, np.ndarray]:
        """Random but well-conditioned starting arrays (NumPy, the state dtype), for every
        array key a layer may have; the runner keeps the ones the layer uses."""
        rng = np.random.default_rng([self.seed, 1_000_000])
        shape = self.param_shape()
        dtype = np.dtype(self.state_dtype)
        state = {
            "weight": 1.0 + 0.5 * rng.standard_normal(shape),
            "bias": 0.5 * rng.standard_normal(shape),
            "running_mean": self.loc + 0.1 * self.scale * rng.standard_normal(shape),
            "running_var": self.scale**2 * rng.uniform(0.5, 1.5, size=shape),
        }
        return {key: value.astype(dtype) for key, value in state.items()}


def _case(id: str, op: str, shape: tuple[int, ...], **fields: Any) -> Case:
    return Case(id=id, op=op, shape=shape, **fields)


def _per_dtype(prefix: str, op: str, shape: tuple[int, ...], **fields: Any) -> list[Case]:
    return [_case(f"{prefix}-{SHORT_DTYPE[d]}", op, shape, dtype=d, **fields) for d in ALL_DTYPES]


_BN = "batch_norm"
_IN = "instance_norm"
_LN = "layer_norm"
_GN = "group_norm"
_RMS = "rms_norm"
_MOMENTS = "moments"
_NORMALIZE = "normalize"
_MERGE = "merge_moments"

LAYER_OPS = (_BN, _IN, _LN, _GN, _RMS)
"""Operations whose cases play a layer through its steps; the others call one function once."""
PRIMITIVE_OPS = (_MOMENTS, _NORMALIZE, _MERGE)

CASES: tuple[Case, ...] = tuple(
    [
        *_per_dtype(
            "bn-output-dtype", _BN, (8, 3, 5, 4), purpose="output dtype equals input dtype; train then eval"
        ),
        *_per_dtype(
            "in-basic", _IN, (4, 3, 6, 5), options={"affine": True}, purpose="instance norm, train and eval"
        ),
        *_per_dtype(
            "ln-basic",
            _LN,
            (4, 5, 16),
            options={"normalized_shape": 16},
            purpose="layer norm over the last axis",
        ),
        _case(
            "bn-offset-1e4",
            _BN,
            (16, 3, 8, 8),
            loc=1e4,
            scale=1.0,
            steps=("train",) * 3 + ("eval",),
            purpose="mean offset |mean|/std = 1e4 in float32 catches E[x^2]-E[x]^2",
        ),
        _case(
            "bn-keras-preset-offset-1e4",
            _BN,
            (16, 8, 8, 3),
            loc=1e4,
            options={"preset": "keras"},
            steps=("train",) * 3 + ("eval",),
            purpose="mean offset 1e4 under keras conventions (biased running variance, channels-last), "
            "so that layers that store the biased variance meet the offset too",
        ),
        _case(
            "bn-offset-100-small-batch",
            _BN,
            (3, 4),
            loc=100.0,
            scale=1.0,
            steps=("train", "train", "eval"),
            purpose="three values per channel at |mean|/std = 100: E[x^2]-E[x]^2 fails even where "
            "the allowance for a rounded mean is largest",
        ),
        _case(
            "in-offset-1e4",
            _IN,
            (4, 3, 16, 16),
            loc=1e4,
            options={"affine": True},
            purpose="instance norm with a 1e4 offset",
        ),
        _case("ln-offset-1e4", _LN, (8, 256), loc=1e4, purpose="layer norm with a 1e4 offset"),
        _case(
            "ln-offset-1000-std-0.1",
            _LN,
            (8, 256),
            loc=1000.0,
            scale=0.1,
            purpose="mean 1000, std 0.1 in float32: a one-pass variance clamped at 0 gives (x - mean)/sqrt(eps)",
        ),
        _case(
            "bn-float16-large-values",
            _BN,
            (16, 3, 6, 6),
            dtype="float16",
            loc=1000.0,
            scale=100.0,
            steps=("train",) * 3 + ("eval",),
            purpose="float16 values >= 256: squares overflow float16, statistics must accumulate in float32",
        ),
        _case(
            "ln-float16-large-values",
            _LN,
            (8, 64),
            dtype="float16",
            loc=1000.0,
            scale=100.0,
            purpose="float16 layer norm with values >= 256",
        ),
        _case(
            "bn-one-value-per-channel",
            _BN,
            (1, 4),
            options={"preset": "keras", "axis": 1},
            steps=("train", "train", "eval"),
            purpose="one value per channel (keras allows it): y = beta, biased update",
        ),
        _case(
            "bn-two-values-per-channel",
            _BN,
            (2, 4),
            steps=("train", "train", "eval"),
            purpose="two values per channel: the unbiased running variance is twice the biased one",
        ),
        _case(
            "bn-ema-20-steps",
            _BN,
            (8, 3, 4, 4),
            steps=("train",) * 20 + ("eval",),
            loc=2.0,
            scale=3.0,
            purpose="20 exponential-average updates",
        ),
        _case(
            "bn-cumulative-average",
            _BN,
            (8, 3, 4, 4),
            options={"momentum": None},
            steps=("train",) * 6 + ("eval",),
            loc=-1.0,
            scale=2.0,
            purpose="momentum=None: running statistics are the plain average of the batches'",
        ),
        _case(
            "bn-eval-after-train",
            _BN,
            (8, 3, 4, 4),
            steps=("train",) * 3 + ("eval",) * 3,
            purpose="eval normalizes with the running statistics",
        ),
        _case(
            "bn-eval-untracked",
            _BN,
            (8, 3, 4, 4),
            options={"track_running_stats": False},
            steps=("train", "eval", "eval"),
            purpose="no running statistics: eval uses batch statistics",
        ),
        _case(
            "bn-eval-state-unchanged",
            _BN,
            (8, 3, 4, 4),
            steps=("eval", "eval", "train", "eval"),
            purpose="eval leaves the state unchanged",
        ),
        _case(
            "bn-inputs-not-mutated",
            _BN,
            (8, 3, 4, 4),
            steps=("train", "eval"),
            purpose="inputs are never written",
        ),
        _case("bn-affine-off", _BN, (8, 3, 4, 4), options={"affine": False}, purpose="no weight and bias"),
        _case("bn-channels-last", _BN, (8, 5, 4, 3), options={"axis": -1}, purpose="channels-last layout"),
        _case(
            "bn-noncontiguous",
            _BN,
            (8, 3, 4, 5),
            noncontiguous=True,
            purpose="a strided (non-contiguous) input",
        ),
        _case("bn-1d-input", _BN, (32, 6), purpose="(N, C) input"),
        _case("bn-3d-input", _BN, (4, 3, 3, 4, 5), purpose="(N, C, D, H, W) input"),
        _case(
            "bn-empty-batch",
            _BN,
            (0, 3, 4, 4),
            steps=("train", "eval"),
            purpose="an empty batch returns an empty output and changes no statistic",
        ),
        _case(
            "bn-constant-channel",
            _BN,
            (8, 3, 4, 4),
            constant_channel=1,
            steps=("train",),
            purpose="a constant channel normalizes to beta",
        ),
        _case(
            "bn-keras-preset-ema",
            _BN,
            (8, 4, 4, 3),
            options={"preset": "keras"},
            steps=("train",) * 5 + ("eval",),
            purpose="keras: momentum 0.99 on the running value, biased variance, eps 1e-3, channels-last",
        ),
        _case(
            "bn-flax-preset",
            _BN,
            (8, 4, 4, 3),
            options={"preset": "flax"},
            steps=("train",) * 3 + ("eval",),
            purpose="flax conventions",
        ),
        _case(
            "bn-momentum-weights-override",
            _BN,
            (8, 3, 4, 4),
            options={"momentum_weights": "running"},
            steps=("train",) * 4 + ("eval",),
            purpose="overriding only the convention keeps the preset's update (torch: 0.1 on the batch = 0.9 on the running value)",
        ),
        _case(
            "bn-onnx-preset",
            _BN,
            (8, 3, 4, 4),
            options={"preset": "onnx"},
            steps=("train",) * 3 + ("eval",),
            purpose="onnx conventions: momentum 0.9 on the running value, biased variance",
        ),
        _case(
            "in-tracked-eval",
            _IN,
            (4, 3, 6, 6),
            options={"track_running_stats": True, "affine": True},
            steps=("train",) * 3 + ("eval",),
            purpose="instance norm with running statistics: eval uses them",
        ),
        _case(
            "in-channels-last",
            _IN,
            (4, 6, 5, 3),
            options={"axis": -1, "affine": True},
            purpose="channels-last instance norm",
        ),
        _case(
            "in-noncontiguous", _IN, (4, 3, 6, 5), noncontiguous=True, purpose="strided instance norm input"
        ),
        _case(
            "ln-train-equals-eval",
            _LN,
            (4, 6, 8),
            options={"normalized_shape": (6, 8)},
            steps=("train", "eval"),
            purpose="layer norm is identical in training and eval",
        ),
        _case(
            "ln-axes-0-2",
            _LN,
            (4, 3, 5),
            options={"axis": (0, 2)},
            purpose="layer norm over a set of axes (keras style)",
        ),
        _case(
            "ln-keras-preset",
            _LN,
            (4, 7, 10),
            options={"preset": "keras"},
            purpose="keras layer norm: eps 1e-3",
        ),
        _case("ln-noncontiguous", _LN, (4, 5, 6), noncontiguous=True, purpose="strided layer norm input"),
        _case(
            "ln-no-affine",
            _LN,
            (4, 10),
            options={"affine": False},
            purpose="layer norm without weight and bias",
        ),
        *_per_dtype(
            "gn-basic",
            _GN,
            (4, 6, 5, 5),
            options={"num_groups": 3},
            purpose="group norm, 3 groups of 2 channels",
        ),
        _case(
            "gn-offset-1e4-channels-first",
            _GN,
            (4, 8, 6, 6),
            loc=1e4,
            options={"num_groups": 4},
            purpose="|mean|/std = 1e4 in float32, channels-first: catches E[x^2]-E[x]^2",
        ),
        _case(
            "gn-offset-1e4-channels-last",
            _GN,
            (4, 6, 6, 8),
            loc=1e4,
            options={"num_groups": 4, "axis": -1},
            purpose="|mean|/std = 1e4 in float32, channels-last (torch's CPU kernel is one-pass there)",
        ),
        *[
            _case(
                f"gn-offset-1000-std-{label}",
                _GN,
                (4, 8, 6, 6),
                loc=1000.0,
                scale=scale,
                options={"num_groups": 4},
                purpose=f"mean 1000, std {scale:g} in float32: E[x^2]-E[x]^2 loses "
                + ("0.3 (onnxruntime's GroupNormalization)" if scale == 1.0 else "everything: NaN"),
            )
            for label, scale in (("1", 1.0), ("0.1", 0.1))
        ],
        _case(
            "gn-offset-1000-bf16-large-groups",
            _GN,
            (2, 8, 64, 64),
            dtype="bfloat16",
            loc=1000.0,
            options={"num_groups": 4},
            purpose="bfloat16 groups of 8192 values at mean 1000: statistics must accumulate in float32, two-pass",
        ),
        _case(
            "gn-float16-large-values",
            _GN,
            (4, 8, 6, 6),
            dtype="float16",
            loc=1000.0,
            scale=100.0,
            options={"num_groups": 2},
            purpose="float16 values >= 256: statistics must accumulate in float32",
        ),
        _case(
            "gn-constant-group",
            _GN,
            (4, 6, 5, 5),
            constant_channel=2,
            options={"num_groups": 6},
            purpose="a constant group (one channel per group) normalizes to beta",
        ),
        _case(
            "gn-one-group",
            _GN,
            (4, 6, 5, 5),
            options={"num_groups": 1},
            purpose="one group: layer norm over (C, H, W) with a per-channel affine",
        ),
        _case(
            "gn-groups-equal-channels",
            _GN,
            (4, 6, 5, 5),
            options={"num_groups": 6},
            purpose="C groups: instance norm",
        ),
        _case(
            "gn-keras-preset",
            _GN,
            (4, 5, 5, 6),
            options={"num_groups": 3, "preset": "keras"},
            purpose="keras: channels-last, eps 1e-3",
        ),
        _case(
            "gn-noncontiguous",
            _GN,
            (4, 6, 5, 6),
            noncontiguous=True,
            options={"num_groups": 2},
            purpose="a strided group norm input",
        ),
        *_per_dtype(
            "rms-basic",
            _RMS,
            (4, 5, 16),
            options={"normalized_shape": 16},
            purpose="RMS norm over the last axis",
        ),
        *[
            _case(
                f"rms-cast-{order.split('_')[0]}-{SHORT_DTYPE[dtype]}",
                _RMS,
                (8, 64),
                dtype=dtype,
                scale=3.0,
                options={"normalized_shape": 64, "cast": order},
                purpose=f"{dtype} input rounded {order.replace('_', ' ')} (the two orders differ by an ulp)",
            )
            for order in ("after_weight", "before_weight")
            for dtype in ("float16", "bfloat16")
        ],
        _case(
            "rms-gemma-offset",
            _RMS,
            (4, 32),
            options={"normalized_shape": 32, "preset": "gemma"},
            purpose="gemma: the weight enters as 1 + w, eps 1e-6",
        ),
        _case(
            "rms-keras-axes",
            _RMS,
            (4, 6, 8),
            options={"axis": (1, 2), "preset": "keras"},
            purpose="keras: over a set of axes, eps 1e-6",
        ),
        _case("rms-offset-1e4", _RMS, (8, 256), loc=1e4, purpose="large values: the mean square in float32"),
        _case(
            "rms-no-weight",
            _RMS,
            (4, 10),
            options={"normalized_shape": 10, "elementwise_affine": False},
            purpose="RMS norm without a weight",
        ),
        _case("rms-noncontiguous", _RMS, (4, 5, 6), noncontiguous=True, purpose="strided RMS norm input"),
        *_per_dtype("moments-basic", _MOMENTS, (8, 3, 5), purpose="per-channel (count, mean, m2)"),
        _case(
            "moments-offset-1e4",
            _MOMENTS,
            (16, 4, 8, 8),
            loc=1e4,
            purpose="|mean|/std = 1e4 in float32: M2 two-pass",
        ),
        _case("moments-channels-last", _MOMENTS, (8, 5, 4, 3), options={"axis": -1}, purpose="channels-last"),
        _case(
            "moments-layer-axes", _MOMENTS, (4, 6, 8), options={"axes": (1, 2)}, purpose="over a set of axes"
        ),
        _case(
            "moments-mask-unequal-counts",
            _MOMENTS,
            (16, 4, 6),
            loc=5.0,
            options={"mask": "unequal"},
            purpose="a mask that keeps a different share of each channel",
        ),
        _case(
            "moments-mask-broadcast",
            _MOMENTS,
            (8, 5, 3),
            options={"mask": "broadcast", "axis": -1},
            purpose="a (N, T, 1) mask over (N, T, C) data (Keras's sequence mask)",
        ),
        _case(
            "moments-fully-masked",
            _MOMENTS,
            (8, 3, 5),
            options={"mask": "none"},
            purpose="nothing counts: (0, 0, 0), the identity of the merge",
        ),
        _case(
            "moments-bf16-large-variance",
            _MOMENTS,
            (16, 3, 8),
            dtype="bfloat16",
            scale=1000.0,
            purpose="bfloat16 variances near 1e6, above float16's largest value (65504)",
        ),
        _case(
            "moments-float16-large-values",
            _MOMENTS,
            (16, 3, 6, 6),
            dtype="float16",
            loc=1000.0,
            scale=100.0,
            purpose="float16 values >= 256 accumulate in float32",
        ),
        *_per_dtype("normalize-basic", _NORMALIZE, (8, 3, 5), purpose="normalize with given statistics"),
        _case(
            "normalize-channels-last",
            _NORMALIZE,
            (8, 4, 5),
            loc=1e3,
            options={"axis": -1},
            purpose="given statistics, channels-last, offset 1e3",
        ),
        *[
            _case(
                f"merge-unequal-splits-{index}",
                _MERGE,
                (64, 4),
                loc=1e4,
                options={"parts": parts},
                purpose="Chan's merge of unequal parts (empty and single-element ones included) equals "
                "the moments of the whole at |mean|/std = 1e4 in float32",
            )
            for index, parts in enumerate(
                ((64,), (1, 0, 63), (5, 0, 1, 20, 0, 38), (3, 3, 3, 3, 3, 3, 3, 43))
            )
        ],
        _case(
            "merge-unequal-splits-f16",
            _MERGE,
            (40, 3),
            dtype="float16",
            loc=100.0,
            options={"parts": (7, 0, 1, 32)},
            purpose="merged float16 parts",
        ),
    ]
)

_BY_ID = {case.id: case for case in CASES}
if len(_BY_ID) != len(CASES):  # pragma: no cover - a programming error in this file
    raise RuntimeError("duplicate conformance case ids")


def get_case(case_id: str) -> Case:
    """The case with this id.

    :raises KeyError: listing nothing but the unknown id (see :data:`CASES` for all).
    """
    try:
        return _BY_ID[case_id]
    except KeyError:
        raise KeyError(f"no conformance case {case_id!r}") from None
