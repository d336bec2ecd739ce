"""What one UNet evaluation costs, measured inside the run at no extra cost.

The first call of a freshly streamed UNet loads every weight synchronously (the streamer
learns the execution order on that pass, so nothing is prefetched and no loader thread
competes for the cores).  Its wall time minus the time spent loading is the UNet's own
arithmetic for that batch; divided by the batch it is the time of one evaluation, at the
batch size the run really uses.  ``bench`` divides the run's wall time by
``evaluations × that`` to get ``overhead_ratio``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def _loading_seconds(eps) -> float:
    streamer = getattr(eps, "streamer", None)
    if streamer is None:  # weights already resident (e.g. the webui's model)
        return 0.0
    return streamer.stats.load_seconds + streamer.stats.wait_seconds


class FirstCallTimer:
    """Wraps ``eps(x, t, context)``; times the first call's compute (loads excluded).

    ``seconds`` / ``samples`` accumulate over every instance sharing one ``totals`` dict, so
    a run can time the first call of each stage and report their mean per sample.
    """

    def __init__(self, eps: Callable, device: torch.device, totals: dict):
        self.eps, self.device, self.totals = eps, device, totals
        self.done = False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *extra) -> torch.Tensor:
        """``extra``: what else the UNet takes (SDXL's ADM vector ``y``), passed on."""
        if self.done:
            return self.eps(x, t, context, *extra)
        self.done = True
        before = _loading_seconds(self.eps)
        self._sync()
        t0 = time.perf_counter()
        out = self.eps(x, t, context, *extra)
        self._sync()
        wall = time.perf_counter() - t0
        self.totals["seconds"] = self.totals.get("seconds", 0.0) + max(wall - (_loading_seconds(self.eps) - before), 0.0)
        self.totals["samples"] = self.totals.get("samples", 0) + int(x.shape[0])
        return out


def per_sample_seconds(totals: dict) -> float | None:
    """Mean compute seconds per UNet sample over the timed calls (None when none was timed)."""
    if not totals.get("samples"):
        return None
    return totals["seconds"] / totals["samples"]
