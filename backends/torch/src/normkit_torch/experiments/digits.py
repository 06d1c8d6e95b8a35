r"""Batch norm at test time on real data: scikit-learn's digits under synthetic corruptions.

A small convolutional network with batch norm is trained with PyTorch on scikit-learn's digits
(1,797 real 8x8 grey-level images of handwritten digits, shipped inside the scikit-learn wheel:
no download) and evaluated on a held-out split, clean and under five corruptions, with four ways
of choosing each batch norm's statistics at test time:

* **standard eval**: the running statistics estimated in training;
* **AdaBN** (Li et al. 2016): the running statistics recomputed on the whole corrupted test set
  (:func:`normkit.testtime.recalibrate`, population estimator), then standard eval;
* **prediction-time BN** (Nado et al. 2020): each test batch's own statistics
  (:func:`normkit.testtime.prior_mixing` with ``N=0``);
* **prior mixing** (Schneider et al. 2020): :math:`\mu = \lambda\mu_{run} + (1-\lambda)\mu_{batch}`
  and :math:`\sigma^2 = \lambda\sigma^2_{run} + (1-\lambda)\sigma^2_{batch}` (unbiased),
  :math:`\lambda = N/(N+n)` for a test batch of ``n`` images (``N`` = 16 and 64).

Each method is evaluated at test batch sizes 2 to 64, on batches drawn i.i.d. (consecutive
chunks of the randomly ordered test split) and on a **label-sorted** stream (the test split
sorted by label, then chunked: each batch holds one or two classes). The whole experiment is a
function of one seed (the split, the initialization, the shuffles and the corruptions' noise).

Run it as ``python -m normkit_torch.experiments.digits --seed 0 --out-dir DIR``: it writes
``digits-shift.md`` (the tables), ``digits-shift.png`` (the plot) and ``digits-shift.json`` (every
number, the settings, the versions, the machine and the run time). scikit-learn and matplotlib
are imported only when they are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normkit.testtime import prior_mixing, recalibrate

__all__ = [
    "BATCH_SIZES",
    "CORRUPTIONS",
    "DATA_RANGE",
    "METHODS",
    "STREAMS",
    "Method",
    "Split",
    "brightness",
    "contrast",
    "corrupt",
    "evaluate",
    "gaussian_blur",
    "gaussian_noise",
    "impulse_noise",
    "load_split",
    "main",
    "make_model",
    "markdown_tables",
    "plot",
    "run",
    "test_batches",
    "train",
]

DATA_RANGE = (0.0, 1.0)
"""The range of the images: the digits' grey levels 0..16 divided by 16."""

TEST_SIZE = 600
"""Images held out for testing; the other 1,197 train the model."""

BATCH_SIZES = (2, 4, 8, 16, 32, 64)
"""Test batch sizes."""

STREAMS = ("i.i.d.", "label-sorted")
"""Orders of the test stream: the split's random order, or sorted by label (stable)."""

EPOCHS = 15
"""Training: passes over the training split ..."""
TRAIN_BATCH = 32
"""... in mini-batches of this size ..."""
LEARNING_RATE = 3e-3
"""... with Adam at this learning rate."""
WIDTH = 16
"""Channels of the first convolution (the second has twice as many)."""
ADAPT_BATCH = 64
"""Batch size of AdaBN's pass over the corrupted test set (the population estimator makes the
recalibrated statistics independent of it)."""


def _check_images(x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray) or x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        got = f"{type(x).__name__} of dtype {getattr(x, 'dtype', None)} and shape {getattr(x, 'shape', None)}"
        raise ValueError(f"x is a {got}; expected a floating NumPy array of images (..., height, width)")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):  # also refuses NaN
        raise ValueError(f"{name}={value!r}; expected a number in [{low}, {high}]")


# --- corruptions: pure functions of the images (and a random generator where they draw noise) ---


def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    r"""Additive Gaussian noise: :math:`\operatorname{clip}(x + \sigma z, 0, 1)` with
    ``z = rng.standard_normal(x.shape)`` (one independent standard normal per pixel, drawn in
    float64 in C order), computed in float64 and returned in ``x``'s dtype and shape.

    :param x: images in :data:`DATA_RANGE`, shape ``(..., height, width)``.
    :param sigma: the noise's standard deviation, in units of the data range (``>= 0``).
    :param rng: the generator the noise is drawn from (one draw of ``x.size`` normals)."""
    _check_images(x)
    _check_range("sigma", sigma, 0.0, math.inf)
    z = rng.standard_normal(x.shape)
    return np.clip(x.astype(np.float64) + sigma * z, *DATA_RANGE).astype(x.dtype)


def impulse_noise(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    r"""Salt-and-pepper noise: with ``u = rng.random(x.shape)`` (one uniform in [0, 1) per pixel),
    a pixel with :math:`u < p/2` becomes 0 (pepper), one with :math:`p/2 \le u < p` becomes 1
    (salt), every other pixel keeps its value; so each pixel is replaced with probability ``p``,
    by 0 or 1 with equal odds. Returned in ``x``'s dtype and shape.

    :param x: images in :data:`DATA_RANGE`, shape ``(..., height, width)``.
    :param p: the fraction of pixels replaced, in [0, 1].
    :param rng: the generator the uniforms are drawn from (one draw of ``x.size`` values)."""
    _check_images(x)
    _check_range("p", p, 0.0, 1.0)
    u = rng.random(x.shape)
    out = x.copy()
    out[u < p / 2] = DATA_RANGE[0]
    out[(u >= p / 2) & (u < p)] = DATA_RANGE[1]
    return out


def contrast(x: np.ndarray, c: float) -> np.ndarray:
    r"""Contrast change: an affine map of each image around its own mean,
    :math:`\operatorname{clip}(m + c\,(x - m), 0, 1)` with :math:`m` the mean of the image's
    pixels, computed in float64 and returned in ``x``'s dtype. Each image keeps its mean and its
    deviations from the mean are scaled by ``c``; for ``c <= 1`` every value is a convex
    combination of a pixel and the mean, inside the data range, so the clip never acts.

    :param x: images in :data:`DATA_RANGE`, shape ``(..., height, width)``.
    :param c: the contrast factor (``>= 0``; below 1 lowers the contrast, 0 gives flat images)."""
    _check_images(x)
    _check_range("c", c, 0.0, math.inf)
    x64 = x.astype(np.float64)
    m = x64.mean(axis=(-2, -1), keepdims=True)
    return np.clip(m + c * (x64 - m), *DATA_RANGE).astype(x.dtype)


def brightness(x: np.ndarray, b: float) -> np.ndarray:
    r"""Brightness change: a shift of every pixel, :math:`\operatorname{clip}(x + b, 0, 1)`,
    computed in float64 and returned in ``x``'s dtype (pixels pushed past the range saturate).

    :param x: images in :data:`DATA_RANGE`, shape ``(..., height, width)``.
    :param b: the shift, in units of the data range, in [-1, 1]."""
    _check_images(x)
    _check_range("b", b, -1.0, 1.0)
    return np.clip(x.astype(np.float64) + b, *DATA_RANGE).astype(x.dtype)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r"""Gaussian blur: each image convolved with the separable kernel
    :math:`k_j \propto \exp(-j^2 / 2\sigma^2)`, :math:`j = -r, \dots, r`,
    :math:`r = \lfloor 3\sigma + 1/2 \rfloor`, normalized to sum 1, along the rows and then the
    columns; pixels beyond the border repeat the nearest edge pixel. This is
    ``scipy.ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3)`` on the last two axes.
    Computed in float64 and returned in ``x``'s dtype; every output is a convex combination of
    input pixels, so it stays in the data range.

    :param x: images in :data:`DATA_RANGE`, shape ``(..., height, width)``.
    :param sigma: the kernel's standard deviation in pixels (``> 0``)."""
    _check_images(x)
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r}; expected a standard deviation > 0 pixels")
    r = int(3.0 * sigma + 0.5)
    j = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(j**2) / (2.0 * sigma**2))
    k /= k.sum()
    out = x.astype(np.float64)
    for axis in (-1, -2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        size = out.shape[axis]
        out = sum(k[i] * np.take(padded, np.arange(i, i + size), axis=axis) for i in range(2 * r + 1))
    return out.astype(x.dtype)


@dataclass(frozen=True)
class Corruption:
    """A corruption at one severity: ``apply(x, severity, rng)``; ``parameter`` names the
    severity's parameter (empty for none)."""

    name: str
    severity: float
    parameter: str
    apply: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("clean", 0.0, "", lambda x, s, rng: x.copy()),
        Corruption("gaussian noise", 0.3, "sigma", gaussian_noise),
        Corruption("impulse noise", 0.1, "p", impulse_noise),
        Corruption("contrast", 0.3, "c", lambda x, s, rng: contrast(x, s)),
        Corruption("brightness", 0.4, "b", lambda x, s, rng: brightness(x, s)),
        Corruption("blur", 1.0, "sigma", lambda x, s, rng: gaussian_blur(x, s)),
    )
}
"""The test conditions, each at the one severity used (documented in docs/digits-experiment.md)."""


def corrupt(x: np.ndarray, name: str, *, seed: int) -> np.ndarray:
    """``x`` under the corruption ``name`` of :data:`CORRUPTIONS` at its severity; the noise is
    drawn from ``numpy.random.default_rng([seed, i])`` with ``i`` the corruption's position in
    :data:`CORRUPTIONS`."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption={name!r}; expected one of {list(CORRUPTIONS)}")
    c = CORRUPTIONS[name]
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name)])
    return c.apply(x, c.severity, rng)


# --- data, model, training ---


@dataclass(frozen=True)
class Split:
    """Images ``(n, 1, 8, 8)`` float32 in :data:`DATA_RANGE` and labels ``(n,)`` int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split(seed: int, *, test_size: int = TEST_SIZE) -> Split:
    """scikit-learn's digits, grey levels divided by 16, split by the permutation
    ``numpy.random.default_rng(seed).permutation(1797)``: its first ``test_size`` entries are the
    test split (in that random order), the rest the training split."""
    from sklearn.datasets import load_digits  # lazily: importing normkit_torch never needs it

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float64) / 16.0).astype(np.float32)[:, None]
    labels = np.asarray(digits.target, dtype=np.int64)
    if not 0 < test_size < len(labels):
        raise ValueError(f"test_size={test_size!r}; expected 0 < test_size < {len(labels)}")
    order = np.random.default_rng(seed).permutation(len(labels))
    test, fit = order[:test_size], order[test_size:]
    return Split(images[fit], labels[fit], images[test], labels[test])


def make_model(seed: int, *, width: int = WIDTH) -> nn.Sequential:
    """Two 3x3 convolutions without padding (8x8 -> 6x6 -> 4x4), each followed by batch norm and
    ReLU, global average pooling and a linear head; initialized from ``torch.manual_seed(seed)``
    inside :func:`torch.random.fork_rng` (the global generator is left as it was). The first batch
    norm sits right after the first convolution, which is affine in the image: a global shift or
    scale of the pixels is a per-channel affine change of that batch norm's input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, width, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 10),
        )


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    epochs: int = EPOCHS,
    batch_size: int = TRAIN_BATCH,
    lr: float = LEARNING_RATE,
) -> nn.Module:
    """Train ``model`` in place with Adam (``lr``) on the cross entropy, ``epochs`` passes over
    ``(x, y)`` in mini-batches of ``batch_size`` reshuffled each epoch by a
    ``torch.Generator`` seeded with ``seed`` (the last, smaller batch kept); returns it in eval
    mode."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r}; expected at least 1")
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ys), generator=g).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(xs[idx]), ys[idx]).backward()
            optimizer.step()
    return model.eval()


# --- test-time methods ---


@dataclass(frozen=True)
class Method:
    """A way of choosing the batch norms' statistics at test time: ``adapt`` recalibrates them on
    the test data first (AdaBN); ``prior`` is the N of prior mixing (``None``: running statistics
    only; 0: the test batch's statistics only)."""

    name: str
    adapt: bool = False
    prior: float | None = None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("standard"),
        Method("AdaBN", adapt=True),
        Method("prediction-time BN", prior=0.0),
        Method("prior N=16", prior=16.0),
        Method("prior N=64", prior=64.0),
    )
}


def test_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, stream: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive chunks of ``batch_size`` of the test data (the last one smaller if need be), in
    the given order (``"i.i.d."``, the split's random order) or sorted by label (``"label-sorted"``,
    a stable sort, so ties keep the random order)."""
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r}; expected one of {STREAMS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected at least 1")
    order = np.argsort(y, kind="stable") if stream == "label-sorted" else np.arange(len(y))
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def adapted(model: nn.Module, x: np.ndarray) -> nn.Module:
    """AdaBN: a copy of ``model`` whose batch norms' running statistics are the population
    statistics of their inputs over all of ``x`` (:func:`normkit.testtime.recalibrate`, passes of
    :data:`ADAPT_BATCH` images), in eval mode."""
    model = copy.deepcopy(model).eval()
    batches = [torch.from_numpy(x[i : i + ADAPT_BATCH]) for i in range(0, len(x), ADAPT_BATCH)]
    recalibrate(model, batches, progress=False)
    return model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: str,
    batch_size: int,
    stream: str = "i.i.d.",
) -> float:
    """Accuracy of ``model`` on ``(x, y)`` fed in test batches of ``batch_size`` in the order
    ``stream`` (:func:`test_batches`), in eval mode with the statistics chosen by ``method`` (a
    key of :data:`METHODS`); ``model`` is not changed (AdaBN works on a copy)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {list(METHODS)}")
    m = METHODS[method]
    net = adapted(model, x) if m.adapt else model
    was_training = net.training
    net.eval()
    correct = 0
    try:
        with contextlib.nullcontext() if m.prior is None else prior_mixing(net, N=m.prior):
            for xb, yb in test_batches(x, y, batch_size, stream):
                logits = net(torch.from_numpy(xb))
                correct += int((logits.argmax(1).numpy() == yb).sum())
    finally:
        net.train(was_training)
    return correct / len(y)


# --- the experiment ---


def run(
    seed: int = 0,
    *,
    epochs: int = EPOCHS,
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    methods: Sequence[str] = tuple(METHODS),
    batch_sizes: Sequence[int] = BATCH_SIZES,
    streams: Sequence[str] = STREAMS,
) -> dict[str, Any]:
    """Train on the seed's split and evaluate every (corruption, method, stream, batch size).

    :returns: ``{"accuracy": {corruption: {method: {stream: {batch_size: accuracy}}}},
        "train_accuracy": ..., "seconds": {"train": ..., "evaluate": ...}}``; the batch sizes
        are string keys (as in JSON)."""
    split = load_split(seed)
    started = time.perf_counter()
    model = train(make_model(seed), split.x_train, split.y_train, seed=seed, epochs=epochs)
    trained = time.perf_counter()
    accuracy: dict[str, Any] = {}
    for corruption in corruptions:
        x = corrupt(split.x_test, corruption, seed=seed)
        accuracy[corruption] = {
            method: {
                stream: {
                    str(n): evaluate(model, x, split.y_test, method=method, batch_size=n, stream=stream)
                    for n in batch_sizes
                }
                for stream in streams
            }
            for method in methods
        }
    done = time.perf_counter()
    train_acc = evaluate(model, split.x_train, split.y_train, method="standard", batch_size=256)
    return {
        "accuracy": accuracy,
        "train_accuracy": train_acc,
        "seconds": {"train": trained - started, "evaluate": done - trained},
    }


def markdown_tables(result: dict[str, Any]) -> str:
    """The accuracies as Markdown: one table per stream, a row per (corruption, method), a column
    per test batch size, in percent."""
    accuracy = result["accuracy"]
    lines: list[str] = []
    for stream in STREAMS:
        sizes = None
        rows = []
        for corruption, by_method in accuracy.items():
            for method, by_stream in by_method.items():
                if stream not in by_stream:
                    continue
                sizes = list(by_stream[stream])
                cells = " | ".join(f"{100 * by_stream[stream][n]:.1f}" for n in sizes)
                rows.append(f"| {corruption} | {method} | {cells} |")
        if sizes is None:
            continue
        lines += [
            f"**{stream} test batches** (accuracy %, {TEST_SIZE} test images; columns: test batch size n)",
            "",
            "| corruption | method | " + " | ".join(f"n={n}" for n in sizes) + " |",
            "|---|---|" + "---:|" * len(sizes),
            *rows,
            "",
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Accuracy against test batch size, one panel per corruption, a line per method; top row
    i.i.d. batches, bottom row the label-sorted stream; saved as a PNG at ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no backend chosen, no global state

    accuracy = result["accuracy"]
    corruptions = list(accuracy)
    fig = Figure(figsize=(2.6 * len(corruptions), 5.6))
    axes = fig.subplots(2, len(corruptions), sharex=True, sharey=True)
    axes = np.asarray(axes).reshape(2, len(corruptions))
    styles = {
        "standard": "k-",
        "AdaBN": "g-",
        "prediction-time BN": "r-",
        "prior N=16": "b-",
        "prior N=64": "c-",
    }
    for row, stream in enumerate(STREAMS):
        for col, corruption in enumerate(corruptions):
            ax = axes[row, col]
            for method, by_stream in accuracy[corruption].items():
                sizes = [int(n) for n in by_stream[stream]]
                values = [100 * v for v in by_stream[stream].values()]
                ax.plot(sizes, values, styles.get(method, "-"), marker="o", ms=3, lw=1.2, label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(corruption, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{stream} stream\naccuracy %")
            if row == 1:
                ax.set_xlabel("test batch size")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def environment(threads: int) -> dict[str, Any]:
    """Versions and the machine: Python, torch, NumPy, scikit-learn, matplotlib, normkit,
    ``platform``, ``os.cpu_count()``, the CPU model (``/proc/cpuinfo`` where there is one) and
    torch's thread count."""
    import matplotlib
    import sklearn

    import normkit

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
        "normkit": normkit.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: run the experiment and write ``digits-shift.{md,png,json}``."""
    parser = argparse.ArgumentParser(
        prog="python -m normkit_torch.experiments.digits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    result = run(args.seed, epochs=args.epochs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_tables(result)
    (args.out_dir / "digits-shift.md").write_text(table, encoding="utf-8")
    plot(result, args.out_dir / "digits-shift.png")
    result = {
        "seed": args.seed,
        "command": "python -m normkit_torch.experiments.digits "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "epochs": args.epochs,
            "train_batch": TRAIN_BATCH,
            "learning_rate": LEARNING_RATE,
            "width": WIDTH,
            "test_size": TEST_SIZE,
            "adapt_batch": ADAPT_BATCH,
            "corruptions": {
                c.name: {c.parameter: c.severity} if c.parameter else {} for c in CORRUPTIONS.values()
            },
            "methods": {m.name: {"adapt": m.adapt, "prior_N": m.prior} for m in METHODS.values()},
            "batch_sizes": list(BATCH_SIZES),
            "streams": list(STREAMS),
        },
        "environment": environment(args.threads),
        **result,
    }
    result["seconds"]["total"] = time.perf_counter() - started
    (args.out_dir / "digits-shift.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(table)
    print(
        f"seed {args.seed}: trained in {result['seconds']['train']:.1f} s, evaluated in "
        f"{result['seconds']['evaluate']:.1f} s, {result['seconds']['total']:.1f} s in all; "
        f"wrote {args.out_dir}/digits-shift.{{md,png,json}}"
    )
    return result


if __name__ == "__main__":
    main()
