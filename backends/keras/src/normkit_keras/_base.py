r"""What every normkit Keras layer shares: the preset's choices, argument checks, reading the
variables' values for normkit's functional ops, and loading normkit state dicts.

The layers compute nothing themselves. In ``call`` they hand the input and the values of their
variables (``variable.value``: a ``tf.Variable``, a JAX array or tracer, a ``torch`` tensor, the
value in the current ``StatelessScope`` under JAX's trainer) to normkit's functional ops, and
normkit's registry picks the backend of the tensor's own type: ``normkit_tensorflow``,
``normkit_jax`` or ``normkit_torch`` (NumPy's, built in, under ``KERAS_BACKEND=numpy``). New
running statistics come back as values, and the layer stores them with ``variable.assign``,
its only side effect (JAX's trainer turns it into new non-trainable variables).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from normkit import presets
from normkit._registry import backend_for
from normkit.errors import StateDictError

__all__ = [
    "PACKAGE",
    "PresetOptions",
    "check_axis",
    "check_epsilon",
    "check_flag",
    "keras_momentum",
    "metadata",
    "to_numpy",
    "value",
]

PACKAGE = "normkit"
"""The package of the registered names (``"normkit>BatchNormalization"``), written into every
``.keras`` file: changing it (or a class name) would stop saved models from loading."""


def value(variable: keras.Variable | None) -> Any:
    """A Keras variable's backend-native value, or ``None`` for a missing weight.

    ``variable.value``, not the variable: ``keras.ops.convert_to_tensor`` returns a TensorFlow
    backend variable itself, which no normkit backend takes, and under JAX's trainer the value
    is the ``StatelessScope``'s (a tracer), not the stored array.
    """
    return None if variable is None else variable.value


def keras_momentum(momentum: float | None, preset: presets.Preset) -> float:
    """Keras's momentum (the weight of the old value): the preset's default or ``momentum``."""
    if momentum is None:
        return round(preset.default_momentum("running"), 12)
    return presets.check_momentum(momentum)


def check_epsilon(epsilon: object, default: float) -> float:
    r"""``epsilon`` (``None``: the preset's ``default``) as a positive finite float.

    normkit's kernels add it inside the square root and require :math:`\epsilon > 0` (Keras's
    own layers also take 0, which divides a constant channel by zero).
    """
    if epsilon is None:
        return default
    try:
        return presets.check_eps(epsilon)
    except (TypeError, ValueError):
        raise ValueError(
            f"epsilon={epsilon!r}: expected a positive finite number (normkit adds it to the variance "
            f"inside the square root)"
        ) from None


def check_axis(axis: object, *, several: bool = False) -> int | list[int]:
    """``axis`` as an ``int`` (a NumPy integer too; not a bool), or with ``several`` also a
    non-empty list of them (a tuple becomes a list, as Keras keeps it).

    :raises TypeError: for anything else, naming what was given (Keras's own layers turn 1.5
        into 1 with ``int(axis)``, or fail later with an error that does not name ``axis``).
    :raises ValueError: for an empty list.
    """
    expected = "an int or a non-empty list of ints" if several else "an int (the channel axis)"

    def one(a: object) -> int:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(f"axis={axis!r}: expected {expected}")
        return int(a)

    if several and isinstance(axis, list | tuple):
        if not axis:
            raise ValueError(f"axis={axis!r}: expected {expected}")
        return [one(a) for a in axis]
    return one(axis)


def check_flag(name: str, flag: object) -> bool:
    """``flag`` as a bool (a NumPy bool too).

    :raises TypeError: for anything else, naming the parameter ``name`` (a string such as
        ``"no"`` would otherwise count as true).
    """
    if not isinstance(flag, bool | np.bool_):
        raise TypeError(f"{name}={flag!r}: expected True or False")
    return bool(flag)


def unsupported(**options: Any) -> None:
    """``NotImplementedError`` naming the first option that is set."""
    for name, setting in options.items():
        if setting:
            raise NotImplementedError(f"{name}={setting!r} is not supported by normkit's Keras layers")


def to_numpy(array: Any) -> np.ndarray:
    """Any backend's array, a Keras variable or a plain number as a NumPy array."""
    if isinstance(array, keras.Variable):
        return np.asarray(keras.ops.convert_to_numpy(array.value))
    if isinstance(array, np.ndarray | int | float):
        return np.asarray(array)
    return np.asarray(backend_for(array).info.to_numpy(array))


def metadata(state_dict: Mapping[str, Any], layers: tuple[str, ...]) -> Mapping[str, Any]:
    """The ``_metadata`` of a normkit state dict of one of ``layers``."""
    found = state_dict.get("_metadata") if isinstance(state_dict, Mapping) else None
    if not isinstance(found, Mapping) or found.get("layer") not in layers:
        raise StateDictError(
            f"state_dict needs normkit's '_metadata' of a {' or '.join(layers)} (eps, momentum, axis); "
            f"make one with normkit.{layers[0]}(...).load_state_dict(arrays) and .state_dict()"
        )
    return found


class PresetOptions:
    """Mixin: the choices a preset makes that Keras hard-codes, the mixed-precision rule, and
    weights given to ``from_state_dict`` before the layer was built.

    Every normkit Keras layer sets ``autocast = False``: under a mixed-precision policy its input
    keeps its dtype (a float32 input above 65504 is not rounded to float16 infinity first), the
    statistics are computed in at least float32, and the output is cast to the policy's compute
    dtype. The weights stay in the variable dtype.
    """

    _pending_weights: dict[str, np.ndarray] | None = None

    def build(self, input_shape: Any) -> None:
        self._check_pending_weights(input_shape)  # before any weight exists: a failure changes nothing
        super().build(input_shape)  # type: ignore[misc]  # Keras's own build: its weights, in its order
        self._assign_pending_weights()

    def _weight_shape(self, input_shape: Any) -> tuple[int, ...]:
        """The shape Keras's build gives each weight: one value per channel of ``axis``
        (layers that normalize over several axes override it)."""
        return (input_shape[self.axis],)  # type: ignore[attr-defined]

    def _check_pending_weights(self, input_shape: Any) -> None:
        """Every weight given to ``from_state_dict`` against the shape this input gives it.

        :raises TypeError: for a weight that is not floating point;
        :raises ValueError: for one whose shape does not fit. Either names the first weight at
            fault, and the layer stays unbuilt with the weights still pending (a call with a
            fitting input loads them).
        """
        shape = tuple(self._weight_shape(input_shape))
        for name, array in (self._pending_weights or {}).items():
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"the state's {name} has dtype {array.dtype}; expected a floating dtype")
            if array.shape != shape:
                raise ValueError(
                    f"the state's {name} has shape {array.shape}, but this input gives the layer a "
                    f"{name} of shape {shape}: the state was saved for other features"
                )

    def _assign_pending_weights(self) -> None:
        """Assign the weights given to ``from_state_dict`` (checked by
        :meth:`_check_pending_weights` before the layer was built), then forget them."""
        for name, array in (self._pending_weights or {}).items():
            getattr(self, name).assign(array)
        self._pending_weights = None

    def _set_preset(self, p: presets.Preset) -> None:
        self.preset = p.name
        self.unbiased_running_var = p.running_var_estimator == "unbiased"
        self.allow_single_value = p.allow_single_value
        self.autocast = False

    @property
    def running_var_estimator(self) -> str:
        """``"unbiased"`` or ``"biased"``: the batch variance stored in the moving variance."""
        return "unbiased" if self.unbiased_running_var else "biased"

    def _channel_state(self) -> tuple[Any, Any, Any, Any]:
        """The values of the moving mean and variance, γ and β (``None`` where a weight is
        missing), in the order of ``normkit.batch_norm``'s and ``normkit.instance_norm``'s
        arguments."""
        names = ("moving_mean", "moving_variance", "gamma", "beta")
        return tuple(value(getattr(self, name)) for name in names)  # type: ignore[return-value]

    def _moving_options(self) -> dict[str, Any]:
        """The keyword arguments ``normkit.batch_norm`` and ``normkit.instance_norm`` share:
        Keras's momentum (the weight of the old value), the preset's variance estimator, epsilon
        and the preset. One value per group is allowed there: the layer checks it itself, in its
        own words (:meth:`_check_values_per_group`)."""
        return {
            "momentum": self.momentum,  # type: ignore[attr-defined]
            "momentum_weights": "running",
            "eps": self.epsilon,  # type: ignore[attr-defined]
            "running_var_estimator": self.running_var_estimator,
            "allow_single_value": True,
            "preset": self.preset,
        }

    def _check_values_per_group(self, inputs: Any, reduced_axes: list[int]) -> None:
        """One value per group in training: an error unless the preset allows it (checked when
        the reduced dimensions are known; a traced graph with unknown ones leaves it to the
        kernel)."""
        sizes = [inputs.shape[a] for a in reduced_axes]
        if self.allow_single_value or any(size is None for size in sizes):
            return
        if int(np.prod(sizes)) == 1:
            raise ValueError(
                f"inputs has shape {tuple(inputs.shape)}: expected more than 1 value per channel when "
                f"training (preset={self.preset!r}; preset='keras' allows it)"
            )

    def _output(self, y: Any) -> Any:
        """``y`` in the layer's compute dtype (the policy's: float16 under ``mixed_float16``)."""
        return keras.ops.cast(y, self.compute_dtype)  # type: ignore[attr-defined]
