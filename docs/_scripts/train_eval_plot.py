"""Draw docs/_generated/train_eval.png with normkit itself: the figure of the train/eval page.

Left: running estimates of a channel's mean during training, for PyTorch's momentum 0.1, Keras's
momentum 0.99 (0.01 on the new batch) and the cumulative average (momentum=None).
Right: the output for one fixed sample while the rest of its batch shifts: in eval (running
estimates) it does not move; with batch statistics it does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import normkit

TRUE_MEAN, TRUE_STD = 5.0, 2.0


def running_means(steps: int = 300) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    layers = {
        "torch: momentum 0.1 on the new batch": normkit.BatchNorm(preset="torch"),
        "keras: momentum 0.99 on the running value": normkit.BatchNorm(preset="keras", axis=1),
        "cumulative average (momentum=None)": normkit.BatchNorm(momentum=None),
    }
    history: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(steps):
        x = rng.normal(TRUE_MEAN, TRUE_STD, size=(16, 1, 4, 4)).astype(np.float32)
        for name, layer in layers.items():
            layer(x)
            history[name].append(float(layer.running_mean[0]))
    return history


def one_sample_under_shift(shifts: np.ndarray) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(1)
    layer = normkit.BatchNorm()
    for _ in range(200):
        layer(rng.normal(0.0, 1.0, size=(32, 1)).astype(np.float32))
    layer.eval()
    sample = np.array([[0.5]], np.float32)
    rest = rng.normal(0.0, 1.0, size=(31, 1)).astype(np.float32)
    with_running, with_batch = [], []
    for shift in shifts:
        batch = np.concatenate([sample, rest + np.float32(shift)])
        with_running.append(float(layer(batch)[0, 0]))
        y, _, _ = normkit.batch_norm(batch, training=True)
        with_batch.append(float(y[0, 0]))
    return with_running, with_batch


def main(target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, values in running_means().items():
        left.plot(values, label=name)
    left.axhline(TRUE_MEAN, color="black", linewidth=0.8, linestyle=":", label="population mean")
    left.set(
        xlabel="training step", ylabel="running mean estimate", title="Running estimates during training"
    )
    left.legend(fontsize=8)

    shifts = np.linspace(-3, 3, 61)
    with_running, with_batch = one_sample_under_shift(shifts)
    right.plot(shifts, with_running, label="eval: running estimates")
    right.plot(shifts, with_batch, label="batch statistics (training, or no tracked stats)")
    right.set(
        xlabel="shift of the other 31 samples in the batch",
        ylabel="output for the same sample x = 0.5",
        title="One sample's output as the rest of its batch changes",
    )
    right.legend(fontsize=8)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main(
        sys.argv[1]
        if len(sys.argv) > 1
        else str(Path(__file__).parent.parent / "_generated" / "train_eval.png")
    )
