"""Budget guard: estimate a run's peak before it starts, adapt what can adapt, refuse the rest.

The estimate is per stage: the process baseline (interpreter, torch, our code: measured,
not guessed) plus what the stage keeps resident — streamed weights in flight, the pinned
weight cache, and activations.  Activation sizes come from the architecture (every
tensor the UNet keeps alive for its skip connections, plus a working set around the
largest level) with factors calibrated against measured runs of the SD 1.5 UNet
(``tests/test_budget.py`` checks that the estimate stays above what is measured).

Only two knobs adapt automatically: the number of tiles per UNet call and the size of the
weight cache.  Everything else (tile size, VAE tile, dtype, the budget itself) is the
user's choice, and a plan that cannot fit names the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.architectures import ModelConfig
from ..errors import BudgetError

MB = 1024 * 1024

# Calibrated working-set factors (see module docstring): live activations of one UNet
# sample are about WORK_FACTOR times the largest level's feature map on top of the skips.
UNET_WORK_FACTOR = 6.0
# Chunked attention/feed-forward keep at most this many tokens of the 4x-wide GEGLU alive.
FF_CHUNK_TOKENS = 4096
SAFETY = 1.10


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
    vae_tile: int  # latent px per VAE decode tile
    stages: tuple[StageEstimate, ...] = field(default_factory=tuple)

    @property
    def peak_mb(self) -> float:
        return max(s.mb for s in self.stages)

    def table(self) -> str:
        rows = [f"{'stage':<22}{'estimated MB':>14}  detail"]
        rows += [f"{s.name:<22}{s.mb:>14.0f}  {s.detail}" for s in self.stages]
        rows.append(f"{'budget':<22}{self.budget_mb:>14.0f}")
        return "\n".join(rows)


def unet_activation_bytes(model: ModelConfig, tile: int, samples: int, dtype_bytes: int) -> int:
    """Live activations of a UNet call on ``samples`` tiles of ``tile``×``tile`` latent px."""
    u = model.unet
    skips = 0
    largest = 0
    ch = u.model_channels
    px = tile * tile
    skips += ch * px  # conv_in output
    for level, mult in enumerate(u.channel_mult):
        ds = 4**level
        out_ch = u.model_channels * mult
        for _ in range(u.num_res_blocks):
            skips += out_ch * px // ds
        largest = max(largest, out_ch * px // ds)
        if level != len(u.channel_mult) - 1:
            skips += out_ch * px // (ds * 4)
    # GEGLU feed-forward at the first attention level, chunked over tokens
    ff = 8 * u.model_channels * min(px, FF_CHUNK_TOKENS)
    per_sample = skips + UNET_WORK_FACTOR * largest
    return int((per_sample * samples + ff) * dtype_bytes)


def text_stage_bytes(model: ModelConfig, dtype_bytes: int) -> int:
    t = model.text
    emb = t.vocab_size * t.hidden_size  # the largest single tensor, streamed whole
    layer = 4 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * t.intermediate_size
    acts = 16 * 77 * max(t.intermediate_size, t.hidden_size)
    return int((emb + layer + acts) * dtype_bytes)


def largest_unet_tensors(model: ModelConfig) -> tuple[int, int]:
    """Element counts of the two largest UNet weight tensors (what streaming holds in flight)."""
    u = model.unet
    top = u.model_channels * u.channel_mult[-1]
    a = 2 * top * top * 9  # output ResBlock conv1: (2*top) -> top, 3x3
    b = top * top * 9
    return a, b


def vae_decode_bytes(model: ModelConfig, vae_tile: int, dtype_bytes: int, taesd: bool) -> int:
    """Weights of the decoder plus the working set of one decode tile (vae_tile latent px)."""
    v = model.vae
    f = v.downscale
    px_out = (vae_tile * f) ** 2
    if taesd:
        weights = 1_300_000 * 4
        acts = 6 * 64 * px_out
        return int(weights + acts * 4)
    weights = 49_500_000 * (v.ch / 128) ** 2
    # a segment holds its input (with halo), its output and one intermediate at full resolution
    acts = 4 * v.ch * 2 * px_out
    return int((weights + acts) * dtype_bytes)


def vae_encode_bytes(model: ModelConfig, px_tile: int, dtype_bytes: int, taesd: bool) -> int:
    v = model.vae
    if taesd:
        return int((1_300_000 + 6 * 64 * px_tile * px_tile) * 4)
    weights = 34_200_000 * (v.ch / 128) ** 2
    acts = 4 * v.ch * 2 * px_tile * px_tile
    return int((weights + acts) * dtype_bytes)


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
) -> BudgetPlan:
    """Choose tile batch, weight cache and VAE tile for ``budget_mb``, or raise BudgetError."""
    a, b = largest_unet_tensors(model)
    in_flight = (a + b) * dtype_bytes + a * 2  # two units plus one fp16 read buffer
    room = budget_mb / SAFETY - baseline_mb

    def unet_mb(batch: int) -> float:
        return (in_flight + unet_activation_bytes(model, tile, 2 * batch, dtype_bytes)) / MB

    if room <= 0:
        raise BudgetError(
            "budget_mb",
            f"{budget_mb:.0f} MB is below what the process needs before any model is loaded "
            f"({baseline_mb:.0f} MB); raise --budget-mb",
        )
    # tiles per call: as many as fit (each extra tile amortises one pass over the streamed weights)
    max_batch = max(1, min(n_tiles, 8))
    if tile_batch is not None:
        batch = tile_batch
        if unet_mb(batch) > room:
            raise BudgetError(
                "tile_batch",
                f"{batch} tiles per UNet call need about {unet_mb(batch) + baseline_mb:.0f} MB; "
                f"lower --tile-batch (1 needs {unet_mb(1) + baseline_mb:.0f} MB) or raise --budget-mb",
            )
    else:
        batch = max_batch
        while batch > 1 and unet_mb(batch) > room:
            batch -= 1
        if unet_mb(batch) > room:
            raise BudgetError(
                "tile",
                f"one {tile}x{tile} latent tile needs about {unet_mb(1) + baseline_mb:.0f} MB with "
                f"{dtype_bytes * 8}-bit weights; lower --tile, use a smaller --dtype, or raise --budget-mb",
            )
    cache_mb = max(0.0, room - unet_mb(batch))
    if unet_total_mb is not None:
        cache_mb = min(cache_mb, unet_total_mb)

    # VAE tile: the largest of 64/48/32/16 latent px that fits
    candidates = [vae_tile] if vae_tile is not None else [64, 48, 32, 16]
    chosen = None
    for vt in candidates:
        if vae_decode_bytes(model, vt, dtype_bytes, taesd) / MB <= room:
            chosen = vt
            break
    if chosen is None:
        need = vae_decode_bytes(model, candidates[-1], dtype_bytes, taesd) / MB + baseline_mb
        raise BudgetError(
            "vae_tile",
            f"a {candidates[-1]} latent px VAE tile needs about {need:.0f} MB; "
            f"lower --vae-tile, use --vae taesd, or raise --budget-mb",
        )
    enc_px = chosen * model.vae.downscale
    stages = (
        StageEstimate("text_encoder", baseline_mb + text_stage_bytes(model, dtype_bytes) / MB, "streamed per layer"),
        StageEstimate("base_unet", baseline_mb + unet_mb(1) + cache_mb, f"1 tile, cache {cache_mb:.0f} MB"),
        StageEstimate("guide_encode", baseline_mb + vae_encode_bytes(model, enc_px, dtype_bytes, taesd) / MB,
                      f"{enc_px}px tiles"),
        StageEstimate("tiled_unet", baseline_mb + unet_mb(batch) + cache_mb,
                      f"{batch} tiles/call, cache {cache_mb:.0f} MB"),
        StageEstimate("vae_decode", baseline_mb + vae_decode_bytes(model, chosen, dtype_bytes, taesd) / MB,
                      f"{chosen} latent px tiles"),
    )
    return BudgetPlan(
        budget_mb=budget_mb,
        baseline_mb=baseline_mb,
        tile_batch=batch,
        unet_cache_mb=cache_mb,
        vae_tile=chosen,
        stages=stages,
    )
