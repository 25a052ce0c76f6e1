"""Progress of a long step, reported as `progress(done, total)` by the core functions that take one.

`Tracker` turns those calls into a tqdm bar on stderr when stderr is a terminal and `darwin -q` (DARWIN_QUIET) is
not set, and, every 5%, into a call of `on_percent` (the flows' Prefect progress artifacts, tasks.progress).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

QUIET_ENV = "DARWIN_QUIET"
Progress = Callable[[int, int], None]


def shown() -> bool:
    """Bars are for people watching a terminal: not under -q, not into a file, a pipe or a test's capture."""
    return os.environ.get(QUIET_ENV) != "1" and sys.stderr.isatty()


class Tracker:
    """A `Progress` for one step; a context manager that closes its bar."""

    def __init__(self, description: str, unit: str = "it", on_percent: Callable[[float], None] | None = None):
        self.description, self.unit, self.on_percent = description, unit, on_percent
        self._bar = None
        self._next_percent = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None and shown():
            from tqdm import tqdm

            # disable=False: a TQDM_DISABLE set for the libraries' own bars does not hide darwin's
            self._bar = tqdm(total=total, desc=self.description, unit=self.unit, unit_scale=self.unit == "B",
                             leave=False, dynamic_ncols=True, disable=False)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        percent = 100.0 * done / max(total, 1)
        if self.on_percent is not None and (percent >= self._next_percent or done >= total):
            self.on_percent(percent)
            self._next_percent = percent + 5.0

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
