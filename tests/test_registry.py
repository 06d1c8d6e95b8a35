"""The registry in one process: per-type dispatch, overrides, explicit backends, validation."""

from __future__ import annotations

import types
from collections.abc import Iterator

import numpy as np
import pytest

import normkit
from normkit import _registry, numpy_backend


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    _registry.reset()
    yield
    _registry.reset()


def plugin(name: str, **hooks: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, normkit.hookimpl(**getattr(function, "marker", {}))(function))
    return module


def claiming_numpy(name: str) -> object:
    def normkit_backend_info() -> normkit.BackendInfo:
        info = numpy_backend.normkit_backend_info()
        return normkit.BackendInfo(**{**info.__dict__, "name": name, "distribution": name})

    return normkit_backend_info


def test_dispatch_is_resolved_once_per_array_type() -> None:
    x = np.ones((4, 3))
    normkit.batch_norm(x, training=True)
    table = _registry.registry()._by_type
    assert set(table) == {np.ndarray}
    backend = table[np.ndarray]
    normkit.batch_norm(x, training=True)
    assert _registry.registry()._by_type[np.ndarray] is backend
    assert backend.batch_norm is numpy_backend.normkit_batch_norm


def test_a_tryfirst_plugin_overrides_one_op_and_inherits_the_rest() -> None:
    calls = []

    def normkit_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    ):
        calls.append(x.shape)
        return numpy_backend.normkit_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
        )

    normkit_batch_norm.marker = {"tryfirst": True}
    normkit.register_backend(
        plugin("fast", normkit_backend_info=claiming_numpy("fast"), normkit_batch_norm=normkit_batch_norm),
        "fast",
    )
    x = np.ones((4, 3))
    normkit.batch_norm(x, training=True)
    normkit.layer_norm(x)
    assert calls == [(4, 3)]
    backend = _registry.backend_for(x)
    assert backend.name == "fast" and backend.layer_norm is numpy_backend.normkit_layer_norm
    # the built-in backend is still reachable by name
    normkit.batch_norm(x, training=True, backend="numpy")
    assert calls == [(4, 3)]


def test_without_tryfirst_the_last_registered_plugin_wins_like_pluggy() -> None:
    seen = []

    def normkit_layer_norm(x, weight, bias, axes, eps):
        seen.append(axes)
        return numpy_backend.normkit_layer_norm(x, weight, bias, axes, eps)

    normkit.register_backend(
        plugin("late", normkit_backend_info=claiming_numpy("late"), normkit_layer_norm=normkit_layer_norm)
    )
    normkit.layer_norm(np.ones((2, 5)))
    assert seen == [(1,)]


def test_explicit_backend_must_exist_and_handle_the_array() -> None:
    with pytest.raises(
        ValueError, match=r"backend='nope' is not a loaded normkit backend; loaded: \[.*'numpy'"
    ):
        normkit.batch_norm(np.ones((4, 3)), training=True, backend="nope")


def test_unknown_array_types_name_the_type_and_the_install_hint() -> None:
    with pytest.raises(normkit.NoBackendError, match=r"no normkit backend handles arrays of type list"):
        normkit.layer_norm([[1.0, 2.0]])
    with pytest.raises(normkit.NoBackendError, match=r"x is a numpy.float64 scalar, not an array"):
        normkit.layer_norm(np.float64(1.0))  # a scalar of a handled framework: told to pass an array


def test_known_frameworks_get_an_install_hint() -> None:
    message = _registry.registry()._no_backend_message(type("Tensor", (), {"__module__": "torch"}))
    assert "pip install normkit-torch" in message and "normkit[torch]" in message


def test_implementations_must_take_the_spec_parameters_in_order() -> None:
    def normkit_layer_norm(x, weight, bias, eps, axes):  # swapped: pluggy accepts it, normkit must not
        raise AssertionError("never called")

    normkit.register_backend(
        plugin("sloppy", normkit_backend_info=claiming_numpy("sloppy"), normkit_layer_norm=normkit_layer_norm)
    )
    with pytest.raises(TypeError, match=r"plugin 'sloppy'.*must take exactly the spec's parameters"):
        normkit.layer_norm(np.ones((2, 3)))


def test_a_backend_without_an_op_raises_not_implemented_when_it_is_used() -> None:
    class Box:
        pass

    def info() -> normkit.BackendInfo:
        base = numpy_backend.normkit_backend_info()
        return normkit.BackendInfo(**{**base.__dict__, "name": "boxes", "array_types": (f"{__name__}:Box",)})

    Box.__module__ = __name__
    globals()["Box"] = Box
    normkit.register_backend(plugin("boxes", normkit_backend_info=info))
    backend = _registry.backend_for(Box())
    with pytest.raises(NotImplementedError, match="backend 'boxes' does not implement batch_norm"):
        backend.batch_norm()


def test_load_backend_names_known_backends() -> None:
    assert normkit.BackendInfo is type(_registry.load_backend("numpy"))
    with pytest.raises(ValueError, match="neither registered nor installed"):
        _registry.load_backend("caffe")


def test_a_plugin_that_fails_validation_is_not_left_registered() -> None:
    def normkit_batch_nrom(x):  # a misspelled hook
        return x

    with pytest.raises(Exception, match="normkit_batch_nrom"):
        normkit.register_backend(plugin("typo", normkit_batch_nrom=normkit_batch_nrom), "typo")
    assert "typo" not in _registry.registry().loaded()
    normkit.register_backend(
        plugin("fine", normkit_backend_info=claiming_numpy("fine")), "fine"
    )  # still usable


def test_hook_wrappers_are_never_used_as_kernels() -> None:
    def normkit_layer_norm(x, weight, bias, axes, eps):
        result = yield
        return result

    normkit_layer_norm.marker = {"wrapper": True}
    normkit.register_backend(
        plugin(
            "wrapping", normkit_backend_info=claiming_numpy("wrapping"), normkit_layer_norm=normkit_layer_norm
        )
    )
    assert _registry.backend_for(np.ones(2)).layer_norm is numpy_backend.normkit_layer_norm
