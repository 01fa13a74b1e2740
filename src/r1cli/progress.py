"""Progress bars for long work (loading weights, quantizing while loading, writing the quantized cache): rich bars on
stderr when stderr is a terminal, nothing at all otherwise (pipes, files, CI logs, `r1 serve`'s log).

A bar is drawn at most `REFRESH_PER_S` times a second, from the caller's own thread (no refresh thread): advancing
costs one clock read per call otherwise, so a bar never slows the work it reports on.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

REFRESH_PER_S = 4
_active = False  # one bar at a time: a nested task (e.g. the cache written after a quantized load) takes the line


def enabled() -> bool:
    """A terminal on stderr (and not TERM=dumb), on rank 0 only under torchrun (the ranks share one terminal);
    R1_PROGRESS=0 turns bars off, =1 forces them."""
    forced = os.environ.get("R1_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("RANK", "0") != "0":
        return False
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Bar:
    """One task: `advance(nbytes, items)` as work is done. Total bytes and items are known up front."""

    def __init__(self, description: str, total_bytes: int, total_items: int, unit: str, console=None,
                 clock: Callable[[], float] = time.monotonic):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.clock = clock
        self.items_total, self.items_done, self.unit = total_items, 0, unit
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
            TextColumn("· {task.fields[items]}"), TimeRemainingColumn(compact=True, elapsed_when_finished=True),
            console=console or Console(stderr=True), transient=True, auto_refresh=False,
        )
        self.task = self.progress.add_task(description, total=max(total_bytes, 1), items=self._items())
        self.refreshes = 0
        self.last = clock()
        self.progress.start()
        self._draw()

    def _items(self) -> str:
        return f"{self.items_done}/{self.items_total} {self.unit}"

    def _draw(self) -> None:
        self.progress.refresh()
        self.refreshes += 1

    def advance(self, nbytes: int, items: int = 1) -> None:
        self.items_done += items
        self.progress.update(self.task, advance=nbytes, items=self._items())
        now = self.clock()
        if now - self.last >= 1 / REFRESH_PER_S:
            self.last = now
            self._draw()

    def close(self) -> None:
        self.progress.stop()


class Tracker:
    """What the loader hands to long work (weights.load_weights, quant.write_cache): the work calls
    `start(total_bytes, total_items)` once it knows its size, then `advance(nbytes)` per item. The bar exists
    only in a terminal and when no other bar is up; otherwise both calls do nothing."""

    def __init__(self, description: str, unit: str = "tensors"):
        self.description, self.unit = description, unit
        self.bar: Bar | None = None

    def start(self, total_bytes: int, total_items: int) -> None:
        global _active
        self.close()
        if _active or not enabled() or total_items <= 0:
            return
        self.bar = Bar(self.description, total_bytes, total_items, self.unit)
        _active = True

    def advance(self, nbytes: int, items: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(nbytes, items)

    def close(self) -> None:
        global _active
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            _active = False


@contextmanager
def tracker(description: str, unit: str = "tensors") -> Iterator[Tracker]:
    """A Tracker whose bar (if any) is gone when the block ends, error or not."""
    t = Tracker(description, unit)
    try:
        yield t
    finally:
        t.close()
