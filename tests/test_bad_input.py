"""Bad input: a clear, documented error naming the parameter, and no state changed.

Every case starts from a trained layer (and its own arrays, used in functional calls). After the
error, the layer's running statistics, weights and counter must be bit-identical.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import normkit
from normkit import StateDictError, _registry

FAKEFW = str(Path(__file__).parent / "fakefw")


@pytest.fixture(scope="module", autouse=True)
def second_array_type() -> Iterator[None]:
    """``tests/fakefw`` on sys.path: a second framework and its installed backend, for the
    mixed-backend case. Removed afterwards, so other modules see a plain installation."""
    sys.path.insert(0, FAKEFW)
    _registry.reset()
    normkit.register_backend(failing_backend(), "failing")
    yield
    sys.path.remove(FAKEFW)
    _registry.reset()


def failing_backend() -> types.ModuleType:
    """A backend for NumPy arrays whose batch norm kernel fails: the layer has built or loaded
    its state by the time the kernel runs, and must keep the old one."""
    from normkit import numpy_backend

    module = types.ModuleType("failing")

    def normkit_backend_info() -> normkit.BackendInfo:
        return normkit.BackendInfo(**{**numpy_backend.normkit_backend_info().__dict__, "name": "failing"})

    def normkit_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis, unbiased_running_var
    ):
        raise RuntimeError("kernel failed")

    # trylast: NumPy arrays keep going to the NumPy backend unless backend="failing" is asked for
    module.normkit_backend_info = normkit.hookimpl(trylast=True)(normkit_backend_info)
    module.normkit_batch_norm = normkit.hookimpl(trylast=True)(normkit_batch_norm)
    return module


def call_through_failing_backend(layer: normkit.BatchNorm) -> Any:
    layer.backend = "failing"
    return layer(X)


def fake_array(data: np.ndarray) -> Any:
    import fakefw

    return fakefw.Array(data)


C = 3
rng = np.random.default_rng(0)
X = rng.normal(2.0, 3.0, size=(8, C, 4, 4)).astype(np.float32)


def trained() -> normkit.BatchNorm:
    layer = normkit.BatchNorm()
    for _ in range(3):
        layer(rng.normal(2.0, 3.0, size=(8, C, 4, 4)).astype(np.float32))
    return layer


def functional(layer: normkit.BatchNorm, **options: Any) -> Any:
    args = {"weight": layer.weight, "bias": layer.bias, "training": True, **options}
    return normkit.batch_norm(
        options.pop("x", X),
        layer.running_mean,
        layer.running_var,
        **{k: v for k, v in args.items() if k != "x"},
    )


def with_state(change: Callable[[dict[str, Any]], None]) -> Callable[[normkit.BatchNorm], Any]:
    def load(layer: normkit.BatchNorm) -> Any:
        state = dict(layer.state_dict())
        state["_metadata"] = dict(state["_metadata"])
        change(state)
        return layer.load_state_dict(state)

    return load


def _pop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.__setitem__(key, value)


def _set_metadata(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["_metadata"].__setitem__(key, value)


# (id, call on a trained layer, exception type, text the message must contain)
CASES: list[tuple[str, Callable[[normkit.BatchNorm], Any], type[Exception], str]] = [
    ("kernel-fails-mid-call", call_through_failing_backend, RuntimeError, "kernel failed"),
    (
        "wrong-rank",
        lambda layer: layer(np.ones(5, np.float32)),
        ValueError,
        "x has shape (5,), 1 dimension; batch_norm expects an array with at least 2 dimensions",
    ),
    (
        "zero-d-array",
        lambda layer: layer(np.array(1.0, np.float32)),
        ValueError,
        "x has shape (), a 0-d array (a scalar); batch_norm expects an array with at least 2 dimensions",
    ),
    (
        "numpy-scalar",
        lambda layer: layer(np.float32(1.0)),
        normkit.NoBackendError,
        "x is a numpy.float32 scalar, not an array; batch_norm expects an array with at least 2 dimensions",
    ),
    (
        "python-float",
        lambda layer: layer(1.0),
        normkit.NoBackendError,
        "x is a Python float, a scalar (no normkit backend handles arrays of type float); batch_norm "
        "expects an array with at least 2 dimensions, such as a numpy.ndarray or a framework's tensor",
    ),
    (
        "list-to-layer",
        lambda layer: layer(X.tolist()),
        normkit.NoBackendError,
        "x is a list, not an array (no normkit backend handles arrays of type list); batch_norm expects "
        "an array with at least 2 dimensions: convert it first, e.g. with np.asarray(x, dtype=np.float32)",
    ),
    (
        "masked-array",
        lambda layer: layer(np.ma.masked_array(X, mask=X < 0)),
        TypeError,
        "x is a numpy.ma.MaskedArray: normkit does not take masked arrays",
    ),
    (
        "masked-weight",
        lambda layer: functional(layer, weight=np.ma.masked_array(layer.weight, mask=[1, 0, 0])),
        TypeError,
        "weight is a numpy.ma.MaskedArray: normkit does not take masked arrays",
    ),
    (
        "channel-mismatch",
        lambda layer: layer(np.ones((8, 5, 4), np.float32)),
        ValueError,
        "x has shape (8, 5, 4): 5 channels on axis 1, but this layer has 3 (num_features)",
    ),
    (
        "integer-dtype",
        lambda layer: layer(np.ones((8, C), np.int64)),
        TypeError,
        "x has dtype int64; batch_norm expects a floating dtype",
    ),
    (
        "one-value-per-channel",
        lambda layer: layer(np.ones((1, C), np.float32)),
        ValueError,
        "x has shape (1, 3): expected more than 1 value per channel",
    ),
    (
        "eps-zero",
        lambda layer: functional(layer, eps=0.0),
        ValueError,
        "eps=0.0: expected a positive finite number",
    ),
    ("eps-negative", lambda layer: functional(layer, eps=-1e-5), ValueError, "eps=-1e-05"),
    ("eps-nan", lambda layer: functional(layer, eps=math.nan), ValueError, "eps=nan"),
    (
        "momentum-above-one",
        lambda layer: functional(layer, momentum=1.5),
        ValueError,
        "momentum=1.5: expected a number in [0, 1]",
    ),
    ("momentum-negative", lambda layer: functional(layer, momentum=-0.1), ValueError, "momentum=-0.1"),
    (
        "momentum-none-in-functional",
        lambda layer: functional(layer, momentum=None),
        ValueError,
        "momentum=None (the cumulative average) needs a batch counter",
    ),
    (
        "weight-wrong-shape",
        lambda layer: functional(layer, weight=np.ones(5, np.float32)),
        ValueError,
        "weight has shape (5,); expected (3,)",
    ),
    (
        "bias-integer",
        lambda layer: functional(layer, bias=np.zeros(C, np.int32)),
        TypeError,
        "bias has dtype int32",
    ),
    (
        "mixed-backends",
        lambda layer: normkit.batch_norm(fake_array(X), training=True, weight=layer.weight),
        TypeError,
        "weight is a numpy.ndarray but x is a fakefw.Array",
    ),
    (
        "unknown-backend",
        lambda layer: functional(layer, backend="jaxx"),
        ValueError,
        "backend='jaxx' is not a loaded normkit backend",
    ),
    (
        "unknown-preset",
        lambda layer: functional(layer, preset="caffe"),
        ValueError,
        "preset='caffe' is not a known preset; expected one of ['flax', 'gemma', 'keras', 'llama', 'onnx', 'torch']",
    ),
    (
        "unknown-array-type",
        lambda layer: normkit.batch_norm(X.tolist(), training=True),
        normkit.NoBackendError,
        "no normkit backend handles arrays of type list",
    ),
    (
        "axis-out-of-range",
        lambda layer: functional(layer, axis=4),
        ValueError,
        "axis=4 is out of range for an input with 4 dimensions",
    ),
    (
        "running-mean-without-var",
        lambda layer: normkit.batch_norm(X, layer.running_mean, None, training=True),
        ValueError,
        "running_mean is given but running_var is None",
    ),
    (
        "eval-without-running-stats",
        lambda layer: normkit.batch_norm(X),
        ValueError,
        "running_mean and running_var are None: training=False",
    ),
    (
        "momentum-weights",
        lambda layer: functional(layer, momentum_weights="new"),
        ValueError,
        "momentum_weights='new'",
    ),
    (
        "running-var-estimator",
        lambda layer: functional(layer, running_var_estimator="sample"),
        ValueError,
        "running_var_estimator='sample'",
    ),
    (
        "instance-norm-batch-axis",
        lambda layer: normkit.instance_norm(X, axis=0),
        ValueError,
        "axis=0 is the batch axis",
    ),
    (
        "layer-norm-normalized-shape",
        lambda layer: normkit.layer_norm(X, (5, 4)),
        ValueError,
        "normalized_shape=(5, 4) does not match the trailing dimensions",
    ),
    (
        "state-dict-missing-key",
        with_state(_pop("running_var")),
        StateDictError,
        "missing keys ['running_var']",
    ),
    (
        "state-dict-unexpected-key",
        with_state(_set("running_std", np.ones(C, np.float32))),
        StateDictError,
        "unexpected keys ['running_std']",
    ),
    (
        "state-dict-wrong-shape",
        with_state(_set("running_mean", np.zeros(5, np.float32))),
        StateDictError,
        "running_mean has shape (5,); expected (3,)",
    ),
    (
        "state-dict-wrong-dtype",
        with_state(_set("running_var", np.ones(C, np.float64))),
        StateDictError,
        "running_var has dtype float64; this layer's state is float32",
    ),
    (
        "state-dict-counter",
        with_state(_set("num_batches_tracked", -1)),
        StateDictError,
        "num_batches_tracked=-1",
    ),
    (
        "state-dict-newer-format",
        with_state(_set_metadata("format_version", 99)),
        StateDictError,
        "format_version']=99 was written by a newer normkit",
    ),
    (
        "state-dict-other-layer",
        with_state(_set_metadata("layer", "LayerNorm")),
        StateDictError,
        "this state belongs to another layer type; expected 'BatchNorm'",
    ),
    (
        "state-dict-eps",
        with_state(_set_metadata("eps", 1e-3)),
        StateDictError,
        "eps: the state was saved with eps=0.001 but this layer has eps=1e-05",
    ),
]


def snapshot(layer: normkit.BatchNorm) -> dict[str, Any]:
    state = layer.state_dict()
    return {key: np.array(value, copy=True) for key, value in state.items() if key != "_metadata"}


@pytest.mark.parametrize(
    ("call", "error", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_input_raises_a_clear_error_and_changes_no_state(
    call: Callable[[Any], Any], error: type[Exception], message: str
) -> None:
    layer = trained()
    arrays_before = {k: layer.state_dict()[k] for k in ("weight", "bias", "running_mean", "running_var")}
    before = snapshot(layer)
    with pytest.raises(error) as raised:
        call(layer)
    assert message in str(raised.value)
    after = snapshot(layer)
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), f"{key} changed"
        if key in arrays_before:
            assert layer.state_dict()[key] is arrays_before[key], f"{key} was replaced"


SCALAR_HINT = (
    ": normalization needs a group of values, e.g. np.asarray(values, dtype=np.float32) with shape "
    "(batch, channels, ...)"
)

# (call, exception type, the whole message): ops and layers given a scalar, a 0-d array or a list
NOT_AN_ARRAY: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (
        lambda: normkit.batch_norm(np.float32(1.0), training=True),
        normkit.NoBackendError,
        "x is a numpy.float32 scalar, not an array; batch_norm expects an array with at least 2 dimensions"
        + SCALAR_HINT,
    ),
    (
        lambda: normkit.instance_norm(np.float64(1.0)),
        normkit.NoBackendError,
        "x is a numpy.float64 scalar, not an array; instance_norm expects an array with at least 3 dimensions"
        + SCALAR_HINT,
    ),
    (
        lambda: normkit.layer_norm(np.float32(1.0), backend="numpy"),
        TypeError,
        "x is a numpy.float32 scalar, not an array; layer_norm expects an array with at least 1 dimension"
        + SCALAR_HINT,
    ),
    (
        lambda: normkit.layer_norm(np.array(1.0, np.float32)),
        ValueError,
        "x has shape (), a 0-d array (a scalar); layer_norm expects an array with at least 1 dimension",
    ),
    (
        lambda: normkit.LayerNorm()(np.array(1.0, np.float32)),
        ValueError,
        "x has shape (), a 0-d array (a scalar); layer_norm expects an array with at least 1 dimension",
    ),
    (
        lambda: normkit.instance_norm(np.ones((4, 3), np.float32)),
        ValueError,
        "x has shape (4, 3), 2 dimensions; instance_norm expects an array with at least 3 dimensions",
    ),
    (
        lambda: normkit.layer_norm(2.5),
        normkit.NoBackendError,
        "x is a Python float, a scalar (no normkit backend handles arrays of type float); layer_norm "
        "expects an array with at least 1 dimension, such as a numpy.ndarray or a framework's tensor",
    ),
    (
        lambda: normkit.InstanceNorm()(3),
        normkit.NoBackendError,
        "x is a Python int, a scalar (no normkit backend handles arrays of type int); instance_norm "
        "expects an array with at least 3 dimensions, such as a numpy.ndarray or a framework's tensor",
    ),
    (
        lambda: normkit.layer_norm([1.0, 2.0]),
        normkit.NoBackendError,
        "x is a list, not an array (no normkit backend handles arrays of type list); layer_norm expects "
        "an array with at least 1 dimension: convert it first, e.g. with np.asarray(x, dtype=np.float32)",
    ),
    (
        lambda: normkit.batch_norm(((1.0, 2.0), (3.0, 4.0)), training=True),
        normkit.NoBackendError,
        "x is a tuple, not an array (no normkit backend handles arrays of type tuple); batch_norm expects "
        "an array with at least 2 dimensions: convert it first, e.g. with np.asarray(x, dtype=np.float32)",
    ),
    (
        lambda: normkit.layer_norm(np.ones(3, np.float32), axis=1),
        ValueError,
        "axis=1 is out of range for an input with 1 dimension",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), NOT_AN_ARRAY)
def test_scalars_zero_d_arrays_and_lists_are_told_what_to_pass(
    call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value) == message
    assert "1 dimensions" not in message


def test_the_table_has_at_least_fifteen_cases() -> None:
    assert len(CASES) >= 15


def test_a_failed_first_call_creates_no_state() -> None:
    layer = normkit.BatchNorm()
    with pytest.raises(TypeError):
        layer(np.ones((4, 3), np.int32))
    assert layer.running_mean is None and layer.num_batches_tracked == 0


def test_an_empty_batch_passes_through_and_changes_no_state() -> None:
    layer = trained()
    before = snapshot(layer)
    y = layer(np.zeros((0, C, 4, 4), np.float32))
    assert y.shape == (0, C, 4, 4) and y.dtype == np.float32
    after = snapshot(layer)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert layer.num_batches_tracked == 3
    y, mean, var = normkit.batch_norm(np.zeros((0, C)), layer.running_mean, layer.running_var, training=True)
    assert y.shape == (0, C) and mean is layer.running_mean and var is layer.running_var


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: normkit.BatchNorm(eps=0), "eps=0"),
        (lambda: normkit.BatchNorm(momentum=2.0), "momentum=2.0"),
        (lambda: normkit.BatchNorm(num_features=0), "num_features=0"),
        (lambda: normkit.BatchNorm(preset="mxnet"), "preset='mxnet'"),
        (lambda: normkit.InstanceNorm(running_var_estimator="ddof1"), "running_var_estimator='ddof1'"),
        (lambda: normkit.LayerNorm(4, axis=-1), "pass normalized_shape or axis, not both"),
    ],
)
def test_bad_layer_configuration_is_rejected_at_construction(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=None) as raised:
        build()
    assert message in str(raised.value)


def test_a_fresh_layer_whose_kernel_fails_keeps_no_state() -> None:
    layer = normkit.BatchNorm(backend="failing")
    with pytest.raises(RuntimeError, match="kernel failed"):
        layer(X)
    assert layer.running_mean is None and layer.num_batches_tracked == 0
    with pytest.raises(RuntimeError, match="has no state yet"):
        layer.state_dict()
