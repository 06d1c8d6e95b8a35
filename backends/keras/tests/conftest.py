"""The tests run under the Keras backend chosen by ``KERAS_BACKEND`` before Keras is imported
(tox runs them three times: tensorflow, jax, torch). The normkit backend of that framework is
registered here when it is on the path but not installed (``PYTHONPATH=backends/jax/src``): an
installed one registers itself through its entry point."""

from __future__ import annotations

import keras_helpers
import pytest


def pytest_report_header() -> str:
    return f"Keras backend: {keras_helpers.BACKEND}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = keras_helpers.missing_backend()
    if missing:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=missing))
