r"""The spec's version-2 primitives on ``torch.Tensor``: statistics as values, and applying them.

* :func:`moments` returns per-group ``(count, mean, m2)`` (:math:`M_2 = \sum_i (x_i - \mu)^2`),
  over the unmasked values when a mask is given, optionally pooling contiguous blocks of
  channels (group norm). It is the *corrected two-pass* algorithm (Chan, Golub and LeVeque,
  *Algorithms for computing the sample variance*, 1983) in the compute dtype (float32 for
  float16/bfloat16/float32 input, float64 for float64):

  .. math::

     s = \frac1n \sum_i m_i x_i, \qquad d_i = m_i (x_i - s), \qquad
     c = \frac1n \sum_i d_i, \qquad \mu = s + c, \qquad
     M_2 = \sum_i d_i^2 - c \sum_i d_i .

  The first pass gives a provisional mean :math:`s`; the deviations :math:`d_i` from it are
  exact where :math:`x_i` is near :math:`s` (Sterbenz), and :math:`c` (0 in exact arithmetic)
  removes the rounding of :math:`s`, so the mean is good to :math:`\epsilon\sigma`, not
  :math:`\epsilon|\mu|`, and :math:`M_2 = \sum_i (x_i - \mu)^2` exactly in exact arithmetic
  (:math:`\sum (d_i - c)^2 = \sum d_i^2 - c \sum d_i`). :math:`\sum x^2` is never formed. A group
  with :math:`n = 0` is ``(0, 0, 0)``.
* :func:`normalize` applies given statistics,
  :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}\,\gamma + \beta`, with one statistic per index
  of the kept axes (or per block of channels on one of them).

Both are plain torch operations: differentiable with respect to ``x``, the statistics and the
affine parameters, on any device, and traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch

from normkit_torch.kernels import compute_dtype

__all__ = ["centered", "moments", "normalize", "split_groups"]

Tensor = torch.Tensor


def split_groups(t: Tensor, axis: int, num_groups: int) -> Tensor:
    """A view of ``t`` with axis ``axis`` split into ``(G, size // G)`` contiguous blocks; an axis
    of size 1 (a broadcast mask) becomes ``(1, 1)``."""
    size = t.shape[axis]
    if size == 1:
        return t.unsqueeze(axis + 1)
    return t.unflatten(axis, (num_groups, size // num_groups))


def grouped_axes(axes: tuple[int, ...], group_axis: int) -> tuple[int, ...]:
    """The reduced axes of the view :func:`split_groups` makes: ``axes`` shifted past the split
    axis, and the axis of the channels within a block."""
    shifted = [a + 1 if a > group_axis else a for a in axes]
    return tuple(sorted([*shifted, group_axis + 1]))


def centered(
    xc: Tensor, reduced: tuple[int, ...], mask: Tensor | None
) -> tuple[Tensor | int, Tensor, Tensor, Tensor, Tensor]:
    r"""The corrected two-pass statistics of ``xc`` (already in the compute dtype) over
    ``reduced``, kept dimensions kept (size 1), and what normalizing needs to reuse.

    :returns: ``(count, s, c, m2, d)``: the count per group (int64, ``mask``'s values counted;
        without a mask the one count of every group, a Python int),
        the provisional mean :math:`s`, its correction :math:`c` (the mean is :math:`s + c`),
        :math:`M_2`, and the deviations :math:`d = m\,(x - s)` (0 where masked out).
    """
    if mask is None:
        n = 1
        for a in reduced:  # not math.prod(generator): Dynamo cannot trace that
            n *= xc.shape[a]
        count: Tensor | int = n
        divisor: Tensor | int = max(n, 1)  # an empty group has sums 0: mean 0, M2 0
        s = xc.sum(reduced, keepdim=True) / divisor
        d = xc - s
    else:
        counted = mask.expand(xc.shape)
        count = counted.sum(reduced, keepdim=True, dtype=torch.int64)
        divisor = count.clamp_min(1).to(xc.dtype)
        s = torch.where(counted, xc, 0).sum(reduced, keepdim=True) / divisor
        d = torch.where(counted, xc - s, 0)  # where, not a product: masked values may be inf or NaN
    total = d.sum(reduced, keepdim=True)
    c = total / divisor
    # >= 0 in exact arithmetic (Cauchy-Schwarz); a constant group whose s rounded has every
    # d equal, and the difference may round to a hair below 0
    m2 = ((d * d).sum(reduced, keepdim=True) - c * total).clamp_min(0)
    return count, s, c, m2, d


def moments(
    x: Tensor,
    axes: tuple[int, ...],
    mask: Tensor | None,
    group_axis: int | None,
    num_groups: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The spec's moments (:func:`normkit.hookspecs.normkit_moments`): ``(count, mean, m2)``
    with the shape of the kept axes (``G`` on ``group_axis``), ``count`` int64, ``mean`` and
    ``m2`` in the compute dtype; corrected two-pass (see the module docstring)."""
    xc = x.to(compute_dtype(x))
    reduced = tuple(axes)
    if group_axis is not None and num_groups is not None:
        xc = split_groups(xc, group_axis, num_groups)
        if mask is not None:
            mask = split_groups(mask, group_axis, num_groups)
        reduced = grouped_axes(reduced, group_axis)
    count, s, c, m2, _ = centered(xc, reduced, mask)
    kept_shape = [size for a, size in enumerate(s.shape) if a not in reduced]
    if not isinstance(count, Tensor):  # no mask: every group counts the same
        count = torch.full(kept_shape, count, dtype=torch.int64, device=x.device)
    return count.reshape(kept_shape), (s + c).reshape(kept_shape), m2.reshape(kept_shape)


def _group_of(x: Tensor, mean: Tensor, axes: tuple[int, ...]) -> tuple[int | None, int]:
    """The kept axis on which ``mean`` has fewer entries than ``x`` (groups of channels), and
    the number of groups there; ``(None, 0)`` when the statistics are per index."""
    kept = [a for a in range(x.dim()) if a not in axes]
    for size, a in zip(mean.shape, kept, strict=True):
        if size != x.shape[a]:
            return a, size
    return None, 0


def _broadcast(param: Tensor, dims: tuple[int, ...], ndim: int, dtype: torch.dtype) -> Tensor:
    """``param`` (whose axes are ``dims`` of an ``ndim``-dimensional tensor, in order) shaped to
    broadcast against that tensor, in ``dtype``."""
    shape = [1] * ndim
    for a, size in zip(dims, param.shape, strict=True):
        shape[a] = size
    return param.to(dtype).reshape(shape)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    axes: tuple[int, ...],
    param_axes: tuple[int, ...],
) -> Tensor:
    r"""The spec's normalize (:func:`normkit.hookspecs.normkit_normalize`):
    :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}\,\gamma + \beta`, with ``mean`` and ``var``
    over the kept axes (one of them possibly ``G`` groups of channels).

    Computed in the compute dtype, or the statistics' dtype where that is wider (float64
    statistics beside float32 input, as a float64 merge gives them), and rounded once to ``x``'s
    dtype. The difference :math:`x - \mu` is formed before scaling, so no rounding of
    :math:`\mu\gamma/\sigma` enters the output.
    """
    wide = torch.promote_types(torch.promote_types(compute_dtype(x), mean.dtype), var.dtype)
    group_axis, num_groups = _group_of(x, mean, axes)
    xw = x.to(wide)
    if group_axis is not None:
        xw = split_groups(xw, group_axis, num_groups)
        reduced = grouped_axes(axes, group_axis)
    else:
        reduced = tuple(axes)
    kept = tuple(a for a in range(xw.dim()) if a not in reduced)
    mu = _broadcast(mean, kept, xw.dim(), wide)
    scale = torch.rsqrt(_broadcast(var, kept, xw.dim(), wide) + eps)
    z = (xw - mu) * scale
    if group_axis is not None:
        z = z.flatten(group_axis, group_axis + 1)
    if weight is not None:
        z = z * _broadcast(weight, param_axes, z.dim(), wide)
    if bias is not None:
        z = z + _broadcast(bias, param_axes, z.dim(), wide)
    return z.to(x.dtype)
