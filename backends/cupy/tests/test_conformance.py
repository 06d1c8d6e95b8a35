"""normkit's conformance suite on the GPU (skipped, with the reason, without a CUDA device)."""

import pytest
from gpu import unavailable

from normkit.testing import ConformanceTests

REASON = unavailable()
if REASON:
    pytest.skip(REASON, allow_module_level=True)


class TestCuPyBackend(ConformanceTests):
    backend = "cupy"
