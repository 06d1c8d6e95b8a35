r"""``jax.nn.standardize``, and what the JAX-based adapters share (:mod:`.flax`, :mod:`.equinox`).

``jax.nn.standardize(x, axis, epsilon=1e-5, *, algorithm="fast")`` computes
:math:`(x - \mu)/\sqrt{\sigma^2 + \epsilon}` over ``axis`` (any set of axes) with
``jnp.mean`` and, by default (``"fast"``), :math:`\sigma^2 = \max(E[x^2] - \mu^2, 0)`, the
one-pass formula normkit's spec forbids; ``algorithm="stable"`` is the two-pass
:math:`E[(x-\mu)^2]`. Everything is computed in ``x``'s dtype: the squares too (float16 overflows
beyond 256), only ``jnp.mean``'s sums of float16 and bfloat16 accumulate in float32. The adapter audits it as ``layer_norm``
over ``config.axes`` with ``epsilon=config.eps`` (native defaults: ``axis=-1``, ``1e-5``); it
has no affine, so the case's weight and bias are applied *outside*, in float64 NumPy on the
returned values, and the result rounded to the dtype ``standardize`` returned: that adds one
rounding, which the suite's tolerance already allows, and nothing of JAX's.

Precision: float64 cases run under ``jax.enable_x64(True)`` (a context, not the process-wide
flag, so no subprocess is needed and other cases keep JAX's defaults); every other dtype runs
as JAX's default 32-bit mode leaves it. Half-precision input is passed as is (bfloat16 as an
``ml_dtypes`` array).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from normkit.audit.adapter import Adapter, Config, Unsupported

__all__ = ["JaxStandardize", "adapters", "axes_last", "axes_restored", "precision"]


@contextlib.contextmanager
def precision(dtype: str) -> Iterator[None]:
    """JAX's 64-bit mode for a float64 case (JAX truncates float64 to float32 without it)."""
    if dtype != "float64":
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield


def axes_last(x: np.ndarray, axes: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` with ``axes`` moved to the end (in their order) and the permutation used: a pure
    data movement, undone by :func:`axes_restored`."""
    order = tuple(a for a in range(x.ndim) if a not in axes) + tuple(axes)
    return np.transpose(x, order), order


def axes_restored(y: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`axes_last`."""
    return np.transpose(y, np.argsort(order))


class JaxStandardize(Adapter):
    """``jax.nn.standardize`` as a layer norm (the affine applied outside, in float64)."""

    ops: ClassVar[tuple[str, ...]] = ("layer_norm",)
    requires: ClassVar[tuple[str, ...]] = ("jax",)

    def __init__(self, algorithm: str | None = None) -> None:
        self.algorithm = algorithm
        suffix = "" if algorithm is None else f" (algorithm={algorithm!r})"
        self.name = f"jax.nn.standardize{suffix}"
        self.description = f"jax.nn.standardize with algorithm={algorithm or 'fast (default)'}; the affine in float64 outside"

    def build(self, config: Config, state: Mapping[str, np.ndarray]) -> Callable[[np.ndarray, bool], Any]:
        if config.op != "layer_norm":
            raise Unsupported(f"jax.nn.standardize is a layer norm, not {config.op}")
        import jax

        axes = (-1,) if config.native_defaults else config.axes
        options: dict[str, Any] = {} if config.native_defaults else {"epsilon": config.eps}
        if self.algorithm is not None:
            options["algorithm"] = self.algorithm
        weight, bias = state.get("weight"), state.get("bias")

        def call(x: np.ndarray, training: bool) -> np.ndarray:
            with precision(config.dtype):
                y = np.asarray(jax.nn.standardize(x, axis=axes, **options))
            if weight is None and bias is None:
                return y
            shape = [x.shape[a] if a in axes or a - x.ndim in axes else 1 for a in range(x.ndim)]
            z = y.astype(np.float64)
            if weight is not None:
                z = z * np.asarray(weight, np.float64).reshape(shape)
            if bias is not None:
                z = z + np.asarray(bias, np.float64).reshape(shape)
            return z.astype(y.dtype)

        return call


def adapters() -> list[Adapter]:
    """``jax.nn.standardize`` with its default algorithm and with ``algorithm="stable"``."""
    return [JaxStandardize(), JaxStandardize("stable")]
