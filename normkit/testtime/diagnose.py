r"""A diagnosis of a model's running statistics: for every normalization layer, how far its
running mean and variance are from the statistics of its input over given data.

It answers "why is eval worse than training?" (the running estimates do not describe the data
the model is evaluated on) and "which layers does this shift break?". Each layer's input is
recorded as :func:`~normkit.testtime.recalibrate` records it: the layers normalizing with batch
statistics, as in training, every other layer in eval mode. So each layer's numbers are its
*own* mismatch — what recalibrating (AdaBN) on the same data would change there — and not the
mismatch of an earlier layer carried forward. The model is never changed.

**Definitions.** For one channel of one layer, with :math:`\mu_d, \sigma^2_d` the mean and
variance of the layer's input over every value of every batch (Chan's exact merge of the
per-batch moments, :func:`normkit.merge_moments`; for an instance norm with running statistics,
the average over every sample of the sample's mean and variance, which is what its running
statistics estimate), :math:`\mu_r, \sigma^2_r` the layer's
running estimates and :math:`\epsilon` its eps:

.. math::

   s^2_d = \sigma^2_d + \epsilon, \qquad s^2_r = \sigma^2_r + \epsilon, \qquad
   z = \frac{\mu_d - \mu_r}{s_r}, \qquad
   \ell = \log\frac{s^2_d}{s^2_r}, \qquad
   \mathrm{KL} = \mathrm{KL}\big(\mathcal N(\mu_d, s^2_d)\,\big\|\,\mathcal N(\mu_r, s^2_r)\big)
   = \tfrac12 z^2 + \tfrac12\left(e^{\ell} - 1 - \ell\right) .

* :math:`z`, the **mean shift**, is in running standard deviations :math:`s_r`, the scale eval
  divides by: in eval the layer's normalized output has mean :math:`z` where training gave 0.
* :math:`\ell`, the **log variance ratio**, is 0 when the scales agree, :math:`\log 4 = 1.39`
  for data twice as spread as the running estimate, :math:`-1.39` for half as spread; in eval
  the normalized output's variance is :math:`e^{\ell}` times training's (for
  :math:`\sigma^2 \gg \epsilon`).
* **KL** (in nats) is the information lost when the layer describes data that follow the
  Gaussian it would use in training, :math:`\mathcal N(\mu_d, s^2_d)`, by the Gaussian it uses
  in eval, :math:`\mathcal N(\mu_r, s^2_r)`: 0 only when both agree; its mean part
  :math:`\tfrac12 z^2` and scale part :math:`\tfrac12(e^\ell - 1 - \ell)` add. A mean shift of
  one running standard deviation costs 0.5 nats; a variance twice or half as large, 0.153 or
  0.097.

*Choices.* :math:`\epsilon` enters both variances, as it enters the layer's normalization in
training (:math:`s_d`) and in eval (:math:`s_r`): a channel whose data or running variance is 0
still gets finite values, and :math:`z` and :math:`\ell` are in the units the layer divides by.
:math:`\sigma^2_d` is in the layer's variance convention — :math:`M_2/(N-1)` for a layer that
stores the unbiased variance (PyTorch), :math:`M_2/N` for one that stores the biased one
(Keras) — so that right after :func:`~normkit.testtime.recalibrate` on the same batches every
value is 0 up to the rounding of the stored statistics. (With eps = 0, which PyTorch and Keras
allow, a zero variance makes the values infinite where the statistics differ; where a mean or
a variance equals its running value, its part is 0.) KL is the divergence *from* the data's
Gaussian, the direction in which it is the expected log-likelihood ratio under the data; it is
computed as :math:`\tfrac12 z^2 + \tfrac12(\delta - \log(1 + \delta))` with
:math:`\delta = (\sigma^2_d - \sigma^2_r)/s^2_r`, by a series where :math:`|\delta|` is small,
so it never comes out negative by cancellation.

>>> import numpy as np, normkit
>>> from normkit.testtime.diagnose import diagnose
>>> rng = np.random.default_rng(0)
>>> bn = normkit.BatchNorm(2)
>>> for _ in range(50):                                  # trained on N(0, 1)
...     _ = bn(rng.normal(0.0, 1.0, size=(64, 2)).astype(np.float32))
>>> shifted = [rng.normal([1.0, 0.0], [1.0, 2.0], size=(64, 2)).astype(np.float32) for _ in range(8)]
>>> report = diagnose(bn, shifted, forward=bn)
>>> print(report)                      # channel 0 moved by 1 sd (z), channel 1 twice as wide
diagnose: 1 layer; z = mean shift in running sd, log ratio = log(data var / running var), KL in nats
layer    channels  values  max |z| (channel)  mean |log ratio|  mean KL  max KL
(model)         2     512          0.982 (0)              0.78    0.703   0.921
>>> np.round(report.layers[0].log_ratio, 2)                # log 4 = 1.39
array([0.1 , 1.46])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from normkit.testtime.recalibrate import layer_statistics, pooled_moments
from normkit.testtime.recording import recorded
from normkit.testtime.sites import adapter_for

__all__ = ["LayerShift", "ShiftReport", "diagnose", "shift_statistics"]

Array = Any

_SERIES_BELOW = 0.25
"""Where :func:`_x_minus_log1p` sums its series instead of subtracting."""
_SERIES_TERMS = 30
r"""Terms of the series (:math:`k = 2 \ldots 30`): the first left out is below
:math:`2 \cdot 0.25^{29}/31 < 10^{-18}` of the sum."""


def _x_minus_log1p(x: np.ndarray) -> np.ndarray:
    r""":math:`x - \log(1 + x) \ge 0` for :math:`x > -1`, to a few ulps everywhere.

    Subtracting loses :math:`\log_2` of :math:`x/(x - \log(1+x)) \approx 2/x` bits near 0, so
    for :math:`|x| \le 1/4` it sums :math:`\sum_{k \ge 2} (-1)^k x^k / k`, whose terms alternate
    and shrink at least 4-fold (Horner's scheme, :data:`_SERIES_TERMS` terms); above, the
    subtraction loses at most a factor 10 (:math:`x = 1/4`). ``inf`` gives ``inf``."""
    x = np.asarray(x, np.float64)
    small = np.abs(x) <= _SERIES_BELOW
    xs = np.where(small, x, 0.0)
    acc = np.zeros_like(xs)
    for k in range(_SERIES_TERMS, 1, -1):
        acc = acc * -xs + 1.0 / k
    series = xs * xs * acc
    with np.errstate(invalid="ignore", divide="ignore"):
        direct = np.where(np.isposinf(x), np.inf, x - np.log1p(np.where(small, 0.0, x)))
    return np.where(small, series, direct)


def shift_statistics(
    data_mean: Array, data_var: Array, running_mean: Array, running_var: Array, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""The mean shift :math:`z`, the log variance ratio :math:`\ell` and
    :math:`\mathrm{KL}(\mathcal N(\mu_d, \sigma^2_d + \epsilon) \| \mathcal N(\mu_r, \sigma^2_r + \epsilon))`
    per channel, in float64 (see the module docstring for the definitions).

    >>> z, log_ratio, kl = shift_statistics([3.0, 0.0], [1.0, 4.0], [0.0, 0.0], [1.0, 1.0], eps=0.0)
    >>> z, np.round(log_ratio, 4), np.round(kl, 4)       # 3 sigma: 9/2 nats; 2x wider: (4-1-log 4)/2
    (array([3., 0.]), array([0.    , 1.3863]), array([4.5   , 0.8069]))
    """
    mu_d, var_d, mu_r, var_r = (
        np.asarray(a, np.float64) for a in (data_mean, data_var, running_mean, running_var)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = var_r + eps
        # 0 where the statistics agree, also when eps = 0 and the running variance is 0 (0/0)
        z = np.where(mu_d == mu_r, 0.0, (mu_d - mu_r) / np.sqrt(scale))
        # s_d^2/s_r^2 - 1, without rounding s_d^2/s_r^2 first
        delta = np.where(var_d == var_r, 0.0, (var_d - var_r) / scale)
        log_ratio = np.log1p(delta)
        kl = 0.5 * z * z + 0.5 * _x_minus_log1p(delta)
    return z, log_ratio, kl


@dataclass(frozen=True, eq=False)
class LayerShift:
    """One normalization layer's running statistics against the data's, per channel (float64
    arrays of the layer's channel count; see the module docstring for the definitions)."""

    name: str
    """The layer's name in the model (``""`` for a model that is one layer)."""
    channels: int
    count: np.ndarray
    """Values of the layer's input counted per channel, over every batch (int64)."""
    eps: float
    unbiased: bool
    """Whether the layer stores the unbiased variance (and ``data_var`` is unbiased too)."""
    data_mean: np.ndarray
    data_var: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    z: np.ndarray
    """Mean shift :math:`(\\mu_d - \\mu_r)/\\sqrt{\\sigma^2_r + \\epsilon}`."""
    log_ratio: np.ndarray
    """Log variance ratio :math:`\\log((\\sigma^2_d + \\epsilon)/(\\sigma^2_r + \\epsilon))`."""
    kl: np.ndarray
    """Gaussian KL divergence of the running estimates from the data's, in nats."""

    @property
    def label(self) -> str:
        """The name, or ``"(model)"`` for a model that is one layer."""
        return self.name or "(model)"

    @property
    def max_abs_z(self) -> float:
        """The largest :math:`|z|` over the channels."""
        return float(np.max(np.abs(self.z)))

    @property
    def max_abs_z_channel(self) -> int:
        """The channel of :attr:`max_abs_z`."""
        return int(np.argmax(np.abs(self.z)))

    @property
    def mean_abs_log_ratio(self) -> float:
        """The mean :math:`|\\ell|` over the channels."""
        return float(np.mean(np.abs(self.log_ratio)))

    @property
    def mean_kl(self) -> float:
        """The mean KL over the channels."""
        return float(np.mean(self.kl))

    @property
    def max_kl(self) -> float:
        """The largest KL over the channels."""
        return float(np.max(self.kl))

    @property
    def worst_channel(self) -> int:
        """The channel with the largest KL."""
        return int(np.argmax(self.kl))

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (lists of floats; NaN and infinities, which only eps = 0 can
        produce, stay floats, as :func:`json.dumps` writes them by default)."""
        arrays = ("data_mean", "data_var", "running_mean", "running_var", "z", "log_ratio", "kl")
        return {
            "name": self.name,
            "channels": self.channels,
            "count": [int(c) for c in self.count],
            "eps": self.eps,
            "unbiased": self.unbiased,
            **{key: [float(v) for v in getattr(self, key)] for key in arrays},
            "max_abs_z": self.max_abs_z,
            "max_abs_z_channel": self.max_abs_z_channel,
            "mean_abs_log_ratio": self.mean_abs_log_ratio,
            "mean_kl": self.mean_kl,
            "max_kl": self.max_kl,
            "worst_channel": self.worst_channel,
        }


COLUMNS = ("layer", "channels", "values", "max |z| (channel)", "mean |log ratio|", "mean KL", "max KL")
"""The table's columns: one row per layer."""


DECADES = 6
"""The KL panel of :meth:`ShiftReport.plot` spans at most this many decades below the largest bar."""


def _number(value: float) -> str:
    return f"{value:.3g}"


def _row(layer: LayerShift) -> tuple[str, ...]:
    low, high = int(np.min(layer.count)), int(np.max(layer.count))
    return (
        layer.label,
        str(layer.channels),
        str(low) if low == high else f"{low}-{high}",
        f"{_number(layer.max_abs_z)} ({layer.max_abs_z_channel})",
        _number(layer.mean_abs_log_ratio),
        _number(layer.mean_kl),
        _number(layer.max_kl),
    )


@dataclass(frozen=True, eq=False)
class ShiftReport:
    """What :func:`diagnose` found, one :class:`LayerShift` per layer in model order.

    ``str(report)`` is a plain-text table, :meth:`to_markdown` a Markdown one, :meth:`plot` a
    matplotlib figure, :meth:`to_dict` plain values for JSON. ``ShiftReport(layers)`` makes a
    report of any layers (say, ``ShiftReport(report.worst(3))``)."""

    layers: Sequence[LayerShift]

    def header(self) -> str:
        """The line above the table."""
        count = len(self.layers)
        return (
            f"diagnose: {count} layer{'s' if count != 1 else ''}; z = mean shift in running sd, "
            "log ratio = log(data var / running var), KL in nats"
        )

    def __str__(self) -> str:
        rows = [COLUMNS, *(_row(layer) for layer in self.layers)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        return "\n".join([self.header(), *(line.rstrip() for line in lines)])

    def to_markdown(self) -> str:
        """The table in Markdown (GitHub/MyST pipe table), below the header line."""

        def cell(text: str) -> str:
            return text.replace("|", r"\|")

        rows = [
            "| " + " | ".join(cell(c) for c in COLUMNS) + " |",
            "|:--" + "|--:" * (len(COLUMNS) - 1) + "|",
        ]
        for layer in self.layers:
            first, *rest = _row(layer)
            rows.append("| " + " | ".join([f"`{cell(first)}`", *rest]) + " |")
        return "\n".join([self.header(), "", *rows])

    def worst(self, k: int) -> list[LayerShift]:
        """The ``k`` layers with the largest mean KL, largest first (all of them if there are
        fewer; ties in model order).

        :raises ValueError: for ``k`` that is not a positive int.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r}: expected a positive int (how many layers)")
        order = sorted(range(len(self.layers)), key=lambda i: -self.layers[i].mean_kl)
        return [self.layers[i] for i in order[: int(k)]]

    def to_dict(self) -> dict[str, Any]:
        """``{"layers": [layer.to_dict(), ...]}`` in model order (see :meth:`LayerShift.to_dict`)."""
        return {"layers": [layer.to_dict() for layer in self.layers]}

    def plot(self, ax: Any = None) -> Any:
        """A bar chart per layer, in model order: mean and max KL on a log scale (down to
        :data:`DECADES` decades below the largest), and max :math:`|z|` (matplotlib, imported
        here).

        :param ax: ``None`` for a new figure (``matplotlib.pyplot.subplots``) with both panels;
            two Axes for the KL and the :math:`|z|` panel; or one Axes for the KL panel alone.
        :returns: the ``matplotlib.figure.Figure``.
        """
        if ax is None:
            import matplotlib.pyplot as plt

            _, (kl_ax, z_ax) = plt.subplots(
                2, 1, sharex=True, figsize=(max(4.0, 0.6 * len(self.layers) + 2.0), 5.0), layout="constrained"
            )
        elif isinstance(ax, (list, tuple, np.ndarray)):
            if len(ax) != 2:
                raise ValueError(
                    f"ax is a sequence of {len(ax)} Axes; expected 2 (KL, |z|), one Axes or None"
                )
            kl_ax, z_ax = ax
        else:
            kl_ax, z_ax = ax, None
        names = [layer.label for layer in self.layers]
        x = np.arange(len(self.layers), dtype=np.float64)
        width = 0.4
        kl_ax.bar(x - width / 2, [layer.mean_kl for layer in self.layers], width, label="mean KL")
        kl_ax.bar(x + width / 2, [layer.max_kl for layer in self.layers], width, label="max KL")
        kl_ax.set_yscale("log")
        shown = np.array([v for layer in self.layers for v in (layer.mean_kl, layer.max_kl)], np.float64)
        shown = shown[np.isfinite(shown) & (shown > 0)]
        if shown.size:  # at most DECADES below the largest: smaller divergences are rounding
            floor = max(float(shown.min()), float(shown.max()) * 10.0**-DECADES)
            kl_ax.set_ylim(bottom=floor / 2)
        kl_ax.set_ylabel("KL (nats)")
        kl_ax.legend()
        if z_ax is not None:
            z_ax.bar(x, [layer.max_abs_z for layer in self.layers], 2 * width, color="tab:gray")
            z_ax.set_ylabel("max |z| (running sd)")
        rotate = len(names) > 4 or max((len(n) for n in names), default=0) > 12
        panels = (kl_ax,) if z_ax is None else (kl_ax, z_ax)
        for panel in panels:
            panel.set_xticks(x, names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
        panels[-1].set_xlabel("layer")
        return kl_ax.figure


def diagnose(
    model: object,
    batches: Iterable[object],
    *,
    forward: Callable[[Array], object] | None = None,
    progress: bool = True,
) -> ShiftReport:
    """How far every normalization layer's running statistics are from the statistics of its
    input over ``batches``: per channel, the mean shift in running standard deviations, the log
    variance ratio and the Gaussian KL divergence (see the module docstring).

    :param model: a PyTorch module (with ``normkit-torch``), a Keras model (with
        ``normkit-tensorflow``), or normkit :class:`~normkit.BatchNorm` layers: one layer, a
        list, tuple or mapping of them, or an object holding them as attributes.
    :param batches: arrays, or tuples/lists whose first element is the input (a data loader).
    :param forward: called with each batch's input; default ``model(x)`` for PyTorch and
        ``model(x, training=False)`` for Keras, required for normkit's layers.
    :param progress: show a progress bar on stderr once the run has taken a second.
    :returns: a :class:`ShiftReport`, one :class:`LayerShift` per layer in model order.
    :raises ValueError: for a layer without running statistics yet (never trained or loaded),
        a model without a normalization layer with running statistics, no batches, a batch
        whose channel count differs from a layer's, or a layer no batch reached. The model is
        unchanged afterwards, after an error too: nothing is committed.
    :raises TypeError: for a model of a framework without an adapter.
    """
    for name, site in adapter_for(model).sites(model).items():
        if site.running() is None:
            raise ValueError(
                f"layer {name or '(model)'!r} has no running statistics yet (it has never run in "
                f"training mode nor loaded a state); there is nothing to diagnose"
            )
    layers = []
    with recorded(model, batches, forward=forward, progress=progress, task="diagnose") as (sites, parts):
        for name, site in sites.items():
            running = site.running()
            assert running is not None  # checked above; recording does not remove statistics
            running_mean, running_var = running
            # what recalibrate would store: an instance norm's average over samples included
            data_mean, data_var = layer_statistics(site, parts[name], "population")
            count = site.to_numpy(pooled_moments(site, parts[name]).count)
            z, log_ratio, kl = shift_statistics(data_mean, data_var, running_mean, running_var, site.eps)
            layers.append(
                LayerShift(
                    name=name,
                    channels=int(data_mean.shape[0]),
                    count=count.astype(np.int64),
                    eps=float(site.eps),
                    unbiased=bool(site.unbiased),
                    data_mean=data_mean,
                    data_var=data_var,
                    running_mean=running_mean,
                    running_var=running_var,
                    z=z,
                    log_ratio=log_ratio,
                    kl=kl,
                )
            )
    return ShiftReport(tuple(layers))
