"""Batch and instance norm: per-channel statistics, per-channel affine, optional running statistics."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from normkit import presets
from normkit._registry import Backend
from normkit.functional import _checks
from normkit.functional import channel as channel_ops
from normkit.layers._base import _Layer
from normkit.state import NormState

__all__ = ["BatchNorm", "FrozenBatchNorm", "InstanceNorm"]

Array = Any


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
            num_features = _checks._index(num_features, "num_features")
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
        self.axis = p.axis if axis is None else _checks._index(axis, "axis")
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

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """Normalize ``x``; in training with tracked statistics, update them.

        :param mask: (batch norm) a boolean array, ``True`` where a value counts: training
            statistics over the unmasked values only; eval ignores it (see
            :func:`normkit.batch_norm`). A masked training call counts in
            ``num_batches_tracked`` like any non-empty batch, even with nothing unmasked (whose
            running statistics it leaves unchanged).
        """
        if mask is not None and self._op != "batch_norm":
            raise TypeError(f"mask=: {type(self).__name__} takes no mask (only BatchNorm does)")
        be = self._resolve(x, self._min_ndim, self._op)
        shape = _checks._check_input(be, x, self._min_ndim, self._op)
        axis = (
            _checks._check_instance_axis(self.axis, len(shape))
            if self._op == "instance_norm"
            else _checks._check_axis(self.axis, len(shape))
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
        for observe in getattr(self, "_input_observers", ()):  # normkit.testtime's recorders
            observe(x, axis, mask)
        substitute = getattr(self, "_eval_forward", None)  # normkit.testtime's prior mixing
        if (
            substitute is not None
            and not self.training
            and self._state is not None
            and self.track_running_stats
        ):
            return substitute(x, axis)
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
        communicator = getattr(self, "communicator", None)
        if communicator is not None and self.training and communicator.size > 1:
            y, new_mean, new_var, nonempty = self._synchronized(
                communicator, be, x, shape, axis, mask, state, running_mean, running_var, momentum
            )
            if update and nonempty:
                state = state.replace(running_mean=new_mean, running_var=new_var, num_batches_tracked=count)
            self._state, self._state_backend = state, self._state_backend or be
            return y
        y, new_mean, new_var = channel_ops._channel_norm(
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
            mask=mask,
        )
        if update and math.prod(shape) > 0:
            state = state.replace(running_mean=new_mean, running_var=new_var, num_batches_tracked=count)
        self._state, self._state_backend = state, self._state_backend or be
        return y

    def _synchronized(
        self,
        communicator: Any,
        be: Backend,
        x: Array,
        shape: tuple[int, ...],
        axis: int,
        mask: Array | None,
        state: NormState,
        running_mean: Array | None,
        running_var: Array | None,
        momentum: float,
    ) -> tuple[Array, Array | None, Array | None, bool]:
        """Training with the global batch's statistics over ``communicator``
        (:func:`normkit.distributed.sync_batch_norm`): this rank's output, the new running
        statistics and whether the global batch had any value."""
        from normkit.distributed.sync import check_layout, sync_batch_norm
        from normkit.functional.statistics import check_mask

        label = f"{type(self).__name__}({shape[axis]})"
        if mask is not None:
            check_mask(be, mask, shape)
        channels_and_dtype = (shape[axis], be.info.dtype_name(x))
        if getattr(self, "_checked_layout", None) != channels_and_dtype:  # once per layout
            check_layout(communicator, channels=shape[axis], dtype=channels_and_dtype[1], layer=label)
            self._checked_layout = channels_and_dtype
        y, new_mean, new_var, total = sync_batch_norm(
            be, x, mask, axis, state.weight, state.bias, running_mean, running_var, momentum, self.eps,
            self.running_var_estimator == "unbiased", self.allow_single_value, communicator, label,
        )  # fmt: skip
        return y, new_mean, new_var, bool(be.info.to_numpy(total.count).any())


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
    :param communicator: a :class:`normkit.distributed.Communicator` (one rank's view of a
        group of data-parallel replicas): in training, normalize with the statistics of the
        global batch, every replica's part merged exactly (:mod:`normkit.distributed.sync`);
        the running statistics, the same on every rank, follow the global count. Eval never
        communicates. Not part of the state.
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
        communicator: Any = None,
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
        for method in ("all_gather", "all_gather_ints"):
            if communicator is not None and not callable(getattr(communicator, method, None)):
                raise TypeError(
                    f"communicator is a {type(communicator).__name__} without {method}(); expected a "
                    f"normkit.distributed.Communicator"
                )
        self.communicator = communicator

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the communicator (a connection to other processes)."""
        return super().__getstate__() | {"communicator": None, "_checked_layout": None}


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


class FrozenBatchNorm(BatchNorm):
    r"""A :class:`BatchNorm` whose running statistics and affine are fixed: it normalizes with
    its running statistics in training mode too,
    :math:`y = \gamma(x - \mu_{\text{running}})/\sqrt{\sigma^2_{\text{running}} + \epsilon} + \beta`,
    a per-channel affine map independent of the batch (torchvision's ``FrozenBatchNorm2d``
    semantics), and never updates anything. ``train()`` leaves it in eval mode.

    Made by :meth:`from_batch_norm` (or :func:`normkit.testtime.freeze`); its state dict is a
    batch norm's, saved as ``"FrozenBatchNorm"``.
    """

    @property  # type: ignore[override]
    def training(self) -> bool:
        """Always ``False``: frozen."""
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        """Ignored: a frozen layer stays in eval mode."""

    @classmethod
    def from_batch_norm(cls, bn: BatchNorm) -> FrozenBatchNorm:
        """The frozen form of ``bn``: its configuration, arrays (the same objects) and counter.

        :raises ValueError: for a layer without running statistics, or without state yet.
        """
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"bn is a {type(bn).__name__}; expected a normkit BatchNorm")
        if not bn.track_running_stats or bn._state is None:
            raise ValueError(
                f"bn has no running statistics {'(track_running_stats=False)' if not bn.track_running_stats else 'yet'}: "
                f"nothing to freeze"
            )
        config = {key: value for key, value in bn._config().items()}
        frozen = cls(**config)
        frozen.backend = bn.backend
        frozen._state, frozen._state_backend = bn._state, bn._state_backend
        return frozen
