"""Progress of long commands on stderr: a bar with an ETA where the amount of work is known,
a count and rate where it is not, and elapsed time for one long wait (a compile).

On a terminal the line is redrawn in place at most twice a second; in a log (not a tty) a
line is written every 10 s, so a job's log shows it is alive without filling up.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Bar:
    """`label [####------] 40% 4/10 units | 2.1 units/s | eta 0:00:03` (with a total), or
    `label 1,234 units | 2.1 units/s` (without)."""

    def __init__(
        self, label: str, total: float | None = None, unit: str = "", stream: TextIO | None = None
    ):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.shown = -1e9
        self.done = 0.0
        self.note = ""
        self.shown_done: float | None = None  # `done` when the line was last written

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        unit = f" {self.unit}" if self.unit else ""
        tail = f" | {rate:,.1f}{unit}/s" if self.done else ""
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
            eta = (self.total - self.done) / rate if rate else None
            count = f"{self.done:,.0f}/{self.total:,.0f}{unit}"
            tail += f" | eta {_duration(eta)}" if eta is not None and frac < 1 else ""
            text = f"{self.label} [{bar}] {frac:4.0%} {count}{tail}"
        else:
            text = f"{self.label} {self.done:,.0f}{unit}{tail}"
        return text + (f" | {self.note}" if self.note else "")

    def update(self, done: float, note: str = "", force: bool = False) -> None:
        self.done, self.note = done, note or self.note
        now = time.perf_counter()
        if not force and now - self.shown < (0.5 if self.tty else 10.0):
            return
        self.shown, self.shown_done = now, done
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")  # and clear what a longer line left
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def advance(self, by: float = 1, note: str = "") -> None:
        self.update(self.done + by, note)

    def skip(self, units: float, note: str) -> None:
        """`units` of the total will not be done (an eval whose split ended early): the bar
        and its eta count the rest."""
        if self.total:
            self.total = max(self.total - units, self.done)
        self.update(self.done, note, force=True)

    def close(self) -> float:
        """Shows the final state (unless that line is already out); returns the seconds it
        took."""
        if self.shown_done != self.done:
            self.update(self.done, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return time.perf_counter() - self.start


@contextlib.contextmanager
def waiting(label: str, stream: TextIO | None = None) -> Iterator[None]:
    """`label ... 12 s` while one long call runs (nothing to count: a compile), from a
    thread, then `label: done in 14.2 s`."""
    out = stream if stream is not None else sys.stderr
    tty, start, stop = out.isatty(), time.perf_counter(), threading.Event()

    def tick() -> None:
        while not stop.wait(0.5 if tty else 10.0):
            text = f"{label} ... {time.perf_counter() - start:.0f} s"
            out.write(("\r" + text + "\x1b[K") if tty else text + "\n")
            out.flush()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    outcome = "failed after"  # what the error then says is the rest of the story
    try:
        yield
        outcome = "done in"
    finally:
        stop.set()
        thread.join()
        text = f"{label}: {outcome} {time.perf_counter() - start:.1f} s"
        out.write(("\r" + text + "\x1b[K\n") if tty else text + "\n")
        out.flush()
