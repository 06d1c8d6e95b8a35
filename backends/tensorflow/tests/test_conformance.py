"""normkit's conformance suite against this backend: eagerly, and with every kernel traced by
``tf.function`` (the graph a Keras model runs) and compiled by XLA (``jit_compile=True``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from normkit.testing import ConformanceTests
from normkit_tensorflow.testing import register_function_backends


@pytest.fixture(scope="module", autouse=True)
def _function_backends() -> Iterator[None]:
    with register_function_backends():
        yield


class TestTensorFlowEager(ConformanceTests):
    backend = "tensorflow"


class TestTensorFlowFunction(ConformanceTests):
    backend = "tensorflow-function"


class TestTensorFlowXLA(ConformanceTests):
    backend = "tensorflow-xla"
