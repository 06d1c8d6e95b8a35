"""The opt-in pytest plugin of the conformance suite.

Enable it in a backend's ``conftest.py`` with ``pytest_plugins = ["normkit.testing.plugin"]``
(or ``pytest -p normkit.testing.plugin``); it is never loaded automatically.

Options:

``--normkit-device NAME``
    create the suite's arrays on this device (default: the backend's first device).
``--normkit-xfails FILE``
    expected failures, one per line: ``<case id or test name>  # reason``. Entries that match
    no collected test are reported as a warning, so the file cannot go stale silently.
``--normkit-max-examples N``
    hypothesis examples per property test (default 25).
``--normkit-derandomize``
    derandomize hypothesis (recommended in CI: xfails on random tests are otherwise flaky).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

__all__ = ["load_xfails"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("normkit", "normkit conformance suite")
    group.addoption(
        "--normkit-device", dest="normkit_device", default=None, help="device for the suite's arrays"
    )
    group.addoption("--normkit-xfails", dest="normkit_xfails", default=None, help="file of expected failures")
    group.addoption(
        "--normkit-max-examples",
        dest="normkit_max_examples",
        type=int,
        default=25,
        help="hypothesis examples per property test",
    )
    group.addoption(
        "--normkit-derandomize",
        dest="normkit_derandomize",
        action="store_true",
        help="derandomize hypothesis",
    )


def load_xfails(path: str | Path) -> dict[str, str]:
    """Parse an xfail file into ``{id: reason}``; blank lines and ``#`` comments are skipped."""
    entries: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        body, _, reason = line.partition("#")
        name = body.strip()
        if name:
            entries[name] = reason.strip() or "expected failure"
    return entries


def _item_ids(item: pytest.Item) -> set[str]:
    ids = {item.name, item.nodeid}
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        ids.add(callspec.id)
    return ids


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("normkit_xfails")
    if not path:
        return
    xfails = load_xfails(path)
    matched: set[str] = set()
    for item in items:
        for name in _item_ids(item) & set(xfails):
            matched.add(name)
            item.add_marker(pytest.mark.xfail(reason=xfails[name], strict=True))
    unmatched = sorted(set(xfails) - matched)
    if unmatched:
        warnings.warn(
            f"{path}: entries match no collected test: {unmatched}", pytest.PytestWarning, stacklevel=1
        )
