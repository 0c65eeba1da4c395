"""Progress of long work: counts, elapsed time and what is left, for any progress callback.

Library code reports through a plain ``progress(message)`` callable. Work that can count its units (models in
``fit_table``, stages of a cold plan, chunks of data to tokenize) wraps the callable in ``counted``: each unit then
reads "planning X 3/25 ... 0:42 elapsed, about 4:10 left", and a callback that can draw a bar (``Terminal``, which
the CLI and ``train`` use) draws one with tqdm instead. Nothing here prints unless a callback is given.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Counted:
    """``total`` units of work, each begun with ``step(label)``; messages from inside a unit (``__call__``) are
    shown beside its count. The estimate of what is left is the mean time per finished unit so far."""

    def __init__(self, progress: Callable[[str], None], total: int, what: str) -> None:
        self.progress, self.total, self.what = progress, max(1, total), what
        self.started = time.perf_counter()
        self.done = -1  # units finished; step() begins the first
        self.label = ""
        counter = getattr(progress, "counter", None)
        self.bar = counter(self.total, what) if counter else None

    def step(self, label: str = "") -> None:
        """Begins the next unit (and so finishes the one before); a count that was a guess grows when passed."""
        self.done += 1
        if self.done >= self.total:
            self.total = self.done + 1
            if self.bar is not None:
                self.bar.total = self.total
        self.label = label
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            self.bar.set_postfix_str(label, refresh=True)
            return
        self.progress(self._line(label))

    def __call__(self, message: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.label}: {message}" if self.label else message, refresh=True)
        else:
            self.progress(self._line(f"{self.label}: {message}" if self.label else message))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _line(self, label: str) -> str:
        elapsed = time.perf_counter() - self.started
        done = max(0, self.done)
        left = f", about {_clock(elapsed / done * (self.total - done))} left" if done else ""
        return (f"{self.what} {done + 1}/{self.total}" + (f" {label}" if label else "")
                + f" ({_clock(elapsed)} elapsed{left})")

    @property
    def inner(self) -> "_Inner":
        """A callback for the work inside one unit: its messages show beside the count, and work that would count
        its own units (a plan inside ``fit_table``) reports labels instead of starting a second count."""
        return _Inner(self)


class _Inner:
    nested = True

    def __init__(self, outer: Callable[[str], None]) -> None:
        self.outer = outer

    def __call__(self, message: str) -> None:
        self.outer(message)

    def step(self, label: str = "") -> None:
        self.outer(label)

    def close(self) -> None:
        pass


def counted(progress: Callable[[str], None] | None, total: int, what: str) -> Counted | _Inner | None:
    """A ``Counted`` over ``progress``; inside another's unit (``Counted.inner``), a pass-through of labels; None when
    there is no callback (callers then report nothing)."""
    if progress is None:
        return None
    if getattr(progress, "nested", False):
        return _Inner(progress)
    return Counted(progress, total, what)


def stage(progress, label: str) -> None:
    """Begins the next unit of a ``Counted`` callback, or reports ``label`` to a plain one."""
    if progress is None:
        return
    step = getattr(progress, "step", None)
    if step is not None:
        step(label)
    else:
        progress(label)


class Terminal:
    """Progress on stderr for people: one line rewritten in place, and a tqdm bar (count, rate, elapsed and time
    left) for counted work. Disabled, it reports nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.width = 0
        self.bars: list = []

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bars:
            self.bars[-1].set_postfix_str(message, refresh=True)
            return
        if self.tty:
            sys.stderr.write("\r" + message[:160].ljust(self.width))
            self.width = min(len(message), 160)
        else:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def counter(self, total: int, what: str):
        """A tqdm bar of ``total`` units on a terminal; None elsewhere (a log then gets one line per message, each
        with its count, elapsed time and time left) or when disabled."""
        if not (self.enabled and self.tty):
            return None
        from tqdm.auto import tqdm

        self.done()
        bar = tqdm(total=total, desc=what, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5,
                   bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
        self.bars.append(bar)
        close = bar.close

        def closed() -> None:
            close()
            if bar in self.bars:
                self.bars.remove(bar)

        bar.close = closed
        return bar

    def done(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0
