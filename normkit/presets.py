r"""Named conventions: what PyTorch, Keras, Flax and ONNX each mean by batch norm.

A :class:`Preset` sets every explicit choice of the spec at once. Any option passed
explicitly to an op or a layer overrides the preset's value.

=================================  ==========  ==========  ==========  ==========
choice                             ``torch``   ``keras``   ``flax``    ``onnx``
=================================  ==========  ==========  ==========  ==========
``momentum`` (default)             0.1         0.99        0.99        0.9
``momentum_weights``               batch       running     running     running
running-variance estimator         unbiased    biased      biased      biased
channel ``axis`` (BN/IN)           1           -1          -1          1
eps: batch norm                    1e-5        1e-3        1e-5        1e-5
eps: layer norm                    1e-5        1e-3        1e-6        1e-5
eps: instance norm                 1e-5        1e-3        1e-6        1e-5
one value per channel in training  error       allowed     allowed     allowed
instance norm affine by default    no          yes         yes         yes
eps: group norm                    1e-5        1e-3        1e-6        1e-5
eps: RMS norm                      None [1]_   1e-6        1e-6        1e-5
RMS cast order (half precision)    after       after       after       before
RMS weight offset                  0           0           0           0
=================================  ==========  ==========  ==========  ==========

Two presets exist for RMS norm's model-family conventions; everything else in them is
``torch``'s: ``llama`` (eps 1e-6, cast before the weight, as Llama and the ONNX spec) and
``gemma`` (eps 1e-6, cast after the weight, weight offset 1: Gemma's :math:`1 + w`).

.. [1] PyTorch's ``eps=None``: the machine epsilon of the compute dtype (``1.19e-7`` for
   float16, bfloat16 and float32 input, ``2.2e-16`` for float64).

``momentum_weights="batch"`` means :math:`r \leftarrow (1-m)\,r + m\,b` (PyTorch);
``"running"`` means :math:`r \leftarrow m\,r + (1-m)\,b` (Keras/Flax/ONNX call it momentum or
decay). Both describe the same exponential average: ``keras momentum = 1 - torch momentum``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT",
    "PRESETS",
    "MomentumWeights",
    "Preset",
    "RunningVarEstimator",
    "batch_weight",
    "check_eps",
    "check_estimator",
    "check_momentum",
    "check_momentum_weights",
    "check_rms_cast",
    "get_preset",
    "momentum_in_convention",
]

MomentumWeights = Literal["batch", "running"]
RunningVarEstimator = Literal["unbiased", "biased"]
RmsCast = Literal["after_weight", "before_weight"]
RMS_CASTS = ("after_weight", "before_weight")


class _Default:
    """Sentinel: "use the preset's value" (``None`` already means the cumulative average)."""

    _instance: _Default | None = None

    def __new__(cls) -> _Default:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
"""Default of ``momentum=``: take the preset's value."""


@dataclass(frozen=True)
class Preset:
    """One framework's conventions. See the module docstring for the table."""

    name: str
    momentum: float
    momentum_weights: MomentumWeights
    running_var_estimator: RunningVarEstimator
    axis: int
    batch_norm_eps: float
    layer_norm_eps: float
    instance_norm_eps: float
    allow_single_value: bool
    instance_norm_affine: bool
    group_norm_eps: float = 1e-5
    rms_norm_eps: float | None = None
    rms_cast: RmsCast = "after_weight"
    rms_weight_offset: float = 0.0

    @property
    def update_weight(self) -> float:
        """The weight of the new batch statistic in this preset's default update."""
        return batch_weight(self.momentum, self.momentum_weights)

    def default_momentum(self, momentum_weights: MomentumWeights) -> float:
        """This preset's default update expressed as a momentum in the given convention (so
        overriding only ``momentum_weights`` keeps the preset's update, not its number)."""
        return momentum_in_convention(self.update_weight, momentum_weights)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("torch", 0.1, "batch", "unbiased", 1, 1e-5, 1e-5, 1e-5, False, False, 1e-5, None),
        Preset("keras", 0.99, "running", "biased", -1, 1e-3, 1e-3, 1e-3, True, True, 1e-3, 1e-6),
        Preset("flax", 0.99, "running", "biased", -1, 1e-5, 1e-6, 1e-6, True, True, 1e-6, 1e-6),
        Preset(
            "onnx", 0.9, "running", "biased", 1, 1e-5, 1e-5, 1e-5, True, True, 1e-5, 1e-5, "before_weight"
        ),
        Preset(
            "llama", 0.1, "batch", "unbiased", 1, 1e-5, 1e-5, 1e-5, False, False, 1e-5, 1e-6, "before_weight"
        ),
        Preset(
            "gemma",
            0.1,
            "batch",
            "unbiased",
            1,
            1e-5,
            1e-5,
            1e-5,
            False,
            False,
            1e-5,
            1e-6,
            "after_weight",
            1.0,
        ),
    )
}


def get_preset(preset: str | Preset) -> Preset:
    """The preset named ``preset`` (or ``preset`` itself).

    :raises ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise ValueError(
            f"preset={preset!r} is not a known preset; expected one of {sorted(PRESETS)}"
        ) from None


def check_momentum_weights(momentum_weights: object) -> MomentumWeights:
    """``momentum_weights`` if it names a convention.

    :raises ValueError: naming ``momentum_weights`` otherwise.
    """
    if momentum_weights not in ("batch", "running"):
        raise ValueError(f"momentum_weights={momentum_weights!r}; expected 'batch' or 'running'")
    return momentum_weights  # type: ignore[return-value]


def batch_weight(momentum: float, momentum_weights: MomentumWeights) -> float:
    """The weight of the new batch statistic for ``momentum`` in the given convention."""
    check_momentum_weights(momentum_weights)
    return momentum if momentum_weights == "batch" else 1.0 - momentum


def momentum_in_convention(weight_of_batch: float, momentum_weights: MomentumWeights) -> float:
    """Express the weight of the new batch statistic as a momentum in the given convention."""
    check_momentum_weights(momentum_weights)
    return weight_of_batch if momentum_weights == "batch" else 1.0 - weight_of_batch


def check_momentum(momentum: object) -> float:
    """``momentum`` as a float in ``[0, 1]``.

    :raises TypeError: naming ``momentum`` if it is not a number.
    :raises ValueError: naming ``momentum`` if it is not a finite number in ``[0, 1]``.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum={momentum!r}: expected a number in [0, 1]")
    value = float(momentum)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"momentum={momentum!r}: expected a number in [0, 1]")
    return value


def check_eps(eps: object) -> float:
    """``eps`` as a positive finite float.

    :raises TypeError: naming ``eps`` if it is not a number.
    :raises ValueError: naming ``eps`` if it is zero, negative, NaN or infinite.
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps={eps!r}: expected a positive finite number")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"eps={eps!r}: expected a positive finite number")
    return value


def check_estimator(estimator: str) -> bool:
    """True for ``"unbiased"``, False for ``"biased"``.

    :raises ValueError: naming ``running_var_estimator`` otherwise.
    """
    if estimator not in ("unbiased", "biased"):
        raise ValueError(f"running_var_estimator={estimator!r}; expected 'unbiased' or 'biased'")
    return estimator == "unbiased"


def check_rms_cast(cast: object) -> RmsCast:
    """``cast`` if it names an RMS cast order.

    :raises ValueError: naming ``cast`` otherwise.
    """
    if cast not in RMS_CASTS:
        raise ValueError(f"cast={cast!r}; expected one of {RMS_CASTS}")
    return cast  # type: ignore[return-value]


def machine_eps(dtype: str) -> float:
    """The machine epsilon of the compute dtype for input ``dtype`` (PyTorch's ``eps=None``)."""
    return 2.220446049250313e-16 if dtype == "float64" else 1.1920928955078125e-07
