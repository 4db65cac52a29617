"""Progress for long work that reads well both on a terminal and in a CI log.

On a terminal: a rich progress bar on the CLI's console (nested under its status). Elsewhere
(a pipe, a CI log, `nohup`): a plain line at least every `interval_s` seconds with the
step, the percentage, the elapsed time and the ETA, so a log shows the job is alive and
how long it has left. Rich alone cannot do the second part (a non-terminal Console
prints nothing until the bar ends), hence this small wrapper.

    with progress("distill", total=steps) as bar:
        for ...:
            bar.advance(info=f"loss {loss:.3f}")

The pipeline names the step being run (`step_label("02-distill")`), so lines read
`02-distill: distill 1200/3000 (40%), 1m02s elapsed, ETA 1m33s`.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

INTERVAL_S = 30.0
_STEP: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgeopt_progress_step", default=None)


class Tracker(Protocol):
    def advance(self, n: float = 1, info: str = "") -> None:
        """`n` more units done; `info` is a short status (e.g. the loss) shown beside the bar."""

    def update(self, completed: float, info: str = "", total: float | None = None) -> None:
        """Set the units done; `total` when the amount of work is learnt only once it started."""


@contextmanager
def step_label(name: str) -> Iterator[None]:
    """Prefix progress lines with the pipeline step being run."""
    token = _STEP.set(name)
    try:
        yield
    finally:
        _STEP.reset(token)


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainTracker:
    """Writes a progress line each time `interval_s` passes, and a last one at the end if it wrote
    any: work that finishes within `interval_s` stays silent, as on a terminal.

    `tick()` is also called by a background thread once a second, so a step that never
    advances (an export, one slow batch) still prints a line at least every `interval_s`.
    """

    def __init__(self, description: str, total: float | None, stream: TextIO, interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, completed: float = 0) -> None:
        self.description, self.total, self.stream, self.interval_s, self.clock = (
            description, total, stream, interval_s, clock)
        self.completed = self._resumed = completed
        self.info = ""
        self.started = self._last = clock()
        self._lock = threading.Lock()
        self.prefix = f"{_STEP.get()}: " if _STEP.get() else ""
        self.lines = 0

    def advance(self, n: float = 1, info: str = "") -> None:
        self.update(self.completed + n, info)

    def update(self, completed: float, info: str = "", total: float | None = None) -> None:
        self.completed = completed
        self.total = total or self.total
        self.info = info or self.info
        self.tick()

    def tick(self) -> None:
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self._write(self.line())

    def finish(self) -> None:
        if self.lines:
            self._write(self.line("done"))

    def line(self, event: str = "") -> str:
        elapsed = self.clock() - self.started
        head = f"{self.prefix}{self.description}"
        if self.total:
            fraction = min(1.0, self.completed / self.total)
            head += f" {self.completed:g}/{self.total:g} ({100 * fraction:.0f}%)"
        parts = [head]
        if event:
            parts.append(event)
        parts.append(f"{duration(elapsed)} elapsed")
        done_here = self.completed - self._resumed
        if self.total and event != "done" and done_here > 0 and self.completed < self.total:
            remaining = (self.total - self.completed) * elapsed / done_here
            parts.append(f"ETA {duration(remaining)}")
        if self.info:
            parts.append(self.info)
        return ", ".join(parts)

    def _write(self, line: str) -> None:
        with self._lock:
            self.lines += 1
            self.stream.write(line + "\n")
            self.stream.flush()


class _RichTracker:
    def __init__(self, bar, task) -> None:  # noqa: ANN001
        self.bar, self.task = bar, task

    def advance(self, n: float = 1, info: str = "") -> None:
        self.bar.update(self.task, advance=n, **({"info": info} if info else {}))

    def update(self, completed: float, info: str = "", total: float | None = None) -> None:
        extra = {**({"info": info} if info else {}), **({"total": total} if total else {})}
        self.bar.update(self.task, completed=completed, **extra)


class _Silent:
    def advance(self, n: float = 1, info: str = "") -> None:
        pass

    def update(self, completed: float, info: str = "", total: float | None = None) -> None:
        pass


@contextmanager
def progress(description: str, total: float | None = None, *, completed: float = 0, enabled: bool = True,
             stream: TextIO | None = None, interval_s: float = INTERVAL_S,
             clock: Callable[[], float] = time.monotonic, heartbeat: bool = True) -> Iterator[Tracker]:
    """A progress tracker; `total=None` when the amount of work is unknown.

    Goes to the CLI's console (standard output) unless `stream` is given. `heartbeat=False`
    skips the background thread (tests drive `tick()` with a fake clock).
    """
    if not enabled:
        yield _Silent()
        return
    if _isatty(stream or sys.stdout):
        yield from _rich_tracker(description, total, completed, stream)
        return
    stream = stream or sys.stdout
    tracker = PlainTracker(description, total, stream, interval_s, clock, completed)
    stop = threading.Event()
    thread = None
    if heartbeat:
        def beat() -> None:
            while not stop.wait(min(1.0, interval_s)):
                tracker.tick()

        thread = threading.Thread(target=beat, name=f"progress-{description}", daemon=True)
        thread.start()
    try:
        yield tracker
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    tracker.finish()  # after the heartbeat stopped: "done" is the last line


_ACTIVE: list = []  # the rich Progress on screen: nested work (distill inside sweep) adds a row to it


def _rich_tracker(description: str, total: float | None, completed: float,
                  stream: TextIO | None) -> Iterator[Tracker]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from edgeopt.console import shared_console

    label = f"{_STEP.get()}: {description}" if _STEP.get() else description
    if _ACTIVE:
        bar = _ACTIVE[-1]
        task = bar.add_task(label, total=total, completed=completed, info="")
        try:
            yield _RichTracker(bar, task)
        finally:
            bar.remove_task(task)
        return
    counted = (BarColumn(), MofNCompleteColumn()) if total else (SpinnerColumn(),)
    columns = (TextColumn("{task.description}"), *counted, TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    console = shared_console() if stream is None else Console(file=stream)
    with Progress(*columns, console=console, transient=True) as bar:
        _ACTIVE.append(bar)
        try:
            yield _RichTracker(bar, bar.add_task(label, total=total, completed=completed, info=""))
        finally:
            _ACTIVE.pop()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
