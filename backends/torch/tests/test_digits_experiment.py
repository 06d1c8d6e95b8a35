"""The digits experiment (normkit_torch.experiments.digits): each corruption does exactly what its
docstring says (against independent float64 formulas and scipy.ndimage), the split is a function
of the seed, and the papers' qualitative findings hold on seeds 0-4 with margins set from the
spread measured over seeds 0-9:

(a) AdaBN recovers most of the accuracy lost to contrast and brightness shifts (Li et al. 2016;
    Schneider et al. 2020);
(b) at test batch size 2, prediction-time BN loses clean accuracy that prior mixing with N=16
    keeps (Schneider et al. 2020);
(c) label-sorted test batches break prediction-time BN (e.g. Doebler's benchmark; TEMA).

On one machine and thread count the run is deterministic; elsewhere, other rounding in the
kernels perturbs the training like another seed would. So each threshold is the ten-seed mean
minus (or plus) four sample standard deviations, rounded towards the weaker claim, and must
still lie on the claim's side; the measured values are in the comments.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from normkit.testing.tolerances import EPS, reduction_growth
from normkit_torch.experiments import digits

SEEDS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def has_sklearn() -> None:
    """The data set ships with scikit-learn: without it, the tests that need the data skip."""
    pytest.importorskip("sklearn", reason="the digits experiment needs scikit-learn (load_digits)")


def images(seed: int, shape: tuple[int, ...] = (5, 1, 8, 8)) -> np.ndarray:
    """Float64 images in the data range with exact 0s and 1s among them."""
    x = np.random.default_rng(seed).random(shape)
    x.flat[:3] = (0.0, 1.0, 0.5)
    return x


# --- corruptions: what their docstrings say ---


def test_gaussian_noise_adds_sigma_times_the_generators_normals_then_clips() -> None:
    x = images(1)
    got = digits.gaussian_noise(x, 0.3, np.random.default_rng(7))
    z = np.random.default_rng(7).standard_normal(x.shape)  # the docstring's one draw, C order
    expected = np.minimum(np.maximum(x + 0.3 * z, 0.0), 1.0)
    np.testing.assert_array_equal(got, expected)  # one rounding (x + 0.3z) on both sides
    assert got.min() == 0.0 and got.max() == 1.0  # the clip acted (sigma 0.3 pushes values out)
    np.testing.assert_array_equal(digits.gaussian_noise(x, 0.0, np.random.default_rng(7)), x)
    x32 = x.astype(np.float32)
    out32 = digits.gaussian_noise(x32, 0.3, np.random.default_rng(7))
    assert out32.dtype == np.float32 and out32.shape == x32.shape


def test_impulse_noise_replaces_pixels_below_p_by_0_or_1() -> None:
    x = images(2, (40, 1, 8, 8))
    p = 0.3
    got = digits.impulse_noise(x, p, np.random.default_rng(3))
    u = np.random.default_rng(3).random(x.shape)
    expected = np.where(u < p / 2, 0.0, np.where(u < p, 1.0, x))
    np.testing.assert_array_equal(got, expected)
    # without knowing the draws: on grey images (0.5) every replaced pixel shows; the counts of 0s
    # and 1s are Binomial(size, p/2) each: within 6 standard deviations (a correct implementation
    # fails with a chance of 2e-9 each)
    grey = digits.impulse_noise(np.full(x.shape, 0.5), p, np.random.default_rng(4))
    assert set(np.unique(grey)) == {0.0, 0.5, 1.0}
    for value in (0.0, 1.0):
        count = int((grey == value).sum())
        assert abs(count - p / 2 * grey.size) <= 6 * math.sqrt(grey.size * p / 2 * (1 - p / 2)), (
            value,
            count,
        )
    np.testing.assert_array_equal(digits.impulse_noise(x, 0.0, np.random.default_rng(3)), x)
    assert set(np.unique(digits.impulse_noise(x, 1.0, np.random.default_rng(3)))) <= {0.0, 1.0}
    np.testing.assert_array_equal(x, images(2, (40, 1, 8, 8)))  # input untouched


def per_image_affine(x: np.ndarray, c: float) -> np.ndarray:
    """m + c(x - m) image by image, the mean by math.fsum (correctly rounded), in Python floats."""
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-2]):
        pixels = [float(v) for v in x[idx].ravel()]
        m = math.fsum(pixels) / len(pixels)
        out[idx] = np.array([m + c * (v - m) for v in pixels]).reshape(x.shape[-2:])
    return out


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0, 2.5])
def test_contrast_is_an_affine_map_around_each_images_mean_clipped_to_the_range(c: float) -> None:
    x = images(4)
    got = digits.contrast(x, c)
    # the mean is a sum of 64 terms (error sqrt(64) eps max|x|, reduction_growth), then the
    # subtraction, product and sum round once each (eps max|x| each)
    bound = (reduction_growth(x[0, 0].size) + 3) * EPS["float64"] * float(np.abs(x).max())
    expected = np.clip(per_image_affine(x, c), 0.0, 1.0)
    assert float(np.abs(got - expected).max()) <= bound
    if c <= 1.0:  # inside the range: the clip never acts; each image keeps its mean, deviations scale by c
        assert got.min() >= 0.0 and got.max() <= 1.0
        np.testing.assert_allclose(got.mean(axis=(-2, -1)), x.mean(axis=(-2, -1)), rtol=0, atol=2 * bound)
        np.testing.assert_allclose(got.std(axis=(-2, -1)), c * x.std(axis=(-2, -1)), rtol=0, atol=2 * bound)
    else:
        assert got.min() == 0.0 and got.max() == 1.0  # the clip acted


@pytest.mark.parametrize("b", [-0.4, 0.0, 0.4])
def test_brightness_shifts_every_pixel_and_saturates_at_the_range(b: float) -> None:
    x = images(5)
    got = digits.brightness(x, b)
    np.testing.assert_array_equal(got, np.minimum(np.maximum(x + b, 0.0), 1.0))  # one rounding
    inside = (x + b > 0) & (x + b < 1)
    np.testing.assert_array_equal(got[inside], x[inside] + b)
    assert got.dtype == x.dtype


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.0, 1.7])
def test_gaussian_blur_equals_scipy_gaussian_filter_with_nearest_edges(
    has_sklearn: None, sigma: float
) -> None:
    from scipy import ndimage  # the oracle; scipy comes with scikit-learn

    x = images(6)
    got = digits.gaussian_blur(x, sigma)
    expected = ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
    # two passes, each a sum of 2r+1 weighted terms with weights summing to 1 (recursive
    # summation: (2r+1) eps max|x| each), plus the kernel's normalization (a few eps relative)
    r = int(3 * sigma + 0.5)
    bound = (2 * (2 * r + 1) + 4) * EPS["float64"] * float(np.abs(x).max())
    assert float(np.abs(got - expected).max()) <= bound
    flat = np.full((1, 8, 8), 0.25)
    np.testing.assert_allclose(digits.gaussian_blur(flat, sigma), flat, rtol=0, atol=bound)


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda x: digits.gaussian_noise(x, -0.1, np.random.default_rng(0)), "sigma=-0.1"),
        (lambda x: digits.gaussian_noise(x, math.nan, np.random.default_rng(0)), "sigma=nan"),
        (lambda x: digits.impulse_noise(x, 1.5, np.random.default_rng(0)), "p=1.5"),
        (lambda x: digits.contrast(x, -1.0), "c=-1.0"),
        (lambda x: digits.brightness(x, 2.0), "b=2.0"),
        (lambda x: digits.gaussian_blur(x, 0.0), "sigma=0.0"),
        (lambda x: digits.contrast(x.astype(np.int64), 0.5), "x is a ndarray of dtype int64"),
        (lambda x: digits.corrupt(x, "fog", seed=0), "corruption='fog'"),
    ],
)
def test_bad_parameters_are_refused_naming_them(call: Any, parameter: str) -> None:
    x = images(7)
    with pytest.raises(ValueError, match=parameter.replace("(", r"\(")):
        call(x)


def test_corrupt_uses_the_documented_severity_and_generator() -> None:
    x = images(8)
    index = list(digits.CORRUPTIONS).index("gaussian noise")
    expected = digits.gaussian_noise(x, 0.3, np.random.default_rng([11, index]))
    np.testing.assert_array_equal(digits.corrupt(x, "gaussian noise", seed=11), expected)
    np.testing.assert_array_equal(digits.corrupt(x, "contrast", seed=11), digits.contrast(x, 0.3))
    np.testing.assert_array_equal(digits.corrupt(x, "clean", seed=11), x)


# --- data ---


def test_split_is_a_deterministic_partition_of_the_digits_chosen_by_the_seed(has_sklearn: None) -> None:
    from sklearn.datasets import load_digits

    a, b, other = digits.load_split(3), digits.load_split(3), digits.load_split(4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.y_test, other.y_test)
    assert a.x_test.shape == (digits.TEST_SIZE, 1, 8, 8)
    assert a.x_train.shape == (1797 - digits.TEST_SIZE, 1, 8, 8)
    assert a.x_test.dtype == np.float32 and a.y_test.dtype == np.int64
    # train + test is the whole data set, each image once: compare the sorted rows (label, pixels*16)
    data = load_digits()
    full = np.column_stack([data.target, data.images.reshape(len(data.target), -1)])
    ours = np.column_stack(
        [
            np.concatenate([a.y_train, a.y_test]),
            16 * np.concatenate([a.x_train, a.x_test]).reshape(1797, -1).astype(np.float64),
        ]
    )
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(full, axis=0))
    assert len(ours) == len(full)


def test_streams_keep_the_order_or_sort_by_label_and_cover_every_image() -> None:
    y = np.array([3, 1, 2, 1, 3, 0, 2])
    x = np.arange(len(y), dtype=np.float32)
    iid = list(digits.test_batches(x, y, 3, "i.i.d."))
    assert [list(b) for b, _ in iid] == [[0, 1, 2], [3, 4, 5], [6]]
    ordered = list(digits.test_batches(x, y, 3, "label-sorted"))
    assert [list(yb) for _, yb in ordered] == [[0, 1, 1], [2, 2, 3], [3]]
    assert [list(b) for b, _ in ordered] == [[5, 1, 3], [2, 6, 0], [4]]  # stable: ties keep their order
    with pytest.raises(ValueError, match="stream='shuffled'"):
        list(digits.test_batches(x, y, 3, "shuffled"))


# --- the findings ---


@pytest.fixture(scope="module")
def one_thread(has_sklearn: None) -> Iterator[None]:
    """The documented run's thread count (results are deterministic per thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def measure(seed: int) -> dict[str, Any]:
    """The numbers the findings are about, for one seed, with the documented settings."""
    split = digits.load_split(seed)
    model = digits.train(digits.make_model(seed), split.x_train, split.y_train, seed=seed)
    y, clean = split.y_test, split.x_test

    def acc(x: np.ndarray, method: str, n: int, stream: str = "i.i.d.") -> float:
        return digits.evaluate(model, x, y, method=method, batch_size=n, stream=stream)

    out: dict[str, Any] = {"clean": acc(clean, "standard", len(y))}
    for corruption in ("contrast", "brightness"):
        x = digits.corrupt(clean, corruption, seed=seed)
        standard, adabn = acc(x, "standard", len(y)), acc(x, "AdaBN", len(y))
        out[corruption] = {
            "standard": standard,
            "AdaBN": adabn,
            "recovered": (adabn - standard) / (out["clean"] - standard),
        }
    out["n=2"] = {
        "prediction-time BN": acc(clean, "prediction-time BN", 2),
        "prior N=16": acc(clean, "prior N=16", 2),
    }
    out["label-sorted drop"] = {
        n: acc(clean, "prediction-time BN", n) - acc(clean, "prediction-time BN", n, "label-sorted")
        for n in (16, 32)
    }
    return out


@pytest.fixture(scope="module")
def findings(one_thread: None) -> dict[int, dict[str, Any]]:
    return {seed: measure(seed) for seed in SEEDS}


def check(values: dict[int, float], holds: Callable[[float], bool], what: str) -> None:
    """Assert ``holds`` on every seed's value, naming the seeds that fail and all values."""
    failed = {seed: round(v, 4) for seed, v in values.items() if not holds(v)}
    assert not failed, f"{what} fails at seeds {failed}; all: { {s: round(v, 4) for s, v in values.items()} }"


def test_adabn_recovers_most_of_the_accuracy_lost_to_contrast_and_brightness(findings: dict) -> None:
    # Measured over seeds 0-9 (the documented settings, 1 thread; seeds 0-4 are the ones run here):
    #   lost = clean - standard   contrast   0.900 0.770 0.822 0.880 0.857 0.878 0.800 0.897 0.905 0.873
    #                                        mean 0.858, sd 0.046 -> mean - 4 sd = 0.674 -> ask 0.67
    #                             brightness 0.505 0.780 0.812 0.850 0.762 0.867 0.810 0.635 0.873 0.793
    #                                        mean 0.769, sd 0.115 -> mean - 4 sd = 0.309 -> ask 0.30
    #   recovered = (AdaBN - standard) / lost
    #                             contrast   0.991 1.006 0.976 0.977 1.000 0.964 0.983 0.991 0.980 0.985
    #                                        mean 0.985, sd 0.012 -> mean - 4 sd = 0.936 -> ask 0.93
    #                             brightness 0.977 1.004 0.967 0.977 0.982 0.964 0.971 0.979 0.964 0.927
    #                                        mean 0.971, sd 0.020 -> mean - 4 sd = 0.893 -> ask 0.89
    # (sd: the sample standard deviation over the seeds.) Every threshold is on the claim's side:
    # a shift that costs accuracy (lost > 0), and "most" of it recovered (> 1/2).
    for corruption, lost_at_least, recovered_at_least in (
        ("contrast", 0.67, 0.93),
        ("brightness", 0.30, 0.89),
    ):
        check(
            {s: f["clean"] - f[corruption]["standard"] for s, f in findings.items()},
            lambda v, t=lost_at_least: v >= t,
            f"{corruption} costs standard eval at least {lost_at_least}",
        )
        check(
            {s: f[corruption]["recovered"] for s, f in findings.items()},
            lambda v, t=recovered_at_least: v >= t,
            f"AdaBN recovers at least {recovered_at_least} of what {corruption} cost",
        )


def test_at_batch_size_2_prediction_time_bn_loses_clean_accuracy_that_prior_mixing_keeps(
    findings: dict,
) -> None:
    # Measured over seeds 0-9 (clean test split, i.i.d. batches of 2; drop = standard - method):
    #   prediction-time BN  0.148 0.168 0.213 0.225 0.195 0.182 0.217 0.215 0.247 0.243
    #                       mean 0.205, sd 0.032 -> mean - 4 sd = 0.078 -> ask a drop of at least 0.07
    #   prior N=16         -0.002 -0.003 -0.002 0.003 0.000 0.007 0.000 -0.002 0.002 0.000
    #                       mean 0.000, sd 0.003 -> mean + 4 sd = 0.012 -> allow at most 0.012
    #                       (7 of the 600 test images)
    check(
        {s: f["clean"] - f["n=2"]["prediction-time BN"] for s, f in findings.items()},
        lambda v: v >= 0.07,
        "prediction-time BN at n=2 loses at least 0.07 of clean accuracy",
    )
    check(
        {s: f["clean"] - f["n=2"]["prior N=16"] for s, f in findings.items()},
        lambda v: v <= 0.012,
        "prior mixing (N=16) at n=2 loses at most 0.012 of clean accuracy",
    )


def test_label_sorted_batches_break_prediction_time_bn(findings: dict) -> None:
    # Measured over seeds 0-9 (clean test split; drop = i.i.d. - label-sorted at the same batch size):
    #   n=16  0.723 0.703 0.728 0.723 0.765 0.683 0.702 0.715 0.753 0.735
    #         mean 0.723, sd 0.024 -> mean - 4 sd = 0.626 -> ask 0.62
    #   n=32  0.632 0.608 0.600 0.650 0.702 0.558 0.608 0.638 0.703 0.655
    #         mean 0.636, sd 0.045 -> mean - 4 sd = 0.455 -> ask 0.45
    # (n=8: mean 0.765, sd 0.014; n=64: mean 0.447, sd 0.105 -- at 64 a batch holds one or two
    # classes depending on where the class boundaries fall, so the drop varies more; not asserted.)
    for n, drop_at_least in ((16, 0.62), (32, 0.45)):
        check(
            {s: f["label-sorted drop"][n] for s, f in findings.items()},
            lambda v, t=drop_at_least: v >= t,
            f"label-sorted batches of {n} cost prediction-time BN at least {drop_at_least}",
        )


def test_evaluate_leaves_the_model_unchanged(one_thread: None) -> None:
    split = digits.load_split(0)
    model = digits.train(digits.make_model(0), split.x_train[:64], split.y_train[:64], seed=0, epochs=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = digits.corrupt(split.x_test[:40], "contrast", seed=0)
    for method in digits.METHODS:
        digits.evaluate(model, x, split.y_test[:40], method=method, batch_size=8)
    after = model.state_dict()
    assert not model.training
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="method='TENT'"):
        digits.evaluate(model, x, split.y_test[:40], method="TENT", batch_size=8)


def fake_result() -> dict[str, Any]:
    sizes = {"2": 0.5, "64": 0.75}
    return {
        "accuracy": {
            c: {m: {s: dict(sizes) for s in digits.STREAMS} for m in ("standard", "AdaBN")}
            for c in ("clean", "blur")
        },
        "train_accuracy": 1.0,
        "seconds": {"train": 0.0, "evaluate": 0.0},
    }


def test_main_writes_the_table_plot_and_json(
    has_sklearn: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digits, "run", lambda seed, epochs: fake_result())
    threads = torch.get_num_threads()
    try:
        digits.main(["--seed", "5", "--out-dir", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    table = (tmp_path / "digits-shift.md").read_text(encoding="utf-8")
    assert "| clean | standard | 50.0 | 75.0 |" in table and "| n=2 | n=64 |" in table
    assert "label-sorted test batches" in table
    assert (tmp_path / "digits-shift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "digits-shift.json").read_text(encoding="utf-8"))
    assert record["seed"] == 5 and record["accuracy"]["blur"]["AdaBN"]["i.i.d."]["64"] == 0.75
    assert {"torch", "scikit-learn", "normkit", "cpu", "cpu_count", "torch_threads"} <= set(
        record["environment"]
    )
    assert record["seconds"]["total"] >= 0


def test_importing_the_experiment_imports_neither_scikit_learn_nor_matplotlib() -> None:
    code = (
        "import sys, normkit_torch, normkit_torch.experiments.digits; "
        "print(sorted(m for m in ('sklearn', 'matplotlib', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
