r"""Large groups at large offsets under ``jax.jit``, and the passes XLA compiles the training
kernels into.

* Accuracy: groups of 65 536 to 262 144 values at :math:`|\mu|/\sigma = 10^4` in float32 (the
  conformance cases keep every group small), eagerly and compiled, judged by the suite's own
  runner against the float64 reference with its derived bound (which includes the allowance
  :math:`2\epsilon_c|\mu||\gamma|/\sqrt{\sigma^2+\epsilon}` for the rounded mean). The kernels
  compute the variance from :math:`x - \mu` recomputed inside its own reduction (see
  ``kernels._centred``); these cases check that path at sizes the suite does not reach. A
  one-pass :math:`E[x^2] - E[x]^2` fails every one of them; XLA:CPU's own float32 sums are
  accurate enough here that an unshifted two-pass would pass (the shift is for other summation
  orders, and for the constant groups of the conformance suite, which must give exactly β).
* Passes: in the optimized HLO of each training kernel compiled for the CPU, no buffer the size
  of the input is written but the output itself. Sharing one centred tensor between the
  variance's reduction and the output makes XLA:CPU write it out and read it back (one more
  write and read of the input's size: 1.15-1.25x Flax's two-pass layers in issue 17's bench);
  this guards the kernels against that plan coming back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normkit.testing import Case, run_case
from normkit_jax import kernels
from normkit_jax.testing import enable_x64, register_jit_backend

LARGE = [
    Case("bn-nchw-65k-offset-1e4", "batch_norm", (16, 2, 64, 64), loc=1e4),
    Case("bn-nhwc-262k-offset-1e4", "batch_norm", (64, 64, 64, 2), options={"axis": -1}, loc=1e4),
    Case("bn1d-65k-offset-1e4", "batch_norm", (65536, 3), loc=1e4),
    Case(
        "in-nchw-65k-offset-1e4",
        "instance_norm",
        (2, 2, 256, 256),
        options={"track_running_stats": True},
        loc=1e4,
    ),
    Case("ln-262k-offset-1e4", "layer_norm", (2, 262144), options={"normalized_shape": 262144}, loc=1e4),
    Case(
        "gn-nhwc-65k-offset-1e4",
        "group_norm",
        (2, 64, 64, 32),
        options={"num_groups": 2, "axis": -1},
        loc=1e4,
    ),
    Case("gn-nchw-65k-offset-1e4", "group_norm", (2, 32, 64, 64), options={"num_groups": 2}, loc=1e4),
    Case("moments-65k-offset-1e4", "moments", (16, 2, 64, 64), loc=1e4),
]


@pytest.fixture(scope="module", autouse=True)
def _backends() -> Iterator[None]:
    with enable_x64(False), register_jit_backend():
        yield


@pytest.mark.parametrize("backend", ["jax", "jax-jit"])
@pytest.mark.parametrize("case", LARGE, ids=lambda case: case.id)
def test_large_groups_at_offset_1e4_stay_within_the_suites_bound(case: Case, backend: str) -> None:
    result = run_case(case, backend)
    assert result.passed, result.report()


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\{[^}]*\} (\S+?)\(")


def _full_size_buffers(hlo: str, size: int) -> list[str]:
    """The instructions of the entry computation of ``hlo`` (optimized HLO text) that produce an
    array of ``size`` elements, other than parameters and bitcasts (a bitcast is a view, not a
    buffer): each is a buffer of the input's size written by one pass."""
    entry = hlo[hlo.index("\nENTRY ") :]
    found = []
    for line in entry.splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        dims, opcode = match.group(2), match.group(3)
        elements = int(np.prod([int(d) for d in dims.split(",")])) if dims else 1
        if elements == size and opcode not in ("parameter", "bitcast"):
            found.append(line.strip().split(", metadata=")[0])
    return found


def _params(channels: int) -> dict[str, jax.Array]:
    return {
        "weight": jnp.full((channels,), 1.5, jnp.float32),
        "bias": jnp.full((channels,), 0.5, jnp.float32),
        "running_mean": jnp.zeros((channels,), jnp.float32),
        "running_var": jnp.ones((channels,), jnp.float32),
    }


def _batch_norm(axis: int) -> Callable[[jax.Array, dict[str, jax.Array]], Any]:
    def run(x: jax.Array, p: dict[str, jax.Array]) -> Any:
        return kernels.batch_norm(
            x, p["weight"], p["bias"], p["running_mean"], p["running_var"], True, 0.1, 1e-5, axis, True
        )

    return run


def _instance_norm(x: jax.Array, p: dict[str, jax.Array]) -> Any:
    return kernels.instance_norm(
        x, p["weight"], p["bias"], p["running_mean"], p["running_var"], True, 0.1, 1e-5, 1, True
    )


def _group_norm(axis: int) -> Callable[[jax.Array, dict[str, jax.Array]], Any]:
    return lambda x, p: kernels.group_norm(x, 4, p["weight"], p["bias"], 1e-5, axis)


def _layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> Any:
    return kernels.layer_norm(x, p["weight"], p["bias"], (x.ndim - 1,), 1e-5)


def _moments(x: jax.Array, p: dict[str, jax.Array]) -> Any:
    return kernels.moments(x, (0, 2, 3), None, None, None)


# (name, kernel, input shape, channels of the parameters, buffers of the input's size: the output)
PLANS = [
    ("bn-nchw", _batch_norm(1), (8, 16, 24, 24), 16, 1),
    ("bn-nhwc", _batch_norm(3), (8, 24, 24, 16), 16, 1),
    ("bn1d", _batch_norm(1), (512, 64), 64, 1),
    ("in-nchw", _instance_norm, (8, 16, 24, 24), 16, 1),
    ("gn-nchw", _group_norm(1), (8, 16, 24, 24), 16, 1),
    ("gn-nhwc", _group_norm(3), (8, 24, 24, 16), 16, 1),
    ("ln", _layer_norm, (64, 512), 512, 1),
    ("moments", _moments, (8, 16, 24, 24), 16, 0),
]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's plan")
@pytest.mark.parametrize(
    ("name", "kernel", "shape", "channels", "expected"), PLANS, ids=[p[0] for p in PLANS]
)
def test_training_writes_no_temporary_of_the_inputs_size(
    name: str, kernel: Callable[..., Any], shape: tuple[int, ...], channels: int, expected: int
) -> None:
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    hlo = jax.jit(kernel).lower(x, _params(channels)).compile().as_text()
    buffers = _full_size_buffers(hlo, x.size)
    assert len(buffers) == expected, f"{name}: {len(buffers)} buffers of x's size:\n" + "\n".join(buffers)
