"""The spec module: its docstrings are the normative text, and every rule has a case."""

from __future__ import annotations

import inspect
import re

import pytest

from normkit import hookspecs
from normkit.testing.cases import CASES

OPS = tuple(f"normkit_{op}" for op in (*hookspecs.COMPOSITES, *hookspecs.PRIMITIVES))
CASE_IDS = {case.id for case in CASES}


@pytest.mark.parametrize("name", OPS)
def test_each_op_is_a_firstresult_hookspec_with_a_complete_docstring(name: str) -> None:
    function = getattr(hookspecs, name)
    assert function.normkit_spec["firstresult"] is True
    doc = inspect.getdoc(function)
    assert doc is not None
    for parameter in inspect.signature(function).parameters:
        assert f":param {parameter}:" in doc, f"{name}: parameter {parameter} is not documented"
    for section in (".. math::", ":returns:", "Stops at first non-None result", "Conformance:"):
        assert section in doc, f"{name}: missing {section!r}"
    assert not any(
        p.default is not inspect.Parameter.empty for p in inspect.signature(function).parameters.values()
    )


def test_every_case_the_spec_names_exists() -> None:
    named = set(
        re.findall(
            r"``((?:bn|ln|in|gn|rms|moments|normalize|merge)-[a-z0-9-]+\*?)``", hookspecs.__doc__ or ""
        )
    )
    assert len(named) >= 15
    for name in named:
        if name.endswith("*"):
            assert any(case_id.startswith(name[:-1]) for case_id in CASE_IDS), name
        else:
            assert name in CASE_IDS, name


def test_the_spec_states_the_nine_explicit_choices() -> None:
    doc = hookspecs.__doc__ or ""
    for number, topic in enumerate(
        ["Running-statistic update", "Running-variance estimator", "eps", "Eval", "Feature axis and layout",
         "Affine", "Precision", "Degenerate input", "Variance algorithm"], start=1,
    ):  # fmt: skip
        assert f"{number}. **{topic}" in doc


# The cases the core issue requires, by the id that covers each.
REQUIRED = {
    "mean offset |mean|/std >= 1e4 in float32": "bn-offset-1e4",
    "float16 values >= 256": "bn-float16-large-values",
    "one value per channel": "bn-one-value-per-channel",
    "two values per channel": "bn-two-values-per-channel",
    "20 EMA steps": "bn-ema-20-steps",
    "momentum=None over several steps": "bn-cumulative-average",
    "eval after train": "bn-eval-after-train",
    "eval with track_running_stats=False": "bn-eval-untracked",
    "affine off": "bn-affine-off",
    "channels-last": "bn-channels-last",
    "non-contiguous input": "bn-noncontiguous",
    "LayerNorm identical in train and eval": "ln-train-equals-eval",
    "inputs not mutated": "bn-inputs-not-mutated",
    "output dtype equals input dtype": "bn-output-dtype-f16",
    "eval leaves state unchanged": "bn-eval-state-unchanged",
}


@pytest.mark.parametrize("rule", REQUIRED)
def test_required_case_is_present_by_id(rule: str) -> None:
    assert REQUIRED[rule] in CASE_IDS


def test_cases_have_stable_unique_ids_and_a_purpose() -> None:
    assert len(CASE_IDS) == len(CASES)
    for case in CASES:
        assert (
            re.fullmatch(r"(bn|in|ln|gn|rms|moments|normalize|merge)-[a-z0-9.-]+", case.id) and case.purpose
        ), case.id
