"""Keras 3's own layers, once per Keras backend (each in a subprocess with ``KERAS_BACKEND``
set; JAX with 64-bit mode on, so that float64 cases are float64).

* ``BatchNormalization(axis, momentum=1 - m, epsilon, center, scale)``: Keras's momentum
  weighs the running value; the moving variance is the biased batch variance, so an
  unbiased-estimator case, and the cumulative average (``momentum=None``), are ``n/a``.
* ``LayerNormalization(axis=axes, epsilon, center, scale)``.
* ``GroupNormalization(groups, axis, epsilon, center, scale)``; instance norm is
  ``GroupNormalization(groups=-1)`` (Keras's documented spelling; no running statistics).
* ``RMSNormalization(axis, epsilon)``: always scaled, rounds after the scale, no offset.
* ``keras.ops.moments(x, axes)`` for ``moments``.

Dtype policies: ``mixed_float16``/``mixed_bfloat16`` for half-precision cases (float32
variables, as the cases' state), ``float32``/``float64`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported

__all__ = ["KerasLayers", "adapters"]

_POLICY = {
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "float32": "float32",
    "float64": "float64",
}
_VARIABLES = {
    "weight": ("gamma", "scale"),
    "bias": ("beta",),
    "running_mean": ("moving_mean",),
    "running_var": ("moving_variance",),
}


def _numpy(tensor: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(tensor))


class _Layer:
    def __init__(self, layer: Any, config: Config) -> None:
        self.layer, self.config = layer, config

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        import keras

        return _numpy(self.layer(keras.ops.convert_to_tensor(np.array(x)), training=training))

    def running_stats(self) -> dict[str, np.ndarray]:
        return {
            "running_mean": _numpy(self.layer.moving_mean),
            "running_var": _numpy(self.layer.moving_variance),
        }


class KerasLayers(Adapter):
    """Keras's layers on one Keras backend."""

    ops = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "moments")

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"keras ({backend})"
        self.requires = ("keras", backend)  # the backend's framework has the backend's name
        environment = {"KERAS_BACKEND": backend}
        if backend == "jax":
            environment["JAX_ENABLE_X64"] = "1"
        self.environment = environment

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Any:
        import keras

        if keras.backend.backend() != self.backend:
            raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}, not {self.backend!r}")
        if config.op == "moments":
            axes = list(config.axes)

            def moments(x: np.ndarray, training: bool) -> tuple[np.ndarray, np.ndarray]:
                mean, var = keras.ops.moments(keras.ops.convert_to_tensor(np.array(x)), axes)
                return _numpy(mean), _numpy(var)

            return moments
        layer = self._layer(config, keras.layers, _POLICY[config.dtype])
        layer.build(config.shape)
        for key, value in state.items():
            variable = next(
                (getattr(layer, n) for n in _VARIABLES[key] if getattr(layer, n, None) is not None), None
            )
            if variable is None:
                raise Unsupported(f"Keras's {type(layer).__name__} has no variable for {key} here")
            variable.assign(value.astype(variable.dtype))
        return _Layer(layer, config)

    def _layer(self, c: Config, layers: Any, policy: str) -> Any:
        if c.op == "batch_norm":
            if c.native_defaults:
                return layers.BatchNormalization(dtype=policy)
            if c.momentum is None:
                raise Unsupported("Keras has no cumulative average (momentum=None)")
            if not c.track_running_stats:
                raise Unsupported("Keras's BatchNormalization always tracks running statistics")
            if c.unbiased:
                raise Unsupported("Keras stores the biased batch variance")
            return layers.BatchNormalization(
                axis=c.axis,
                momentum=1.0 - c.momentum,
                epsilon=c.eps,
                center=c.affine,
                scale=c.affine,
                dtype=policy,
            )
        if c.op in ("instance_norm", "group_norm"):
            groups = -1 if c.op == "instance_norm" else c.groups
            if c.native_defaults:
                return layers.GroupNormalization(groups=groups, dtype=policy)
            if c.op == "instance_norm" and c.track_running_stats:
                raise Unsupported(
                    "Keras's instance norm (GroupNormalization(groups=-1)) has no running statistics"
                )
            return layers.GroupNormalization(
                groups=groups, axis=c.axis, epsilon=c.eps, center=c.affine, scale=c.affine, dtype=policy
            )
        if c.op == "layer_norm":
            if c.native_defaults:
                return layers.LayerNormalization(dtype=policy)
            return layers.LayerNormalization(
                axis=list(c.axes), epsilon=c.eps, center=c.bias, scale=c.affine, dtype=policy
            )
        if c.native_defaults:
            return layers.RMSNormalization(dtype=policy)
        if not c.affine:
            raise Unsupported("Keras's RMSNormalization always has a scale")
        if c.weight_offset:
            raise Unsupported("Keras's RMSNormalization has no weight offset")
        if c.cast_before_weight and c.dtype in ("float16", "bfloat16"):
            raise Unsupported("Keras's RMSNormalization rounds after the scale")
        return layers.RMSNormalization(axis=list(c.axes), epsilon=c.eps, dtype=policy)


def adapters() -> list[Adapter]:
    """Keras on TensorFlow, JAX and PyTorch."""
    return [KerasLayers(backend) for backend in ("tensorflow", "jax", "torch")]
