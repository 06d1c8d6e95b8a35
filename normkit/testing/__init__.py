"""normkit's conformance suite: every backend, first- or third-party, checks itself with it.

* :data:`~normkit.testing.cases.CASES` and :func:`get_case`: the case records, with stable ids;
* :func:`run_case`: play one case on a backend against the float64 reference (needs only
  NumPy; ``normkit check`` uses it);
* :class:`ConformanceTests`: the pytest base class a backend subclasses in a few lines (needs
  the ``testing`` extra: pytest and hypothesis);
* :func:`wrapped_backend`: a backend's kernels wrapped by a transformation (``jax.jit``,
  ``tf.function``) as a plugin of their own, for the suite to check the transformed kernels;
* ``normkit.testing.plugin``: the opt-in pytest plugin (options, xfail files).

``import normkit`` never imports this package.
"""

from typing import Any

from normkit.testing.cases import CASES, Case, get_case
from normkit.testing.runner import CaseResult, run_case
from normkit.testing.wrapped import wrapped_backend

__all__ = ["CASES", "Case", "CaseResult", "ConformanceTests", "get_case", "run_case", "wrapped_backend"]


def __getattr__(name: str) -> Any:
    if name == "ConformanceTests":  # imported on demand: it needs pytest and hypothesis
        import pytest

        pytest.register_assert_rewrite("normkit.testing.suite")
        from normkit.testing.suite import ConformanceTests

        return ConformanceTests
    raise AttributeError(f"module 'normkit.testing' has no attribute {name!r}")
