"""Exceptions raised by normkit.

Every error message names the parameter at fault, what it got and what it expected. Bad
arguments raise the built-in types users already catch (``ValueError`` for bad values,
``TypeError`` for bad types); the classes below add the cases that need their own name.
"""

from __future__ import annotations

__all__ = ["NoBackendError", "StateDictError"]


class NoBackendError(TypeError):
    """No installed backend handles this array type.

    The message names the distribution to install (``pip install normkit-torch``), or says why
    an installed backend was not used (blocked by ``NORMKIT_BLOCK_BACKENDS``, autoloading
    disabled by ``NORMKIT_DISABLE_PLUGIN_AUTOLOAD``, failed to load). Asking for a backend by a
    name that is not registered (``backend="jax"``) is a ``ValueError`` naming ``backend``.
    """


class StateDictError(ValueError):
    """A state dict does not fit the layer: missing, unexpected, mis-shaped or mis-typed keys,
    an unknown format version, or a configuration the layer does not have.

    Raised before anything is copied, so the layer's state is unchanged.
    """
