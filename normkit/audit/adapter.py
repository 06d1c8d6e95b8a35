"""What ``normkit audit`` needs from an implementation: a small adapter.

An adapter turns one conformance case into calls of someone else's layer. It receives the
case's semantics already resolved from normkit's presets (:class:`Config`: eps, momentum in
PyTorch's convention, the running-variance estimator, the channel axis, ...) and the starting
arrays, and returns NumPy arrays. It configures the native layer to those semantics, or raises
:class:`Unsupported` when the layer cannot express them (the cell then reads ``n/a``, with the
reason). Everything else (the inputs, the float64 reference, the tolerance, the verdict) is the
audit's.

A minimal adapter for your own layer norm::

    import numpy as np
    from normkit.audit import Adapter, Unsupported

    class MyLayerNorm(Adapter):
        name = "mine"
        ops = ("layer_norm",)

        def build(self, config, state):
            if config.native_defaults:
                raise Unsupported("no defaults to probe")
            def call(x, training):
                mean = x.mean(axis=config.axes, keepdims=True)
                var = x.var(axis=config.axes, keepdims=True)
                return (x - mean) / np.sqrt(var + config.eps) * state["weight"] + state["bias"]
            return call

    # normkit.audit.run_audit([MyLayerNorm()]) runs every layer-norm case on it.

A layer with running statistics returns an object with ``__call__(x, training)`` and
``running_stats()`` (a dict with ``running_mean`` and ``running_var`` as normkit stores them:
the variance under ``config.unbiased``'s estimator). The ``moments`` op returns a
``(mean, variance)`` pair (biased variance, reduced over ``config.axes``) instead of ``y``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["OPS", "Adapter", "Config", "Layer", "Unsupported", "refuse_fixed_choices"]

OPS = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "moments")
"""The operations an adapter may implement (the conformance suite's layer ops and ``moments``)."""


class Unsupported(Exception):
    """The implementation cannot express this configuration: the cell reads ``n/a`` with this
    message. Raise it before doing any work; an exception of any other type is a failure."""


@dataclass(frozen=True)
class Config:
    """One case's semantics, resolved from its preset (normkit's conventions).

    ``axis`` is the channel axis (batch, instance and group norm, and the kept axis of
    ``moments``); ``axes`` the normalized axes (layer and RMS norm) or the reduced axes
    (``moments``); both non-negative. ``momentum`` is the weight of the new batch statistic
    (PyTorch's convention; Keras, Flax and ONNX store ``1 - momentum``), ``None`` for the
    cumulative average. ``unbiased`` names the running-variance estimator
    (:math:`n/(n-1)`); the variance that normalizes in training is always the biased one.

    ``native_defaults`` asks for the framework's own defaults: the adapter constructs the
    layer with only what it needs (sizes and groups) and ignores eps, momentum, estimator,
    axis, affine and ``track_running_stats``; it loads whichever of the given arrays the layer
    has. The audit uses it to find which preset each implementation matches; the input
    then has the same length on axes 1 and -1.
    """

    op: str
    dtype: str
    shape: tuple[int, ...]
    eps: float = 1e-5
    axis: int = 1
    axes: tuple[int, ...] = ()
    groups: int = 1
    momentum: float | None = 0.1
    unbiased: bool = True
    affine: bool = True
    bias: bool = True
    track_running_stats: bool = False
    weight_offset: float = 0.0
    cast_before_weight: bool = False
    native_defaults: bool = False

    @property
    def channels_last(self) -> bool:
        """Whether the channel axis is the last one."""
        return self.axis == len(self.shape) - 1

    @property
    def num_channels(self) -> int:
        return self.shape[self.axis]

    @property
    def normalized_shape(self) -> tuple[int, ...]:
        """The shape of layer and RMS norm's weight (the sizes of ``axes``)."""
        return tuple(self.shape[a] for a in self.axes)

    @property
    def trailing_axes(self) -> bool:
        """Whether ``axes`` are the last ones (what ``torch.nn.LayerNorm`` can express)."""
        n = len(self.shape)
        return self.axes == tuple(range(n - len(self.axes), n))


def refuse_fixed_choices(config: Config, layers: str, *, running_var: str) -> None:
    """Raise :class:`Unsupported` for the choices most frameworks' layers fix: batch norm's
    running-variance estimator (``running_var``, ``"biased"`` or ``"unbiased"``) and its
    exponential average (no cumulative one), and RMS norm without a weight offset that rounds
    after the weight. ``layers`` names the framework in the message. Nothing is refused for
    ``native_defaults``."""
    if config.native_defaults:
        return
    if config.op == "batch_norm" and config.track_running_stats:
        if config.momentum is None:
            raise Unsupported(f"{layers} BatchNorm has no cumulative average (momentum=None)")
        if config.unbiased != (running_var == "unbiased"):
            raise Unsupported(f"{layers} BatchNorm stores the {running_var} running variance only")
    if config.op == "rms_norm":
        if config.weight_offset:
            raise Unsupported(f"{layers} RMSNorm has no weight offset")
        if config.cast_before_weight and config.affine and config.dtype in ("float16", "bfloat16"):
            raise Unsupported(f"{layers} RMSNorm rounds after the weight")


class Layer(Protocol):
    """A built layer: ``layer(x, training)`` returns ``y`` as a NumPy array of ``x``'s dtype."""

    def __call__(self, x: np.ndarray, training: bool) -> Any: ...


class Adapter:
    """Base class of an audited implementation.

    Subclasses (or their instances, for variants of one class) set :attr:`name`, :attr:`ops`
    (a subset of :data:`OPS`), :attr:`dtypes`, :attr:`requires` (import names; a missing one
    lists the adapter as not installed instead of failing) and implement :meth:`build`.
    """

    name: str = ""
    ops: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
    requires: tuple[str, ...] = ()
    environment: Mapping[str, str] = {}
    """Environment variables the implementation needs set before its framework is imported
    (``KERAS_BACKEND``): the audit runs such an adapter in a subprocess."""
    description: str = ""
    cases: tuple[str, ...] | None = None
    """The ids of the only cases to play (for slow implementations); ``None`` plays all."""

    def missing(self) -> list[str]:
        """The required modules that are not installed."""
        return [module for module in self.requires if importlib.util.find_spec(module) is None]

    def versions(self) -> dict[str, str]:
        """The installed versions of the required modules' distributions."""
        found: dict[str, str] = {}
        distributions = importlib.metadata.packages_distributions()
        for module in self.requires:
            for dist in distributions.get(module, [module]):
                try:
                    found[dist] = importlib.metadata.version(dist)
                except importlib.metadata.PackageNotFoundError:
                    pass
        return found

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Layer | Callable[..., Any]:
        """The layer for one case, holding ``state`` (NumPy arrays in the case's state dtype:
        ``weight``, ``bias``, ``running_mean``, ``running_var`` as the op uses them).

        :raises Unsupported: if the implementation cannot express ``config``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<audit adapter {self.name!r}>"
