"""Masked arrays are refused up front, and plain ndarray subclasses keep working.

A ``numpy.ma.MaskedArray`` is an ``ndarray``, so a backend claiming ``numpy:ndarray`` used to
take it and then ignore the mask (or fail inside a kernel, differently per kernel path). The
registry does not let a backend claim it through its base class (see
:data:`normkit._registry.UNCLAIMED_SUBCLASSES`), so every op and layer raises a ``TypeError``
naming ``numpy.ma.MaskedArray`` and the parameter, before anything runs or changes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import normkit
from normkit import _registry, numpy_backend
from normkit.testing.tolerances import output_tolerance

REPO = Path(__file__).parent.parent
MASKED = "numpy.ma.MaskedArray"
C = 3
rng = np.random.default_rng(7)
X = rng.normal(1.0, 2.0, size=(4, C, 5, 5)).astype(np.float32)

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")
KERNELS = [pytest.param("compiled", marks=needs_numba), "pure"]


@pytest.fixture(params=KERNELS)
def kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the NumPy backend's compiled kernels, then with the pure ones."""
    previous = numpy_backend.kernels_in_use()
    numpy_backend.use_kernels(request.param)
    yield request.param
    numpy_backend.use_kernels(previous)


def masked(data: np.ndarray) -> np.ma.MaskedArray:
    """``data`` as a masked array with its first element masked."""
    result = np.ma.masked_array(data.copy(), mask=np.zeros(data.shape, dtype=bool))
    result.mask.flat[0] = True
    return result


def stats() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(running_mean, running_var, weight, bias)`` for ``C`` channels, not all trivial."""
    return (
        np.full(C, 0.5, np.float32),
        np.full(C, 2.0, np.float32),
        np.linspace(0.5, 1.5, C, dtype=np.float32),
        np.linspace(-1.0, 1.0, C, dtype=np.float32),
    )


# -- every public op, train and eval ---------------------------------------------------------
# (id, op called on x, its running statistics, weight and bias)
Op = Callable[[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray], Any]
OPS: list[tuple[str, Op]] = [
    ("batch_norm-train", lambda x, m, v, w, b: normkit.batch_norm(x, m, v, w, b, training=True)),
    ("batch_norm-eval", lambda x, m, v, w, b: normkit.batch_norm(x, m, v, w, b, training=False)),
    (
        "batch_norm-train-backend-named",
        lambda x, m, v, w, b: normkit.batch_norm(x, m, v, w, b, training=True, backend="numpy"),
    ),
    ("instance_norm-train", lambda x, m, v, w, b: normkit.instance_norm(x, m, v, w, b, use_input_stats=True)),
    ("instance_norm-eval", lambda x, m, v, w, b: normkit.instance_norm(x, m, v, w, b, use_input_stats=False)),
    ("layer_norm", lambda x, m, v, w, b: normkit.layer_norm(x, axis=1, weight=w, bias=b)),
    ("layer_norm-backend-named", lambda x, m, v, w, b: normkit.layer_norm(x, backend="numpy")),
]


@pytest.mark.parametrize("op", [op for _, op in OPS], ids=[name for name, _ in OPS])
def test_every_op_refuses_a_masked_input(kernels: str, op: Op) -> None:
    arrays = stats()
    before = [a.copy() for a in arrays]
    x = masked(X)
    data_before = x.data.copy()
    with pytest.raises(TypeError) as raised:
        op(x, *arrays)
    message = str(raised.value)
    assert message.startswith(f"x is a {MASKED}: ")
    assert "x.filled(value) or np.asarray(x)" in message
    assert "x.filled(0) with mask=~np.ma.getmaskarray(x)" in message
    assert "numba" not in message.lower()
    for array, old in zip(arrays, before, strict=True):
        assert np.array_equal(array, old)
    assert np.array_equal(x.data, data_before) and x.mask.flat[0]


def test_a_mask_that_masks_nothing_and_a_masked_subclass_are_refused_too() -> None:
    class Masked(np.ma.MaskedArray):
        pass

    with pytest.raises(TypeError, match=r"^x is a numpy\.ma\.MaskedArray: "):
        normkit.layer_norm(np.ma.asarray(X))
    with pytest.raises(TypeError) as raised:
        normkit.layer_norm(X.view(Masked))
    assert f"x is a {Masked.__module__}.{Masked.__qualname__} (a {MASKED}): " in str(raised.value)


# -- masked parameters, named in the error ---------------------------------------------------
PARAMETERS: list[tuple[str, str]] = [
    *((op, name) for op in ("batch_norm", "instance_norm") for name in ("running_mean", "running_var")),
    *(
        (op, name)
        for op in ("batch_norm", "instance_norm", "layer_norm")
        for name in ("weight", "bias", "out")
    ),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("op", "name"), PARAMETERS, ids=[f"{op}-{name}" for op, name in PARAMETERS])
def test_a_masked_parameter_is_refused_by_name(kernels: str, op: str, name: str, training: bool) -> None:
    running_mean, running_var, weight, bias = stats()
    given: dict[str, Any] = {"weight": weight, "bias": bias}
    if op != "layer_norm":
        given.update(running_mean=running_mean, running_var=running_var)
    if name == "out":
        given["out"] = masked(np.zeros_like(X))
    else:
        given[name] = masked(given[name])
    snapshots = {key: np.ma.getdata(value).copy() for key, value in given.items()}
    with pytest.raises(TypeError) as raised:
        if op == "batch_norm":
            normkit.batch_norm(X, training=training, **given)
        elif op == "instance_norm":
            normkit.instance_norm(X, use_input_stats=training, **given)
        else:
            normkit.layer_norm(X, axis=1, **given)
    message = str(raised.value)
    assert message.startswith(f"{name} is a {MASKED}: "), message
    assert f"np.asarray({name})" in message and f"{name}.filled(value)" in message
    for key, value in given.items():
        assert np.array_equal(np.ma.getdata(value), snapshots[key]), f"{key} changed"


# -- every layer, train and eval -------------------------------------------------------------
LAYERS: list[tuple[str, Callable[[], Any]]] = [
    ("BatchNorm", lambda: normkit.BatchNorm()),
    ("BatchNorm-channels-last", lambda: normkit.BatchNorm(preset="keras")),
    ("InstanceNorm", lambda: normkit.InstanceNorm()),
    ("InstanceNorm-tracking", lambda: normkit.InstanceNorm(affine=True, track_running_stats=True)),
    ("LayerNorm", lambda: normkit.LayerNorm((5, 5))),
    ("BatchNorm-backend-named", lambda: normkit.BatchNorm(backend="numpy")),
]


def layer_state(layer: Any) -> dict[str, Any]:
    """Copies of every array and the counter, and the arrays themselves (to check identity)."""
    state = layer.state_dict()
    return {key: value for key, value in state.items() if key != "_metadata"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("build", [build for _, build in LAYERS], ids=[name for name, _ in LAYERS])
def test_every_layer_refuses_a_masked_input_and_keeps_its_state(
    kernels: str, build: Callable[[], Any], training: bool
) -> None:
    layer = build()
    for _ in range(2):
        layer(rng.normal(1.0, 2.0, size=X.shape).astype(np.float32))
    layer.train(training)
    held = layer_state(layer)
    before = {key: np.array(value, copy=True) for key, value in held.items()}
    with pytest.raises(TypeError) as raised:
        layer(masked(X))
    assert str(raised.value).startswith(f"x is a {MASKED}: ")
    after = layer_state(layer)
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert np.array_equal(np.asarray(value), before[key]), f"{key} changed"
        if key != "num_batches_tracked":
            assert value is held[key], f"{key} was replaced"
            assert value.tobytes() == before[key].tobytes(), f"{key} changed"
    if "num_batches_tracked" in after:
        assert after["num_batches_tracked"] == 2


@pytest.mark.parametrize("build", [build for _, build in LAYERS], ids=[name for name, _ in LAYERS])
def test_a_fresh_layer_given_a_masked_input_creates_no_state(build: Callable[[], Any]) -> None:
    layer = build()
    with pytest.raises(TypeError, match=MASKED):
        layer(masked(X))
    assert layer.weight is None and layer._state is None


def test_a_masked_array_in_a_state_dict_is_refused() -> None:
    layer = normkit.BatchNorm()
    layer(X)
    state = dict(layer.state_dict())
    old = layer.running_mean
    state["running_mean"] = masked(state["running_mean"])
    with pytest.raises(normkit.StateDictError, match=r"running_mean is a numpy\.ma\.MaskedArray"):
        layer.load_state_dict(state)
    assert layer.running_mean is old


def test_the_compiled_path_in_a_fresh_process_refuses_before_any_kernel() -> None:
    """No earlier call has compiled or resolved anything: the refusal comes before numba."""
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    code = """
        import sys, numpy as np, normkit
        x = np.ma.masked_array(np.ones((4, 3, 2, 2), np.float32), mask=False)
        for call in (lambda: normkit.batch_norm(x, training=True), lambda: normkit.BatchNorm()(x)):
            try:
                call()
            except TypeError as error:
                print(type(error).__name__, "|", error)
        print("numba imported:", "numba" in sys.modules)
        print(normkit.numpy_backend.kernels_in_use())
    """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), numpy_backend.KERNELS_ENV: "compiled"},
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 4, run.stdout
    for line in lines[:2]:
        assert line.startswith(f"NoBackendError | x is a {MASKED}: "), line
    assert lines[2] == "numba imported: False"
    assert lines[3] == "compiled"


# -- the check costs nothing per call ----------------------------------------------------------
def test_a_masked_type_is_never_cached_as_handled() -> None:
    normkit.layer_norm(X)
    with pytest.raises(TypeError):
        normkit.layer_norm(masked(X))
    registry = _registry.registry()
    assert np.ma.MaskedArray not in registry._by_type
    backend = _registry.backend_for(X)
    assert not backend.handles(np.ma.MaskedArray) and backend.handles(np.ndarray)


def test_a_backend_that_names_masked_arrays_gets_them() -> None:
    """Only claiming the base class is not enough; naming the masked type is."""
    seen: list[type] = []

    def normkit_backend_info() -> normkit.BackendInfo:
        info = numpy_backend.normkit_backend_info()
        return normkit.BackendInfo(
            **{**info.__dict__, "name": "masked", "array_types": ("numpy.ma:MaskedArray",)}
        )

    def normkit_layer_norm(x, weight, bias, axes, eps):
        seen.append(type(x))
        return np.ma.masked_array(numpy_backend.normkit_layer_norm(x.filled(0.0), weight, bias, axes, eps))

    plugin = types.ModuleType("masked")
    plugin.normkit_backend_info = normkit.hookimpl(normkit_backend_info)
    plugin.normkit_layer_norm = normkit.hookimpl(normkit_layer_norm)
    _registry.reset()
    try:
        normkit.register_backend(plugin, "masked")
        normkit.layer_norm(masked(X))
        normkit.layer_norm(X)
        assert seen == [np.ma.MaskedArray]
        assert _registry.backend_for(X).name == "numpy"
    finally:
        _registry.reset()


# -- ndarray subclasses that are not masked keep working ---------------------------------------
class Sub(np.ndarray):
    """A trivial ndarray subclass."""


@pytest.fixture(params=["subclass", "memmap"])
def like_x(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[np.ndarray]:
    """``X`` as a trivial ndarray subclass, or as an ``np.memmap``."""
    if request.param == "subclass":
        yield X.copy().view(Sub)
        return
    array = np.memmap(tmp_path / "x.dat", dtype=X.dtype, mode="w+", shape=X.shape)
    array[:] = X
    yield array
    del array


def test_ndarray_subclasses_give_the_numbers_of_plain_arrays(kernels: str, like_x: np.ndarray) -> None:
    assert type(like_x) is not np.ndarray
    for name, op in OPS:
        expected = op(X, *stats())
        got = op(like_x, *stats())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for e, g in zip(expected, got, strict=True):
            assert np.asarray(g).tobytes() == np.asarray(e).tobytes(), name
    for name, build in LAYERS:
        plain, other = build(), build()
        for training in (True, False):
            plain.train(training)
            other.train(training)
            assert np.asarray(other(like_x)).tobytes() == np.asarray(plain(X)).tobytes(), name
        assert {k: np.asarray(v).tobytes() for k, v in layer_state(other).items()} == {
            k: np.asarray(v).tobytes() for k, v in layer_state(plain).items()
        }, name
    assert np.array_equal(np.asarray(like_x), X)


def test_the_advice_for_a_masked_input_gives_the_statistics_of_the_unmasked_values() -> None:
    """What the error advises (fill, and pass the mask as mask=) leaves the masked values out of
    the statistics: each channel's running mean moves toward the mean of its unmasked values
    (the float64 reference's moments over them)."""
    from normkit import reference

    rng = np.random.default_rng(4)
    data = rng.normal(3.0, 2.0, size=(16, 3)).astype(np.float32)
    x = np.ma.masked_array(data, mask=rng.random(data.shape) < 0.4)
    keep = ~np.ma.getmaskarray(x)
    _, mean, var = normkit.batch_norm(
        x.filled(0), np.zeros(3, np.float32), np.zeros(3, np.float32), training=True, momentum=1.0,
        running_var_estimator="biased", mask=keep,
    )  # fmt: skip
    count, ref_mean, m2 = reference.moments(data, (0,), keep)
    bound = output_tolerance("float32").bound(ref_mean, 0.0)
    assert np.all(np.abs(mean - ref_mean) <= bound)
    assert np.all(np.abs(var - m2 / count) <= output_tolerance("float32").bound(m2 / count, 0.0))
