"""State files: ``normkit.save_state`` / ``normkit.load_state`` (safetensors).

Round trips are checked bit for bit against the original arrays, for every layer type and
preset; files PyTorch wrote are checked against ``torch.nn``'s own outputs (the oracle) within
the tolerance policy of :mod:`normkit.testing.tolerances`; damaged and foreign files must raise
:class:`normkit.StateDictError` naming the file and leave the layer that would load them as it was.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import normkit
from normkit import reference
from normkit.testing.tolerances import CENTERING_FACTOR, EPS, output_tolerance

rng = np.random.default_rng(20240611)

Factory = Callable[[str], Any]

LAYERS: dict[str, Factory] = {
    "batch": lambda p: normkit.BatchNorm(preset=p),
    "batch-no-affine": lambda p: normkit.BatchNorm(affine=False, preset=p),
    "batch-cumulative": lambda p: normkit.BatchNorm(momentum=None, preset=p),
    "batch-no-running-stats": lambda p: normkit.BatchNorm(track_running_stats=False, preset=p),
    "instance": lambda p: normkit.InstanceNorm(preset=p),
    "instance-affine": lambda p: normkit.InstanceNorm(affine=True, preset=p),
    "instance-bare": lambda p: normkit.InstanceNorm(affine=False, preset=p),
    "instance-running-stats": lambda p: normkit.InstanceNorm(track_running_stats=True, affine=True, preset=p),
    "instance-running-stats-no-affine": lambda p: normkit.InstanceNorm(
        track_running_stats=True, affine=False, preset=p
    ),
    "layer": lambda p: normkit.LayerNorm(preset=p),
    "layer-normalized-shape": lambda p: normkit.LayerNorm((4, 5), preset=p),
    "layer-axes": lambda p: normkit.LayerNorm(axis=(1, 3), preset=p),
    "layer-no-bias": lambda p: normkit.LayerNorm(bias=False, preset=p),
    "layer-no-affine": lambda p: normkit.LayerNorm(affine=False, preset=p),
}


def data_for(layer: Any, dtype: type = np.float32) -> np.ndarray:
    """A (6, 3, 4, 5) batch, with the 3 channels on a channel layer's own axis."""
    x = rng.normal(1.5, 2.0, size=(6, 3, 4, 5))
    if getattr(layer, "axis", None) == -1 and not isinstance(layer, normkit.LayerNorm):
        x = np.moveaxis(x, 1, -1)
    return np.ascontiguousarray(x).astype(dtype)


def trained(factory: Factory, preset: str, dtype: type) -> tuple[Any, np.ndarray]:
    """A layer after three training steps, with random (not 1 and 0) affine arrays."""
    layer = factory(preset)
    x = data_for(layer, dtype)
    for _ in range(3):
        layer(data_for(layer, dtype))
    state = layer.state_dict()
    for key in ("weight", "bias"):
        if key in state:
            state[key] = rng.uniform(0.5, 1.5, size=state[key].shape).astype(dtype)
    layer.load_state_dict(state)
    return layer, x


def assert_same_state(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        if key == "_metadata":
            assert got[key] == value
        elif key == "num_batches_tracked":
            assert type(got[key]) is int and got[key] == value
        else:
            assert isinstance(got[key], np.ndarray)
            assert (got[key].dtype, got[key].shape) == (value.dtype, value.shape), key
            assert got[key].tobytes() == value.tobytes(), key  # bit for bit


def snapshot(layer: Any) -> dict[str, Any]:
    """A deep copy of everything a load could change."""
    state = layer.state_dict()
    return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in state.items()}


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("preset", sorted(normkit.PRESETS))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_round_trip_is_bit_exact_for_every_layer_and_preset(
    kind: str, preset: str, dtype: type, tmp_path: Path
) -> None:
    layer, x = trained(LAYERS[kind], preset, dtype)
    state = layer.state_dict()
    path = tmp_path / "state.safetensors"
    normkit.save_state(state, path)
    loaded = normkit.load_state(path)
    assert_same_state(loaded, state)

    restored = type(layer).from_state_dict(loaded)
    assert_same_state(restored.state_dict(), state)
    assert restored.eval()(x).tobytes() == layer.eval()(x).tobytes()
    into_fresh = LAYERS[kind](preset)
    into_fresh.load_state_dict(normkit.load_state(str(path)))  # str paths too
    assert into_fresh.eval()(x).tobytes() == layer.eval()(x).tobytes()
    # training continues identically: the counter (the weight of a cumulative average) survived
    restored.train()(x)
    layer.train()(x)
    assert_same_state(restored.state_dict(), layer.state_dict())


def test_the_file_layout_is_what_the_docstring_says(tmp_path: Path) -> None:
    layer, _ = trained(LAYERS["batch"], "torch", np.float32)
    state = layer.state_dict()
    path = tmp_path / "bn.safetensors"
    normkit.save_state(state, path)
    with safe_open(path, framework="numpy") as file:
        assert json.loads(file.metadata()["normkit"]) == state["_metadata"]
        counter = file.get_tensor("num_batches_tracked")
        assert (counter.dtype, counter.shape, int(counter)) == (np.dtype(np.int64), (), 3)
        assert sorted(file.keys()) == sorted(k for k in state if k != "_metadata")
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert file.get_tensor(key).tobytes() == state[key].tobytes()


def test_non_contiguous_and_big_endian_arrays_are_written_as_their_values(tmp_path: Path) -> None:
    weight = np.arange(8, dtype=np.float64)[::2]
    bias = np.array([0.5, -1.25, 3.0, 7.0], dtype=">f8")
    normkit.save_state({"weight": weight, "bias": bias}, tmp_path / "s.safetensors")
    loaded = normkit.load_state(tmp_path / "s.safetensors")
    np.testing.assert_array_equal(loaded["weight"], weight)
    np.testing.assert_array_equal(loaded["bias"], bias)
    assert loaded["bias"].dtype == np.dtype("<f8")


def test_loaded_arrays_are_independent_of_the_file(tmp_path: Path) -> None:
    layer, _ = trained(LAYERS["batch"], "torch", np.float32)
    path = tmp_path / "bn.safetensors"
    normkit.save_state(layer.state_dict(), path)
    first = normkit.load_state(path)
    first["running_mean"][:] = 100.0
    path.unlink()
    assert np.all(first["running_mean"] == 100.0)
    assert not np.any(layer.running_mean == 100.0)


# -- saving: validation and atomic writes -------------------------------------------------------


def good_state() -> dict[str, Any]:
    layer, _ = trained(LAYERS["batch"], "torch", np.float32)
    return layer.state_dict()


BAD_STATES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "not a dict": (lambda s: list(s.items()), "expected a dict"),
    "a list for an array": (lambda s: {**s, "weight": [1.0, 1.0, 1.0]}, r"state_dict\['weight'\] is a list"),
    "a float for an array": (lambda s: {**s, "bias": 0.0}, r"state_dict\['bias'\] is a float"),
    "an unexpected key": (lambda s: {**s, "conv.weight": s["weight"]}, "unexpected keys"),
    "an integer array": (lambda s: {**s, "weight": np.ones(3, np.int32)}, "dtype int32"),
    "mixed shapes": (lambda s: {**s, "bias": np.zeros(4, np.float32)}, "different shapes"),
    "mixed dtypes": (lambda s: {**s, "bias": np.zeros(3, np.float64)}, "mix dtypes"),
    "a negative counter": (lambda s: {**s, "num_batches_tracked": -1}, "non-negative"),
    "a bool counter": (lambda s: {**s, "num_batches_tracked": True}, "non-negative integer"),
    "metadata not JSON": (
        lambda s: {**s, "_metadata": {**s["_metadata"], "axis": {1, 2}}},
        "cannot be written as JSON",
    ),
    "metadata with NaN": (
        lambda s: {**s, "_metadata": {**s["_metadata"], "eps": float("nan")}},
        "cannot be written as JSON",
    ),
    "a newer format version": (
        lambda s: {**s, "_metadata": {**s["_metadata"], "format_version": 99}},
        "newer normkit",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_save_rejects_what_is_not_a_state_dict_and_writes_nothing(case: str, tmp_path: Path) -> None:
    change, message = BAD_STATES[case]
    path = tmp_path / "bn.safetensors"
    normkit.save_state(good_state(), path)
    before = path.read_bytes()
    with pytest.raises(normkit.StateDictError, match=message):
        normkit.save_state(change(good_state()), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["bn.safetensors"]
    with pytest.raises(normkit.StateDictError):
        normkit.save_state(change(good_state()), tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == ["bn.safetensors"]


def test_a_save_that_fails_while_writing_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bn.safetensors"
    normkit.save_state(good_state(), path)
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        normkit.save_state(good_state(), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["bn.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_a_new_file_gets_the_permissions_open_would_give(tmp_path: Path) -> None:
    normkit.save_state(good_state(), tmp_path / "bn.safetensors")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "bn.safetensors").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_save_converts_a_framework_backends_arrays_to_numpy(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("normkit_torch")
    layer = normkit.BatchNorm()
    for _ in range(3):
        layer(torch.from_numpy(rng.normal(1.5, 2.0, size=(8, 3, 4, 4)).astype(np.float32)))
    normkit.save_state(layer.state_dict(), tmp_path / "bn.safetensors")
    loaded = normkit.load_state(tmp_path / "bn.safetensors")
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert loaded[key].tobytes() == layer.state_dict()[key].numpy().tobytes()
    assert loaded["num_batches_tracked"] == 3


# -- files PyTorch wrote, and PyTorch reading normkit's -----------------------------------------


def eval_bound(x: np.ndarray, state: dict[str, np.ndarray], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The float64 reference of eval-mode batch norm (channels-first) and the float32 output
    bound of :mod:`normkit.testing.tolerances` around it: ``r|y| + r + K·Δ`` plus the
    centering term, Δ measured by perturbing the input by one float32 ulp."""

    def y_of(data: np.ndarray) -> np.ndarray:
        return reference.batch_norm(
            data,
            state["weight"],
            state["bias"],
            state["running_mean"],
            state["running_var"],
            training=False,
            momentum=0.0,
            eps=eps,
            axis=1,
            unbiased_running_var=True,
        )[0]

    eps_c = EPS["float32"]
    x64 = x.astype(np.float64)
    y_ref = y_of(x64)
    perturbed = y_of(x64 * (1.0 + eps_c * rng.uniform(-1.0, 1.0, size=x.shape)))
    conditioning = float(np.abs(perturbed - y_ref).max())
    per_channel = (1, -1) + (1,) * (x.ndim - 2)
    gain = (
        np.abs(state["running_mean"].astype(np.float64))
        * np.abs(state["weight"].astype(np.float64))
        / np.sqrt(state["running_var"].astype(np.float64) + eps)
    ).reshape(per_channel)
    bound = output_tolerance("float32").bound(y_ref, conditioning) + CENTERING_FACTOR * eps_c * gain
    return y_ref, bound


def assert_matches_torch(got: np.ndarray, expected: np.ndarray, y_ref: np.ndarray, bound: np.ndarray) -> None:
    """normkit within its tolerance of the float64 reference, and within the sum of both
    implementations' tolerances of torch (the pairwise rule of ``normkit check``)."""
    assert got.dtype == expected.dtype == np.float32
    assert np.all(np.abs(got.astype(np.float64) - y_ref) <= bound)
    difference = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    assert np.all(difference <= 2 * bound), f"largest difference {difference.max():.3g}"


def test_a_torch_batch_norm_file_loads_and_evaluates_as_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    module = torch.nn.BatchNorm2d(5)
    with torch.no_grad():  # a non-trivial state without training
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.5)
        module.running_mean.normal_(1.0, 0.5)
        module.running_var.uniform_(0.5, 3.0)
        module.num_batches_tracked.fill_(7)
    path = tmp_path / "bn.safetensors"
    safetensors_torch.save_file(module.state_dict(), path)

    loaded = normkit.load_state(path)
    assert "_metadata" not in loaded and loaded["num_batches_tracked"] == 7
    layer = normkit.BatchNorm(preset="torch")
    layer.load_state_dict(loaded)  # no metadata: the layer's own configuration is used
    assert layer.num_batches_tracked == 7
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert layer.state_dict()[key].tobytes() == module.state_dict()[key].numpy().tobytes()

    x = rng.normal(1.5, 2.0, size=(8, 5, 6, 6)).astype(np.float32)
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    y_ref, bound = eval_bound(x, layer.state_dict(), module.eps)
    assert_matches_torch(layer.eval()(x), expected, y_ref, bound)

    with pytest.raises(normkit.StateDictError, match="needs the saved configuration"):
        normkit.BatchNorm.from_state_dict(loaded)


def test_a_batch_norm_from_a_trained_torch_model_evaluates_as_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 4),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        inputs = torch.randn(16, 3, 10, 10) * 2.0 + 1.5
        loss = torch.nn.functional.cross_entropy(model(inputs), torch.randint(0, 4, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bn = model[1]
    assert int(bn.num_batches_tracked) == 6 and not torch.allclose(bn.weight, torch.ones(6))
    path = tmp_path / "bn1.safetensors"
    safetensors_torch.save_file(bn.state_dict(), path)

    layer = normkit.BatchNorm(preset="torch")
    layer.load_state_dict(normkit.load_state(path))
    assert layer.num_batches_tracked == 6
    model.eval()
    with torch.no_grad():
        features = model[0](torch.randn(8, 3, 10, 10) * 2.0 + 1.5)
        expected = bn(features).numpy()
    x = features.numpy()
    y_ref, bound = eval_bound(x, layer.state_dict(), bn.eps)
    assert_matches_torch(layer.eval()(x), expected, y_ref, bound)


def test_torch_loads_a_normkit_file_into_its_own_batch_norm(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    layer, _ = trained(LAYERS["batch"], "torch", np.float32)
    path = tmp_path / "bn.safetensors"
    normkit.save_state(layer.state_dict(), path)
    module = torch.nn.BatchNorm2d(3)
    module.load_state_dict(safetensors_torch.load_file(path))  # strict: the same names and shapes
    assert int(module.num_batches_tracked) == 3
    x = data_for(layer)
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    y_ref, bound = eval_bound(x, layer.state_dict(), layer.eps)
    assert_matches_torch(layer.eval()(x), expected, y_ref, bound)


# -- damaged, foreign and missing files ---------------------------------------------------------


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def replace_in_header(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    end = 8 + header_length(data)
    assert old in data[8:end]
    return data[:8] + data[8:end].replace(old, new, 1) + data[end:]


def npz_bytes(tmp_path: Path) -> bytes:
    np.savez(tmp_path / "scratch.npz", weight=np.ones(3, np.float32))
    data = (tmp_path / "scratch.npz").read_bytes()
    (tmp_path / "scratch.npz").unlink()
    return data


def safetensors_bytes(tmp_path: Path, tensors: dict[str, np.ndarray], **metadata: str) -> bytes:
    save_file(tensors, tmp_path / "scratch.safetensors", metadata=metadata or None)
    data = (tmp_path / "scratch.safetensors").read_bytes()
    (tmp_path / "scratch.safetensors").unlink()
    return data


# Each maker gets the bytes of a good state file (of another state than the layer's) and tmp_path.
DAMAGED: dict[str, tuple[Callable[[bytes, Path], bytes], str]] = {
    "truncated in the data": (lambda d, _: d[:-5], "not a valid safetensors file"),
    "truncated in the header": (lambda d, _: d[:40], "not a valid safetensors file"),
    "truncated to nothing": (lambda d, _: b"", "not a valid safetensors file"),
    "trailing garbage": (lambda d, _: d + b"\x00" * 16, "not a valid safetensors file"),
    "header length garbage": (
        lambda d, _: struct.pack("<Q", 0xDEADBEEFDEADBEEF) + d[8:],
        "not a valid safetensors file",
    ),
    "header length past the end": (
        lambda d, _: struct.pack("<Q", len(d) + 100) + d[8:],
        "not a valid safetensors file",
    ),
    "header JSON broken": (
        lambda d, _: replace_in_header(d, b'"dtype":', b'"dtype";'),
        "not a valid safetensors file",
    ),
    "header JSON with a field renamed": (
        lambda d, _: replace_in_header(d, b'"shape"', b'"shap!"'),
        "not a valid safetensors file",
    ),
    "header offsets past the data": (
        lambda d, _: replace_in_header(d, b'"data_offsets":[0,', b'"data_offsets":[9,'),
        "not a valid safetensors file",
    ),
    "normkit metadata not JSON": (
        lambda d, _: replace_in_header(d, b'\\"format_version\\": 1', b'\\"format_version\\"= 1'),
        "metadata is not valid JSON",
    ),
    "normkit metadata of a newer format": (
        lambda d, _: replace_in_header(d, b'\\"format_version\\": 1', b'\\"format_version\\": 9'),
        "newer normkit",
    ),
    "a conv layer's weight and bias": (
        lambda _, t: safetensors_bytes(
            t, {"weight": np.ones((8, 3, 3, 3), np.float32), "bias": np.zeros(8, np.float32)}
        ),
        "different shapes",
    ),
    "a whole model's state": (
        lambda _, t: safetensors_bytes(
            t,
            {"conv1.weight": np.ones((8, 3, 3, 3), np.float32), "bn1.weight": np.ones(8, np.float32)},
            format="pt",
        ),
        "which are not a norm layer's state",
    ),
    "half-precision arrays": (
        lambda _, t: safetensors_bytes(
            t, {"weight": np.ones(3, np.float16), "bias": np.zeros(3, np.float16)}
        ),
        "dtype float16",
    ),
    "a counter that is not a scalar": (
        lambda _, t: safetensors_bytes(
            t, {"weight": np.ones(3, np.float32), "num_batches_tracked": np.arange(3, dtype=np.int64)}
        ),
        "num_batches_tracked has shape",
    ),
    "an .npz archive": (lambda _, t: npz_bytes(t), "zip archive"),
    "random bytes": (
        lambda _, __: np.random.default_rng(5).bytes(512),
        "not a valid safetensors file",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_or_foreign_file_raises_naming_it_and_loads_nothing(case: str, tmp_path: Path) -> None:
    make, message = DAMAGED[case]
    layer, x = trained(LAYERS["batch"], "torch", np.float32)
    other, _ = trained(LAYERS["batch"], "torch", np.float32)
    other(x)  # a different state and counter than the layer's
    good = tmp_path / "good.safetensors"
    normkit.save_state(other.state_dict(), good)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(make(good.read_bytes(), tmp_path))
    before, y_before = snapshot(layer), layer.eval()(x)

    with pytest.raises(normkit.StateDictError, match=message) as raised:
        layer.load_state_dict(normkit.load_state(path))
    assert str(path) in str(raised.value)
    assert re.search(r"expected", str(raised.value))
    assert_same_state(layer.state_dict(), before)
    assert layer.eval()(x).tobytes() == y_before.tobytes()


def test_a_foreign_array_that_could_be_a_state_is_refused_by_the_layer(tmp_path: Path) -> None:
    """A lone 4-D ``weight`` could be a LayerNorm's: the file reads, the batch norm refuses it."""
    layer, _ = trained(LAYERS["batch"], "torch", np.float32)
    path = tmp_path / "conv.safetensors"
    save_file({"weight": np.ones((8, 3, 3, 3), np.float32)}, path)
    before = snapshot(layer)
    with pytest.raises(normkit.StateDictError, match="missing keys"):
        layer.load_state_dict(normkit.load_state(path))
    with pytest.raises(normkit.StateDictError, match=r"weight has shape \(8, 3, 3, 3\); expected \(3,\)"):
        layer.load_state_dict(normkit.load_state(path), strict=False)
    assert_same_state(layer.state_dict(), before)


def test_a_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        normkit.load_state(tmp_path / "nowhere.safetensors")
