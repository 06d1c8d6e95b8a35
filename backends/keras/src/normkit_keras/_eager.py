r"""Eager calls on Keras's TensorFlow backend as one call of a traced ``tf.function``.

Called eagerly, a layer runs its TensorFlow ops one at a time, and each eager op costs tens of
µs of dispatch: a tiny ``BatchNormalization`` training call is some 50 of them (the shifted
statistics, the running-statistic updates, the casts). :func:`run` runs the same computation,
the layer's own method with the same arguments (normkit's op, the ``variable.assign`` of the
moving statistics, the cast to the compute dtype), as one call of a ``tf.function`` traced for
the layer. The ops are the same, and for the layers that take this path
(``BatchNormalization``, ``InstanceNormalization``, ``GroupNormalization``) TensorFlow's graph
optimizer leaves their arithmetic as written: outputs and moving statistics are bit-identical
either way (``tests/test_eager_path.py`` checks it over presets, dtypes, axes and batch sizes).
``LayerNormalization`` and ``RMSNormalization`` do not take it: the optimizer reorders their
broadcast products and sums (its arithmetic optimizer's broadcast minimization), which moves
their outputs by a few units in the last place, and op by op they already cost less than
Keras's own layers.

A function is traced once per layer and *configuration*: the method and its Python arguments
(such as ``training``), the options it reads (``momentum``, ``epsilon``, the preset, the
compute dtype: a layer whose attribute changes gets a new function), the input's dtype and rank
and the sizes of the axes the layer's weights span. Every other axis is traced as unknown
(``None``), so calls with other batch or spatial sizes reuse it: the number of traces does not
grow with the sizes seen, and no batch or spatial size is folded into the graph as a constant.
The concrete function is kept and called directly. A configuration is traced on its second
eager call (tracing costs some 50 ms, dozens of op-by-op calls): the first runs op by op, so a
one-off eager call (building a subclassed model by calling it) costs what it did. At most
:data:`MAX_FUNCTIONS` configurations are kept per layer (then the cache starts over). The
functions are held in a :class:`weakref.WeakKeyDictionary` keyed by the layer, outside the
layer's attributes, so that Keras's tracking, ``.keras`` saving and TensorFlow's SavedModel
export never see them; they refer to the layer only weakly.

The traced path is taken only where it is the same computation as the op-by-op one; otherwise
:func:`run` returns ``None`` and the layer runs op by op, as before:

* Keras's backend is TensorFlow, ``tf.executing_eagerly()`` (not inside a ``tf.function``,
  ``fit``'s compiled step or Keras's symbolic tracing, which run the layer in a graph anyway),
  and not ``tf.config.run_functions_eagerly(True)`` (debugging: every op runs as written);
* no Keras ``StatelessScope`` (``layer.stateless_call``, where assignments are collected by the
  scope) and no ``tf.distribute`` strategy (replica contexts, mirrored variables);
* for ``BatchNormalization``, no mask and not ``synchronized=True`` in training;
* the input is a floating ``tf.Tensor`` with at least one value, and at least 2 values in each
  group whose statistics are computed: edge cases (an empty batch, a group of one value, which
  may be an error) keep their op-by-op checks and errors;
* each weight's ``variable.value`` is a plain ``tf.Variable`` (not a value cast by an autocast
  scope, nor a distributed variable).

A call that fails while tracing (an invalid option set on the layer) raises the op-by-op path's
error before any op has run, so it changes no state, and leaves no function cached. Gradients
flow through the function as through the ops (``tf.GradientTape`` records the call, the layer's
variables included); ``training`` is a Python bool and gives its own function.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable, Sequence
from typing import Any

import keras

try:  # Keras's own test for a StatelessScope; if it moves, every eager call runs op by op
    from keras.src.backend.common.stateless_scope import in_stateless_scope
except ImportError:  # pragma: no cover - a Keras without this internal
    in_stateless_scope = None

__all__ = ["MAX_FUNCTIONS", "run", "traced_functions"]

MAX_FUNCTIONS = 16
"""The most configurations (traced functions) kept per layer; one more clears the layer's cache."""

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})

SEEN = object()
"""The cache's mark of a configuration called once (op by op): its next call traces it."""

_FUNCTIONS: weakref.WeakKeyDictionary[keras.layers.Layer, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def traced_functions(layer: keras.layers.Layer) -> dict[Hashable, Any]:
    """The concrete function (one trace) of each configuration ``layer`` has been traced for (a
    copy; for tests and diagnostics)."""
    return {key: f for key, f in _FUNCTIONS.get(layer, {}).items() if f is not SEEN}


def _variable_ids(weights: Sequence[keras.Variable | None], tf: Any) -> tuple[int | None, ...] | None:
    """The identities of the ``tf.Variable`` behind each weight (``None`` for a missing one), or
    ``None`` when a weight's value is anything else (cast by an autocast scope, distributed)."""
    ids: list[int | None] = []
    for weight in weights:
        if weight is None:
            ids.append(None)
            continue
        v = weight.value
        if not isinstance(v, tf.Variable) or isinstance(v, tf.distribute.DistributedValues):
            return None
        ids.append(id(v))
    return tuple(ids)


def run(
    layer: keras.layers.Layer,
    method: str,
    args: tuple[Hashable, ...],
    inputs: Any,
    *,
    fixed_axes: tuple[int, ...],
    reduced_axes: tuple[int, ...] | None,
    groups: int | None = None,
    weights: Sequence[keras.Variable | None],
    options: tuple[Hashable, ...],
) -> Any:
    """``getattr(layer, method)(inputs, *args)`` as one call of a ``tf.function`` traced for this
    configuration, or ``None`` where the call must run op by op (see the module docstring).

    :param fixed_axes: the axes whose sizes the layer's weights fix (the channel axis; the
        normalized axes); every other axis is traced with an unknown size.
    :param reduced_axes: the axes the method's statistics reduce over, or ``None`` where it only
        applies stored ones: they give the values per group, and a group of fewer than 2 runs op
        by op, where its checks and errors are.
    :param groups: group norm's groups: each group's statistics also span ``C/groups`` channels
        of the channel axis, ``fixed_axes[0]``.
    :param weights: the Keras variables the method reads or assigns (``None`` for a missing one).
    :param options: every other attribute the method reads while tracing.
    """
    if in_stateless_scope is None or keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf  # Keras's backend: imported already

    if not tf.executing_eagerly() or tf.config.functions_run_eagerly():
        return None
    if in_stateless_scope() or tf.distribute.has_strategy():
        return None
    if not isinstance(inputs, tf.Tensor) or inputs.dtype.name not in FLOAT_DTYPES:
        return None
    shape = tuple(inputs.shape)
    if math.prod(shape) == 0:
        return None
    if reduced_axes is not None:
        per_group = math.prod(shape[a] for a in reduced_axes)
        if groups:
            per_group *= shape[fixed_axes[0]] // groups
        if per_group < 2:
            return None
    ids = _variable_ids(weights, tf)
    if ids is None:
        return None
    key = (method, args, options, inputs.dtype, len(shape), tuple(shape[a] for a in fixed_axes), ids)
    functions = _FUNCTIONS.get(layer)
    if functions is None:
        functions = _FUNCTIONS.setdefault(layer, {})
    function = functions.get(key)
    if function is None:  # a configuration's first call runs op by op: no trace for a one-off call
        if len(functions) >= MAX_FUNCTIONS:
            functions.clear()
        functions[key] = SEEN
        return None
    if function is SEEN:  # its second: traced here, before anything runs (a call that fails while
        # tracing leaves nothing behind); the concrete function is kept and called directly, a
        # third less per call than the tf.function, which would look its trace up every time
        signature = tf.TensorSpec(
            [None if a not in fixed_axes else n for a, n in enumerate(shape)], inputs.dtype
        )
        traced = tf.function(_bound(weakref.ref(layer), method, args), autograph=False)
        function = traced.get_concrete_function(signature)
        functions[key] = function
    return function(inputs)


def _bound(layer: weakref.ref[keras.layers.Layer], method: str, args: tuple[Hashable, ...]) -> Any:
    """``layer``'s ``method`` with ``args`` after the input, through a weak reference (the
    cached function must not keep its layer alive: the cache is keyed by the layer)."""

    def traced(x: Any) -> Any:
        return getattr(layer(), method)(x, *args)

    return traced
