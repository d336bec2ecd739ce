"""Tiled denoising around any k-diffusion-style denoiser ``inner(x, sigma, **extra) -> denoised``.

This is how an existing sampler loop (the webui's txt2img / img2img) gets Mixture-of-Diffusers
tiling without knowing about it: the wrapper is called with the whole batch ``x`` of shape
``(N, C, H, W)`` and calls ``inner`` on native-size crops of it, several crops per call when
``batch`` allows, then blends the crops' estimates with the tile weights.

``extra`` (e.g. k-diffusion's ``cond={"c_crossattn": [...], "c_concat": [...]}``) is passed
to every crop call; tensors in it whose last two dimensions equal ``x``'s are cropped with
``x`` (image conditionings), other tensors with N rows are repeated for the crops in a call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import Interrupted
from .mixture import build_jobs, weight_sum
from .plan import TilePlan


def _map_extra(value: Any, hw: tuple[int, int], n: int, crops: list, reps: int):
    if isinstance(value, torch.Tensor):
        if value.ndim >= 3 and tuple(value.shape[-2:]) == hw:
            return torch.cat([value[(Ellipsis,) + c.slices()] for c in crops])
        if value.ndim >= 1 and value.shape[0] == n and reps > 1:
            return value.repeat(reps, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, dict):
        return {k: _map_extra(v, hw, n, crops, reps) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_extra(v, hw, n, crops, reps) for v in value)
    return value


class TiledDenoiser:
    """``TiledDenoiser(inner, plan)(x, sigma, **extra)``: the blend of ``inner`` over the plan's tiles.

    ``batch``: crops per ``inner`` call (each crop carries all N rows of x).  A plan of one
    tile covering the canvas calls ``inner`` once on the whole ``x`` and returns its result
    unchanged.  ``should_stop()`` is polled before every call.
    """

    def __init__(self, inner: Callable, plan: TilePlan, *, weighting: str = "gaussian", batch: int = 1,
                 should_stop: Optional[Callable[[], bool]] = None,
                 progress: Optional[Callable[[int, int], None]] = None):
        self.inner = inner
        self.plan = plan
        self.jobs = build_jobs(plan, (), weighting)
        self.batch = max(1, int(batch))
        self.should_stop = should_stop
        self.progress = progress
        self.weight_sum = weight_sum(self.jobs, plan.height, plan.width)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        hw = tuple(x.shape[-2:])
        if hw != (self.plan.height, self.plan.width):
            raise ValueError(f"x is {hw}, the tile plan is for {(self.plan.height, self.plan.width)}")
        n = x.shape[0]
        if len(self.jobs) == 1 and self.jobs[0].crop.h == hw[0] and self.jobs[0].crop.w == hw[1]:
            self.calls += 1
            return self.inner(x, sigma, **extra)
        acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        sig = torch.as_tensor(sigma, device=x.device)
        for b in range(0, len(self.jobs), self.batch):
            if self.should_stop is not None and self.should_stop():
                raise Interrupted()
            group = self.jobs[b : b + self.batch]
            crops = [j.crop for j in group]
            xb = torch.cat([x[(Ellipsis,) + c.slices()] for c in crops])
            sb = sig.repeat(len(crops)) if sig.ndim == 1 and sig.shape[0] == n else sig
            out = self.inner(xb, sb, **_map_extra(extra, hw, n, crops, len(crops)))
            self.calls += 1
            for k, job in enumerate(group):
                part = out[k * n : (k + 1) * n]
                w = job.weight.to(device=x.device, dtype=torch.float64)
                acc[(Ellipsis,) + job.box.slices()] += part.to(torch.float64) * w
            if self.progress is not None:
                self.progress(min(b + self.batch, len(self.jobs)), len(self.jobs))
        return (acc / self.weight_sum.to(x.device)).to(x.dtype)
