"""normkit's conformance suite, run against this backend exactly as a third-party author runs it
(`pytest --normkit-xfails xfails.txt` picks up the expected failures; there are none)."""

from normkit.testing import ConformanceTests


class TestTorchBackend(ConformanceTests):
    backend = "torch"
