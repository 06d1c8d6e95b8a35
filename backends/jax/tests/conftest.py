"""Shared setup of the JAX backend's tests.

* Four CPU devices for the ``shard_map`` and SPMD tests: ``XLA_FLAGS`` must be set before JAX
  initializes its CPU backend, so it is set here, before anything imports ``jax`` (an
  ``XLA_FLAGS`` already in the environment is kept).
* The backend is registered through its entry point when ``normkit-jax`` is installed; when only
  its ``src`` is on the path (a development checkout), it is registered here by hand, as a
  third party would (:func:`normkit.register_backend`).
"""

from __future__ import annotations

import importlib.metadata
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: F401  (imported after XLA_FLAGS is set, before any test imports it)

import normkit

pytest_plugins = ["normkit.testing.plugin"]

if not any(ep.name == "jax" for ep in importlib.metadata.entry_points(group="normkit.backends")):
    from normkit_jax import plugin

    normkit.register_backend(plugin, "jax")
