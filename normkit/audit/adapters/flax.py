r"""Flax's normalization layers, ``flax.nnx`` and ``flax.linen``, with the default
``use_fast_variance=True`` and with ``use_fast_variance=False``.

Native semantics (flax 0.12, ``flax/{nnx/nn,linen}/normalization.py``), shared by both APIs:

* statistics in at least float32 (``force_float32_reductions``); ``use_fast_variance=True``
  (the default) computes :math:`\sigma^2 = \max(E[x^2] - \mu^2, 0)`, the one-pass formula
  normkit's spec forbids, ``False`` the two-pass :math:`E[(x-\mu)^2]`; then
  :math:`y = (x - \mu)\cdot(\mathrm{rsqrt}(\sigma^2+\epsilon)\cdot\gamma) + \beta`, returned in
  the dtype promoted from ``x`` and the parameters (bfloat16 input with float32 parameters gives
  float32: the audit reports it, the adapter does not cast);
* ``BatchNorm(axis, momentum, epsilon)``: ``momentum`` is the *decay*
  :math:`r \leftarrow m\,r + (1-m)\,b`, so the adapter passes ``1 - config.momentum``; the
  running variance is always the **biased** batch variance (``config.unbiased`` is ``n/a``) and
  there is no cumulative average (``momentum=None`` is ``n/a``); any channel axis;
* ``LayerNorm`` and ``RMSNorm(reduction_axes, feature_axes, epsilon)``: any set of axes, the
  affine over the same axes; RMS norm multiplies by the weight in float32 and then rounds
  (normkit's ``after_weight``), with no weight offset;
* ``GroupNorm(num_groups, epsilon)``: channels last, contiguous groups; a channels-first case
  is transposed to channels-last and back (pure data movement);
* ``InstanceNorm(feature_axes, epsilon)``: any channel axis but 0; no running statistics (a
  tracked case is ``n/a``).

State: the case's arrays (float32, or float64 for a float64 case) are loaded as the layers'
``scale``/``bias`` parameters and ``mean``/``var`` batch statistics unchanged: Flax stores the
biased variance, which is what ``config.unbiased=False`` means. No ``dtype``/``param_dtype``
is set (the loaded arrays replace the initial ones), so the output dtype is Flax's own
promotion. A batch norm without tracked statistics (``track_running_stats=False``) is called
with ``use_running_average=False`` in eval too and its statistics' update dropped. float64
cases run under ``jax.enable_x64(True)`` (:func:`.jax_nn.precision`).

``native_defaults``: the layer is built with its sizes, groups and ``use_scale``/``use_bias``
only (and the variant's ``use_fast_variance``): eps 1e-5 for batch norm and 1e-6 otherwise,
decay 0.99, feature axis -1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported, refuse_fixed_choices
from normkit.audit.adapters.jax_nn import precision

__all__ = ["FlaxLayer", "adapters"]

_OPS = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm")


def _check(config: Config) -> None:
    """Raise :class:`Unsupported` for what no Flax layer expresses (with ``native_defaults``,
    only what no option of the layer could express)."""
    if config.op == "instance_norm" and config.track_running_stats:
        raise Unsupported("flax InstanceNorm keeps no running statistics")
    if config.native_defaults:
        return
    if config.op == "instance_norm" and config.axis == 0:
        raise Unsupported("flax InstanceNorm takes the batch on axis 0")
    refuse_fixed_choices(config, "flax", running_var="biased")


def _options(config: Config) -> tuple[dict[str, Any], int | None]:
    """The layer's keyword arguments (beyond sizes and affine flags) and the channel axis the
    input is moved to last for group norm (``None``: no move)."""
    c = config
    if c.native_defaults:
        return {}, None
    if c.op == "batch_norm":
        return {"axis": c.axis, "momentum": 1.0 - (c.momentum or 0.0), "epsilon": c.eps}, None
    if c.op == "instance_norm":
        return {"feature_axes": c.axis, "epsilon": c.eps}, None
    if c.op in ("layer_norm", "rms_norm"):
        return {"reduction_axes": c.axes, "feature_axes": c.axes, "epsilon": c.eps}, None
    return {"epsilon": c.eps}, (None if c.channels_last else c.axis)


def _param_shape(config: Config) -> tuple[int, ...]:
    """The parameters' shape in the layer's layout (linen's; nnx flattens it)."""
    c = config
    if c.op in ("layer_norm", "rms_norm"):
        return (c.shape[-1],) if c.native_defaults else c.normalized_shape
    return (c.shape[-1] if c.native_defaults else c.num_channels,)


class _Layer:
    """A built Flax layer: NumPy in, the layer's output as NumPy out."""

    def __init__(self, config: Config, run: Callable[[Any, bool], Any], stats: Callable[[], dict]) -> None:
        self.config = config
        self.run = run
        self.stats = stats
        _, self.move = _options(config)

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        if self.move is not None:
            x = np.moveaxis(x, self.move, -1)
        with precision(self.config.dtype):
            y = np.asarray(self.run(x, training))
        return np.moveaxis(y, -1, self.move) if self.move is not None else y

    def running_stats(self) -> dict[str, np.ndarray]:
        return {key: np.asarray(value) for key, value in self.stats().items()}


class FlaxLayer(Adapter):
    """``flax.nnx`` or ``flax.linen`` normalization layers with a given ``use_fast_variance``."""

    ops: ClassVar[tuple[str, ...]] = _OPS
    requires: ClassVar[tuple[str, ...]] = ("jax", "flax")

    def __init__(self, api: str, use_fast_variance: bool = True) -> None:
        if api not in ("nnx", "linen"):
            raise ValueError(f"api={api!r}: expected 'nnx' or 'linen'")
        self.api = api
        self.use_fast_variance = use_fast_variance
        suffix = "" if use_fast_variance else " (use_fast_variance=False)"
        self.name = f"flax.{api}{suffix}"
        self.description = f"flax.{api} layers, use_fast_variance={use_fast_variance}"

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> _Layer:
        _check(config)
        with precision(config.dtype):
            if self.api == "nnx":
                run, stats = self._nnx(config, state)
            else:
                run, stats = self._linen(config, state)
        return _Layer(config, run, stats)

    def _kwargs(self, config: Config) -> dict[str, Any]:
        options, _ = _options(config)
        affine = config.affine
        kwargs = dict(options, use_fast_variance=self.use_fast_variance)
        if config.op != "rms_norm":
            kwargs["use_bias"] = affine and config.bias
        kwargs["use_scale"] = affine
        if config.op == "group_norm":
            kwargs["num_groups"] = config.groups
        return kwargs

    def _nnx(self, config: Config, state: Mapping[str, np.ndarray]) -> tuple[Callable, Callable]:
        import jax.numpy as jnp
        from flax import nnx

        cls = {
            "batch_norm": nnx.BatchNorm,
            "instance_norm": nnx.InstanceNorm,
            "layer_norm": nnx.LayerNorm,
            "group_norm": nnx.GroupNorm,
            "rms_norm": nnx.RMSNorm,
        }[config.op]
        layer = cls(math.prod(_param_shape(config)), rngs=nnx.Rngs(0), **self._kwargs(config))
        for key, name in (("weight", "scale"), ("bias", "bias")):
            if key in state:
                setattr(layer, name, nnx.Param(jnp.asarray(state[key]).reshape(-1)))
        if config.op != "batch_norm":
            return (lambda x, training: layer(x)), dict
        # nnx creates its statistics in float32 whatever the parameters' dtype; untracked
        # ones are never read, and get the state dtype so that float64 updates can be stored
        dtype = "float64" if config.dtype == "float64" else "float32"
        size = layer.mean[...].shape
        layer.mean = nnx.BatchStat(jnp.asarray(state.get("running_mean", np.zeros(size, dtype))))
        layer.var = nnx.BatchStat(jnp.asarray(state.get("running_var", np.ones(size, dtype))))
        tracks = config.track_running_stats or config.native_defaults

        def run(x: Any, training: bool) -> Any:
            kept = (layer.mean[...], layer.var[...])
            y = layer(x, use_running_average=not training and tracks)
            if not tracks:
                layer.mean[...], layer.var[...] = kept
            return y

        return run, lambda: {"running_mean": layer.mean[...], "running_var": layer.var[...]}

    def _linen(self, config: Config, state: Mapping[str, np.ndarray]) -> tuple[Callable, Callable]:
        import jax.numpy as jnp
        from flax import linen

        cls = {
            "batch_norm": linen.BatchNorm,
            "instance_norm": linen.InstanceNorm,
            "layer_norm": linen.LayerNorm,
            "group_norm": linen.GroupNorm,
            "rms_norm": linen.RMSNorm,
        }[config.op]
        module = cls(**self._kwargs(config))
        shape = _param_shape(config)
        params = {
            name: jnp.asarray(state[key]).reshape(shape)
            for key, name in (("weight", "scale"), ("bias", "bias"))
            if key in state
        }
        variables: dict[str, Any] = {"params": params}
        if config.op != "batch_norm":
            return (lambda x, training: module.apply(variables, x)), dict
        if "running_mean" in state:
            variables["batch_stats"] = {
                "mean": jnp.asarray(state["running_mean"]),
                "var": jnp.asarray(state["running_var"]),
            }
        tracks = config.track_running_stats or config.native_defaults

        def run(x: Any, training: bool) -> Any:
            if not training and tracks:
                return module.apply(variables, x, use_running_average=True)
            y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
            if tracks:
                variables["batch_stats"] = updates["batch_stats"]
            return y

        def stats() -> dict[str, Any]:
            held = variables["batch_stats"]
            return {"running_mean": held["mean"], "running_var": held["var"]}

        return run, stats


def adapters() -> list[Adapter]:
    """nnx and linen, each with the default fast variance and with the two-pass one."""
    return [
        FlaxLayer("nnx"),
        FlaxLayer("nnx", use_fast_variance=False),
        FlaxLayer("linen"),
        FlaxLayer("linen", use_fast_variance=False),
    ]
