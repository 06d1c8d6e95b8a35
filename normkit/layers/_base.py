"""What every layer shares: the training flag, lazily created state and state dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from normkit import presets
from normkit._registry import Backend, backend_for, type_name
from normkit.errors import StateDictError
from normkit.functional import _checks
from normkit.state import FORMAT_VERSION, METADATA_KEY, NormState, parse_state_dict

__all__: list[str] = []

Array = Any
LayerT = TypeVar("LayerT", bound="_Layer")


class _Layer:
    """What every layer shares: the training flag, lazily created state, state dicts."""

    training: bool

    def __init__(self, preset: str | presets.Preset, backend: str | None) -> None:
        self._preset = presets.get_preset(preset)
        self.backend = backend
        self.training = True
        self._state: NormState | None = None
        self._state_backend: Backend | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration and state; the backend is found again from the arrays."""
        state = dict(self.__dict__)
        state["_state_backend"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        arrays = self._state.arrays() if self._state is not None else {}
        first = next(iter(arrays.values()), None)
        self._state_backend = None if first is None else backend_for(first)

    # -- mode ---------------------------------------------------------------------------
    def train(self: LayerT, mode: bool = True) -> LayerT:
        """Set training mode (``mode=False`` is eval) and return the layer."""
        self.training = bool(mode)
        return self

    def eval(self: LayerT) -> LayerT:
        """Set eval mode and return the layer."""
        return self.train(False)

    @property
    def preset(self) -> str:
        return self._preset.name

    # -- state --------------------------------------------------------------------------
    def _expected_arrays(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _tracks_counter(self) -> bool:
        return False

    def _param_shapes(self) -> dict[str, tuple[int, ...]] | None:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _get(self, key: str) -> Array | None:
        return None if self._state is None else getattr(self._state, key)

    @property
    def weight(self) -> Array | None:
        """γ, or ``None`` (not affine, or no state yet)."""
        return self._get("weight")

    @property
    def bias(self) -> Array | None:
        """β, or ``None``."""
        return self._get("bias")

    def _resolve(self, x: Array, min_ndim: int, op: str) -> Backend:
        """The backend for ``x``, which must be the one holding this layer's state (if any).

        Raises before anything changes for an input no backend takes (a masked array, a
        scalar, a list), naming ``x`` and what to pass instead.
        """
        be = _checks._backend(x, self.backend, min_ndim, op)
        held = self._state_backend
        if held is not None and not held.handles(type(x)):
            raise TypeError(
                f"x is a {type_name(type(x))}, but this layer's state lives in backend {held.name!r} "
                f"({', '.join(held.info.array_types)}); call it with that backend's arrays, or load the "
                f"state into a new layer (load_state_dict converts arrays between backends)"
            )
        return be

    def state_dict(self) -> dict[str, Any]:
        """The layer's arrays (its own objects, not copies), counter and configuration.

        :raises RuntimeError: if the layer has arrays but no state yet (call it on an input,
            or load a state dict, first).
        """
        expected = self._expected_arrays()
        if expected and self._state is None:
            raise RuntimeError(
                f"{type(self).__name__} has no state yet: it is created on the first call; "
                f"call the layer on an input or load a state dict first"
            )
        result: dict[str, Any] = {}
        if self._state is not None:
            result.update({key: getattr(self._state, key) for key in expected})
        if self._tracks_counter():
            result["num_batches_tracked"] = self._state.num_batches_tracked if self._state else 0
        result[METADATA_KEY] = {
            "format_version": FORMAT_VERSION,
            "layer": type(self).__name__,
            **self._config(),
        }
        return result

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Replace the state with ``state_dict`` (see :mod:`normkit.state` for the format).

        Arrays are copied into the layer's backend and device (or, for a layer without state,
        kept in their own backend). ``strict=False`` ignores unexpected keys, keeps current
        values for missing ones and skips the eps check.

        :raises StateDictError: if anything does not fit; the state is then unchanged.
        """
        state, backend = parse_state_dict(
            state_dict,
            layer=type(self).__name__,
            config=self._config(),
            expected_arrays=self._expected_arrays(),
            tracks_counter=self._tracks_counter(),
            current=self._state,
            current_backend=self._state_backend,
            param_shapes=self._param_shapes(),
            per_channel=self._per_channel,
            strict=strict,
        )
        self._state, self._state_backend = state, backend

    @classmethod
    def from_state_dict(cls: type[LayerT], state_dict: Mapping[str, Any]) -> LayerT:
        """A new layer configured as recorded in ``state_dict['_metadata']``, holding its state."""
        metadata = state_dict.get(METADATA_KEY) if isinstance(state_dict, Mapping) else None
        if not isinstance(metadata, Mapping):
            raise StateDictError(
                f"state_dict has no {METADATA_KEY!r}; {cls.__name__}.from_state_dict needs the saved configuration. "
                f"For a state without it (a torch.nn state_dict, a file written by safetensors.torch), configure "
                f"the layer and load into it: {cls.__name__}(preset=...).load_state_dict(state_dict)"
            )
        if metadata.get("layer") != cls.__name__:
            raise StateDictError(
                f"{METADATA_KEY}['layer']={metadata.get('layer')!r}: expected {cls.__name__!r}"
            )
        config = {k: v for k, v in metadata.items() if k not in ("format_version", "layer")}
        try:
            layer = cls(**config)
        except (TypeError, ValueError) as error:
            raise StateDictError(
                f"{METADATA_KEY} does not describe a valid {cls.__name__}: {error}"
            ) from error
        layer.load_state_dict(state_dict)
        return layer

    def to_preset(self: LayerT, preset: str, *, axis: int | Sequence[int] | None = None) -> LayerT:
        """A copy of this layer (state, mode and backend) under another preset's conventions;
        see :func:`convert_state_dict`."""
        from normkit.layers.convert import convert_state_dict

        converted = type(self).from_state_dict(convert_state_dict(self.state_dict(), preset, axis=axis))
        converted.backend = self.backend
        return converted.train(self.training)

    def __repr__(self) -> str:
        config = self._config()
        first = config.pop(self._repr_first)
        first = tuple(first) if isinstance(first, list) else first
        args = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in config.items())
        return f"{type(self).__name__}({first!r}, {args})"

    _repr_first: ClassVar[str]
    _per_channel: ClassVar[bool]


class _AxesNorm(_Layer):
    """Layer and RMS norm: statistics per sample over a set of axes, element-wise parameters of
    those axes' shape, no running state. Subclasses set ``normalized_shape`` and ``axis``."""

    _repr_first = "normalized_shape"
    _per_channel = False
    normalized_shape: tuple[int, ...] | None
    axis: int | tuple[int, ...] | None

    def _set_axes(
        self, normalized_shape: int | Sequence[int] | None, axis: int | Sequence[int] | None
    ) -> None:
        if normalized_shape is not None and axis is not None:
            raise ValueError("pass normalized_shape or axis, not both")
        self.normalized_shape = (
            None if normalized_shape is None else _checks.as_shape(normalized_shape, "normalized_shape")
        )
        raw = tuple(axis) if isinstance(axis, Sequence) and not isinstance(axis, str) else axis
        if raw is not None:  # ints now; their range is checked against the input's rank per call
            names = raw if isinstance(raw, tuple) else (raw,)
            if not names:
                raise ValueError("axis=() names no axis to normalize over")
            for a in names:
                _checks._index(a, "axis")
        self.axis = raw

    def _axes_config(self) -> dict[str, Any]:
        shape = self.normalized_shape
        return {
            "normalized_shape": None if shape is None else list(shape),
            "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis,
        }

    def _param_shape(self) -> tuple[int, ...] | None:
        if self._state is not None and self._state_backend is not None:
            first = next(iter(self._state.arrays().values()), None)
            if first is not None:
                return tuple(self._state_backend.info.shape(first))
        return self.normalized_shape

    def _param_shapes(self) -> dict[str, tuple[int, ...]] | None:
        shape = self._param_shape()
        return None if shape is None else {key: shape for key in self._expected_arrays()}

    def _prepare(
        self, x: Array, op: str
    ) -> tuple[Backend, tuple[int, ...], tuple[int, ...], tuple[int, ...], str]:
        """``(backend, shape, axes, param_shape, state dtype)`` for a call on ``x``, after checking
        that the normalized dimensions hold values and match this layer's parameters."""
        from normkit.functional.layer import normalized_axes

        be = self._resolve(x, 1, op)
        shape = _checks._check_input(be, x, 1, op)
        axes = normalized_axes(shape, self.normalized_shape, self.axis)
        param_shape = tuple(shape[a] for a in axes)
        if 0 in param_shape:
            raise ValueError(f"x has shape {shape}: the normalized dimensions {param_shape} hold no values")
        expected = self._param_shape()
        if expected is not None and param_shape != expected:
            raise ValueError(
                f"x has shape {shape}: normalized dimensions {param_shape}, but this layer's are {expected}"
            )
        dtype = "float64" if be.info.dtype_name(x) == "float64" else "float32"
        return be, shape, axes, param_shape, dtype
