"""The conformance suite on the built-in NumPy backend: what any backend runs on itself."""

from normkit.testing import ConformanceTests


class TestNumpyBackend(ConformanceTests):
    backend = "numpy"
