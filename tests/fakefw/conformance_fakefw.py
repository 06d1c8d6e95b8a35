"""The conformance suite as a third-party backend author runs it. Not collected by the main
run: tests/test_plugins.py runs it in a subprocess with this folder on sys.path, so that the
``normkit-fakefw`` entry point is installed there."""

from normkit.testing import ConformanceTests


class TestFakeBackend(ConformanceTests):
    backend = "fakefw"
