r"""What the test-time tools see of a model: its normalization layers as *sites*.

A site records the moments of its layer's input while the model runs, and afterwards either
takes new running statistics or is put back exactly as it was. An adapter finds a model's sites
and runs a batch through it (:func:`adapter_for`): normkit's own layers here, PyTorch models in
``normkit_torch.testtime``. The methods (:mod:`normkit.testtime.recalibrate`) are written once,
against sites.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from normkit.functional.statistics import Moments, moments
from normkit.layers.channel_norm import BatchNorm, FrozenBatchNorm, InstanceNorm, _ChannelNorm

__all__ = [
    "Adapter",
    "EvalForward",
    "LayerView",
    "Recorder",
    "Site",
    "adapter_for",
    "find_batch_norms",
    "find_norm_layers",
    "framework_module",
]

Array = Any


@dataclass(frozen=True)
class LayerView:
    """What an eval-mode replacement sees of a batch-norm layer at the moment of a call: its
    arrays (the framework's, current values) and its conventions."""

    axis: int
    eps: float
    running_mean: Array
    running_var: Array
    weight: Array | None
    bias: Array | None


EvalForward = Callable[[Array, LayerView], Array]
"""What a layer computes in eval mode while substituted: ``y = forward(x, view)``."""


@dataclass
class Recorder:
    """The moments of one layer's input, batch by batch (over every axis but the channel axis).

    :param name: the layer's name in the model, for messages.
    :param channels: the layer's channel count, if known: an input with another count is refused
        before the layer sees it.
    """

    name: str = ""
    channels: int | None = None
    per_instance: bool = False
    """Record each sample's moments separately (instance norm: over the spatial axes only,
    ``(N, C)`` per batch)."""
    batch: int = 0
    """The number of the batch being run (from 1), for messages."""
    parts: list[Moments] = field(default_factory=list)

    def __call__(self, x: Array, axis: int, mask: Array | None = None) -> None:
        shape = tuple(x.shape)
        if self.channels is not None and (
            not -len(shape) <= axis < len(shape) or shape[axis] != self.channels
        ):
            raise ValueError(
                f"batch {self.batch}: layer {self.name or 'the layer'!r} got an input of shape {shape} with "
                f"{shape[axis] if -len(shape) <= axis < len(shape) else 'no'} channels on axis {axis}; "
                f"expected {self.channels} (the layer's num_features)"
            )
        kept = (0, axis % len(shape)) if self.per_instance else axis
        self.parts.append(moments(x, axis=kept, mask=mask))


class Site(Protocol):
    """One normalization layer with running statistics."""

    name: str
    per_instance: bool
    """An instance norm with running statistics (which average the statistics of each sample)
    rather than a batch norm."""
    unbiased: bool
    """Whether the layer stores the unbiased variance."""
    eps: float
    """The layer's eps."""
    channels: int | None
    """The layer's channel count, when known."""

    def running(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The layer's running mean and variance as float64 NumPy arrays (``None`` before the
        layer has any)."""

    def attach(self, recorder: Recorder) -> None:
        """Remember the layer's state and mode, and record its input from now on (the layer
        normalizing with batch statistics)."""

    def commit(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Stop recording; put everything back but the running statistics, which become
        ``mean`` and ``var`` (float64, cast to the layer's dtype). A later :meth:`restore`
        does nothing."""

    def restore(self) -> None:
        """Stop recording and put the layer back exactly as it was (nothing, after
        :meth:`commit` or without :meth:`attach`)."""

    def to_numpy(self, array: Array) -> np.ndarray:
        """A recorded statistic as a NumPy array."""

    def substitute(self, forward: EvalForward | None) -> None:
        """From now on the layer, when in eval mode, returns ``forward(x, view)`` instead of
        normalizing with its running statistics (training mode is unchanged); ``None`` puts
        the layer's own eval back exactly."""

    @property
    def substituted(self) -> bool:
        """Whether an eval forward is substituted now."""


class Adapter(Protocol):
    """How the tools reach a family of models."""

    def sites(self, model: object) -> dict[str, Site]:
        """The model's normalization layers with running statistics, by name."""

    def running(self, model: object) -> contextlib.AbstractContextManager[Callable[[Array], object]]:
        """A context in which the model runs for recording (other layers in eval mode, no
        gradients), yielding the default forward function; on exit every mode is restored."""


def _layers_in(model: object) -> dict[str, Any]:
    """What ``model`` holds one level deep, by name: the model itself (``""``) if it is a
    layer, the values of a mapping, the items of a list or tuple, or an object's attributes."""
    if isinstance(model, _ChannelNorm):
        return {"": model}
    if isinstance(model, Mapping):
        return {str(k): v for k, v in model.items()}
    if isinstance(model, (list, tuple)):
        return {str(i): v for i, v in enumerate(model)}
    return dict(vars(model)) if hasattr(model, "__dict__") else {}


def find_batch_norms(model: object) -> dict[str, BatchNorm]:
    """The :class:`~normkit.BatchNorm` layers with running statistics (frozen ones aside) in
    ``model``: the layer itself, the values of a mapping, the items of a list or tuple, or an
    object's attributes, one level deep, by name (``"0"``, ``"conv_bn"``)."""
    return {
        name: layer
        for name, layer in _layers_in(model).items()
        if isinstance(layer, BatchNorm)
        and layer.track_running_stats
        and not isinstance(layer, FrozenBatchNorm)
    }


def find_norm_layers(model: object) -> dict[str, BatchNorm | InstanceNorm]:
    """:func:`find_batch_norms`, and the :class:`~normkit.InstanceNorm` layers with running
    statistics, in the order ``model`` holds them."""
    batch_norms = find_batch_norms(model)
    return {
        name: layer
        for name, layer in _layers_in(model).items()
        if name in batch_norms or (isinstance(layer, InstanceNorm) and layer.track_running_stats)
    }


class NormkitSite:
    """A normkit :class:`~normkit.BatchNorm` (or :class:`~normkit.InstanceNorm` with running
    statistics), observed through its input-observer hook."""

    def __init__(self, name: str, layer: BatchNorm | InstanceNorm) -> None:
        self.name, self.layer = name, layer
        self.per_instance = isinstance(layer, InstanceNorm)
        self.unbiased = layer.running_var_estimator == "unbiased"
        self.eps = layer.eps
        self.channels = layer._channels()
        self._saved: tuple[Any, ...] = ()

    def running(self) -> tuple[np.ndarray, np.ndarray] | None:
        saved = self._saved[1] if self._saved else self.layer._state
        if saved is None or saved.running_mean is None:
            return None
        return self.to_numpy(saved.running_mean), self.to_numpy(saved.running_var)

    def attach(self, recorder: Recorder) -> None:
        layer = self.layer
        self._saved = (layer.training, layer._state, layer._state_backend)
        recorder.channels = self.channels
        layer._input_observers = (recorder,)
        layer.train()

    def commit(self, mean: np.ndarray, var: np.ndarray) -> None:
        layer = self.layer
        training, state, backend = self._saved
        layer._input_observers = ()
        layer.training = training
        layer._state_backend = backend or layer._state_backend
        if state is None:  # created by the first recorded call: as if never trained
            state = layer._state.replace(num_batches_tracked=0)
        info = layer._state_backend.info
        like = state.running_mean
        dtype, device = info.dtype_name(like), info.device(like)
        layer._state = state.replace(
            running_mean=info.asarray(mean, dtype, device), running_var=info.asarray(var, dtype, device)
        )
        self._saved = ()

    def restore(self) -> None:
        layer = self.layer
        layer._input_observers = ()
        if self._saved:
            layer.training, layer._state, layer._state_backend = self._saved
            self._saved = ()

    def to_numpy(self, array: Array) -> np.ndarray:
        backend = self.layer._state_backend
        return np.asarray(backend.info.to_numpy(array) if backend is not None else array, np.float64)

    def substitute(self, forward: EvalForward | None) -> None:
        layer = self.layer
        if forward is None:
            layer._eval_forward = None
            return

        def eval_forward(x: Array, axis: int) -> Array:
            state = layer._state
            view = LayerView(axis, layer.eps, state.running_mean, state.running_var, state.weight, state.bias)
            return forward(x, view)

        layer._eval_forward = eval_forward

    @property
    def substituted(self) -> bool:
        return getattr(self.layer, "_eval_forward", None) is not None


class NormkitAdapter:
    """normkit's own layers, run by the caller's forward function."""

    def sites(self, model: object) -> dict[str, Site]:
        return {name: NormkitSite(name, layer) for name, layer in find_norm_layers(model).items()}

    @contextlib.contextmanager
    def running(self, model: object) -> Iterator[Callable[[Array], object]]:
        def no_default(x: Array) -> object:
            raise TypeError("forward=: normkit's layers are run by a forward function; pass forward=")

        yield no_default


def _framework(model: object) -> str | None:
    """The top-level module of the first framework class in ``model``'s class hierarchy."""
    for cls in type(model).__mro__:
        top = cls.__module__.split(".")[0]
        if top in ("torch", "keras", "tensorflow"):
            return top
    return None


FRAMEWORK_PACKAGES = {
    "torch": ("normkit_torch", "normkit-torch"),
    "keras": ("normkit_tensorflow", "normkit-tensorflow"),
    "tensorflow": ("normkit_tensorflow", "normkit-tensorflow"),
}
"""For each framework, the package holding its halves of the test-time tools (``testtime``:
the adapter, ``fold``, ``frozen``) and the distribution that provides it."""


def framework_module(model: object, part: str, task: str) -> ModuleType | None:
    """The module ``part`` of the package serving ``model``'s framework (``normkit_torch.fold``
    for a PyTorch module), or ``None`` for a model of no framework (normkit's own layers).

    :param task: what the caller does with the model, for the message (``"fold it"``).
    :raises TypeError: when the distribution that holds the module is not installed.
    """
    framework = _framework(model)
    if framework is None:
        return None
    package, distribution = FRAMEWORK_PACKAGES[framework]
    try:
        return importlib.import_module(f"{package}.{part}")
    except ModuleNotFoundError as error:
        raise TypeError(f"model is a {framework} model; install {distribution} to {task} ({error})") from None


def adapter_for(model: object) -> Adapter:
    """The adapter for ``model``: a PyTorch module's from ``normkit_torch``, a Keras model's
    from ``normkit_tensorflow``, else normkit's own.

    :raises TypeError: for a framework model whose adapter is not installed.
    """
    module = framework_module(model, "testtime", "reach its layers")
    return NormkitAdapter() if module is None else module.ADAPTER
