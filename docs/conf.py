"""Sphinx configuration: furo, MyST Markdown, and the API rendered from the docstrings."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE / "_scripts"))

import normkit  # noqa: E402

project = "normkit"
author = "the normkit developers"
copyright = "2026, the normkit developers"
release = normkit.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.mathjax", "normkit_cases"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3  # [masks](statistics.md#masks) links to a section
exclude_patterns = ["_build", "_generated/*.md"]
html_theme = "furo"
html_title = f"normkit {release}"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
suppress_warnings = ["myst.header"]


def setup(app):
    """Draw the train/eval figure before the build (with normkit itself)."""
    import train_eval_plot

    target = HERE / "_generated" / "train_eval.png"
    if not target.exists():
        train_eval_plot.main(str(target))
