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
from typing import Any, Protocol

import numpy as np

from normkit.functional.statistics import Moments, moments
from normkit.layers.channel_norm import BatchNorm

__all__ = ["Adapter", "Recorder", "Site", "adapter_for", "find_batch_norms"]

Array = Any


@dataclass
class Recorder:
    """The moments of one layer's input, batch by batch (over every axis but the channel axis)."""

    parts: list[Moments] = field(default_factory=list)

    def __call__(self, x: Array, axis: int, mask: Array | None = None) -> None:
        self.parts.append(moments(x, axis=axis, mask=mask))


class Site(Protocol):
    """One normalization layer with running statistics."""

    name: str
    unbiased: bool
    """Whether the layer stores the unbiased variance."""

    def attach(self, recorder: Recorder) -> None:
        """Remember the layer's state and mode, and record its input from now on (the layer
        normalizing with batch statistics)."""

    def commit(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Stop recording; put everything back but the running statistics, which become
        ``mean`` and ``var`` (float64, cast to the layer's dtype)."""

    def restore(self) -> None:
        """Stop recording and put the layer back exactly as it was."""

    def to_numpy(self, array: Array) -> np.ndarray:
        """A recorded statistic as a NumPy array."""


class Adapter(Protocol):
    """How the tools reach a family of models."""

    def sites(self, model: object) -> dict[str, Site]:
        """The model's normalization layers with running statistics, by name."""

    def running(self, model: object) -> contextlib.AbstractContextManager[Callable[[Array], object]]:
        """A context in which the model runs for recording (other layers in eval mode, no
        gradients), yielding the default forward function; on exit every mode is restored."""


def find_batch_norms(model: object) -> dict[str, BatchNorm]:
    """The :class:`~normkit.BatchNorm` layers with running statistics in ``model``: the layer
    itself, the values of a mapping, the items of a list or tuple, or an object's attributes, one
    level deep, by name (``"0"``, ``"conv_bn"``)."""
    if isinstance(model, BatchNorm):
        found: dict[str, Any] = {"": model}
    elif isinstance(model, Mapping):
        found = {str(k): v for k, v in model.items()}
    elif isinstance(model, (list, tuple)):
        found = {str(i): v for i, v in enumerate(model)}
    else:
        found = dict(vars(model)) if hasattr(model, "__dict__") else {}
    return {
        name: layer
        for name, layer in found.items()
        if isinstance(layer, BatchNorm) and layer.track_running_stats
    }


class NormkitSite:
    """A normkit :class:`~normkit.BatchNorm`, observed through its input-observer hook."""

    def __init__(self, name: str, layer: BatchNorm) -> None:
        self.name, self.layer = name, layer
        self.unbiased = layer.running_var_estimator == "unbiased"
        self._saved: tuple[Any, ...] = ()

    def attach(self, recorder: Recorder) -> None:
        layer = self.layer
        self._saved = (layer.training, layer._state, layer._state_backend)
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

    def restore(self) -> None:
        layer = self.layer
        layer._input_observers = ()
        if self._saved:
            layer.training, layer._state, layer._state_backend = self._saved

    def to_numpy(self, array: Array) -> np.ndarray:
        backend = self.layer._state_backend
        return np.asarray(backend.info.to_numpy(array) if backend is not None else array, np.float64)


class NormkitAdapter:
    """normkit's own layers, run by the caller's forward function."""

    def sites(self, model: object) -> dict[str, Site]:
        return {name: NormkitSite(name, layer) for name, layer in find_batch_norms(model).items()}

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


ADAPTER_MODULES = {"torch": ("normkit_torch.testtime", "normkit-torch")}
"""Where each framework's adapter lives, and the distribution that provides it."""


def adapter_for(model: object) -> Adapter:
    """The adapter for ``model``: a PyTorch module's from ``normkit_torch``, else normkit's own.

    :raises TypeError: for a framework model whose adapter is not installed or not written yet.
    """
    framework = _framework(model)
    if framework is None:
        return NormkitAdapter()
    if framework not in ADAPTER_MODULES:
        raise TypeError(
            f"model is a {type(model).__module__}.{type(model).__qualname__}: normkit.testtime has no adapter "
            f"for {framework} models yet (PyTorch models and normkit's own layers are supported)"
        )
    module, distribution = ADAPTER_MODULES[framework]
    try:
        return importlib.import_module(module).ADAPTER
    except ModuleNotFoundError as error:
        raise TypeError(
            f"model is a {framework} model; install {distribution} for its adapter ({error})"
        ) from None
