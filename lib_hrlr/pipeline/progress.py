"""Progress reporting: stage, unit of work, ETA — as data for callers and as a line for terminals."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    done: int
    total: int
    detail: str
    elapsed_s: float
    eta_s: float | None
    # the whole run: the share of its expected time done, and the seconds left (None: unknown)
    overall: float | None = None
    overall_eta_s: float | None = None


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class WorkTracker:
    """The whole run's progress and ETA over stages of unequal work.

    Each stage has an expected work (:class:`lib_hrlr.pipeline.work.StageWork`, multiply-
    accumulates).  A finished stage gives the seconds per unit of its kind (the base pass
    times the UNet for the tiled pass, the base decode times the decoder for the final
    decode); a kind not measured yet borrows the UNet's rate, else any measured one.  The
    running stage's own rate takes over once part of it is done.  ``clock`` is injectable.
    """

    def __init__(self, stages: Sequence, clock: Callable[[], float] = time.perf_counter):
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.units = {s.name: float(s.units) for s in stages}
        self.clock = clock
        self.t0 = clock()
        self.seconds: dict[str, float] = {}  # finished stages
        self.current: str | None = None
        self.current_t0 = self.t0

    def start(self, name: str, total: int) -> None:
        now = self.clock()
        if self.current is not None and self.current not in self.seconds:
            self.seconds[self.current] = now - self.current_t0
        self.current, self.current_t0 = name, now
        s = self.stages.get(name)
        if s is not None and s.per_unit is not None:
            self.units[name] = s.per_unit * max(1, total)

    def rate(self, kind: str, frac: float = 0.0) -> float | None:
        """Seconds per unit measured on the finished stages of ``kind`` and on the running one
        once ``frac`` > 5 % of it is done; a kind not measured yet borrows the UNet's rate, then
        any other but the text encoder's (a few small calls, all overhead)."""
        spent = {n: t for n, t in self.seconds.items() if n in self.stages}
        done_units = {n: self.units[n] for n in spent}
        cur = self.current
        if cur in self.stages and cur not in spent and frac > 0.05:
            spent[cur] = self.clock() - self.current_t0
            done_units[cur] = self.units[cur] * frac

        def measured(match):
            names = [n for n in spent if match(self.stages[n].kind)]
            units = sum(done_units[n] for n in names)
            return sum(spent[n] for n in names) / units if units > 0 else None

        for match in (lambda k: k == kind, lambda k: k == "unet", lambda k: k != "text"):
            r = measured(match)
            if r is not None:
                return r
        return None

    def remaining(self, frac: float) -> float | None:
        """Seconds left in the run when the current stage is ``frac`` done (None: no rate yet)."""
        now = self.clock()
        left = 0.0
        cur = self.current
        if cur is not None and cur in self.stages:
            spent = now - self.current_t0
            if frac > 0.05:
                left += spent / frac * (1 - frac)
            else:
                r = self.rate(self.stages[cur].kind)
                if r is None:
                    return None
                left += max(0.0, self.units[cur] * r - spent)
        after = self.order.index(cur) + 1 if cur in self.order else 0
        for name in self.order[after:]:
            if name in self.seconds:
                continue
            r = self.rate(self.stages[name].kind, frac)
            if r is None:
                return None
            left += self.units[name] * r
        return left

    def fraction(self, frac: float, eta: float | None) -> float:
        """The share of the run done: by time when the ETA is known, else by expected work."""
        elapsed = self.clock() - self.t0
        if eta is not None and elapsed + eta > 0:
            return min(1.0, elapsed / (elapsed + eta))
        total = sum(self.units.values()) or 1.0
        done = sum(self.units[n] for n in self.seconds if n in self.units)
        if self.current in self.units and self.current not in self.seconds:
            done += self.units[self.current] * frac
        return min(1.0, done / total)


class Progress:
    """Tracks the current stage; each update becomes a ProgressEvent for ``sink``.

    With a work plan (:meth:`plan`), events also carry the whole run's share done and ETA.
    """

    def __init__(self, sink: Callable[[ProgressEvent], None] | None = None):
        self.sink = sink
        self._stage = ""
        self._total = 0
        self._t0 = time.perf_counter()
        self.work: WorkTracker | None = None

    def plan(self, stages: Sequence) -> None:
        self.work = WorkTracker(stages)

    def stage(self, name: str, total: int) -> None:
        self._stage, self._total, self._t0 = name, max(1, total), time.perf_counter()
        if self.work is not None:
            self.work.start(name, self._total)
        self.update(0)

    def update(self, done: int, detail: str = "", total: int | None = None) -> None:
        if total:
            self._total = total
        if self.sink is None:
            return
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self._total - done) if done > 0 else None
        overall = overall_eta = None
        if self.work is not None:
            frac = min(1.0, done / self._total) if self._total else 0.0
            overall_eta = self.work.remaining(frac)
            overall = self.work.fraction(frac, overall_eta)
        self.sink(ProgressEvent(self._stage, done, self._total, detail, elapsed, eta, overall, overall_eta))


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
        if ev.overall is not None:
            line += f" | run {100 * ev.overall:.0f}% ETA {format_eta(ev.overall_eta_s)}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if ev.done >= ev.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
