"""Mixture of Diffusers over a large latent canvas: one k-diffusion denoiser call denoises
every tile job and blends their estimates.

Jobs, all of the plan's tile size (one crop size, so region tiles share UNet batches with the
global tiles and never cost an extra pass over the streamed UNet weights):

* the global prompt on every tile of the :class:`TilePlan`;
* for each :class:`Region`, tiles covering its rectangle with the region's prompt.  Along an
  axis where the region is at least a tile long, tiles step across it with the plan's stride
  (the last one aligned to its far edge); where it is shorter, one tile is centred on it (kept
  inside the canvas), so the UNet sees the region in its surroundings at its native size.  A
  region job only writes inside its rectangle.

Blend: each prompt ``p`` (0 = global, ``i`` = region i) has its own estimate, the tile-weighted
mean ``E_p = Σ_t g_t·d_t / Σ_t g_t`` over its tiles (``g``: the Gaussian or uniform tile
weighting), and the result is ``Σ_p share_p · E_p`` with the shares of
:mod:`~lib_hrlr.tiling.regions` (weight 1: the region holds the whole blend inside its rectangle
except the feather band).  Job ``t`` of prompt ``p`` therefore carries the weight map
``share_p · g_t / Σ_t' g_t'`` (float64), the weights of every pixel sum to 1, and one call returns
``Σ w·denoised / Σ w`` over all jobs, float32, where each job's ``denoised`` is the
classifier-free guided estimate of :class:`EpsDenoiser`.  A job whose weight is 0 everywhere (a
global tile entirely inside a weight-1 region's core) is dropped: it would not change the result.

UNet batches hold up to ``batch_size`` samples (a guided job costs 2: its cond and uncond
rows, which may fall in different batches); only crops of one size share a batch.  Jobs are
accumulated in a fixed order, so the result does not depend on ``batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import InvalidInput, Interrupted
from ..sampling.denoiser import EpsDenoiser, stack_contexts
from .plan import Tile, TilePlan, axis_starts
from .regions import Region, feather_px, validate_feather, validate_regions
from .weights import WEIGHTINGS, region_mask

LATENT_DOWNSCALE = 8
UNET_SIZE_MULTIPLE = 8


@dataclass(frozen=True, eq=False)
class TileJob:
    """Denoise ``crop`` with prompt ``prompt`` (index into the contexts) and add
    ``weight * denoised`` over ``box`` (a part of ``crop``; ``weight`` is ``(box.h, box.w)``)."""

    crop: Tile
    box: Tile
    prompt: int
    weight: torch.Tensor


def _region_axis(start: int, length: int, canvas: int, tile: int, stride: int) -> list[int]:
    """Offsets of the ``tile``-long crops covering ``[start, start+length)`` along one axis."""
    if length >= tile:
        return [start + s for s in axis_starts(length, tile, stride)]
    offset = start - (tile - length) // 2
    return [min(max(offset, 0), canvas - tile)]


def region_shares(
    regions: Sequence[Region], height: int, width: int, feather: float | None = None, downscale: int = LATENT_DOWNSCALE
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(share_0, [share_i over region i's latent box])``, float64, from the regions' masks and
    weights (formula in :mod:`~lib_hrlr.tiling.regions`); ``share_0`` covers the canvas."""
    claims = []
    total = torch.zeros(height, width, dtype=torch.float64)
    for r in regions:
        ry, rx, rh, rw = r.latent_box(downscale)
        edges = (ry > 0, ry + rh < height, rx > 0, rx + rw < width)  # no band on the canvas border
        claim = region_mask(rh, rw, feather_px(r, feather) / downscale, edges) * float(r.weight)
        total[ry : ry + rh, rx : rx + rw] += claim
        claims.append((Tile(ry, rx, rh, rw), claim))
    denom = total.clamp(min=1.0)
    share0 = (1.0 - total).clamp(min=0.0) / denom
    return share0, [claim / denom[box.slices()] for box, claim in claims]


def build_jobs(
    plan: TilePlan,
    regions: Sequence[Region] = (),
    weighting: str = "gaussian",
    downscale: int = LATENT_DOWNSCALE,
    size_multiple: int = UNET_SIZE_MULTIPLE,
    feather: float | None = None,
) -> tuple[TileJob, ...]:
    """The jobs of one canvas: global tiles first (prompt 0), then region ``i``'s tiles (prompt
    i+1); weights as in the module docstring.  ``feather``: the regions' feather band in image
    px (None: 1/8 of each region's shorter side).  ``size_multiple`` is accepted for callers
    only: every crop is a whole tile, already a multiple of it."""
    if weighting not in WEIGHTINGS:
        raise InvalidInput("weighting", f"unknown weighting '{weighting}'; choose one of: {', '.join(WEIGHTINGS)}")
    weigh = WEIGHTINGS[weighting]
    validate_regions(regions, width=plan.width * downscale, height=plan.height * downscale)
    validate_feather(feather, regions)
    H, W = plan.height, plan.width
    g = weigh(plan.tile, plan.tile).to(torch.float64)
    share0, shares = region_shares(regions, H, W, feather, downscale)

    norm0 = torch.zeros(H, W, dtype=torch.float64)
    for t in plan.tiles:
        norm0[t.slices()] += g
    jobs = []
    for t in plan.tiles:
        weight = g * (share0[t.slices()] / norm0[t.slices()])
        if bool((weight > 0).any()) or not regions:
            jobs.append(TileJob(t, t, 0, weight))

    stride = plan.tile - plan.overlap
    for i, region in enumerate(regions):
        ry, rx, rh, rw = region.latent_box(downscale)
        crops = [
            Tile(y, x, plan.tile, plan.tile)
            for y in _region_axis(ry, rh, H, plan.tile, stride)
            for x in _region_axis(rx, rw, W, plan.tile, stride)
        ]
        parts = []  # (crop, box, g over the box)
        norm = torch.zeros(rh, rw, dtype=torch.float64)
        for crop in crops:
            by0, bx0 = max(crop.y, ry), max(crop.x, rx)
            by1, bx1 = min(crop.y1, ry + rh), min(crop.x1, rx + rw)
            gb = g[by0 - crop.y : by1 - crop.y, bx0 - crop.x : bx1 - crop.x]
            norm[by0 - ry : by1 - ry, bx0 - rx : bx1 - rx] += gb
            parts.append((crop, Tile(by0, bx0, by1 - by0, bx1 - bx0), gb))
        for crop, box, gb in parts:
            sl = (slice(box.y - ry, box.y1 - ry), slice(box.x - rx, box.x1 - rx))
            jobs.append(TileJob(crop, box, i + 1, gb * (shares[i][sl] / norm[sl])))
    return tuple(jobs)


def prompt_shares(jobs: Sequence[TileJob], height: int, width: int, n_prompts: int) -> torch.Tensor:
    """``(n_prompts, height, width)`` float64: each prompt's fraction of the blend at every pixel."""
    out = torch.zeros(n_prompts, height, width, dtype=torch.float64)
    for job in jobs:
        out[job.prompt][job.box.slices()] += job.weight.to(torch.float64)
    return out / out.sum(0, keepdim=True)


def weight_sum(jobs: Sequence[TileJob], height: int, width: int) -> torch.Tensor:
    """Σ of the jobs' weights over the canvas (float64), the blend's denominator."""
    total = torch.zeros(height, width, dtype=torch.float64)
    for job in jobs:
        total[job.box.slices()] += job.weight.to(torch.float64)
    if not bool((total > 0).all()):
        raise RuntimeError("tile plan leaves part of the canvas without weight")
    return total


class MixtureDenoiser:
    """``MixtureDenoiser(...)(x, sigma) -> denoised`` for a float32 ``(1, C, H, W)`` canvas.

    ``contexts``: ``(1, T, ctx)`` conditionings, the global prompt's first, then one per region
    in order; ``negative``: the negative prompt's (needed when ``denoiser.cfg_scale != 1``);
    ``feather``: the regions' feather band in image px (None: 1/8 of each one's shorter side).
    ``progress(done_jobs, total_jobs)`` is called after every UNet batch; ``should_stop()`` is
    polled before every batch and raises :class:`Interrupted`.  SDXL: ``added(crop, prompt)``
    gives the UNet's ``(1, adm)`` ADM row of a crop for a prompt index (None: the negative),
    e.g. :class:`~lib_hrlr.sampling.micro_conditioning.AddedConditioning` (per-tile
    micro-conditioning).  ``unet_calls`` / ``samples``
    count UNet invocations and the rows they held, over the object's life.
    """

    def __init__(
        self,
        denoiser: EpsDenoiser,
        plan: TilePlan,
        contexts: Sequence[torch.Tensor],
        negative: torch.Tensor | None = None,
        regions: Sequence[Region] = (),
        *,
        weighting: str = "gaussian",
        feather: float | None = None,
        batch_size: int = 2,
        downscale: int = LATENT_DOWNSCALE,
        size_multiple: int = UNET_SIZE_MULTIPLE,
        progress: Optional[Callable[[int, int], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        added: Optional[Callable[[Tile, Optional[int]], torch.Tensor]] = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput("batch_size", f"must be a positive integer, got {batch_size!r}")
        if len(contexts) != 1 + len(regions):
            raise InvalidInput(
                "prompt", f"{len(contexts)} conditionings for 1 global prompt and {len(regions)} regions"
            )
        all_ctx = list(contexts) + ([negative] if negative is not None else [])
        stacked = stack_contexts(all_ctx)  # checks all share (T, ctx)
        if denoiser.uses_uncond and negative is None:
            raise InvalidInput("negative_prompt", "classifier-free guidance needs the negative conditioning")
        self.denoiser = denoiser
        self.plan = plan
        self.contexts = stacked[: len(contexts)]
        self.negative = stacked[len(contexts) :] if negative is not None else None
        self.regions = tuple(regions)
        self.batch_size = batch_size
        self.progress = progress
        self.should_stop = should_stop
        self.added = added
        self.jobs = build_jobs(plan, self.regions, weighting, downscale, size_multiple, feather)
        self.weight_sum = self._weight_sum()
        self.unet_calls = 0
        self.samples = 0

    # -- fixed per canvas -----------------------------------------------------------------------
    def _weight_sum(self) -> torch.Tensor:
        return weight_sum(self.jobs, self.plan.height, self.plan.width)

    def _groups(self) -> list[list[int]]:
        """Job indices grouped by crop size (groups in order of first appearance, job order
        within): the order jobs are run and accumulated in, whatever the batch size."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, job in enumerate(self.jobs):
            groups.setdefault((job.crop.h, job.crop.w), []).append(i)
        return list(groups.values())

    @property
    def samples_per_call(self) -> int:
        """UNet rows one denoiser call costs (all jobs, all guidance halves)."""
        return len(self.jobs) * self.denoiser.samples_per_job

    # -- one denoiser call --------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise InvalidInput("x", f"latents must be float32, got {x.dtype}")
        if x.ndim != 4 or x.shape[0] != 1 or tuple(x.shape[-2:]) != (self.plan.height, self.plan.width):
            raise InvalidInput(
                "x", f"expected a (1, C, {self.plan.height}, {self.plan.width}) canvas, got {tuple(x.shape)}"
            )
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(())
        den = self.denoiser
        guided = den.uses_uncond
        ctx = self.contexts.to(x.device)
        neg = self.negative.to(x.device) if self.negative is not None else None
        # float64 sums: a lone job comes back bit-exact (w*d/w == d in float64) and the
        # rounding does not grow with the number of overlapping jobs
        acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        weight_sum = self.weight_sum.to(x.device)
        total = len(self.jobs)
        done = 0

        pending: dict[int, dict[bool, torch.Tensor]] = {}  # eps rows of a job split across batches

        def finish(j: int, parts: dict[bool, torch.Tensor]) -> None:
            job = self.jobs[j]
            eps = den.guide(parts[False], parts[True]) if guided else parts[False]
            crop = x[(slice(None), slice(None)) + job.crop.slices()]
            denoised = den.to_denoised(crop, sigma, eps)
            oy, ox = job.box.y - job.crop.y, job.box.x - job.crop.x
            part = denoised[:, :, oy : oy + job.box.h, ox : ox + job.box.w]
            acc[(slice(None), slice(None)) + job.box.slices()] += part.to(torch.float64) * job.weight.to(x.device)

        for members in self._groups():
            # UNet rows (job index, is_uncond) of crops of one size
            rows = [(j, u) for j in members for u in ((False, True) if guided else (False,))]
            for b in range(0, len(rows), self.batch_size):
                if self.should_stop is not None and self.should_stop():
                    raise Interrupted()
                chunk = rows[b : b + self.batch_size]
                xb = torch.cat([x[(slice(None), slice(None)) + self.jobs[j].crop.slices()] for j, _ in chunk])
                cb = torch.cat([neg if u else ctx[self.jobs[j].prompt : self.jobs[j].prompt + 1] for j, u in chunk])
                yb = None
                if self.added is not None:
                    yb = torch.cat([self.added(self.jobs[j].crop, None if u else self.jobs[j].prompt) for j, u in chunk])
                eps = den.eps(xb, sigma, cb, yb)
                self.unet_calls += 1
                self.samples += len(chunk)
                for r, (j, u) in enumerate(chunk):
                    parts = pending.setdefault(j, {})
                    parts[u] = eps[r : r + 1]
                    if len(parts) == (2 if guided else 1):
                        finish(j, pending.pop(j))
                        done += 1
                if self.progress is not None:
                    self.progress(done, total)
        return (acc / weight_sum).to(torch.float32)
