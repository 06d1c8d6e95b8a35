"""Autograd through the torch backend, checked three independent ways in float64:

* ``torch.autograd.gradcheck`` (finite differences of the kernels themselves) for every op, in
  training and eval, channels-first and channels-last, with either running-variance estimator;
* the gradients of ``torch.nn``'s own layers (``BatchNorm2d``, ``InstanceNorm2d``, ``LayerNorm``),
  within the suite's float64 bound around them (they are in fact identical: the same ATen ops);
* central finite differences of the float64 NumPy oracle, :mod:`normkit.reference`, within the
  truncation and rounding error of the differences.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import normkit
import normkit_torch
from normkit import reference
from normkit.testing.tolerances import (
    assert_within,
    centering_gain,
    normalization_gradient_tolerances,
    normalized_by,
    output_tolerance,
    training_tolerance,
)
from normkit_torch import kernels

F64 = torch.float64
EPS = 1e-5


def _rand(shape: tuple[int, ...], seed: int, *, grad: bool = True, low: float | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=F64)
    if low is not None:  # positive values, e.g. a running variance
        t = t.abs() + low
    return t.requires_grad_(grad)


# --------------------------------------------------------------------------------------------
# a. gradcheck of the kernels, w.r.t. x, weight and bias
# --------------------------------------------------------------------------------------------

BATCH_NORM_CASES = [
    # (shape, axis, training, unbiased_running_var, with running stats)
    pytest.param((3, 2, 4), 1, True, True, True, id="train"),
    pytest.param((4, 3, 2, 2), 1, True, True, True, id="train-4d"),
    pytest.param((3, 2, 4), 1, True, True, False, id="train-no-running-stats"),
    pytest.param((3, 2, 4), 1, True, False, True, id="train-biased-var"),
    pytest.param((4, 3, 2), 2, True, True, True, id="train-channels-last"),
    pytest.param((4, 3, 2), 2, True, False, True, id="train-channels-last-biased-var"),
    pytest.param((4, 3, 2), 0, True, True, True, id="train-axis0"),
    pytest.param((3, 2, 4), 1, False, True, True, id="eval"),
    pytest.param((4, 3, 2, 2), 1, False, True, True, id="eval-4d"),
    pytest.param((4, 3, 2), 2, False, False, True, id="eval-channels-last"),
]


@pytest.mark.parametrize(("shape", "axis", "training", "unbiased", "stats"), BATCH_NORM_CASES)
def test_gradcheck_batch_norm(
    shape: tuple[int, ...], axis: int, training: bool, unbiased: bool, stats: bool
) -> None:
    c = shape[axis]
    x, w, b = _rand(shape, 0), _rand((c,), 1), _rand((c,), 2)
    rm = _rand((c,), 3, grad=False) if stats else None
    rv = _rand((c,), 4, grad=False, low=0.5) if stats else None
    rm0 = None if rm is None else rm.clone()
    rv0 = None if rv is None else rv.clone()

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return kernels.batch_norm(x, w, b, rm, rv, training, 0.1, EPS, axis, unbiased)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    if stats:  # the kernel is pure: the caller's running statistics are never written
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize(
    ("shape", "axis", "use_input_stats", "unbiased", "stats"),
    [
        pytest.param((3, 2, 4), 1, True, True, True, id="input-stats"),
        pytest.param((2, 3, 2, 2), 1, True, True, True, id="input-stats-4d"),
        pytest.param((3, 2, 4), 1, True, True, False, id="input-stats-no-running-stats"),
        pytest.param((3, 2, 4), 1, True, False, True, id="input-stats-biased-var"),
        pytest.param((3, 4, 2), 2, True, True, True, id="input-stats-channels-last"),
        pytest.param((3, 2, 4), 1, False, True, True, id="running-stats"),
        pytest.param((3, 4, 2), 2, False, True, True, id="running-stats-channels-last"),
    ],
)
def test_gradcheck_instance_norm(
    shape: tuple[int, ...], axis: int, use_input_stats: bool, unbiased: bool, stats: bool
) -> None:
    c = shape[axis]
    x, w, b = _rand(shape, 10), _rand((c,), 11), _rand((c,), 12)
    rm = _rand((c,), 13, grad=False) if stats else None
    rv = _rand((c,), 14, grad=False, low=0.5) if stats else None

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return kernels.instance_norm(x, w, b, rm, rv, use_input_stats, 0.1, EPS, axis, unbiased)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        pytest.param((3, 2, 4), (2,), id="last"),
        pytest.param((3, 2, 4), (1, 2), id="trailing-2"),
        pytest.param((2, 3, 2, 2), (1, 2, 3), id="trailing-3"),
        pytest.param((3, 2, 4), (0, 2), id="non-trailing-0-2"),
        pytest.param((3, 2, 4), (1,), id="non-trailing-1"),
        pytest.param((3, 2, 4), (0, 1, 2), id="all"),
    ],
)
def test_gradcheck_layer_norm(shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
    pshape = tuple(shape[a] for a in axes)
    x, w, b = _rand(shape, 20), _rand(pshape, 21), _rand(pshape, 22)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, w, b, axes, EPS)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_gradcheck_public_ops(training: bool, estimator: str) -> None:
    """The public functions dispatch torch tensors to the kernels and keep the autograd graph."""
    x, w, b = _rand((3, 2, 4), 30), _rand((2,), 31), _rand((2,), 32)
    rm, rv = _rand((2,), 33, grad=False), _rand((2,), 34, grad=False, low=0.5)
    w_ln, b_ln = _rand((2, 4), 35), _rand((2, 4), 36)

    def bn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = normkit.batch_norm(
            x, rm, rv, w, b, training=training, momentum=0.1, eps=EPS, axis=1, running_var_estimator=estimator
        )
        return out[0] if isinstance(out, tuple) else out

    def inorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = normkit.instance_norm(
            x, rm, rv, w, b, use_input_stats=training, momentum=0.1, eps=EPS, running_var_estimator=estimator
        )
        return out[0] if isinstance(out, tuple) else out

    def ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return normkit.layer_norm(x, (2, 4), w, b, eps=EPS)

    assert torch.autograd.gradcheck(bn, (x, w, b))
    assert torch.autograd.gradcheck(inorm, (x, w, b))
    assert torch.autograd.gradcheck(ln, (x, w_ln, b_ln))


# --------------------------------------------------------------------------------------------
# b. the gradients of torch.nn's layers, to 1e-10
# --------------------------------------------------------------------------------------------


def _randomize(ours: nn.Module, theirs: nn.Module, seed: int) -> None:
    """The same random parameters and running statistics in both layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in theirs.named_buffers():
            if name == "running_var":
                buf.copy_(torch.rand(buf.shape, generator=g, dtype=buf.dtype) + 0.5)
            elif name == "running_mean":
                buf.copy_(torch.randn(buf.shape, generator=g, dtype=buf.dtype))
    ours.load_state_dict(theirs.state_dict())


def _forward_backward(
    layer: nn.Module, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return y.detach(), grads


def _results(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """y, the gradients and the buffers after one forward and backward pass of ``layer``."""
    y, grads = _forward_backward(layer, x, g)
    return {"y": y, **grads, **{name: b.clone() for name, b in layer.named_buffers()}}


def _assert_same_gradients(ours: nn.Module, theirs: nn.Module, shape: tuple[int, ...], seed: int) -> None:
    """ours and torch.nn's results within the suite's float64 bound around torch.nn's, doubled
    (two implementations): ``2r|e| + 2r + K*Delta``, with Delta how far torch.nn's results move
    when x and the upstream gradient are perturbed by one ulp (the conditioning the suite
    measures: a backward-stable implementation is exact for inputs that close)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64) * 2.0 + 0.5
    g = torch.randn(shape, generator=gen, dtype=F64)
    ulp = 2.0**-52 * (2 * torch.rand(shape, generator=gen, dtype=F64) - 1)
    perturbed = _results(copy.deepcopy(theirs), x * (1 + ulp), g * (1 - ulp))
    got, expected = _results(ours, x, g), _results(theirs, x, g)
    assert got.keys() == expected.keys() and {"x", "weight", "bias"} <= got.keys()
    tolerance = output_tolerance("float64").pairwise()
    for name, e in expected.items():
        if name == "num_batches_tracked":
            assert torch.equal(got[name], e)
            continue
        assert got[name] is not None and e is not None, name
        if name in ("x", "weight", "bias"):
            assert e.abs().max() > 1e-3, name  # a gradient worth comparing
        conditioning = float((perturbed[name] - e).abs().max())
        bound = tolerance.bound(e.numpy(), 2 * conditioning)
        error = (got[name] - e).abs().numpy()
        assert_within(error, bound, f"{name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batch_norm2d_gradients_match_torch_nn(training: bool, momentum: float | None) -> None:
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(3, momentum=momentum, dtype=F64)
    ours = normkit_torch.BatchNorm2d(3, momentum=momentum, dtype=F64)
    _randomize(ours, theirs, seed=1)
    ours.train(training)
    theirs.train(training)
    _assert_same_gradients(ours, theirs, (4, 3, 3, 2), seed=2)


def test_batch_norm1d_gradients_match_torch_nn() -> None:
    theirs = nn.BatchNorm1d(5, dtype=F64)
    ours = normkit_torch.BatchNorm1d(5, dtype=F64)
    _randomize(ours, theirs, seed=3)
    _assert_same_gradients(ours, theirs, (6, 5), seed=4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_instance_norm2d_gradients_match_torch_nn(training: bool, track: bool) -> None:
    theirs = nn.InstanceNorm2d(3, affine=True, track_running_stats=track, dtype=F64)
    ours = normkit_torch.InstanceNorm2d(3, affine=True, track_running_stats=track, dtype=F64)
    _randomize(ours, theirs, seed=5)
    ours.train(training)
    theirs.train(training)
    _assert_same_gradients(ours, theirs, (2, 3, 3, 4), seed=6)


@pytest.mark.parametrize("normalized_shape", [(4,), (3, 4)], ids=["1d", "2d"])
def test_layer_norm_gradients_match_torch_nn(normalized_shape: tuple[int, ...]) -> None:
    theirs = nn.LayerNorm(normalized_shape, dtype=F64)
    ours = normkit_torch.LayerNorm(normalized_shape, dtype=F64)
    _randomize(ours, theirs, seed=7)
    _assert_same_gradients(ours, theirs, (2, 5, 3, 4), seed=8)


def test_layer_gradients_accumulate_like_torch_nn() -> None:
    """Two backward passes through a training step accumulate into .grad as torch.nn's do."""
    theirs = nn.BatchNorm2d(2, dtype=F64)
    ours = normkit_torch.BatchNorm2d(2, dtype=F64)
    _randomize(ours, theirs, seed=9)
    ours_copy, theirs_copy, perturbed = copy.deepcopy(ours), copy.deepcopy(theirs), copy.deepcopy(theirs)
    gen = torch.Generator().manual_seed(10)
    xs = [torch.randn(3, 2, 2, 2, generator=gen, dtype=F64) for _ in range(2)]
    for layer, inputs in (
        (ours_copy, xs),
        (theirs_copy, xs),
        (
            perturbed,
            [x * (1 + 2.0**-52 * (2 * torch.rand(x.shape, generator=gen, dtype=F64) - 1)) for x in xs],
        ),
    ):
        for x in inputs:
            (layer(x) ** 2).sum().backward()
    tolerance = output_tolerance("float64").pairwise()  # as in _assert_same_gradients
    for (name, p), q in zip(theirs_copy.named_parameters(), perturbed.parameters(), strict=True):
        bound = tolerance.bound(p.grad.numpy(), 2 * float((q.grad - p.grad).abs().max()))
        error = (dict(ours_copy.named_parameters())[name].grad - p.grad).abs().numpy()
        assert_within(error, bound, f"{name}")


# --------------------------------------------------------------------------------------------
# c. central finite differences of the float64 reference
# --------------------------------------------------------------------------------------------

FD_STEP = 1e-6  # central differences in float64; their error bound: normalization_gradient_tolerances


def _finite_difference(loss, arrays: list[np.ndarray]) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """∂loss/∂a for each array a, by central differences of ``loss(*arrays)``, one element at a time."""
    grads = []
    for k, a in enumerate(arrays):
        grad = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [arr.copy() for arr in arrays]
            minus = [arr.copy() for arr in arrays]
            plus[k][idx] += FD_STEP
            minus[k][idx] -= FD_STEP
            grad[idx] = (loss(*plus) - loss(*minus)) / (2 * FD_STEP)
        grads.append(grad)
    return grads


def _autograd(f, arrays: list[np.ndarray], g: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:  # type: ignore[no-untyped-def]
    tensors = [torch.tensor(a, dtype=F64, requires_grad=True) for a in arrays]
    y = f(*tensors)
    y.backward(torch.tensor(g, dtype=F64))
    return y.detach().numpy(), [t.grad.numpy() for t in tensors]


FD_CASES = [
    # (seed, op, shape, axis or axes, training / use_input_stats, unbiased_running_var)
    pytest.param(40, "batch_norm", (4, 3, 2), 1, True, True, id="batch_norm-train"),
    pytest.param(41, "batch_norm", (4, 3, 2), 1, False, True, id="batch_norm-eval"),
    pytest.param(42, "batch_norm", (4, 2, 3), 2, True, False, id="batch_norm-train-keras-channels-last"),
    pytest.param(43, "instance_norm", (2, 3, 4), 1, True, True, id="instance_norm-train"),
    pytest.param(44, "instance_norm", (2, 3, 4), 1, False, True, id="instance_norm-eval"),
    pytest.param(45, "layer_norm", (2, 3, 4), (1, 2), None, None, id="layer_norm-trailing"),
    pytest.param(46, "layer_norm", (3, 2, 4), (0, 2), None, None, id="layer_norm-non-trailing"),
]


@pytest.mark.parametrize(("seed", "op", "shape", "axis", "mode", "unbiased"), FD_CASES)
def test_gradients_match_finite_differences_of_reference(
    seed: int,
    op: str,
    shape: tuple[int, ...],
    axis: int | tuple[int, ...],
    mode: bool | None,
    unbiased: bool | None,
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 1.5, size=shape)
    g = rng.normal(size=shape)
    momentum = 0.1
    if op == "layer_norm":
        assert isinstance(axis, tuple)
        pshape = tuple(shape[a] for a in axis)
    else:
        assert isinstance(axis, int)
        pshape = (shape[axis],)
    w = rng.normal(size=pshape)
    b = rng.normal(size=pshape)
    rm = rng.normal(size=pshape)
    rv = rng.uniform(0.5, 2.0, size=pshape)
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)

    if op in ("batch_norm", "instance_norm"):
        reference_op, kernel = getattr(reference, op), getattr(kernels, op)
        flag = "training" if op == "batch_norm" else "use_input_stats"

        def ref(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
            return reference_op(
                x, w, b, rm, rv, **{flag: mode}, momentum=momentum, eps=EPS, axis=axis,
                unbiased_running_var=unbiased,
            )[0]  # fmt: skip

        def ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return kernel(x, w, b, rm_t, rv_t, mode, momentum, EPS, axis, unbiased)[0]

    else:

        def ref(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
            return reference.layer_norm(x, w, b, axes=axis, eps=EPS)

        def ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return kernels.layer_norm(x, w, b, axis, EPS)

    def loss(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum(g * ref(x, w, b)))

    y, autograd = _autograd(ours, [x, w, b], g)
    by = normalized_by(op, x, w, b, axis=axis, training=mode, running_mean=rm, running_var=rv, eps=EPS)
    gain = centering_gain(by.mean, by.std**2, 0.0, np.abs(by.weight).max())
    tolerance = output_tolerance("float64", centering_gain=gain)
    np.testing.assert_allclose(y, ref(x, w, b), **tolerance.kwargs)  # the same function, first
    numeric = _finite_difference(loss, [x, w, b])
    tolerances = normalization_gradient_tolerances(
        x, by.weight, by.bias, g, by.mean, by.std, batch_statistics=by.batch_statistics, step=FD_STEP
    )
    for name, a, n, (rtol, atol) in zip(("x", "weight", "bias"), autograd, numeric, tolerances, strict=True):
        assert np.abs(n).max() > 1e-2, name  # a gradient worth comparing
        np.testing.assert_allclose(a, n, rtol=rtol, atol=atol, err_msg=name)
    if op == "batch_norm" and mode:  # with batch statistics ∂L/∂x sums to 0 over each channel
        others = tuple(i for i in range(len(shape)) if i != axis)
        # rounding only: each term of (γ/s)(g - mean g - x̂ mean(g x̂)) and the sum over the channel
        # (4 reductions of at most x.size terms), relative to the terms' magnitudes
        u = np.abs(g * by.weight)
        xhat = np.abs((x - by.mean) / by.std)
        sizes = (
            u + u.mean(axis=others, keepdims=True) + xhat * (u * xhat).mean(axis=others, keepdims=True)
        ) / by.std
        scale = float(sizes.sum(axis=others).max())
        atol = training_tolerance("float64", steps=0, reduction_size=4 * x.size, scale=scale).atol
        np.testing.assert_allclose(autograd[0].sum(axis=others), 0.0, atol=atol)
