"""normkit's JAX backend: every op of the spec on ``jax.Array``, eagerly and under ``jit``,
``grad``, ``jvp``, ``vmap`` and ``shard_map``.

Installing ``normkit-jax`` is enough for ``normkit.batch_norm(jax_array, ...)`` (and every other
op) to accept JAX arrays and tracers: normkit finds this backend through the ``normkit.backends``
entry point once ``jax`` is imported. The Flax layers live in :mod:`normkit_jax.nnx` and
:mod:`normkit_jax.linen` (install the ``flax`` extra), the exact cross-device merge of moments in
:mod:`normkit_jax.collectives`, and the conversion of PyTorch layers in :mod:`normkit_jax.convert`;
they are imported on first use, so
``import normkit_jax`` imports neither Flax nor, by itself, JAX.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

__all__ = ["__version__", "collectives", "convert", "linen", "nnx"]

_LAZY_SUBMODULES = ("nnx", "linen", "collectives", "convert")


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:  # imported (the layers with Flax) on first access
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
