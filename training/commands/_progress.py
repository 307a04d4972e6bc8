"""The command line's one progress display: tqdm bars on stderr, fed by the core's reports.

The core (training, inference, data writers) only reports progress, as values or callbacks;
drawing is the commands' job, so every command shows the same kind of bar and ``--quiet`` means
the same thing everywhere. Under torchrun only rank 0 draws (pass ``enabled=dist.is_main``); the
bars go to stderr, so the ranks' stdout lines stay one flushed write each.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.train.trainer import TrainReport


class Bars:
    """Named tqdm bars, each made on its first update (so work refused up front draws nothing).

    ``update(name, done, total, status)`` moves bar ``name`` to ``done`` of ``total``; a bar starts
    one step before the first value it is given, so a resumed run's rate and ETA count only the
    steps done now. Use as a context manager: the bars are closed on the way out, errors included.
    """

    def __init__(self, unit: str = "it", *, enabled: bool = True, unit_scale: bool = False):
        self.unit, self.enabled, self.unit_scale = unit, enabled, unit_scale
        self._bars: dict = {}

    def update(self, name: str, done: int, total: int | None = None, status: str | None = None) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(name)
        if bar is None:
            from tqdm import tqdm

            bar = self._bars[name] = tqdm(total=total or None, initial=max(done - 1, 0), desc=name,
                                          unit=self.unit, unit_scale=self.unit_scale, file=sys.stderr,
                                          leave=True, dynamic_ncols=True)
        if total and bar.total != total:
            bar.total = total
        if status is not None:
            bar.set_postfix_str(status, refresh=False)
        bar.n = done
        bar.refresh()

    def write(self, text: str) -> None:
        """A line that stays above the bars (they are redrawn below it)."""
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)

    def callback(self, name: str) -> Callable[[int, int], None]:
        """``progress(done, total)`` for the core's writers and downloads, drawn as bar ``name``."""
        return lambda done, total: self.update(name, done, total)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track_training(reports: Iterator[TrainReport], *, enabled: bool = True,
                   desc: str = "train") -> Iterator[TrainReport]:
    """Pass a training run's reports through, drawing them as one bar (domain, loss, lr in its
    status) and each validation's mean Dice as a line that stays."""
    with Bars("it", enabled=enabled) as bars:
        for r in reports:
            bars.update(desc, r.iteration, r.iterations or None, f"{r.domain} loss {r.loss:.4f} lr {r.lr:.2e}")
            if r.val_mean is not None:
                bars.write(f"{desc} {r.iteration}/{r.iterations or r.iteration}: val Dice {r.val_mean:.3f}")
            yield r
