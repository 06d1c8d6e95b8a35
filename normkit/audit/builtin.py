"""The implementations ``normkit audit`` knows: one module per framework under
:mod:`normkit.audit.adapters`, each with an ``adapters()`` function. Listing them imports no
framework."""

from __future__ import annotations

import importlib

from normkit.audit.adapter import Adapter

__all__ = ["ADAPTER_MODULES", "builtin_adapters"]

ADAPTER_MODULES = (
    "normkit.audit.adapters.torch_nn",
    "normkit.audit.adapters.keras",
    "normkit.audit.adapters.flax",
    "normkit.audit.adapters.jax_nn",
    "normkit.audit.adapters.equinox",
    "normkit.audit.adapters.mlx",
    "normkit.audit.adapters.onnx_models",
    "normkit.audit.adapters.exporters",
)


def builtin_adapters() -> list[Adapter]:
    """Every built-in adapter, installed or not (:meth:`Adapter.missing` says which)."""
    return [adapter for name in ADAPTER_MODULES for adapter in importlib.import_module(name).adapters()]
