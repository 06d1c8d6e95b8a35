"""Shared setup of the JAX backend's tests.

* Four CPU devices for the ``shard_map`` and SPMD tests: ``XLA_FLAGS`` must be set before JAX
  initializes its CPU backend, so ``--xla_force_host_platform_device_count=4`` is added here,
  before anything imports ``jax``, to any ``XLA_FLAGS`` already in the environment (such as
  ``--xla_cpu_max_isa=AVX2``) that does not set a device count itself.
* The backend is registered through its entry point when ``normkit-jax`` is installed; when only
  its ``src`` is on the path (a development checkout), it is registered here by hand, as a
  third party would (:func:`normkit.register_backend`).
"""

from __future__ import annotations

import importlib.metadata
import os

import normkit

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}=4".strip()

import jax  # noqa: E402, F401  (imported after XLA_FLAGS is set, before any test imports it)

pytest_plugins = ["normkit.testing.plugin"]

if not any(ep.name == "jax" for ep in importlib.metadata.entry_points(group="normkit.backends")):
    from normkit_jax import plugin

    normkit.register_backend(plugin, "jax")
