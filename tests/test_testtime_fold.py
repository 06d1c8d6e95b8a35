"""normkit.testtime.fold's float64 math (fold_weights) for every kernel layout, against an
independent float64 computation: each layer written out here as explicit sums (grouped torch
convolution, grouped torch transposed convolution, Keras dense, grouped Keras convolution, Keras
transposed and depthwise convolution), followed by the batch norm, compared with the folded
kernel and bias applied the same way; bad input refused; fold()'s dispatch and its errors."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

import normkit
from normkit.testing.testtime import folding_bound, folding_offset
from normkit.testing.tolerances import assert_within
from normkit.testtime.fold import LAYOUTS, fold, fold_weights

fold_module = importlib.import_module(
    "normkit.testtime.fold"
)  # the module, even once the package exports fold

# The layers, written out in float64 (x: channels first for torch, last for Keras; 1-D data).


def torch_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, groups: int) -> np.ndarray:
    """y[n, o, t] = b[o] + sum_{c, j} w[o, c, j] x[n, g(o)*C_in/groups + c, t + j]."""
    n, _, length = x.shape
    c_out, per_in, k = w.shape
    per_out = c_out // groups
    y = np.zeros((n, c_out, length - k + 1))
    for o in range(c_out):
        first = (o // per_out) * per_in
        for c in range(per_in):
            for j in range(k):
                y[:, o, :] += w[o, c, j] * x[:, first + c, j : j + length - k + 1]
    return y + b[None, :, None]


def torch_conv_transpose(x: np.ndarray, w: np.ndarray, b: np.ndarray, groups: int, stride: int) -> np.ndarray:
    """Every input value x[n, i, t] spreads w[i, j, s] into y[n, g(i)*C_out/groups + j, t*stride + s]."""
    n, c_in, length = x.shape
    _, per_out, k = w.shape
    per_in = c_in // groups
    y = np.zeros((n, groups * per_out, (length - 1) * stride + k))
    for i in range(c_in):
        for j in range(per_out):
            o = (i // per_in) * per_out + j
            for t in range(length):
                y[:, o, t * stride : t * stride + k] += w[i, j, :][None, :] * x[:, i, t][:, None]
    return y + b[None, :, None]


def keras_dense(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ni,io->no", x, w) + b


def keras_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, groups: int) -> np.ndarray:
    """x (N, L, C_in), w (k, C_in/groups, C_out): output channel o reads its group's inputs."""
    n, length, _ = x.shape
    k, per_in, c_out = w.shape
    per_out = c_out // groups
    y = np.zeros((n, length - k + 1, c_out))
    for o in range(c_out):
        first = (o // per_out) * per_in
        for j in range(k):
            y[:, :, o] += x[:, j : j + length - k + 1, first : first + per_in] @ w[j, :, o]
    return y + b


def keras_conv_transpose(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x (N, L, C_in), w (k, C_out, C_in), stride 1, "valid": y[n, t + s, o] += w[s, o, i] x[n, t, i]."""
    n, length, _ = x.shape
    k, c_out, _ = w.shape
    y = np.zeros((n, length + k - 1, c_out))
    for t in range(length):
        y[:, t : t + k, :] += np.einsum("ni,soi->nso", x[:, t, :], w)
    return y + b


def keras_depthwise(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x (N, L, C), w (k, C, M): y[n, t, c*M + m] = sum_s w[s, c, m] x[n, t + s, c]."""
    n, length, c = x.shape
    k, _, m = w.shape
    y = np.zeros((n, length - k + 1, c * m))
    for ch in range(c):
        for mm in range(m):
            for s in range(k):
                y[:, :, ch * m + mm] += w[s, ch, mm] * x[:, s : s + length - k + 1, ch]
    return y + b


# Each case: layout, groups, kernel shape, input shape, the layer, the output's channel axis,
# and the number of products each output sums.
CASES: dict[str, tuple[str, int, tuple[int, ...], tuple[int, ...], Callable, int, int]] = {
    "torch-conv-grouped": (
        "out-first", 1, (6, 2, 3), (3, 4, 9), lambda x, w, b: torch_conv(x, w, b, groups=2), 1, 2 * 3,
    ),
    "torch-linear": ("out-first", 1, (5, 7), (4, 7), lambda x, w, b: x @ w.T + b, 1, 7),
    "torch-transposed": (
        "torch-transposed", 1, (4, 6, 3), (2, 4, 5), lambda x, w, b: torch_conv_transpose(x, w, b, 1, 2), 1, 4 * 3,
    ),
    "torch-transposed-grouped": (
        "torch-transposed", 2, (4, 3, 3), (2, 4, 5), lambda x, w, b: torch_conv_transpose(x, w, b, 2, 2), 1, 2 * 3,
    ),
    "keras-dense": ("out-last", 1, (7, 5), (4, 7), keras_dense, -1, 7),
    "keras-conv-grouped": (
        "out-last", 1, (3, 2, 6), (3, 9, 4), lambda x, w, b: keras_conv(x, w, b, groups=2), -1, 3 * 2,
    ),
    "keras-transposed": ("keras-transposed", 1, (3, 5, 4), (2, 6, 4), keras_conv_transpose, -1, 3 * 4),
    "keras-depthwise": ("keras-depthwise", 1, (3, 4, 3), (2, 8, 4), keras_depthwise, -1, 3),
}  # fmt: skip


def statistics(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    return {
        "running_mean": rng.normal(0.5, 2.0, channels),
        "running_var": rng.uniform(1e-3, 4.0, channels),
        "gamma": rng.normal(1.0, 1.0, channels),
        "beta": rng.normal(0.0, 1.0, channels),
    }


def along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", list(CASES))
def test_folded_layer_equals_layer_then_batch_norm_in_float64(case: str, with_bias: bool) -> None:
    layout, groups, kernel_shape, input_shape, layer, axis, terms = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    w = rng.normal(size=kernel_shape)
    x = rng.normal(1.0, 2.0, size=input_shape)
    channels = layer(x[:1], w, np.zeros(1)).shape[axis]  # zero bias broadcasts: just the shape
    b = rng.normal(size=channels) if with_bias else None
    s = statistics(rng, channels)
    eps = 1e-3
    # The independent oracle: the layer, then the batch norm's eval formula, in float64.
    z = layer(x, w, np.zeros(channels) if b is None else b)
    ndim = z.ndim
    mu, var, gamma, beta = (along(s[k], axis, ndim) for k in ("running_mean", "running_var", "gamma", "beta"))
    expected = (z - mu) / np.sqrt(var + eps) * gamma + beta

    folded_w, folded_b = fold_weights(w, b, eps=eps, layout=layout, groups=groups, **s)
    assert folded_w.shape == w.shape and folded_w.dtype == np.float64 and folded_b.shape == (channels,)
    got = layer(x, folded_w, folded_b)

    offset = folding_offset(
        s["running_mean"], s["running_var"], eps, gamma=s["gamma"], beta=s["beta"], bias=b
    )
    magnitude = layer(np.abs(x), np.abs(folded_w), offset)  # sum |W'||x| + |s|(|b| + |mu|) + |beta|
    assert_within(np.abs(got - expected), folding_bound(magnitude, terms, "float64"), case)


def test_a_wrong_layout_is_detected_by_the_oracle() -> None:
    """The grouped transposed kernel folded as if its output channels were axis 1 (torch's
    fuse_conv_bn_weights(transpose=True)'s assumption, pytorch#180995) is far outside the bound."""
    layout, groups, kernel_shape, input_shape, layer, _, terms = CASES["torch-transposed-grouped"]
    rng = np.random.default_rng(3)
    w, x = rng.normal(size=kernel_shape), rng.normal(size=input_shape)
    s = statistics(rng, 6)
    right, bias = fold_weights(w, None, eps=1e-5, layout=layout, groups=groups, **s)
    scale = s["gamma"] / np.sqrt(s["running_var"] + 1e-5)
    wrong = w * scale[:3][None, :, None]  # axis 1 taken as the output channel: group 1 gets group 0's scales
    z = layer(x, w, np.zeros(6))
    expected = (z - s["running_mean"][:, None]) * scale[:, None] + s["beta"][:, None]
    offset = folding_offset(s["running_mean"], s["running_var"], 1e-5, gamma=s["gamma"], beta=s["beta"])
    magnitude = layer(np.abs(x), np.abs(right), offset)
    bound = folding_bound(magnitude, terms, "float64")
    assert_within(np.abs(layer(x, right, bias) - expected), bound, "the right layout")
    with pytest.raises(AssertionError, match="outside tolerance"):
        assert_within(np.abs(layer(x, wrong, bias) - expected), bound, "axis 1 as the output channel")


def test_missing_bias_gamma_beta_are_zero_one_zero() -> None:
    rng = np.random.default_rng(5)
    w, mean, var = rng.normal(size=(4, 3)), rng.normal(size=4), rng.uniform(0.5, 2, 4)
    got = fold_weights(w, None, mean, var, None, None, 1e-5, layout="out-first")
    expected = fold_weights(w, np.zeros(4), mean, var, np.ones(4), np.zeros(4), 1e-5, layout="out-first")
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_the_inputs_are_not_changed_and_the_layer_eps_is_used() -> None:
    rng = np.random.default_rng(6)
    w, mean, var = rng.normal(size=(3, 2)), rng.normal(size=3), np.array([1e-6, 1.0, 4.0])
    before = w.copy(), mean.copy(), var.copy()
    kernel, bias = fold_weights(w, None, mean, var, None, None, 1e-5, layout="out-first")
    for a, b in zip(before, (w, mean, var), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(kernel, w / np.sqrt(var + 1e-5)[:, None])  # the same float64 operations
    np.testing.assert_array_equal(bias, -mean / np.sqrt(var + 1e-5))


def test_every_layout_is_listed() -> None:
    assert set(LAYOUTS) == {case[0] for case in CASES.values()}


GOOD = {
    "kernel": np.ones((4, 3)),
    "bias": None,
    "running_mean": np.zeros(4),
    "running_var": np.ones(4),
    "gamma": None,
    "beta": None,
    "eps": 1e-5,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layout": "out_first"}, r"layout='out_first': expected one of 'out-first'"),
        ({"groups": 2}, r"groups=2: only a 'torch-transposed' kernel"),
        ({"groups": 0}, r"groups=0: expected a positive integer"),
        ({"groups": 3, "layout": "torch-transposed", "kernel": np.ones((4, 2, 3))}, r"has 4 input channels"),
        ({"running_mean": np.zeros(3)}, r"running_mean has shape \(3,\): expected \(4,\)"),
        ({"gamma": np.ones((4, 1))}, r"gamma has shape \(4, 1\): expected \(4,\)"),
        ({"bias": np.zeros(5)}, r"bias has shape \(5,\)"),
        ({"running_var": np.array([1.0, np.inf, 1.0, 1.0])}, r"running_var\[1\] is inf: expected finite"),
        ({"beta": np.array([np.nan, 0.0, 0.0, 0.0])}, r"beta\[0\] is nan"),
        ({"running_var": np.array([1.0, 1.0, 0.0, 1.0]), "eps": 0.0}, r"running_var\[2\] \+ eps = 0.0: expected > 0"),
        ({"eps": -1e-5}, r"eps=-1e-05: expected a finite number >= 0"),
        ({"eps": None}, r"eps=None: expected a number"),
        ({"layout": "keras-depthwise", "kernel": np.ones(4)}, r"kernel has shape \(4,\): a 'keras-depthwise' kernel"),
        ({"running_mean": None}, r"running_mean=None: expected 4 values"),
    ],
)  # fmt: skip
def test_bad_input_is_refused(change: dict, message: str) -> None:
    arguments = {**GOOD, "layout": "out-first", **change}
    kernel = arguments.pop("kernel")
    with pytest.raises(ValueError, match=message):
        fold_weights(kernel, **arguments)


class TorchLike:
    """A model whose class says it is a torch module, without torch."""


TorchLike.__module__ = "torch.nn.fake"


def test_fold_dispatches_by_framework_and_names_the_missing_distribution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(TypeError, match=r"torch model; install normkit-torch to fold it"):
        fold(TorchLike())


def test_fold_refuses_normkit_layers_and_other_objects() -> None:
    class Model:
        def __init__(self) -> None:
            self.bn = normkit.BatchNorm(3)

    with pytest.raises(TypeError, match=r"normkit's own BatchNorm layers: they are not attached"):
        fold(Model())
    with pytest.raises(TypeError, match=r"normkit's own BatchNorm layers"):
        fold(normkit.BatchNorm(3))
    with pytest.raises(TypeError, match=r"model is a builtins.list: fold takes PyTorch"):
        fold([1, 2])


def test_the_math_imports_no_framework() -> None:
    code = (
        "import sys, numpy as np\n"
        "from normkit.testtime.fold import fold, fold_weights\n"
        "fold_weights(np.ones((2, 3)), None, np.zeros(2), np.ones(2), None, None, 1e-5, layout='out-first')\n"
        "print(','.join(m for m in ('torch', 'tensorflow', 'keras', 'matplotlib', 'sklearn') if m in sys.modules) or 'none')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "none"
