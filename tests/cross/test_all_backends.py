"""Every installed backend against the reference and each other (what `normkit check` prints),
and gradients compared across frameworks on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from normkit.check import available_backends, run_check
from normkit.testing.tolerances import assert_within, output_tolerance

FIRST_PARTY = ("numpy", "torch", "tensorflow", "jax")


def test_every_installed_backend_passes_and_every_pair_agrees() -> None:
    backends = available_backends()
    missing = [name for name in FIRST_PARTY if name not in backends]
    if missing:
        pytest.skip(f"backends not installed: {missing} (tox -e cross installs them)")
    report = run_check(backends)
    assert report.passed, report.failures()
    assert report.pairs_agree
    for name in FIRST_PARTY:  # every dtype ran on every backend
        assert all(not r.skipped for r in report.results[name]), name


GRADIENT_CASES = [
    # (op, shape, axis or axes, use batch statistics, unbiased running variance)
    ("batch_norm", (5, 3, 4), 1, True, True),
    ("batch_norm", (5, 3, 4), 1, False, True),
    ("batch_norm", (4, 3, 3), 2, True, False),
    ("instance_norm", (3, 2, 5), 1, True, True),
    ("layer_norm", (3, 4, 5), (1, 2), None, None),
    ("layer_norm", (3, 4, 5), (0, 2), None, None),
]


@pytest.mark.parametrize(("op", "shape", "axis", "mode", "unbiased"), GRADIENT_CASES)
def test_tensorflow_and_torch_gradients_agree_in_float64(op, shape, axis, mode, unbiased) -> None:
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    torch_kernels = pytest.importorskip("normkit_torch.kernels")
    tf_kernels = pytest.importorskip("normkit_tensorflow.kernels")
    rng = np.random.default_rng(sum(shape))
    x, g = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
    pshape = tuple(shape[a] for a in axis) if op == "layer_norm" else (shape[axis],)
    w, b = rng.normal(size=pshape), rng.normal(size=pshape)
    rm, rv = rng.normal(size=pshape), rng.uniform(0.5, 2.0, size=pshape)

    def call(kernels, as_tensor, x, w, b):
        if op == "layer_norm":
            return kernels.layer_norm(x, w, b, axis, 1e-5)
        kernel = getattr(kernels, op)
        return kernel(x, w, b, as_tensor(rm), as_tensor(rv), mode, 0.1, 1e-5, axis, unbiased)[0]

    def torch_gradients(x, w, b, g) -> list[np.ndarray]:
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        (call(torch_kernels, torch.tensor, tx, tw, tb) * torch.tensor(g)).sum().backward()
        return [t.grad.numpy() for t in (tx, tw, tb)]

    expected = torch_gradients(x, w, b, g)
    # The suite's float64 bound around torch's gradients, doubled for two implementations, with
    # the conditioning it measures: how far torch's gradients move when every input is
    # perturbed by one ulp (a backward-stable implementation is exact for inputs that close).
    ulp = np.finfo(np.float64).eps
    perturbed = torch_gradients(*(a * (1 + ulp * rng.uniform(-1, 1, size=a.shape)) for a in (x, w, b, g)))
    fx, fw, fb = (tf.constant(a) for a in (x, w, b))
    with tf.GradientTape() as tape:
        tape.watch([fx, fw, fb])
        loss = tf.reduce_sum(call(tf_kernels, tf.constant, fx, fw, fb) * tf.constant(g))
    tolerance = output_tolerance("float64").pairwise()
    for name, e, p, f in zip(
        ("x", "weight", "bias"), expected, perturbed, tape.gradient(loss, [fx, fw, fb]), strict=True
    ):
        bound = tolerance.bound(e, 2 * float(np.abs(p - e).max()))
        error = np.abs(f.numpy() - e)
        assert_within(error, bound, f"{name}")
