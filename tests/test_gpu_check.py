"""bench/gpu-check.sh, the prepared GPU run, goes end to end without a GPU: every GPU step is
skipped with the reason (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_skips_every_gpu_step_with_the_reason(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu-check.sh"), "--dry-run"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "dry run: every GPU step skipped: --dry-run was given" in summary
    assert not (tmp_path / "bench.json").exists()
