r"""``GroupNormalization``: Keras's layer on normkit's ops, under every Keras backend."""

from __future__ import annotations

from typing import Any

import keras

import normkit
from normkit import presets
from normkit_keras import _eager
from normkit_keras._base import PACKAGE, PresetOptions, check_axis, check_epsilon, check_flag, value

__all__ = ["GroupNormalization"]

KERAS_OWN_BACKENDS = ("tensorflow",)
r"""The Keras backends on which the ``keras`` preset runs Keras's own group norm: there its
statistics are two-pass (``tf.nn.moments``) and its output stays within the spec's bound, also
at ``|mean|/std = 1e4``. On JAX (``jnp.mean`` and ``jnp.var``, then the same fused
:math:`x\,a + (\beta - \mu a)`) its output leaves that bound at ``1e4``, and on torch
``ops.moments`` is :math:`E[x^2] - E[x]^2`, which the spec forbids: there normkit's kernel
runs. A test under each Keras backend (``tests/test_group_and_rms_norm.py``) asserts that
Keras's layer is within the bound at ``1e4`` exactly on the backends named here."""


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupNormalization(PresetOptions, keras.layers.GroupNormalization):
    r"""``keras.layers.GroupNormalization`` on normkit's ops, with ``preset=`` (which sets the
    default ``epsilon``: 1e-3 for ``keras``, 1e-5 for ``torch``).

    Keras's arguments, defaults, weights (``gamma`` and ``beta``, one per channel) and
    serialization: ``groups`` contiguous blocks of ``C/groups`` channels (``groups=-1``: one per
    channel, instance normalization, fixed to ``C`` when the layer is built), each sample's block
    normalized over its channels and every axis but the batch axis,
    :math:`y = \gamma_c (x - \mu_{n,g})/\sqrt{\sigma^2_{n,g} + \epsilon} + \beta_c`. As Keras's
    layer it does not autocast; a mask passes through unchanged.

    Under ``preset="keras"`` (the default), on Keras's TensorFlow backend, it runs Keras's own
    computation, so a model gives bit-identical results after the swap: there Keras's statistics
    are two-pass and its output is the fused :math:`x\,a + (\beta - \mu a)`, which the spec
    allows (its rounding, about :math:`\epsilon|\mu|\gamma/\sigma`, is the centering term of the
    conformance bound: 2e-3 at ``|mean|/std = 1e4`` in float32). On JAX and torch (see
    :data:`KERAS_OWN_BACKENDS`), and under any other preset, it runs normkit's kernel, a shifted
    two-pass that applies :math:`(x - \mu)\,a + \beta`.
    """

    def __init__(
        self,
        groups: int = 32,
        axis: int = -1,
        epsilon: float | None = None,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        *,
        preset: str = "keras",
        **kwargs: Any,
    ) -> None:
        p = presets.get_preset(preset)
        super().__init__(
            groups=groups,
            axis=check_axis(axis),
            epsilon=check_epsilon(epsilon, p.group_norm_eps),
            center=check_flag("center", center),
            scale=check_flag("scale", scale),
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            **kwargs,
        )
        self._set_preset(p)

    def build(self, input_shape: Any) -> None:
        if not -len(input_shape) <= self.axis < len(input_shape):
            raise ValueError(f"axis={self.axis!r}: expected one axis of inputs of rank {len(input_shape)}")
        if self.axis % len(input_shape) == 0:
            raise ValueError("axis=0 is the batch axis; group normalization needs a channel axis")
        super().build(input_shape)  # Keras's: checks groups against the channels, adds gamma and beta

    def call(self, inputs: Any) -> Any:
        rank = len(inputs.shape)
        axis = self.axis % rank
        y = _eager.run(
            self, "_normalize", (axis,), inputs, fixed_axes=(axis,),
            reduced_axes=tuple(a for a in range(1, rank) if a != axis), groups=self.groups,
            weights=(self.gamma, self.beta),
            options=(self.groups, self.epsilon, self.center, self.scale, self.preset, self.compute_dtype),
        )  # fmt: skip
        if y is not None:  # eager on TensorFlow: the same ops as one traced call
            return y
        return self._normalize(inputs, axis)

    def _normalize(self, inputs: Any, axis: int) -> Any:
        """Keras's own group norm (``preset="keras"`` on :data:`KERAS_OWN_BACKENDS`) or normkit's,
        in the compute dtype (eagerly on TensorFlow: one traced call)."""
        if self.preset == "keras" and keras.backend.backend() in KERAS_OWN_BACKENDS:
            return super().call(inputs)  # Keras's own computation: bit-identical, and conforming
        y = normkit.group_norm(
            inputs, self.groups, value(self.gamma), value(self.beta), eps=self.epsilon, axis=axis
        )
        return self._output(y)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "preset": self.preset}
