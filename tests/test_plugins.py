"""Backends installed as distributions: discovered by entry point, loaded lazily, blockable.

Each test runs in a fresh interpreter with ``tests/fakefw`` on ``sys.path``; that folder holds
a stand-in framework (``fakefw``) and its backend distribution (``normkit-fakefw``, entry point
``fakefw`` in the ``normkit.backends`` group), installed exactly as a third party would ship it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

FAKEFW = Path(__file__).parent / "fakefw"
REPO = Path(__file__).parent.parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKEFW), str(REPO)]), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def assert_ok(process: subprocess.CompletedProcess[str]) -> str:
    assert process.returncode == 0, process.stderr
    return process.stdout


def test_backend_loads_only_after_its_framework_is_imported() -> None:
    out = assert_ok(
        run_python("""
            import sys, numpy as np, normkit
            normkit.batch_norm(np.ones((4, 3)), np.zeros(3), np.ones(3), training=True)
            print("before:", "fakefw" in sys.modules, "normkit_fakefw" in sys.modules)
            import fakefw
            x = fakefw.Array(np.arange(12.0).reshape(4, 3))
            y, mean, var = normkit.batch_norm(x, fakefw.Array(np.zeros(3)), fakefw.Array(np.ones(3)), training=True)
            print("after:", type(y).__name__, "normkit_fakefw" in sys.modules, mean.data.round(2).tolist())
        """)
    )
    assert "before: False False" in out
    assert "after: Array True [0.45, 0.55, 0.65]" in out


def test_blocked_backend_is_not_loaded_and_the_error_says_why() -> None:
    out = assert_ok(
        run_python(
            """
            import sys, numpy as np, normkit, fakefw
            try:
                normkit.layer_norm(fakefw.Array(np.ones((2, 3))))
            except normkit.NoBackendError as error:
                print("error:", error)
            print("loaded:", "normkit_fakefw" in sys.modules)
            """,
            NORMKIT_BLOCK_BACKENDS="tensorflow, fakefw",
        )
    )
    assert "blocked by NORMKIT_BLOCK_BACKENDS" in out and "normkit-fakefw" in out
    assert "loaded: False" in out


def test_disabled_autoload_loads_nothing_until_registered_by_hand() -> None:
    out = assert_ok(
        run_python(
            """
            import numpy as np, normkit, fakefw
            x = fakefw.Array(np.ones((2, 3)))
            try:
                normkit.layer_norm(x)
            except normkit.NoBackendError as error:
                print("error:", error)
            import normkit_fakefw
            normkit.register_backend(normkit_fakefw, "fakefw")
            print("after:", type(normkit.layer_norm(x)).__name__)
            """,
            NORMKIT_DISABLE_PLUGIN_AUTOLOAD="1",
        )
    )
    assert "NORMKIT_DISABLE_PLUGIN_AUTOLOAD disables autoloading" in out
    assert "after: Array" in out


def test_mixed_array_types_are_rejected_naming_both() -> None:
    out = assert_ok(
        run_python("""
            import numpy as np, normkit, fakefw
            try:
                normkit.batch_norm(fakefw.Array(np.ones((4, 3))), training=True, weight=np.ones(3))
            except TypeError as error:
                print("error:", error)
        """)
    )
    assert "weight is a numpy.ndarray but x is a fakefw.Array" in out


def test_info_lists_the_installed_backend_without_importing_its_framework() -> None:
    out = assert_ok(
        run_python("""
            import sys
            from normkit.cli import main
            main(["info"])
            print("imported:", "fakefw" in sys.modules, "normkit_fakefw" in sys.modules)
        """)
    )
    assert (
        "fakefw" in out
        and "normkit-fakefw 0.1.0" in out
        and "installed; loads when fakefw is imported" in out
    )
    assert "imported: False False" in out


def test_check_runs_every_installed_backend_and_prints_the_pairwise_matrix() -> None:
    out = assert_ok(
        run_python("""
            from normkit.cli import main
            raise SystemExit(main(["check"]))
        """)
    )
    assert "numpy  (error nearest its tolerance)" in out and "fakefw  (error nearest its tolerance)" in out
    assert "numpy vs fakefw" in out
    assert "every case passes on every backend" in out


def test_a_third_party_backend_passes_the_conformance_suite() -> None:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKEFW), str(REPO)])}
    process = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(FAKEFW / "conformance_fakefw.py")],
        capture_output=True, text=True, env=environment, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout + process.stderr
    assert " passed" in process.stdout and "failed" not in process.stdout


def test_a_broken_backend_is_skipped_with_a_warning_and_numpy_keeps_working(tmp_path: Path) -> None:
    dist = tmp_path / "normkit_broken-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: normkit-broken\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[normkit.backends]\npluggy = module_that_does_not_exist\n"
    )  # normkit imports pluggy
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    code = """
        import warnings, numpy as np, normkit
        from normkit.cli import main
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, _, _ = normkit.batch_norm(np.ones((4, 3)), training=True)
        print("worked:", y.shape, [str(w.message) for w in caught])
        main(["info"])
    """
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    out = assert_ok(process)
    assert (
        "worked: (4, 3)" in out
        and "normkit backend 'pluggy' (module_that_does_not_exist) failed to load" in out
    )
    assert "failed to load: ModuleNotFoundError" in out


def test_blocking_the_numpy_backend() -> None:
    out = assert_ok(
        run_python(
            """
            import numpy as np, normkit
            from normkit.cli import main
            try:
                normkit.layer_norm(np.ones((2, 3)))
            except normkit.NoBackendError as error:
                print("error:", error)
            main(["info"])
            """,
            NORMKIT_BLOCK_BACKENDS="numpy",
        )
    )
    assert "error: no normkit backend handles arrays of type numpy.ndarray: backend 'numpy' is blocked" in out
    numpy_row = next(line for line in out.splitlines() if re.match(r"numpy +normkit", line))
    assert "blocked by NORMKIT_BLOCK_BACKENDS" in numpy_row


def test_the_autoload_switch_reads_like_a_boolean() -> None:
    for value, autoload in (
        ("1", False),
        ("true", False),
        ("on", False),
        ("0", True),
        ("false", True),
        ("", True),
    ):
        out = assert_ok(
            run_python("from normkit.cli import main; main(['info'])", NORMKIT_DISABLE_PLUGIN_AUTOLOAD=value)
        )
        assert f"autoload: {'on' if autoload else 'off'}" in out, value
