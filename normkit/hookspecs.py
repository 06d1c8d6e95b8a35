r"""The normkit specification, version 2.

Every docstring in this module is normative. "Must" is a requirement that
:mod:`normkit.testing` checks for every backend; "should" is advice. The documentation renders
this module; nothing else restates it.

A backend is a pluggy plugin that implements :func:`normkit_backend_info` and any of the
operation hooks below with :data:`normkit.hookimpl`. There are two kinds of operation hook:

* **primitives** (version 2): :func:`normkit_moments` (partial statistics as values) and
  :func:`normkit_normalize` (apply given statistics);
* **composites**: batch, instance, layer, group and RMS norm, the fast paths.

A backend that implements both primitives serves every composite it lacks: normkit composes
them (:mod:`normkit.composed`). A backend written for version 1 (composites only) keeps
loading; an operation it can neither run nor compose raises ``NotImplementedError`` naming the
backend and the operation. Implementations take every argument of
the spec, in the spec's order, with no defaults (pluggy never passes defaults, and normkit
calls the resolved implementation directly); the one optional extra is a keyword-only
``out=None`` (see "Output buffer" below). normkit validates every argument in
:mod:`normkit.functional` before a kernel is called, so kernels do not validate again; the
preconditions each kernel may rely on are listed under "Preconditions".

Notation
--------
``x`` is the input, ``axis`` its channel (feature) axis, ``C = x.shape[axis]``. For a channel
``c``, the reduction set holds every element of channel ``c`` (batch norm), every element of
channel ``c`` of one instance (instance norm), or every element of one normalized slice
(layer norm); ``n`` is its size. The batch statistics are

.. math::

   \mu = \frac{1}{n}\sum_i x_i, \qquad
   \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2 \quad\text{(biased, always used to normalize)}

and the output is :math:`y = \gamma\,(x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`.

The semantics that are explicit choices
---------------------------------------
1. **Running-statistic update.** Kernels receive ``momentum`` as the weight of the new batch
   statistic: :math:`r \leftarrow (1 - m)\,r + m\,b` (PyTorch's convention). Presets whose
   framework stores the weight of the old value (Keras, Flax, ONNX "decay" ``d``) pass
   :math:`m = 1 - d`. The cumulative average (PyTorch ``momentum=None``) is a layer feature:
   the layer counts ``num_batches_tracked`` (``k`` after this batch) and passes
   :math:`m = 1/k`, so the running value is the plain mean of the ``k`` batch statistics.
   Conformance: ``bn-ema-20-steps``, ``bn-cumulative-average``.
2. **Running-variance estimator.** ``unbiased_running_var=True`` stores
   :math:`\frac{n}{n-1}\sigma^2` (PyTorch, cuDNN); ``False`` stores :math:`\sigma^2` (Keras,
   Flax, ONNX). Normalizing in training always uses the biased :math:`\sigma^2`.
   Conformance: ``bn-two-values-per-channel``, ``bn-keras-preset-ema``.
3. **eps** is always inside the square root, :math:`1/\sqrt{\sigma^2+\epsilon}`, applied in the
   compute dtype (never rounded to a float16/bfloat16 input dtype). Preset defaults:
   ``1e-5`` (torch, onnx, flax batch norm), ``1e-6`` (flax layer/instance norm), ``1e-3`` (keras)
   for batch, layer and instance norm; group norm as layer norm; RMS norm ``None`` (torch: the
   compute dtype's machine epsilon), ``1e-6`` (keras, flax, llama, gemma), ``1e-5`` (onnx). See
   :mod:`normkit.presets`.
4. **Eval.** Batch norm in eval normalizes with the running statistics. A layer that tracks no
   running statistics normalizes with batch statistics in eval too (PyTorch
   ``track_running_stats=False``). Instance norm uses per-instance statistics unless it tracks
   running statistics and is in eval. Layer norm is identical in training and eval.
   In training, a kernel normalizes with the batch statistics first and then returns the
   updated running statistics computed from those same batch statistics.
   Conformance: ``bn-eval-after-train``, ``bn-eval-untracked``, ``in-tracked-eval``,
   ``ln-train-equals-eval``.
5. **Feature axis and layout.** Batch and instance norm take the channel axis ``axis``
   (``1`` channels-first, ``-1`` channels-last; any axis is allowed). Layer norm normalizes
   over a set of axes (PyTorch's trailing ``normalized_shape`` is the set of the last
   ``len(normalized_shape)`` axes). Conformance: ``bn-channels-last``, ``ln-axes-0-2``.
6. **Affine.** ``weight`` (γ) and ``bias`` (β) are each optional (``None`` means 1 and 0);
   per channel, shape ``(C,)``, for batch and instance norm; element-wise, with the shape of
   the normalized axes, for layer norm. Conformance: ``bn-affine-off``.
7. **Precision.** The compute dtype is float64 for float64 input and float32 otherwise;
   float16 and bfloat16 inputs are upcast before any statistic is computed. ``y`` has the
   dtype of ``x``; updated running statistics have the dtype of the running statistics passed
   in (float32 by default). Conformance: ``bn-float16-large-values``, ``bn-output-dtype-*``.
8. **Degenerate input.** One value per channel (``n = 1``) while batch statistics are used is
   an error under the torch preset and allowed otherwise (then :math:`\sigma^2 = 0` and
   :math:`y = \beta`); an unbiased running-variance update needs ``n >= 2``. An empty input
   returns an empty output of the same shape and dtype and leaves every statistic unchanged.
   A constant channel normalizes to β, up to the rounding of its mean in the compute dtype
   (:math:`\epsilon_c|\mu\gamma|/\sqrt{\epsilon}`; exactly β where the mean is exact, as with
   the NumPy backend's float64 accumulation). Conformance: ``bn-one-value-per-channel``,
   ``bn-empty-batch``, ``bn-constant-channel``.
9. **Variance algorithm.** Two-pass (centre, then sum squares) or Welford/Chan merges, in at
   least the compute dtype. :math:`E[x^2] - E[x]^2` is not allowed: it loses every digit when
   :math:`|\mu| \gg \sigma`, across parts too: partial statistics merge by Chan's formula
   (:func:`normkit.merge_moments`), never by summing :math:`\sum x` and :math:`\sum x^2`.
   Conformance: ``bn-offset-1e4``, ``moments-offset-1e4``, ``gn-offset-1e4-*``.
10. **Groups** (group norm). The ``C`` channels fall into ``G`` contiguous blocks of ``C/G``
    (channel ``c`` is in group ``c // (C/G)``; PyTorch, Keras, Flax, ONNX; MLX's default
    interleaves and is not this); each sample's block is one reduction set; the affine is per
    channel (ONNX opset 21; opset 18's per-group scale ``s`` is ``numpy.repeat(s, C // G)``).
    Conformance: ``gn-*``.
11. **RMS norm** normalizes by :math:`\sqrt{\overline{x^2} + \epsilon}` (no mean) and
    multiplies by :math:`w + o` (``weight_offset`` :math:`o`: 1 for Gemma's :math:`1 + w`). For a
    float16/bfloat16 input the normalized value is computed in float32 and rounded to the input
    dtype either after the weight (``"after_weight"``: torch, Keras, Flax, Gemma, Transformer
    Engine) or before it (``"before_weight"``: Llama, the ONNX spec's body; the product is then
    rounded again). Conformance: ``rms-*``.
12. **Masks** (:func:`normkit_moments`): a boolean ``mask`` (``True`` counts) selects the values
    that enter the statistics; a group with nothing selected has count 0, mean 0 and M2 0, the
    identity of the merge. Batch norm with a mask (a composition, :mod:`normkit.functional.masked`)
    moves each channel's running statistics with the channel's own count, and not at all for a
    channel with nothing selected; the layer's ``num_batches_tracked`` counts every non-empty
    masked batch (so the cumulative average of rule 1 weighs batches, not counts). Conformance:
    ``moments-mask-*``.

Purity
------
Kernels are pure functions: they never write to ``x``, ``weight``, ``bias``,
``running_mean`` or ``running_var``, and return new running statistics instead. When the
statistics are not updated the kernel returns the objects it was given.

Output buffer (optional)
------------------------
A kernel may declare one more parameter after the spec's, keyword-only: ``*, out=None``. normkit
passes ``out`` only when the caller gave one (``normkit.batch_norm(..., out=buf)``), after
checking that it is an array of ``x``'s type, dtype, shape and device. The kernel must then
write ``y`` into ``out`` and return ``out`` as ``y``, with exactly the values it returns without
``out``; ``out`` may be ``x`` itself (normalizing in place, the one write to ``x`` allowed). A
backend whose kernel has no ``out`` gets a ``TypeError`` naming it when a caller passes one.
Conformance: ``ConformanceTests.test_out_receives_exactly_y``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from normkit._registry import hookspec

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SPEC_VERSION",
    "BackendInfo",
    "normkit_backend_info",
    "normkit_batch_norm",
    "normkit_group_norm",
    "normkit_instance_norm",
    "normkit_layer_norm",
    "normkit_moments",
    "normkit_normalize",
    "normkit_rms_norm",
]

PRIMITIVES = ("moments", "normalize")
"""The version-2 primitives: a backend with both serves every composite it lacks."""
COMPOSITES = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm")
"""The composite operations (the fast paths)."""


SPEC_VERSION = 2
"""Version of this specification. It changes when a hook's signature or meaning changes."""

Array = Any
"""An array of the backend's own type (``numpy.ndarray``, ``torch.Tensor``, ...)."""


@dataclass(frozen=True)
class BackendInfo:
    """What a backend handles and the small array toolkit normkit needs from it.

    Building a ``BackendInfo`` must not import a framework: the array types are named by
    strings and matched only against modules already in :data:`sys.modules`.

    :param name: the backend's name; for an entry-point plugin, the entry-point name, which is
        also the framework's top-level module (``"torch"``).
    :param distribution: the distribution that provides the backend (``"normkit-torch"``),
        named in install hints.
    :param array_types: the array classes this backend handles, as ``"module:QualName"``
        strings (``"torch:Tensor"``); subclasses are included, except those whose meaning
        the kernels would silently drop: ``numpy.ma.MaskedArray`` is not claimed by
        ``"numpy:ndarray"`` (every op refuses it with a ``TypeError``) unless named itself.
    :param dtypes: supported dtypes by name, from ``float16``, ``bfloat16``, ``float32``,
        ``float64``.
    :param devices: devices the backend can put arrays on (``"cpu"``, ``"cuda"``); the first
        is the default.
    :param asarray: ``asarray(array, dtype, device)`` turns a NumPy array into a backend array
        of the named dtype on ``device`` (``None`` for the default device).
    :param to_numpy: returns a NumPy copy of a backend array (bfloat16 as ``ml_dtypes``
        bfloat16 or upcast to float32).
    :param dtype_name: the dtype of a backend array by name (``"float32"``, ``"int64"``).
    :param device: the device of a backend array by name.
    :param shape: the shape of a backend array as a tuple of ints; ``None`` for a dimension that
        is not known yet (a tensor being traced into a graph, as in ``tf.function``). normkit
        skips the checks that need such a dimension, and the kernel must handle it.
    :param full: ``full(shape, fill_value, dtype, like)`` creates an array filled with
        ``fill_value`` of the named dtype on the device of the backend array ``like``.
    :param astype: (version 2, optional) ``astype(array, dtype)``: the array converted to the
        named dtype (``"float64"``, ``"int64"``, ``"bool"``; a backend without ``"int64"`` or
        ``"float64"`` gives its widest integer or floating dtype), on its device, differentiable
        where the framework is. normkit uses it to compose operations from the primitives and to merge
        moments; without it, arrays make a round trip through NumPy.
    """

    name: str
    distribution: str
    array_types: tuple[str, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    asarray: Callable[[np.ndarray, str, str | None], Array]
    to_numpy: Callable[[Array], np.ndarray]
    dtype_name: Callable[[Array], str]
    device: Callable[[Array], str]
    shape: Callable[[Array], tuple[int, ...]]
    full: Callable[[tuple[int, ...], float, str, Array], Array]
    astype: Callable[[Array, str], Array] | None = None


@hookspec
def normkit_backend_info() -> BackendInfo:
    """Describe this backend.

    Called once per plugin when normkit resolves an array type; must be cheap and must not
    import a framework.

    :returns: a :class:`BackendInfo`.
    """


@hookspec(firstresult=True)
def normkit_batch_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Array, Array | None, Array | None]:
    r"""Batch normalization: one set of statistics per channel, pooled over every other axis.

    For channel ``c`` the reduction set is every element with index ``c`` on ``axis``, so
    ``n = x.size // C``.

    **Training** (``training=True``): normalize with the batch statistics,

    .. math::

       y = \gamma_c\,\frac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c ,

    then, if ``running_mean`` and ``running_var`` are given, return them updated from the same
    batch statistics:

    .. math::

       \hat\mu \leftarrow (1-m)\,\hat\mu + m\,\mu_c, \qquad
       \hat\sigma^2 \leftarrow (1-m)\,\hat\sigma^2 + m\,s\,\sigma_c^2,
       \qquad s = \tfrac{n}{n-1} \text{ if unbiased\_running\_var else } 1 .

    **Eval** (``training=False``): normalize with the running statistics,
    :math:`y = \gamma_c (x - \hat\mu_c)/\sqrt{\hat\sigma_c^2 + \epsilon} + \beta_c`, and return
    them unchanged.

    :param x: input of any rank >= 1 with at least one element; channel axis ``axis``.
    :param weight: γ, shape ``(C,)``, or ``None`` for 1.
    :param bias: β, shape ``(C,)``, or ``None`` for 0.
    :param running_mean: running mean :math:`\hat\mu`, shape ``(C,)``, or ``None``.
    :param running_var: running variance :math:`\hat\sigma^2`, shape ``(C,)``, or ``None``.
    :param training: normalize with batch statistics (and update the running statistics if
        given) when true; with the running statistics when false.
    :param momentum: weight ``m`` of the batch statistic in the update, in ``[0, 1]``.
    :param eps: ε > 0, added to the variance inside the square root.
    :param axis: the channel axis, ``0 <= axis < x.ndim``.
    :param unbiased_running_var: store the unbiased (``n/(n-1)``) batch variance in the running
        variance instead of the biased one.
    :returns: ``(y, running_mean, running_var)``: ``y`` with the shape and dtype of ``x``; the
        updated running statistics (training with running statistics), the ones passed in
        (eval), or ``None`` (training without running statistics).

    Preconditions: ``x`` is floating with at least one element; ``axis`` is non-negative;
    parameter shapes match; ``running_mean`` and ``running_var`` are both given or both
    ``None``, and given when ``training`` is false; ``n >= 2`` when an unbiased update is due.

    Stops at first non-None result; normkit resolves one implementation per array type and
    calls it directly, only with arrays of the types its plugin claims.

    Conformance: ``bn-*`` cases in :mod:`normkit.testing.cases`.
    """


@hookspec(firstresult=True)
def normkit_instance_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    axis: int,
    unbiased_running_var: bool,
) -> tuple[Array, Array | None, Array | None]:
    r"""Instance normalization: one set of statistics per instance and channel.

    ``x`` has the batch on axis 0 and the channel on ``axis``; every other axis is spatial.
    For instance ``i`` and channel ``c`` the reduction set is the spatial slice
    ``x[i, ..., c, ...]``, so ``n`` is the product of the spatial sizes.

    **Input statistics** (``use_input_stats=True``):
    :math:`y = \gamma_c (x - \mu_{ic})/\sqrt{\sigma_{ic}^2 + \epsilon} + \beta_c`. If running
    statistics are given they are returned updated with the mean over instances of the
    per-instance statistics (PyTorch's rule):

    .. math::

       \hat\mu \leftarrow (1-m)\,\hat\mu + m\,\overline{\mu_{i}}, \qquad
       \hat\sigma^2 \leftarrow (1-m)\,\hat\sigma^2 + m\,s\,\overline{\sigma_{i}^2}.

    **Running statistics** (``use_input_stats=False``): exactly batch norm in eval,
    :math:`y = \gamma_c (x - \hat\mu_c)/\sqrt{\hat\sigma_c^2 + \epsilon} + \beta_c`.

    :param x: input of rank >= 3, ``(N, C, *spatial)`` or ``(N, *spatial, C)``.
    :param weight: γ, shape ``(C,)``, or ``None``.
    :param bias: β, shape ``(C,)``, or ``None``.
    :param running_mean: shape ``(C,)`` or ``None``.
    :param running_var: shape ``(C,)`` or ``None``.
    :param use_input_stats: normalize each instance with its own statistics when true; with
        the running statistics when false.
    :param momentum: weight ``m`` of the batch statistic in the update, in ``[0, 1]``.
    :param eps: ε > 0.
    :param axis: the channel axis, ``1 <= axis < x.ndim``.
    :param unbiased_running_var: store the unbiased per-instance variance (``n/(n-1)``).
    :returns: ``(y, running_mean, running_var)`` as for :func:`normkit_batch_norm`.

    Preconditions: as for :func:`normkit_batch_norm`, with ``n`` the spatial size.

    Stops at first non-None result; normkit resolves one implementation per array type.

    Conformance: ``in-*`` cases in :mod:`normkit.testing.cases`.
    """


@hookspec(firstresult=True)
def normkit_layer_norm(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    axes: tuple[int, ...],
    eps: float,
) -> Array:
    r"""Layer normalization: statistics over a set of axes, for each index of the others.

    For each index of the axes not in ``axes``, the reduction set is the slice spanned by
    ``axes`` (``n`` is the product of their sizes):

    .. math::

       y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta ,

    with γ and β element-wise over the normalized axes. There is no running state; training
    and eval are the same computation.

    :param x: input of any rank >= 1 with at least one element.
    :param weight: γ with shape ``tuple(x.shape[a] for a in axes)``, or ``None``.
    :param bias: β with the same shape, or ``None``.
    :param axes: the normalized axes, non-negative, strictly increasing, not empty.
    :param eps: ε > 0.
    :returns: ``y`` with the shape and dtype of ``x``.

    Stops at first non-None result; normkit resolves one implementation per array type.

    Conformance: ``ln-*`` cases in :mod:`normkit.testing.cases`.
    """


@hookspec(firstresult=True)
def normkit_moments(
    x: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    group_axis: int | None,
    num_groups: int | None,
) -> tuple[Array, Array, Array]:
    r"""Partial statistics of ``x`` over the axes ``axes``, as values: ``(count, mean, m2)``.

    Each *group* is one index of the axes not in ``axes`` (kept, in order). For a group with
    values :math:`x_i` and mask :math:`m_i \in \{0, 1\}` (1 without a mask):

    .. math::

       n = \sum_i m_i, \qquad \mu = \frac1n \sum_i m_i x_i, \qquad
       M_2 = \sum_i m_i (x_i - \mu)^2 ,

    and a group with :math:`n = 0` is ``(0, 0, 0)``, the identity of the merge. ``M2`` is the sum
    of squared deviations, so the biased variance is :math:`M_2/n` and the unbiased one
    :math:`M_2/(n-1)`; two parts merge exactly by Chan's formula (:func:`normkit.merge_moments`).
    Computed two-pass (or by Welford/Chan merges) in at least the compute dtype (float32 for
    float16/bfloat16/float32 input, float64 for float64): never from :math:`\sum x^2`.

    **Groups of channels** (group norm): with ``num_groups = G``, axis ``group_axis`` (not in
    ``axes``) is split into ``G`` contiguous blocks of ``x.shape[group_axis] // G``, and each
    block is pooled; the result has size ``G`` on that axis.

    :param x: input of any rank >= 1 (it may be empty).
    :param axes: the reduced axes: non-negative, strictly increasing, not empty.
    :param mask: ``None``, or a boolean array of the backend's type with ``x``'s rank whose
        sizes equal ``x``'s or 1 (broadcast): ``True`` where a value counts.
    :param group_axis: the axis split into groups, or ``None``.
    :param num_groups: ``G``, a positive divisor of ``x.shape[group_axis]``, or ``None``.
    :returns: ``(count, mean, m2)``, each with the shape of the kept axes (``G`` on
        ``group_axis``): ``count`` in an integer dtype (int64 where the backend has it),
        ``mean`` and ``m2`` in the compute dtype.

    Preconditions: ``x`` is floating; ``mask`` is boolean and broadcasts as described;
    ``group_axis`` and ``num_groups`` are both given or both ``None``.

    Stops at first non-None result; normkit resolves one implementation per array type.

    Conformance: ``moments-*`` cases in :mod:`normkit.testing.cases`.
    """


@hookspec(firstresult=True)
def normkit_normalize(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...],
) -> Array:
    r"""Apply given statistics:

    .. math::

       y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta .

    The statistics are constant along ``axes`` (the reduced axes) and vary along the others:
    ``mean`` and ``var`` have the shape of the kept axes, in order, where one kept axis may
    have a size ``G`` below ``x``'s that divides it (groups of channels: block ``g`` of
    ``x.shape[a] // G`` consecutive indices takes statistic ``g``). ``weight`` (γ) and ``bias``
    (β) span ``param_axes``. Batch norm is ``axes`` = every axis but the channel axis and
    ``param_axes = (axis,)``; instance norm keeps ``(0, axis)``; group norm keeps ``(0, axis)``
    with ``G`` on ``axis``; layer norm's ``param_axes`` are its ``axes``.

    Computed in the compute dtype (float32 for float16/bfloat16 input), with the statistics in
    at least that precision and ε inside the square root; ``y`` has ``x``'s dtype. A value
    whose :math:`\sigma^2 + \epsilon` is 0 cannot occur (ε > 0).

    :param x: input of any rank >= 1.
    :param mean: μ with the kept axes' shape (see above), any floating dtype.
    :param var: σ² with the same shape.
    :param weight: γ with shape ``tuple(x.shape[a] for a in param_axes)``, or ``None`` for 1.
    :param bias: β with the same shape, or ``None`` for 0.
    :param eps: ε > 0.
    :param axes: the reduced axes: non-negative, strictly increasing.
    :param param_axes: the axes γ and β span: non-negative, strictly increasing.
    :returns: ``y`` with the shape and dtype of ``x``.

    Stops at first non-None result; normkit resolves one implementation per array type.

    Conformance: ``normalize-*`` cases in :mod:`normkit.testing.cases`, and every composite
    case when a backend's composites are composed from the primitives.
    """


@hookspec(firstresult=True)
def normkit_group_norm(
    x: Array,
    num_groups: int,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    axis: int,
) -> Array:
    r"""Group normalization: per sample, statistics over each block of ``C/G`` channels and
    every other non-batch axis (rule 10 above), then a per-channel affine:

    .. math::

       y = \gamma_c\,\frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} + \beta_c ,
       \qquad g = \lfloor c / (C/G) \rfloor .

    One group is layer norm over every axis but the batch axis (with per-channel affine);
    ``C`` groups are instance norm. No running state: training and eval are the same.

    :param x: input of rank >= 2 with the batch on axis 0, channels on ``axis``.
    :param num_groups: ``G``, a positive divisor of ``C``.
    :param weight: γ, shape ``(C,)``, or ``None``.
    :param bias: β, shape ``(C,)``, or ``None``.
    :param eps: ε > 0.
    :param axis: the channel axis, ``1 <= axis < x.ndim``.
    :returns: ``y`` with the shape and dtype of ``x``.

    Stops at first non-None result; normkit resolves one implementation per array type.

    Conformance: ``gn-*`` cases in :mod:`normkit.testing.cases`.
    """


@hookspec(firstresult=True)
def normkit_rms_norm(
    x: Array,
    weight: Array | None,
    axes: tuple[int, ...],
    eps: float,
    weight_offset: float,
    cast_before_weight: bool,
) -> Array:
    r"""RMS normalization over ``axes`` (rule 11 above): for each index of the other axes,

    .. math::

       \hat x = \frac{x}{\sqrt{\frac1n \sum x^2 + \epsilon}}, \qquad y = \hat x\,(w + o) ,

    with the mean square accumulated in the compute dtype and ``w`` element-wise over the
    normalized axes (``None``: no weight, and ``o`` is ignored). For float16/bfloat16 input,
    ``cast_before_weight=False`` rounds :math:`\hat x (w + o)` to the input dtype once;
    ``True`` rounds :math:`\hat x` to the input dtype, multiplies by :math:`w + o` in the compute
    dtype and rounds again (Llama, ONNX). For float32 and float64 input the two agree.

    :param x: input of any rank >= 1 with at least one element.
    :param weight: ``w`` with shape ``tuple(x.shape[a] for a in axes)``, or ``None``.
    :param axes: the normalized axes, non-negative, strictly increasing, not empty.
    :param eps: ε > 0 (normkit resolves PyTorch's ``eps=None`` to the compute dtype's machine
        epsilon before calling).
    :param weight_offset: ``o``, added to ``w`` (Gemma: 1).
    :param cast_before_weight: the cast order for half-precision input (see above).
    :returns: ``y`` with the shape and dtype of ``x``.

    Stops at first non-None result; normkit resolves one implementation per array type.

    Conformance: ``rms-*`` cases in :mod:`normkit.testing.cases`.
    """
