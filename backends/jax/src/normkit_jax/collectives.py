r"""Exact statistics across devices under a named axis (``jax.shard_map``, ``jax.pmap``,
``jax.vmap(axis_name=...)``): the moments of the global batch, from each device's data
(:func:`global_moments`, what normkit's Flax layers use) or from each device's moments alone
(:func:`moments_across`).

**From the data** (:func:`global_moments`), the two-pass algorithm across devices: each device
computes its moments :math:`(n_i, \mu_i, M_{2,i})` (:func:`normkit.moments`, masked); one sum
over the named axis gives :math:`N = \sum_i n_i` and :math:`\mu = \frac1N \sum_i n_i\,\mu_i`,
and a second gives :math:`M_2 = \sum_i \sum_{j \in i} m_j (x_j - \mu)^2` from each device's own
values. An error :math:`\delta` in :math:`\mu` (the devices' means are rounded, to
:math:`\epsilon|\mu_i|`) enters :math:`M_2` only as :math:`N\delta^2`, as in a two-pass on one
device. Two collectives, as Flax's ``use_fast_variance=False`` takes, but count-weighted.

**From the moments** (:func:`moments_across`), when only the moments travel:

Each device :math:`i` holds the moments :math:`(n_i, \mu_i, M_{2,i})` of its part
(:func:`normkit.moments`, masks included, so the :math:`n_i` may differ and be 0). Three sums
over the named axis give the moments of the whole, exactly as if the parts were concatenated:

.. math::

   N = \sum_i n_i, \qquad
   \mu = \frac{1}{N}\sum_i n_i\,\mu_i, \qquad
   M_2 = \sum_i \bigl(M_{2,i} + n_i\,(\mu_i - \mu)^2\bigr),

the parallel-axis theorem: :math:`\sum_{j \in i}(x_j - \mu)^2 = M_{2,i} + n_i(\mu_i - \mu)^2`.
Every term of :math:`M_2` is non-negative, so nothing cancels at a large offset (unlike
:math:`\sum x^2 - N\mu^2`), and an error :math:`\delta` in :math:`\mu` enters only at second
order (:math:`\sum_i n_i(\mu_i - \mu) = 0`, so the first-order term
:math:`-2\delta\sum_i n_i(\mu_i - \mu)` vanishes). A device with nothing counted contributes
:math:`(0, 0, 0)`; :math:`N = 0` gives mean 0 and :math:`M_2 = 0`.

This is what Flax's ``axis_name`` gets wrong with masks: it takes ``pmean`` of each device's
masked mean, a mean of means that weighs a device with 2 values like one with 200
(google/flax#2417).

In both, the counts are summed as integers (exact); the means and :math:`M_2` in float64 when
``jax_enable_x64`` is on, else float32 (:math:`\mu` is then known to about
:math:`\epsilon_{32}|\mu|`, as a single device's float32 mean is). The devices' own means
carry their rounding, :math:`e_i \approx \epsilon|\mu_i|` for a float32 mean, and in
:func:`moments_across` that error does enter :math:`M_2` at first order through the spread of
the means, :math:`\sum_i 2 n_i |\mu_i - \mu|\, e_i`: at :math:`|\mu|/\sigma = 10^4` in float32, with the
devices' means 3 to 9 σ apart, ``tests/test_collectives.py`` checks the merged variance against
the bound this gives and within :math:`10^{-3}` relative (:math:`E[x^2] - E[x]^2` loses every
digit there); :func:`global_moments` never uses :math:`\mu_i - \mu`, so it keeps the accuracy of
a single device's two-pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import normkit

__all__ = ["global_moments", "moments_across", "wide_dtype"]

AxisName = Hashable | tuple[Hashable, ...]


def wide_dtype() -> Any:
    """float64 when ``jax_enable_x64`` is on, else float32: the dtype the merge sums in."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _psum(value: Any, axis_name: AxisName, axis_index_groups: Sequence[Sequence[int]] | None) -> Any:
    """``lax.psum`` that names the layer's argument when the axis is not bound."""
    try:
        return lax.psum(value, axis_name, axis_index_groups=axis_index_groups)
    except NameError as error:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here ({error}); statistics across devices need a "
            f"function mapped over that axis name: jax.shard_map (with a mesh axis of that name), "
            f"jax.pmap(axis_name=...) or jax.vmap(axis_name=...)"
        ) from None
    except NotImplementedError as error:
        if axis_index_groups is None:
            raise
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r}: this JAX transformation does not support "
            f"axis_index_groups (jax.shard_map and jax.vmap do not; jax.pmap does): {error}"
        ) from None


def moments_across(
    moments: normkit.Moments | tuple[Any, Any, Any],
    axis_name: AxisName,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> normkit.Moments:
    r"""The moments of the data of every device on the named axis, from this device's
    ``moments`` (see the module docstring for the formula).

    Call it inside a function mapped over ``axis_name``; every device gets the same result.

    :param moments: this device's :class:`normkit.Moments` ``(count, mean, m2)`` (from
        :func:`normkit.moments`, with or without a mask), any shape.
    :param axis_name: the named axis (or a tuple of names) to merge over.
    :param axis_index_groups: merge within each group of device indices separately, as
        ``jax.lax.psum``'s argument (``[[0, 1], [2, 3]]``); supported under ``jax.pmap``, not
        under ``jax.shard_map`` or ``jax.vmap``.
    :returns: :class:`normkit.Moments` of the union: ``count`` in ``moments.count``'s integer
        dtype, ``mean`` and ``m2`` in :func:`wide_dtype` (float64 with x64, else float32).
    :raises ValueError: when ``axis_name`` is not bound, or ``axis_index_groups`` is not
        supported by the enclosing transformation.
    """
    if len(moments) != 3:
        raise ValueError(f"moments has {len(moments)} fields; expected (count, mean, m2)")
    count, mean, m2 = (jnp.asarray(v) for v in moments)
    if not jnp.issubdtype(count.dtype, jnp.integer):
        raise TypeError(f"moments.count has dtype {count.dtype}; expected an integer dtype")
    for name, value in (("mean", mean), ("m2", m2)):
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(f"moments.{name} has dtype {value.dtype}; expected a floating dtype")
        if value.shape != count.shape:
            raise ValueError(f"moments.{name} has shape {value.shape}; expected count's shape {count.shape}")
    wide = wide_dtype()
    n = count.astype(wide)
    mean, m2 = mean.astype(wide), m2.astype(wide)
    total, weighted_sum = _psum((count, n * mean), axis_name, axis_index_groups)
    total_n = total.astype(wide)
    global_mean = weighted_sum / jnp.where(total > 0, total_n, 1.0)  # 0 / 1 when nothing counted
    deviation = mean - global_mean
    global_m2 = _psum(m2 + n * deviation * deviation, axis_name, axis_index_groups)
    return normkit.Moments(total, global_mean, global_m2)


def global_moments(
    x: Any,
    axes: int | Sequence[int],
    axis_name: AxisName,
    *,
    mask: Any = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> normkit.Moments:
    r"""The moments over ``axes`` of the unmasked values of ``x`` on every device of the named
    axis, by the two-pass algorithm across devices (see the module docstring):
    :math:`N = \sum_i n_i`, :math:`\mu = \frac1N\sum_i n_i\mu_i`,
    :math:`M_2 = \sum_i \sum_{j \in i} m_j (x_j - \mu)^2`.

    Call it inside a function mapped over ``axis_name``; every device gets the same result.
    Masked values are selected away before any arithmetic (NaN there reaches neither the
    statistics nor their gradient).

    :param x: this device's values (the same shape on every device, as JAX requires).
    :param axes: the axes to reduce (those not named are kept: one set of moments per index).
    :param axis_name: the named axis (or a tuple of names) to merge over.
    :param mask: boolean, broadcastable to ``x`` (``x``'s rank): ``True`` where a value counts.
    :param axis_index_groups: as for :func:`moments_across`.
    :returns: :class:`normkit.Moments` with the kept axes' shape: ``count`` in
        :func:`normkit.moments`'s integer dtype, ``mean`` and ``m2`` in :func:`wide_dtype`.
    :raises ValueError: as :func:`moments_across`.
    """
    x = jnp.asarray(x)
    raw = (axes,) if isinstance(axes, int) else tuple(axes)
    reduced = tuple(sorted({a % x.ndim for a in raw}))
    local = normkit.moments(x, axes=reduced, mask=mask)
    wide = wide_dtype()
    n = local.count.astype(wide)
    total, weighted_sum = _psum((local.count, n * local.mean.astype(wide)), axis_name, axis_index_groups)
    mean = weighted_sum / jnp.where(total > 0, total.astype(wide), 1.0)  # 0 / 1 when nothing counted
    cdt = jnp.promote_types(x.dtype, wide)
    centre = jnp.expand_dims(mean, reduced).astype(cdt)
    xc = x.astype(cdt)
    if mask is not None:  # a masked value becomes the mean: a deviation of exactly 0
        xc = jnp.where(jnp.broadcast_to(mask, x.shape), xc, centre)
    deviation = xc - centre
    m2 = _psum(jnp.sum(deviation * deviation, axis=reduced), axis_name, axis_index_groups)
    return normkit.Moments(total, mean, m2.astype(wide))
