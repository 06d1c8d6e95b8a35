"""Re-expressing a saved layer state under another preset's conventions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normkit import presets
from normkit.errors import StateDictError
from normkit.state import METADATA_KEY

__all__ = ["convert_state_dict"]


def convert_state_dict(
    state_dict: Mapping[str, Any], preset: str, *, axis: int | Sequence[int] | None = None
) -> dict[str, Any]:
    r"""Re-express a saved layer state under another preset's conventions.

    The arrays are kept as stored: the running variance is an estimate of the population
    variance under every convention, and eval uses it directly, so no ``n/(n-1)`` factor is
    applied (none could be: ``n`` is not recorded). What changes is the configuration:

    * ``momentum`` is re-expressed in the target's convention, keeping the same update weight
      (torch ``0.1`` becomes keras ``0.9``); ``None`` (cumulative) stays ``None``;
    * the running-variance estimator and the one-value-per-channel rule become the target's;
    * ``eps`` is carried over unchanged (not the target's default), so eval outputs are
      identical; ``axis`` is carried over unless given (give ``axis=-1`` when the data moves
      from channels-first to channels-last).

    A batch norm trained under one preset therefore evaluates to the same outputs under the
    other. Training can continue, but its next updates follow the target's conventions.

    :returns: a new state dict sharing the arrays, with new ``_metadata``.
    """
    metadata = state_dict.get(METADATA_KEY) if isinstance(state_dict, Mapping) else None
    if not isinstance(metadata, Mapping):
        raise StateDictError(
            f"state_dict has no {METADATA_KEY!r}; convert_state_dict needs the saved configuration"
        )
    target = presets.get_preset(preset)
    new = dict(metadata)
    new["preset"] = target.name
    if metadata.get("layer") in ("BatchNorm", "InstanceNorm"):
        missing = sorted({"momentum", "momentum_weights", "eps", "axis"} - set(metadata))
        if missing:
            raise StateDictError(f"{METADATA_KEY} lacks {missing}; convert_state_dict needs them")
        if metadata["momentum"] is not None:
            weight = presets.batch_weight(metadata["momentum"], metadata["momentum_weights"])
            new["momentum"] = presets.momentum_in_convention(weight, target.momentum_weights)
        new["momentum_weights"] = target.momentum_weights
        new["running_var_estimator"] = target.running_var_estimator
        new["allow_single_value"] = target.allow_single_value
        if axis is not None:
            new["axis"] = axis
    elif metadata.get("layer") == "GroupNorm":
        if axis is not None:
            new["axis"] = axis
    elif metadata.get("layer") in ("LayerNorm", "RMSNorm"):
        if axis is not None:
            new["axis"] = list(axis) if not isinstance(axis, int) else axis
            new["normalized_shape"] = None
    else:
        raise StateDictError(f"{METADATA_KEY}['layer']={metadata.get('layer')!r} is not a normkit layer")
    result = dict(state_dict)
    result[METADATA_KEY] = new
    return result
