r"""Exact statistics across devices under a named axis (``jax.shard_map``, ``jax.pmap``,
``jax.vmap(axis_name=...)``): the moments of the global batch from each device's own.

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

The counts are summed as integers (exact); the means and :math:`M_2` in float64 when
``jax_enable_x64`` is on, else float32 (:math:`\mu` is then known to about
:math:`\epsilon_{32}|\mu|`, as a single device's float32 mean is).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import normkit

__all__ = ["moments_across", "wide_dtype"]

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
