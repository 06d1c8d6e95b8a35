r"""Running a model over batches while its normalization layers record their inputs.

The recalibration and the diagnosis both need the same thing: for each normalization layer
(*site*) of a model, the moments :math:`(n_b, \mu_b, M_{2,b})` of its input in every batch
(over every axis but the channel axis), with the layers normalizing with batch statistics as in
training and every other layer in eval mode. :func:`recorded` runs the batches, then yields the
sites and their moments; on leaving the ``with`` block every site that was not committed is put
back exactly as it was, whether the block succeeded or not.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from normkit.functional.statistics import Moments
from normkit.testtime.sites import Recorder, Site, adapter_for

__all__ = ["input_of", "recorded"]

Array = Any


def input_of(batch: object) -> Array:
    """A batch's input: the batch itself, or the first element of a tuple or list (``(x, y)``)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


PROGRESS_AFTER_S = 1.0
"""A run shows its progress line once it has taken this long (short runs stay quiet)."""


class _Progress:
    """A progress bar on stderr, rewritten in place, for runs longer than
    :data:`PROGRESS_AFTER_S`: ``recalibrate [#########-----------]  18/40 batches  7.2/s``
    (without a known length: ``recalibrate  18 batches  7.2/s``)."""

    def __init__(self, task: str, total: int | None, enabled: bool) -> None:
        self.task, self.total, self.enabled = task, total, enabled
        self.start = time.monotonic()
        self.shown = False

    def update(self, seen: int) -> None:
        elapsed = time.monotonic() - self.start
        if not self.enabled or elapsed < PROGRESS_AFTER_S:
            return
        rate = f"{seen / elapsed:.1f}/s" if elapsed > 0 else ""
        if self.total:
            filled = round(20 * seen / self.total)
            line = f"{self.task} [{'#' * filled}{'-' * (20 - filled)}] {seen:>{len(str(self.total))}}/{self.total} batches  {rate}"
        else:
            line = f"{self.task}  {seen} batches  {rate}"
        print(f"\r{line}", end="", file=sys.stderr, flush=True)
        self.shown = True

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)


@contextlib.contextmanager
def recorded(
    model: object,
    batches: Iterable[object],
    *,
    forward: Callable[[Array], object] | None,
    progress: bool,
    task: str,
    allow_no_batches: bool = False,
) -> Iterator[tuple[dict[str, Site], dict[str, list[Moments]]]]:
    """Run ``batches`` through ``model`` with every site recording; yield the sites and each
    site's per-batch moments, by name.

    :param allow_no_batches: accept an empty ``batches`` (every site then has no moments): one
        rank's shard of a data set sharded across ranks may be empty.

    :param task: the caller's name, for messages and the progress line.
    :raises TypeError: for ``batches`` that is one array rather than an iterable of batches.
    :raises ValueError: for a model without a normalization layer with running statistics, no
        batches, a batch whose channel count differs from a layer's, or a layer no batch reached.
        Every site is put back as it was on any error, and on leaving the block unless the block
        committed it.
    """
    if hasattr(batches, "shape") and hasattr(batches, "ndim"):
        raise TypeError(
            f"batches is one array of shape {tuple(batches.shape)}; expected an iterable of batches (a list, "
            f"a data loader): pass [x] for a single batch"
        )
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if not sites:
        raise ValueError(
            f"model is a {type(model).__name__} with no batch norm that tracks running statistics; "
            f"nothing to {task}"
        )
    recorders = {name: Recorder(name=name, per_instance=site.per_instance) for name, site in sites.items()}
    attached: list[Site] = []
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    try:
        with adapter.running(model) as default_forward:
            run = forward or default_forward
            for name, site in sites.items():
                site.attach(recorders[name])
                attached.append(site)
            seen = 0
            bar = _Progress(task, total, progress)
            try:
                for seen, batch in enumerate(batches, start=1):
                    for recorder in recorders.values():
                        recorder.batch = seen
                    x = input_of(batch)
                    try:
                        run(x)
                    except Exception as error:
                        error.add_note(
                            f"normkit.testtime.{task}: raised by batch {seen}, whose input has shape "
                            f"{getattr(x, 'shape', None)} (a batch is run as forward(x), x the batch or its "
                            f"first element; pass forward= for batches of another form); the model is unchanged"
                        )
                        raise
                    bar.update(seen)
            finally:
                bar.close()
        if seen == 0 and not allow_no_batches:
            raise ValueError(f"batches is empty; {task} needs at least one batch")
        silent = [name or "the layer" for name in sites if seen and not recorders[name].parts]
        if silent:
            raise ValueError(f"no batch reached the layer(s) {silent}: forward does not call them")
        yield sites, {name: recorder.parts for name, recorder in recorders.items()}
    finally:
        for site in attached:
            site.restore()
