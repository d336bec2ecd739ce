"""Progress reporting: stage, unit of work, ETA — as data for callers and as a line for terminals."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    done: int
    total: int
    detail: str
    elapsed_s: float
    eta_s: float | None


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Tracks the current stage; each update becomes a ProgressEvent for ``sink``."""

    def __init__(self, sink: Callable[[ProgressEvent], None] | None = None):
        self.sink = sink
        self._stage = ""
        self._total = 0
        self._t0 = time.perf_counter()

    def stage(self, name: str, total: int) -> None:
        self._stage, self._total, self._t0 = name, max(1, total), time.perf_counter()
        self.update(0)

    def update(self, done: int, detail: str = "", total: int | None = None) -> None:
        if total:
            self._total = total
        if self.sink is None:
            return
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self._total - done) if done > 0 else None
        self.sink(ProgressEvent(self._stage, done, self._total, detail, elapsed, eta))


class TerminalBar:
    """A one-line progress bar on a terminal (or one line per 5 % when not a TTY)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 24):
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._last: tuple[str, int] = ("", -1)

    def __call__(self, ev: ProgressEvent) -> None:
        frac = ev.done / ev.total if ev.total else 0.0
        if not self.tty:
            bucket = int(frac * 20)
            if (ev.stage, bucket) == self._last and ev.done != ev.total:
                return
            self._last = (ev.stage, bucket)
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"[{ev.stage:<12}] {bar} {ev.done}/{ev.total} {ev.detail:<22} "
                f"elapsed {format_eta(ev.elapsed_s)} ETA {format_eta(ev.eta_s)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if ev.done >= ev.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
