"""Budget guard: estimate a run's peak before it starts, adapt what can adapt, refuse the rest.

The estimate is per stage: the process baseline (interpreter, torch, our code: measured
at run time, not guessed) plus what the stage keeps resident — streamed weights in
flight, the pinned weight cache, and activations.  Sizes scale with the architecture
(channels, tile size, largest weight tensor) with factors calibrated against measured runs
of the SD 1.5 UNet and VAEs (``tests/test_budget.py`` re-measures a streamed SD 1.5 UNet
call and checks that the estimate stays above it).

Only three knobs adapt automatically: the number of tiles per UNet call, whether a tile's
guidance halves (prompt and negative) share one UNet call or run one after the other (only
when one tile's two samples do not fit: the weights are then read twice per step, which
costs little next to SDXL's compute and makes fp32 SDXL fit), and the size of the weight
cache.  Everything else (tile size, VAE tile, dtype, the budget itself) is the
user's choice, and a plan that cannot fit names the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.architectures import ModelConfig
from ..errors import BudgetError

MB = 1024 * 1024

# Calibration (SD 1.5 UNet, fp32, 64x64 latent, weights streamed with cache 0 and the model's
# STREAM_* chunking, measured as VmHWM above the RSS before two calls; tests/test_budget.py
# re-measures it):  2 samples +340 MB, 4 samples +446 MB, 6 samples +577 MB.
# Per sample that is ~10-12 feature maps of model_channels x tile^2 floats (the skip
# connections and the 64x64 level's attention and feed-forward).  The fixed part is the
# streaming arena, which holds the largest weight tensor and the next one (~1.1 largest),
# the convolution's re-laid-out copy of one output-channel group (at most STREAM_CONV_BYTES,
# whatever the dtype: bf16 groups hold twice the weights of fp32 ones), and the transients below.
# With those byte-sized groups (bf16: SD 1.5's six largest convolutions in 2 groups instead of
# 20-odd convolutions in groups of 8 M weights) the 10-sample bf16 call measured +463 MB
# (tests/test_budget.py, 2026-12-01; +446 MB before), estimated +514 MB.
UNET_SAMPLE_MAPS = 12.0
# ~50 MB of transients measured around a bare UNet call, plus ~70 MB seen in whole runs
# (prompt conditionings, the blend's batches, allocator fragmentation over many calls): the
# 2048² SD 1.5 bench with 2 tiles per call peaked 570 MB above its baseline against 532 MB
# (call, canvas and a 46 MB cache) estimated with 80 here
UNET_FIXED_MB = 120.0
# Small calls have a floor: their activations are estimated as at least UNET_MIN_CALL_MAPS
# feature maps of model_channels x 64 x 64 (5/3 of a sample at SD 1.x's native latent), whatever
# the tile and the samples.  The same one-sample plan (SD 1.5, fp32, 600 MB, tile 56, 768², one
# sample per call) peaked at 502.7, 607.5, 504.5, 599.2 and 531.7 MB in five runs (2026-12-07;
# the highest samples in the decoder blocks, the difference anonymous memory), i.e. its calls
# reached up to ~370 MB above the planning baseline (cache and canvas apart) where fixed + maps
# gave 310-330 MB; the floor makes that 376 MB.  Calls with more samples were seen at or under
# the fixed + maps estimate (4 samples at 64: 709-764 MB against 762), and SDXL's one-sample
# calls estimate above the floor, so only SD 1.x's smallest fp32 calls change: fp32 SD 1.5 at
# 600 MB is refused (its base pass alone needs about 638 MB); 650 MB is planned.
UNET_MIN_CALL_MAPS = 20.0
# whole-canvas float32 latents alive during the tiled pass: x, noise, guide, the sampler's
# previous denoised, the blend's float64 sum (2) and weight sum, the result...
CANVAS_COPIES = 10
SAFETY = 1.05
# inside a long-lived host process (the webui) the run's own additions measured 8.5 % above
# the estimate (other threads' malloc arenas, the host's torch build): SD 1.5 LowRAM at 2048²
# added 827 MB against 762 estimated, so runs counted from the host's RSS keep a wider margin
HOST_SAFETY = 1.15


@dataclass(frozen=True)
class StageEstimate:
    name: str
    mb: float
    detail: str = ""


@dataclass(frozen=True)
class BudgetPlan:
    budget_mb: float
    baseline_mb: float
    tile_batch: int  # tiles per UNet call (each tile is 2 samples with CFG)
    unet_cache_mb: float
    vae_tile: int  # latent px per VAE decode work unit
    stages: tuple[StageEstimate, ...] = field(default_factory=tuple)
    # most samples (batch rows) per UNet call; None: a call holds all of its tiles' samples.
    # 1: guidance split, each tile's prompt and negative halves in separate calls
    samples_per_call: int | None = None
    # the exact tiled VAE's tile tensors from glibc's heap (faster; its estimate x HEAP_REUSE_FACTOR)
    vae_reuse_heap: bool = False

    @property
    def peak_mb(self) -> float:
        return max(s.mb for s in self.stages)

    def table(self) -> str:
        rows = [f"{'stage':<22}{'estimated MB':>14}  detail"]
        rows += [f"{s.name:<22}{s.mb:>14.0f}  {s.detail}" for s in self.stages]
        rows.append(f"{'budget':<22}{self.budget_mb:>14.0f}")
        return "\n".join(rows)


def largest_unet_tensor(model: ModelConfig) -> int:
    """Elements of the largest UNet weight: the first decoder ResBlock conv, (2*top) -> top, 3x3."""
    top = model.unet.model_channels * model.unet.channel_mult[-1]
    return 2 * top * top * 9


def unet_call_bytes(model: ModelConfig, tile: int, samples: int, dtype_bytes: int, area: int | None = None) -> int:
    """Peak memory of one streamed UNet call on ``samples`` tiles of ``tile``x``tile`` latent px
    (or of ``area`` latent px each: the base pass's whole latent)."""
    from ..models.unet import STREAM_CONV_BYTES

    per_sample = UNET_SAMPLE_MAPS * model.unet.model_channels * (tile * tile if area is None else area) * dtype_bytes
    largest = largest_unet_tensor(model)
    fixed = 1.1 * largest * dtype_bytes + min(largest * dtype_bytes, STREAM_CONV_BYTES) + UNET_FIXED_MB * MB
    least = UNET_MIN_CALL_MAPS * model.unet.model_channels * 64 * 64 * dtype_bytes
    return int(fixed + max(per_sample * samples, least))


def text_stage_bytes(model: ModelConfig, dtype_bytes: int) -> int:
    t = model.text
    emb = t.vocab_size * t.hidden_size  # the largest single tensor, streamed whole
    layer = 4 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * t.intermediate_size
    acts = 16 * 77 * max(t.intermediate_size, t.hidden_size)
    return int((2 * emb + layer + acts) * dtype_bytes)


def vae_stage_bytes(model: ModelConfig, tile: int, dtype_bytes: int, taesd: bool, kind: str,
                    reuse_heap: bool = False) -> int:
    """Weights of one VAE half plus the working set of one tile step (``reuse_heap``: with the
    heap's holes, the exact tiled VAE only)."""
    if taesd:
        # measured at 2048² (fp32, tests/test_taesd.py): decode 32 latent px tiles +78 MB; encode,
        # one resolution at a time in 256 px tiles, +93 MB
        return int((90 if kind == "decode" else 105) * MB * dtype_bytes / 4)
    from ..vae.tiled_vae import HEAP_REUSE_FACTOR, estimate_tile_bytes
    import torch

    dtype = {2: torch.float16, 4: torch.float32}.get(dtype_bytes, torch.float32)
    v = model.vae
    weights = (49_500_000 if kind == "decode" else 34_200_000) * (v.ch / 128) ** 2 * dtype_bytes
    step = estimate_tile_bytes(v, tile if kind == "decode" else tile * v.downscale, dtype, kind=kind)
    return int(weights + step * (HEAP_REUSE_FACTOR if reuse_heap else 1))


VAE_TILES = {False: (64, 48, 32, 16), True: (32, 16)}  # latent px candidates, by taesd


def choose_vae_tile(model: ModelConfig, room_mb: float, dtype_bytes: int, taesd: bool,
                    vae_tile: int | None = None) -> tuple[int | None, bool]:
    """The largest VAE work unit (or ``vae_tile``) whose stages fit ``room_mb`` (None: none
    fits), and whether the exact tiled VAE's steps then reuse the heap: only if that fits too."""
    def fits(vt: int, reuse: bool) -> bool:
        return max(vae_stage_bytes(model, vt, dtype_bytes, taesd, k, reuse) for k in ("encode", "decode")) / MB <= room_mb

    for vt in (vae_tile,) if vae_tile is not None else VAE_TILES[taesd]:
        if fits(vt, False):
            return vt, not taesd and fits(vt, True)
    return None, False


def plan_budget(
    model: ModelConfig,
    *,
    budget_mb: float,
    baseline_mb: float,
    tile: int,
    n_tiles: int,
    dtype_bytes: int,
    taesd: bool,
    tile_batch: int | None = None,
    vae_tile: int | None = None,
    unet_total_mb: float | None = None,
    samples_per_tile: int = 2,
    canvas_pixels: int = 0,
    safety: float = SAFETY,
    base_pixels: int | None = None,
) -> BudgetPlan:
    """Choose tile batch, weight cache and VAE tile for ``budget_mb``, or raise BudgetError.

    ``base_pixels``: latent px of the native-size base pass (one latent, not tiled; default
    one tile), which must fit too."""
    room = budget_mb / safety - baseline_mb
    if room <= 0:
        raise BudgetError(
            "budget_mb",
            f"{budget_mb:.0f} MB is below what the process needs before any model is loaded "
            f"({baseline_mb:.0f} MB); raise --budget-mb",
        )

    split = False  # one sample per call (guidance halves in turn)

    def unet_mb(batch: int) -> float:
        samples = 1 if split else samples_per_tile * batch
        return unet_call_bytes(model, tile, samples, dtype_bytes) / MB + canvas_mb

    canvas_mb = CANVAS_COPIES * model.unet.in_channels * canvas_pixels * 4 / MB

    # tiles per call: as many as fit (each extra tile amortises one pass over the streamed weights)
    if tile_batch is not None:
        batch = tile_batch
        if unet_mb(batch) > room:
            raise BudgetError(
                "tile_batch",
                f"{batch} tiles per UNet call need about {(unet_mb(batch) + baseline_mb) * safety:.0f} MB; "
                f"lower --tile-batch (1 needs {(unet_mb(1) + baseline_mb) * safety:.0f} MB) or raise --budget-mb",
            )
    else:
        batch = max(1, min(n_tiles, 8))
        while batch > 1 and unet_mb(batch) > room:
            batch -= 1
        if unet_mb(batch) > room and samples_per_tile > 1:
            whole = unet_mb(1)
            split = True
            if unet_mb(1) > room:
                fits = largest_fitting_tile(model, room - canvas_mb, dtype_bytes, tile)
                hint = f"--tile {fits} fits" if fits else "no tile fits"
                fixes = "raise --budget-mb, lower --tile, or use a smaller --dtype"
                base_alone = unet_call_bytes(model, tile, 1, dtype_bytes, base_pixels) / MB if base_pixels else 0.0
                if base_alone > room:  # a smaller tile would only be refused next, for the base pass
                    hint = (f"no tile helps: the native-size base pass ({base_pixels} latent px) alone needs about "
                            f"{(base_alone + baseline_mb) * safety:.0f} MB")
                    fixes = "raise --budget-mb or use a smaller --dtype"
                raise BudgetError(
                    "budget_mb",
                    f"one {tile}x{tile} latent tile needs about {(whole + baseline_mb) * safety:.0f} MB with "
                    f"{dtype_bytes * 8}-bit weights ({(unet_mb(1) + baseline_mb) * safety:.0f} MB even with its "
                    f"prompt and negative halves in separate UNet calls; {hint}); {fixes}",
                )
        elif unet_mb(batch) > room:
            raise BudgetError(
                "budget_mb",
                f"one {tile}x{tile} latent tile needs about {(unet_mb(1) + baseline_mb) * safety:.0f} MB with "
                f"{dtype_bytes * 8}-bit weights; raise --budget-mb, lower --tile, or use a smaller --dtype",
            )
    def base_mb() -> float:
        return unet_call_bytes(model, tile, 1 if split else samples_per_tile, dtype_bytes, base_pixels) / MB

    if base_mb() > room:
        raise BudgetError(
            "budget_mb",
            f"the native-size base pass ({base_pixels} latent px) needs about {(base_mb() + baseline_mb) * safety:.0f} MB "
            f"with {dtype_bytes * 8}-bit weights{' and its guidance halves in separate calls' if split else ''}; "
            f"raise --budget-mb or use a smaller --dtype",
        )
    cache_mb = max(0.0, room - max(unet_mb(batch), base_mb()))
    if unet_total_mb is not None:
        cache_mb = min(cache_mb, unet_total_mb)

    chosen, reuse = choose_vae_tile(model, room, dtype_bytes, taesd, vae_tile)
    if chosen is None:
        vt = vae_tile if vae_tile is not None else VAE_TILES[taesd][-1]
        need = max(vae_stage_bytes(model, vt, dtype_bytes, taesd, k) for k in ("encode", "decode")) / MB
        raise BudgetError(
            "vae_tile",
            f"a {vt} latent px VAE tile needs about {(need + baseline_mb) * safety:.0f} MB; "
            f"lower --vae-tile, use --vae taesd, or raise --budget-mb",
        )
    text_mb = text_stage_bytes(model, dtype_bytes) / MB
    if text_mb > room:
        raise BudgetError("budget_mb", f"the text encoder needs about {(text_mb + baseline_mb) * safety:.0f} MB; "
                                       f"raise --budget-mb or use a smaller --dtype")
    heap = ", heap reused" if reuse else ""
    stages = (
        StageEstimate("text_encoder", baseline_mb + text_mb, "streamed per layer"),
        StageEstimate("base_unet", baseline_mb + base_mb() + cache_mb,
                      f"1 tile{', guidance split' if split else ''}, cache {cache_mb:.0f} MB"),
        StageEstimate("guide_encode",
                      baseline_mb + vae_stage_bytes(model, chosen, dtype_bytes, taesd, "encode", reuse) / MB,
                      "TAESD" if taesd else f"{chosen * model.vae.downscale} px work units{heap}"),
        StageEstimate("tiled_unet", baseline_mb + unet_mb(batch) + cache_mb,
                      (f"1 sample/call (guidance split), cache {cache_mb:.0f} MB" if split
                       else f"{batch} tiles/call, cache {cache_mb:.0f} MB")),
        StageEstimate("vae_decode",
                      baseline_mb + vae_stage_bytes(model, chosen, dtype_bytes, taesd, "decode", reuse) / MB,
                      f"{chosen} latent px work units{heap}"),
    )
    return BudgetPlan(
        budget_mb=budget_mb,
        baseline_mb=baseline_mb,
        tile_batch=batch,
        unet_cache_mb=cache_mb,
        vae_tile=chosen,
        stages=stages,
        samples_per_call=1 if split else None,
        vae_reuse_heap=reuse,
    )


def largest_fitting_tile(model: ModelConfig, room_mb: float, dtype_bytes: int, below: int) -> int | None:
    """The largest tile (a multiple of 8 latent px, under ``below``) whose one-sample UNet call
    fits in ``room_mb``; None when not even 8 does."""
    for t in range(below - 8, 7, -8):
        if unet_call_bytes(model, t, 1, dtype_bytes) / MB <= room_mb:
            return t
    return None
