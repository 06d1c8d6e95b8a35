r"""Equinox's normalization layers (``equinox.nn``), which act on one example and are mapped
over the batch with ``jax.vmap``.

Native semantics (equinox 0.13, ``equinox/nn/_normalisation.py``, ``_batch_norm.py``):

* ``LayerNorm(shape, eps, use_weight, use_bias, dtype)`` normalizes the *whole* example of
  shape ``shape`` (two-pass ``jnp.var`` in at least float32, the affine in that precision, then
  rounded to ``x``'s dtype). The case's ``axes`` are moved to the end, the other axes merged
  into one that ``jax.vmap`` maps (Equinox's documented way to normalize some axes), and moved
  back. ``RMSNorm(shape, eps, use_weight, use_bias)`` likewise: the weight in float32, then
  rounded (normkit's ``after_weight``); built with ``use_bias=False`` (Equinox's default adds a
  zero-initialized bias normkit's RMS norm does not have); no weight offset.
* ``GroupNorm(groups, channels, eps, channelwise_affine)``: one example ``(C, ...)``,
  contiguous groups; the channel axis is moved to 1 and the batch mapped.
* ``BatchNorm(C, axis_name, eps, channelwise_affine, momentum, mode)``: one example
  ``(C, ...)`` under ``jax.vmap(..., axis_name=...)``, statistics by ``lax.pmean`` over the
  mapped axis, in ``x``'s dtype (no upcast). ``momentum`` is the *decay* (the adapter passes
  ``1 - config.momentum``); the running variance is the **biased** one (its docstring says
  unbiased; the code averages ``(y - mean)**2``), so ``config.unbiased`` is ``n/a``; no
  cumulative average. Two modes, one adapter each:

  - ``mode="batch"`` (recommended): batch statistics in training; in eval the running ones
    *zero-debiased*, divided by :math:`1 - m^{k}` after ``k`` updates. The case's starting
    state is loaded as a long-trained layer's: ``k`` is set to :math:`2^{30}`, where the
    factor is exactly 1 in float32 and float64, so eval uses the exponential average that
    starts from the loaded statistics. (From a fresh ``k = 0`` the first update would divide
    the loaded part by ``1 - m``, which only makes sense for Equinox's zero initialization.)
  - ``mode="ema"`` (what ``BatchNorm`` without ``mode`` gives, with a warning): in training it
    normalizes with the *running* average after this batch's update
    :math:`m\,r + (1-m)\,b`, not with the batch statistics; the loaded state is marked as
    already initialized (Equinox otherwise replaces it by the first batch's statistics).
    Half-precision input with float32 statistics raises a ``TypeError`` in ``lax.select``.

  A batch norm without tracked statistics is called in training mode in eval too and its
  state update dropped.

State: weights and running statistics in the case's state dtype (``dtype=`` of the layer);
Equinox keeps ``x``'s dtype for layer, group and RMS norm, while its batch norm promotes
half-precision input with float32 parameters to float32 (the audit reports it). No InstanceNorm
exists in ``equinox.nn``. float64 cases run under ``jax.enable_x64(True)``.

``native_defaults``: sizes, groups and affine flags only (eps 1e-5, decay 0.99); the axes are
the case's (Equinox has none of its own: the shape given is the example's) and the channel axis
Equinox's 0 of an example, i.e. 1 of the batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported, refuse_fixed_choices
from normkit.audit.adapters.jax_nn import axes_last, axes_restored, precision

__all__ = ["EquinoxLayer", "adapters"]

_TRAINED_STEPS = 2**30
"""The update count loaded with a ``mode="batch"`` state: ``1 - m**k`` is 1 there."""


def _check(config: Config) -> None:
    refuse_fixed_choices(config, "equinox", running_var="biased")


class _Layer:
    """NumPy in, moved to Equinox's per-example layout, mapped, moved back."""

    def __init__(self, config: Config, run: Callable[[Any, bool], Any], stats: Callable[[], dict]) -> None:
        self.config = config
        self.run = run
        self.stats = stats

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        c = self.config
        if c.op in ("layer_norm", "rms_norm"):
            moved, order = axes_last(x, c.axes)
            kept = moved.shape[: x.ndim - len(c.axes)]
            rows = moved.reshape(math.prod(kept), *moved.shape[len(kept) :])
            with precision(c.dtype):
                y = np.asarray(self.run(rows, training))
            return axes_restored(y.reshape(moved.shape), order)
        axis = 1 if c.native_defaults else c.axis
        with precision(c.dtype):
            y = np.asarray(self.run(np.moveaxis(x, axis, 1), training))
        return np.moveaxis(y, 1, axis)

    def running_stats(self) -> dict[str, np.ndarray]:
        return {key: np.asarray(value) for key, value in self.stats().items()}


class EquinoxLayer(Adapter):
    """``equinox.nn`` layers; ``mode`` is ``BatchNorm``'s."""

    requires: ClassVar[tuple[str, ...]] = ("jax", "equinox")

    def __init__(self, mode: str = "batch") -> None:
        if mode not in ("batch", "ema"):
            raise ValueError(f"mode={mode!r}: expected 'batch' or 'ema'")
        self.mode = mode
        if mode == "batch":
            self.name = "equinox"
            self.ops = ("batch_norm", "layer_norm", "group_norm", "rms_norm")
        else:
            self.name = "equinox (BatchNorm mode='ema')"
            self.ops = ("batch_norm",)
        self.description = f"equinox.nn layers under jax.vmap, BatchNorm mode={mode!r}"

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> _Layer:
        if config.op not in self.ops:
            raise Unsupported(f"{self.name} has no {config.op}")
        _check(config)
        with precision(config.dtype):
            if config.op == "batch_norm":
                run, stats = self._batch_norm(config, state)
            else:
                run, stats = self._stateless(config, state), dict
        return _Layer(config, run, stats)

    def _stateless(self, config: Config, state: Mapping[str, np.ndarray]) -> Callable[[Any, bool], Any]:
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        c = config
        dtype = jnp.dtype("float64" if c.dtype == "float64" else "float32")
        eps = {} if c.native_defaults else {"eps": c.eps}
        if c.op == "group_norm":
            channels = c.shape[1] if c.native_defaults else c.num_channels
            layer = eqx.nn.GroupNorm(c.groups, channels, channelwise_affine=c.affine, dtype=dtype, **eps)
        elif c.op == "layer_norm":
            layer = eqx.nn.LayerNorm(
                c.normalized_shape, use_weight=c.affine, use_bias=c.affine and c.bias, dtype=dtype, **eps
            )
        else:
            layer = eqx.nn.RMSNorm(
                c.normalized_shape, use_weight=c.affine, use_bias=False, dtype=dtype, **eps
            )
        layer = _loaded(layer, state, {"weight": "weight", "bias": "bias"})
        mapped = jax.vmap(layer)
        return lambda x, training: mapped(jnp.asarray(x))

    def _batch_norm(self, config: Config, state: Mapping[str, np.ndarray]) -> tuple[Callable, Callable]:
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        c = config
        dtype = jnp.dtype("float64" if c.dtype == "float64" else "float32")
        options: dict[str, Any] = {}
        if not c.native_defaults:
            options = {"eps": c.eps, "momentum": 1.0 - (c.momentum or 0.0)}
        channels = c.shape[1] if c.native_defaults else c.num_channels
        with warnings.catch_warnings():  # mode="ema" equals the default, which warns without a mode
            warnings.simplefilter("ignore")
            layer, held = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
                channels, "batch", channelwise_affine=c.affine, dtype=dtype, mode=self.mode, **options
            )
        layer = _loaded(layer, state, {"weight": "weight", "bias": "bias"})
        if "running_mean" in state:
            pair = (jnp.asarray(state["running_mean"]), jnp.asarray(state["running_var"]))
            if self.mode == "batch":
                counter = held.get(layer.batch_counter)  # 0, weakly typed: keep its type
                held = held.set(layer.batch_counter, counter + _TRAINED_STEPS)
                held = held.set(layer.batch_state_index, pair)
            else:
                held = held.set(layer.ema_first_time_index, jnp.asarray(False))
                held = held.set(layer.ema_state_index, pair)
        tracks = c.track_running_stats or c.native_defaults
        box = {"state": held}

        def run(x: Any, training: bool) -> Any:
            use_batch = training or not tracks
            mapped = jax.vmap(
                lambda example, s: layer(example, s, inference=not use_batch),
                axis_name="batch",
                in_axes=(0, None),
                out_axes=(0, None),
            )
            y, new = mapped(jnp.asarray(x), box["state"])
            if training and tracks:
                box["state"] = new
            return y

        def stats() -> dict[str, Any]:
            index = layer.batch_state_index if self.mode == "batch" else layer.ema_state_index
            mean, var = box["state"].get(index)
            return {"running_mean": mean, "running_var": var}

        return run, stats


def _loaded(layer: Any, state: Mapping[str, np.ndarray], names: Mapping[str, str]) -> Any:
    """``layer`` with the case's arrays in place of its initial ones."""
    import equinox as eqx
    import jax.numpy as jnp

    for key, name in names.items():
        if key in state and getattr(layer, name, None) is not None:
            current = getattr(layer, name)
            value = jnp.asarray(state[key]).reshape(current.shape)
            layer = eqx.tree_at(lambda m, name=name: getattr(m, name), layer, value)
    return layer


def adapters() -> list[Adapter]:
    """``equinox.nn`` with ``BatchNorm(mode="batch")``, and batch norm with ``mode="ema"``."""
    return [EquinoxLayer("batch"), EquinoxLayer("ema")]
