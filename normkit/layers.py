r"""Layers: configuration, state and the training flag around the pure operations.

One class per operation; the input's rank is free (``BatchNorm`` serves 1-D, 2-D and 3-D
inputs). State is created lazily on the first call, in the input's backend and on its
device: ``weight`` = 1, ``bias`` = 0, ``running_mean`` = 0, ``running_var`` = 1, float64 for
float64 input and float32 otherwise.

**Training** (``layer.train()``, the default): batch and instance norm normalize with batch
statistics and, when ``track_running_stats``, update the running statistics and count the
batch in ``num_batches_tracked``. With ``momentum=None`` the update weight of the ``k``-th
batch is ``1/k``: the running statistics are the plain average of every batch's statistics.

**Eval** (``layer.eval()``): running statistics replace batch statistics, so each sample's
output no longer depends on the rest of its batch. A layer that tracks no running statistics
keeps using batch statistics. Eval never changes the state.

>>> import numpy as np, normkit
>>> bn = normkit.BatchNorm()                                   # torch conventions
>>> rng = np.random.default_rng(0)
>>> for _ in range(20):
...     _ = bn(rng.normal(3.0, 2.0, size=(32, 4, 5, 5)).astype(np.float32))
>>> bn.num_batches_tracked
20
>>> y = bn.eval()(rng.normal(3.0, 2.0, size=(8, 4, 5, 5)).astype(np.float32))
>>> y.shape, y.dtype
((8, 4, 5, 5), dtype('float32'))

A call that fails (bad input) changes nothing: the state is replaced only after the
operation succeeded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from normkit import functional, presets
from normkit._registry import Backend, backend_for, type_name
from normkit.errors import StateDictError
from normkit.state import FORMAT_VERSION, METADATA_KEY, NormState, parse_state_dict

__all__ = ["BatchNorm", "InstanceNorm", "LayerNorm", "convert_state_dict"]

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
        be = functional._backend(x, self.backend, min_ndim, op)
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


class _ChannelNorm(_Layer):
    """Batch and instance norm: per-channel affine, optional running statistics."""

    _repr_first = "num_features"
    _per_channel = True
    _eps_field: ClassVar[str]
    _op: ClassVar[str]
    _min_ndim: ClassVar[int]

    def __init__(
        self,
        num_features: int | None,
        *,
        eps: float | None,
        momentum: float | presets._Default | None,
        affine: bool | None,
        track_running_stats: bool,
        axis: int | None,
        momentum_weights: presets.MomentumWeights | None,
        running_var_estimator: presets.RunningVarEstimator | None,
        allow_single_value: bool | None,
        preset: str | presets.Preset,
        backend: str | None,
    ) -> None:
        super().__init__(preset, backend)
        p = self._preset
        if num_features is not None:
            num_features = functional._index(num_features, "num_features")
            if num_features < 1:
                raise ValueError(
                    f"num_features={num_features!r}: expected a positive int or None (inferred from the first input)"
                )
        self.num_features = num_features
        self.eps = presets.check_eps(getattr(p, self._eps_field) if eps is None else eps)
        self.momentum_weights = presets.check_momentum_weights(
            p.momentum_weights if momentum_weights is None else momentum_weights
        )
        if momentum is presets.DEFAULT:
            momentum = p.default_momentum(self.momentum_weights)
        self.momentum = None if momentum is None else presets.check_momentum(momentum)
        self.running_var_estimator = running_var_estimator or p.running_var_estimator
        presets.check_estimator(self.running_var_estimator)
        self.allow_single_value = (
            p.allow_single_value if allow_single_value is None else bool(allow_single_value)
        )
        self.axis = p.axis if axis is None else functional._index(axis, "axis")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)

    @property
    def running_mean(self) -> Array | None:
        """The running mean, or ``None`` (not tracked, or no state yet)."""
        return self._get("running_mean")

    @property
    def running_var(self) -> Array | None:
        """The running variance (estimator per ``running_var_estimator``), or ``None``."""
        return self._get("running_var")

    @property
    def num_batches_tracked(self) -> int:
        """Training batches that updated the running statistics (empty batches do not count)."""
        return 0 if self._state is None else self._state.num_batches_tracked

    def _expected_arrays(self) -> tuple[str, ...]:
        return (("weight", "bias") if self.affine else ()) + (
            ("running_mean", "running_var") if self.track_running_stats else ()
        )

    def _tracks_counter(self) -> bool:
        return self.track_running_stats

    def _channels(self) -> int | None:
        if self._state is not None and self._state_backend is not None:
            first = next(iter(self._state.arrays().values()), None)
            if first is not None:
                return int(self._state_backend.info.shape(first)[0])
        return self.num_features

    def _param_shapes(self) -> dict[str, tuple[int, ...]] | None:
        channels = self._channels()
        return None if channels is None else {key: (channels,) for key in self._expected_arrays()}

    def _config(self) -> dict[str, Any]:
        return {
            "num_features": self._channels(),
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
            "axis": self.axis,
            "momentum_weights": self.momentum_weights,
            "running_var_estimator": self.running_var_estimator,
            "allow_single_value": self.allow_single_value,
            "preset": self.preset,
        }

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (no-op without state)."""
        if self._state is None or self._state_backend is None or not self.track_running_stats:
            return
        full = self._state_backend.info.full
        like = self._state.running_mean
        dtype = self._state_backend.info.dtype_name(like)
        channels = (self._channels(),)
        self._state = self._state.replace(
            running_mean=full(channels, 0.0, dtype, like),
            running_var=full(channels, 1.0, dtype, like),
            num_batches_tracked=0,
        )

    def _initial_state(self, be: Backend, x: Array, channels: int) -> NormState:
        dtype = "float64" if be.info.dtype_name(x) == "float64" else "float32"
        full = be.info.full
        state = NormState()
        if self.affine:
            state = state.replace(
                weight=full((channels,), 1.0, dtype, x), bias=full((channels,), 0.0, dtype, x)
            )
        if self.track_running_stats:
            state = state.replace(
                running_mean=full((channels,), 0.0, dtype, x), running_var=full((channels,), 1.0, dtype, x)
            )
        return state

    def __call__(self, x: Array) -> Array:
        """Normalize ``x``; in training with tracked statistics, update them."""
        be = self._resolve(x, self._min_ndim, self._op)
        shape = functional._check_input(be, x, self._min_ndim, self._op)
        axis = (
            functional._check_instance_axis(self.axis, len(shape))
            if self._op == "instance_norm"
            else functional._check_axis(self.axis, len(shape))
        )
        if shape[axis] == 0:
            raise ValueError(
                f"x has shape {shape}: no channels on axis {self.axis}; a layer needs at least one"
            )
        channels = self._channels()
        if channels is not None and shape[axis] != channels:
            raise ValueError(
                f"x has shape {shape}: {shape[axis]} channels on axis {self.axis}, but this layer has {channels} (num_features)"
            )
        state = self._state if self._state is not None else self._initial_state(be, x, shape[axis])
        update = self.training and self.track_running_stats
        use_batch_stats = self.training or not self.track_running_stats
        count = state.num_batches_tracked + 1
        momentum = (
            (
                1.0 / count
                if self.momentum is None
                else presets.batch_weight(self.momentum, self.momentum_weights)
            )
            if update
            else 0.0
        )
        if update or not use_batch_stats:
            running_mean, running_var = state.running_mean, state.running_var
        else:
            running_mean = running_var = None
        y, new_mean, new_var = functional._channel_norm(
            self._op,
            be,
            x,
            shape,
            axis,
            running_mean,
            running_var,
            state.weight,
            state.bias,
            use_batch_stats,
            momentum,
            self.eps,
            "batch",
            self.running_var_estimator,
            self.allow_single_value,
            self._preset,
        )
        if update and math.prod(shape) > 0:
            state = state.replace(running_mean=new_mean, running_var=new_var, num_batches_tracked=count)
        self._state, self._state_backend = state, self._state_backend or be
        return y


class BatchNorm(_ChannelNorm):
    r"""Batch normalization over every axis but the channel axis.

    .. math::

       y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with batch statistics in training and running statistics in eval (see the module
    docstring). Defaults come from ``preset``; any option given overrides it.

    :param num_features: number of channels ``C``, or ``None`` to take it from the first input.
    :param eps: default the preset's (1e-5 torch/onnx/flax, 1e-3 keras).
    :param momentum: update weight in the ``momentum_weights`` convention (default the preset's:
        0.1 torch, 0.99 keras/flax, 0.9 onnx); ``None`` for the cumulative average.
    :param affine: learnable-style γ and β (created as 1 and 0).
    :param track_running_stats: keep running statistics (otherwise eval uses batch statistics).
    :param axis: channel axis (1 channels-first, -1 channels-last; default the preset's).
    :param momentum_weights: ``"batch"`` (PyTorch) or ``"running"`` (Keras/Flax/ONNX).
    :param running_var_estimator: ``"unbiased"`` (PyTorch) or ``"biased"`` (Keras/Flax/ONNX).
    :param allow_single_value: allow one value per channel in training (``y = β``).
    :param preset: ``"torch"``, ``"keras"``, ``"flax"`` or ``"onnx"``.
    :param backend: force a backend by name instead of choosing by the input's type.
    """

    _eps_field = "batch_norm_eps"
    _op = "batch_norm"
    _min_ndim = 2

    def __init__(
        self,
        num_features: int | None = None,
        *,
        eps: float | None = None,
        momentum: float | presets._Default | None = presets.DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int | None = None,
        momentum_weights: presets.MomentumWeights | None = None,
        running_var_estimator: presets.RunningVarEstimator | None = None,
        allow_single_value: bool | None = None,
        preset: str | presets.Preset = "torch",
        backend: str | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            axis=axis,
            momentum_weights=momentum_weights,
            running_var_estimator=running_var_estimator,
            allow_single_value=allow_single_value,
            preset=preset,
            backend=backend,
        )


class InstanceNorm(_ChannelNorm):
    r"""Instance normalization: statistics per sample and channel over the spatial axes.

    Input ``(N, C, *spatial)`` (``axis=1``) or ``(N, *spatial, C)`` (``axis=-1``). Uses each
    instance's own statistics in training, and in eval unless running statistics are tracked
    (then it normalizes like batch norm in eval; the running statistics average the
    per-instance statistics over the batch).

    Parameters as :class:`BatchNorm`, with ``track_running_stats=False`` by default (as in
    PyTorch) under every preset; ``affine`` follows the preset (``False`` for torch, as
    PyTorch's ``InstanceNorm2d``; ``True`` for keras, flax and onnx).
    """

    _eps_field = "instance_norm_eps"
    _op = "instance_norm"
    _min_ndim = 3

    def __init__(
        self,
        num_features: int | None = None,
        *,
        eps: float | None = None,
        momentum: float | presets._Default | None = presets.DEFAULT,
        affine: bool | None = None,
        track_running_stats: bool = False,
        axis: int | None = None,
        momentum_weights: presets.MomentumWeights | None = None,
        running_var_estimator: presets.RunningVarEstimator | None = None,
        allow_single_value: bool | None = None,
        preset: str | presets.Preset = "torch",
        backend: str | None = None,
    ) -> None:
        if affine is None:
            affine = presets.get_preset(preset).instance_norm_affine
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            axis=axis,
            momentum_weights=momentum_weights,
            running_var_estimator=running_var_estimator,
            allow_single_value=allow_single_value,
            preset=preset,
            backend=backend,
        )


class LayerNorm(_Layer):
    r"""Layer normalization over the trailing ``normalized_shape`` (PyTorch) or ``axis`` (Keras).

    .. math::

       y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with statistics per sample over the normalized axes and element-wise γ, β of their shape.
    Identical in training and eval; it has no running state.

    :param normalized_shape: sizes of the trailing dimensions to normalize (PyTorch style).
    :param axis: an axis or axes to normalize over (Keras style); default the last axis.
    :param eps: default the preset's (1e-5 torch/onnx, 1e-3 keras, 1e-6 flax).
    :param affine: element-wise γ (PyTorch ``elementwise_affine``).
    :param bias: element-wise β (only with ``affine``).
    :param preset: ``"torch"``, ``"keras"``, ``"flax"`` or ``"onnx"``.
    :param backend: force a backend by name.
    """

    _repr_first = "normalized_shape"
    _per_channel = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | None = None,
        *,
        axis: int | Sequence[int] | None = None,
        eps: float | None = None,
        affine: bool = True,
        bias: bool = True,
        preset: str | presets.Preset = "torch",
        backend: str | None = None,
    ) -> None:
        super().__init__(preset, backend)
        if normalized_shape is not None and axis is not None:
            raise ValueError("pass normalized_shape or axis, not both")
        self.normalized_shape = (
            None if normalized_shape is None else functional.as_shape(normalized_shape, "normalized_shape")
        )
        self.axis = tuple(axis) if isinstance(axis, Sequence) else axis
        self.eps = presets.check_eps(self._preset.layer_norm_eps if eps is None else eps)
        self.affine = bool(affine)
        self.has_bias = bool(bias) and self.affine

    def _expected_arrays(self) -> tuple[str, ...]:
        return (("weight",) if self.affine else ()) + (("bias",) if self.has_bias else ())

    def _param_shape(self) -> tuple[int, ...] | None:
        if self._state is not None and self._state_backend is not None:
            first = next(iter(self._state.arrays().values()), None)
            if first is not None:
                return tuple(self._state_backend.info.shape(first))
        return self.normalized_shape

    def _param_shapes(self) -> dict[str, tuple[int, ...]] | None:
        shape = self._param_shape()
        return None if shape is None else {key: shape for key in self._expected_arrays()}

    def _config(self) -> dict[str, Any]:
        shape = self.normalized_shape
        return {
            "normalized_shape": None if shape is None else list(shape),
            "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis,
            "eps": self.eps,
            "affine": self.affine,
            "bias": self.has_bias,
            "preset": self.preset,
        }

    def __call__(self, x: Array) -> Array:
        """Normalize ``x`` (the same in training and eval)."""
        be = self._resolve(x, 1, "layer_norm")
        shape = functional._check_input(be, x, 1, "layer_norm")
        axes = functional.normalized_axes(shape, self.normalized_shape, self.axis)
        param_shape = tuple(shape[a] for a in axes)
        if 0 in param_shape:
            raise ValueError(f"x has shape {shape}: the normalized dimensions {param_shape} hold no values")
        expected = self._param_shape()
        if expected is not None and param_shape != expected:
            raise ValueError(
                f"x has shape {shape}: normalized dimensions {param_shape}, but this layer's are {expected}"
            )
        state = self._state
        if state is None:
            dtype = "float64" if be.info.dtype_name(x) == "float64" else "float32"
            state = NormState(
                weight=be.info.full(param_shape, 1.0, dtype, x) if self.affine else None,
                bias=be.info.full(param_shape, 0.0, dtype, x) if self.has_bias else None,
            )
        y = functional._layer_norm(be, x, shape, axes, state.weight, state.bias, self.eps, self._preset)
        self._state, self._state_backend = state, self._state_backend or be
        return y


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
    elif metadata.get("layer") == "LayerNorm":
        if axis is not None:
            new["axis"] = list(axis) if not isinstance(axis, int) else axis
            new["normalized_shape"] = None
    else:
        raise StateDictError(f"{METADATA_KEY}['layer']={metadata.get('layer')!r} is not a normkit layer")
    result = dict(state_dict)
    result[METADATA_KEY] = new
    return result
