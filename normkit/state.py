"""Layer state, and the versioned ``state_dict`` format that saves and restores it.

A state dict is a plain ``dict``:

* ``"weight"``, ``"bias"`` (when affine) and ``"running_mean"``, ``"running_var"`` (when
  running statistics are tracked): arrays of the layer's backend; PyTorch's names.
* ``"num_batches_tracked"``: an ``int`` (when running statistics are tracked).
* ``"_metadata"``: a ``dict`` of JSON-compatible values: ``format_version``, ``layer`` (the class
  name) and the layer's configuration (``eps``, ``axis``, ``momentum``, ...), so a state can be
  rebuilt into an identical layer or converted to another preset.

Loading validates everything before anything is assigned: a state dict that does not fit
raises :class:`~normkit.errors.StateDictError` and leaves the layer as it was.

:func:`normkit.save_state` and :func:`normkit.load_state` write a state dict to a safetensors
file and read it back (see :mod:`normkit.state_files`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from normkit._registry import Backend, backend_for, type_name
from normkit.errors import StateDictError

__all__ = ["ARRAY_KEYS", "FORMAT_VERSION", "METADATA_KEY", "NormState", "parse_state_dict"]

FORMAT_VERSION = 1
"""Version of the state-dict format written by this normkit."""
METADATA_KEY = "_metadata"
ARRAY_KEYS = ("weight", "bias", "running_mean", "running_var")
COUNTER_KEY = "num_batches_tracked"

Array = Any


@dataclass(frozen=True)
class NormState:
    """A layer's arrays (``None`` where the layer has none) and its batch counter.

    Arrays are never modified in place; a new state replaces the old one.
    """

    weight: Array | None = None
    bias: Array | None = None
    running_mean: Array | None = None
    running_var: Array | None = None
    num_batches_tracked: int = 0

    def arrays(self) -> dict[str, Array]:
        return {key: getattr(self, key) for key in ARRAY_KEYS if getattr(self, key) is not None}

    def replace(self, **changes: Any) -> NormState:
        return replace(self, **changes)


def _counter(value: object) -> int:
    if isinstance(value, bool):
        raise StateDictError(f"num_batches_tracked={value!r}: expected a non-negative integer")
    if not isinstance(value, int):
        try:
            as_numpy = (
                np.asarray(backend_for(value).info.to_numpy(value))
                if not isinstance(value, np.generic)
                else np.asarray(value)
            )
        except TypeError as error:
            raise StateDictError(
                f"num_batches_tracked is a {type_name(type(value))}; expected an int ({error})"
            ) from error
        if as_numpy.shape != () or as_numpy.dtype.kind not in "iu":
            raise StateDictError(
                f"num_batches_tracked has shape {as_numpy.shape} and dtype {as_numpy.dtype}; expected an integer scalar"
            )
        value = int(as_numpy)
    if value < 0:
        raise StateDictError(f"num_batches_tracked={value}: expected a non-negative integer")
    return value


def _check_metadata(metadata: object, layer: str, config: Mapping[str, object], strict: bool) -> None:
    if not isinstance(metadata, Mapping):
        raise StateDictError(f"{METADATA_KEY} is a {type_name(type(metadata))}; expected a dict")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateDictError(f"{METADATA_KEY}['format_version']={version!r}: expected an int >= 1")
    if version > FORMAT_VERSION:
        raise StateDictError(
            f"{METADATA_KEY}['format_version']={version} was written by a newer normkit; this one reads up to {FORMAT_VERSION}"
        )
    saved_layer = metadata.get("layer")
    if saved_layer != layer:
        raise StateDictError(
            f"{METADATA_KEY}['layer']={saved_layer!r}: this state belongs to another layer type; expected {layer!r}"
        )
    if not strict:
        return
    saved_eps = metadata.get("eps")
    if isinstance(saved_eps, (int, float)) and not math.isclose(
        saved_eps, float(config["eps"]), rel_tol=1e-12, abs_tol=0.0
    ):
        raise StateDictError(
            f"eps: the state was saved with eps={saved_eps} but this layer has eps={config['eps']}; eval "
            f"outputs would change. Rebuild the saved layer with {layer}.from_state_dict(state_dict), "
            f"or pass strict=False"
        )


def parse_state_dict(
    state_dict: Mapping[str, object],
    *,
    layer: str,
    config: Mapping[str, object],
    expected_arrays: tuple[str, ...],
    tracks_counter: bool,
    current: NormState | None,
    current_backend: Backend | None,
    param_shapes: Mapping[str, tuple[int, ...]] | None,
    per_channel: bool,
    strict: bool,
) -> tuple[NormState, Backend | None]:
    """Validate ``state_dict`` against a layer and return the state it describes.

    :param layer: the layer's class name, checked against the metadata.
    :param config: the layer's configuration (``eps`` is checked when ``strict``).
    :param expected_arrays: array keys the layer has.
    :param tracks_counter: whether ``num_batches_tracked`` belongs to the layer.
    :param current: the layer's state, or ``None`` before it has one.
    :param current_backend: the backend the current state lives in.
    :param param_shapes: required shape per array key, or ``None`` when the layer does not know
        them yet (then all arrays must share one shape).
    :param per_channel: the arrays hold one value per channel (shape ``(C,)``).
    :param strict: missing and unexpected keys are errors (otherwise missing arrays keep their
        current values and unexpected keys are ignored); the saved eps must match.
    :returns: ``(state, backend)``: copies of the arrays, in ``current_backend`` (and on its
        device) when the layer already has state, else in the arrays' own backend;
        ``backend`` is ``None`` for a layer without arrays.
    :raises StateDictError: naming the key at fault; nothing is modified.
    """
    if not isinstance(state_dict, Mapping):
        raise StateDictError(f"state_dict is a {type_name(type(state_dict))}; expected a dict")
    expected = set(expected_arrays) | ({COUNTER_KEY} if tracks_counter else set())
    given = set(state_dict) - {METADATA_KEY}
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise StateDictError(f"state_dict does not fit {layer}: " + "; ".join(parts))
    if missing and current is None:
        raise StateDictError(
            f"state_dict is missing {missing} and {layer} has no state yet to keep them from"
        )
    if METADATA_KEY in state_dict:
        _check_metadata(state_dict[METADATA_KEY], layer, config, strict)

    arrays = {key: state_dict[key] for key in expected_arrays if key in state_dict}
    backends: dict[str, Backend] = {}
    for key, value in arrays.items():
        try:
            backends[key] = backend_for(value)
        except TypeError as error:
            raise StateDictError(
                f"{key} is a {type_name(type(value))}, which normkit cannot use: {error}"
            ) from error
    source = next(iter(backends.values()), None)
    for key, be in backends.items():
        if source is not None and be.name != source.name:
            raise StateDictError(f"{key} belongs to backend {be.name!r} but other arrays to {source.name!r}")

    current_arrays = current.arrays() if current is not None else {}
    reference_dtype = (
        next((current_backend.info.dtype_name(a) for a in current_arrays.values()), None)
        if current_backend
        else None
    )
    dtypes = {key: backends[key].info.dtype_name(value) for key, value in arrays.items()}
    for key, dtype in dtypes.items():
        if reference_dtype is not None and dtype != reference_dtype:
            raise StateDictError(f"{key} has dtype {dtype}; this layer's state is {reference_dtype}")
        if dtype not in ("float32", "float64"):
            raise StateDictError(f"{key} has dtype {dtype}; expected float32 or float64")
    if len(set(dtypes.values())) > 1:
        raise StateDictError(f"state_dict mixes dtypes {dtypes}; expected one")

    shapes = {key: tuple(backends[key].info.shape(value)) for key, value in arrays.items()}
    if param_shapes is not None:
        for key, shape in shapes.items():
            if shape != param_shapes[key]:
                raise StateDictError(f"{key} has shape {shape}; expected {param_shapes[key]}")
    elif len(set(shapes.values())) > 1:
        raise StateDictError(f"the arrays have different shapes {shapes}; expected one shape")
    elif per_channel and any(len(shape) != 1 for shape in shapes.values()):
        raise StateDictError(f"the arrays have shapes {shapes}; expected one value per channel, (C,)")

    counter = current.num_batches_tracked if current is not None else 0
    if tracks_counter and COUNTER_KEY in state_dict:
        counter = _counter(state_dict[COUNTER_KEY])

    target = current_backend or source
    base = current if current is not None else NormState()
    if target is None:  # a layer with no arrays (no affine, no running statistics)
        return base.replace(num_batches_tracked=counter), None
    converted = {}
    for key, value in arrays.items():  # copies, so later changes to the caller's arrays do not leak in
        assert source is not None
        like = next(iter(current_arrays.values()), value)
        device = (current_backend or source).info.device(like)
        converted[key] = target.info.asarray(source.info.to_numpy(value), dtypes[key], device)
    return base.replace(num_batches_tracked=counter, **converted), target
