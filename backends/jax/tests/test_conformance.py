"""normkit's conformance suite against this backend: eagerly and with every kernel compiled by
``jax.jit``, each without and with ``jax_enable_x64`` (float64, and int64 counts, exist only with
it; without it counts are int32). Each class sets the flag for its own tests and restores it.

The property tests (hypothesis) run eagerly without x64 and compiled in both modes: eagerly,
every new shape compiles each JAX operation on its own, which makes them the slowest part of the
suite, and the kernels they run eagerly under x64 are the ones the compiled x64 class runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from normkit.testing import ConformanceTests
from normkit_jax.testing import enable_x64, register_jit_backend


@pytest.fixture(scope="module", autouse=True)
def _jit_backend() -> Iterator[None]:
    with register_jit_backend():
        yield


class _X64Off:
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _x64(cls) -> Iterator[None]:
        with enable_x64(False):
            yield


class _X64On:
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _x64(cls) -> Iterator[None]:
        with enable_x64(True):
            yield


class TestJaxEager(_X64Off, ConformanceTests):
    backend = "jax"


class TestJaxJit(_X64Off, ConformanceTests):
    backend = "jax-jit"


class TestJaxEagerX64(_X64On, ConformanceTests):
    backend = "jax"
    # not collected here (see the module docstring)
    test_random_cases_agree_with_the_reference = None
    test_eval_output_of_a_sample_does_not_depend_on_its_batch = None
    test_training_output_of_a_sample_depends_on_its_batch = None
    test_instance_norm_in_training_treats_each_sample_alone = None
    test_merge_of_random_splits_equals_the_whole = None


class TestJaxJitX64(_X64On, ConformanceTests):
    backend = "jax-jit"
