"""``python -m lib_hrlr bench --vae-only``: the exact tiled VAE decode against diffusers' tiled
decode, on the same latent, in one process.

Both sides hold the same weights (the seeded random SD 1.5 checkpoint ``bench`` uses, its
exact VAE): ours is :func:`lib_hrlr.vae.tiled_vae.decode_tiled` as ``generate`` calls it (the
decoder half loaded by :func:`~lib_hrlr.pipeline.components.vae_half`, uint8 output, global
attention, the VAE tile the budget picks unless ``--vae-tile`` says otherwise); diffusers' is
``AutoencoderKL.decode`` after ``enable_tiling()`` (its default 64-latent-px tiles, a quarter
overlap, blended seams: approximate), sharing our tensors.

The calls are interleaved (one of each per round, the order swapped every round) and the
ratio ours / diffusers is taken within each round, so what else loads the machine moves both
sides alike.  Also printed: our peak spill bytes (measured: the spill files open at once)
next to :func:`~lib_hrlr.vae.tiled_vae.estimate_spill_bytes`, and exactness on a small latent
(``--exact-latent``): ours tiled (several tiles per segment) against ours untiled in the same
dtype and against a float32 untiled decode.

On a CPU without oneDNN bfloat16 kernels (AVX2 only: :func:`~lib_hrlr.vae.tiled_vae.kernel_dtype`
returns float32 for bfloat16) torch's bfloat16 convolution in diffusers' NCHW layout falls back
to a reference kernel some 50-100x slower than float32, so a bfloat16 comparison there measures
that fallback; the bench says so, and ``--vae-dtype fp32`` compares like with like.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from . import write_json

BUDGET_MB = 800.0  # the default --budget-mb the VAE tile is chosen for


def budget_vae_tile(cfg, dtype: torch.dtype, budget_mb: float = BUDGET_MB, baseline_mb: float = 0.0,
                    tile: int | None = None) -> tuple[int, bool]:
    """The VAE tile ``generate`` picks at ``budget_mb`` (the largest candidate that fits, or
    ``tile``), and whether its tiles reuse the heap there (``BudgetPlan.vae_reuse_heap``)."""
    from ..memory.budget import SAFETY, choose_vae_tile

    chosen, reuse = choose_vae_tile(cfg, budget_mb / SAFETY - baseline_mb, torch.finfo(dtype).bits // 8, False,
                                    tile or None)
    return (chosen, reuse) if chosen is not None else (tile or 16, False)


def diffusers_decoder_twin(vae, cfg, dtype: torch.dtype):
    """diffusers' AutoencoderKL holding ``vae``'s decoder tensors (shared, not copied); its
    encoder stays on the meta device (never called)."""
    import diffusers

    from ..models.vae import diffusers_key_map
    from ..weights.random_checkpoint import diffusers_configs
    from .unet_speed import assign_shared

    _, vcfg, _ = diffusers_configs(cfg)
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**vcfg)
    assign_shared(theirs, vae, diffusers_key_map(cfg.vae), prefixes=("decoder.", "post_quant_conv."))
    return theirs.eval().requires_grad_(False)


def exactness(ckpt, dtype: torch.dtype, side: int, tile: int, seed: int = 1) -> dict:
    """Max abs differences on a ``side``² latent: tiled vs untiled (same dtype), and both
    against a float32 untiled decode of the same weights."""
    from ..pipeline.components import vae_half
    from ..vae.tiled_vae import decode_tiled

    z = torch.randn(1, ckpt.config.vae.embed_dim, side, side, generator=torch.Generator().manual_seed(seed))
    with vae_half(ckpt, "decoder", torch.float32, torch.device("cpu")) as v32:
        ref = v32.decode(z)
    with vae_half(ckpt, "decoder", dtype, torch.device("cpu")) as v:
        cl = torch.channels_last  # torch's CPU bfloat16 convolution without oneDNN is ~50x slower in NCHW
        untiled = v.to(memory_format=cl).decode(z.to(dtype).contiguous(memory_format=cl)).float()
        with decode_tiled(v, z, tile=tile, dtype=dtype, output="float") as arr:
            tiled = arr.to_tensor()
    return {
        "latent": side, "tile": tile,
        "tiled_vs_untiled": (tiled - untiled).abs().max().item(),
        "tiled_vs_fp32": (tiled - ref).abs().max().item(),
        "untiled_vs_fp32": (untiled - ref).abs().max().item(),
    }


def run_vae_bench(a, log=lambda s: print(s, file=sys.stderr)) -> dict:
    from ..memory.meter import rss_mb
    from ..pipeline.components import vae_half
    from ..runtime import DTYPES, tune_allocator
    from ..vae.tiled_vae import TiledRunStats, decode_tiled, estimate_spill_bytes, kernel_dtype
    from ..weights.checkpoint import open_checkpoint
    from ..weights.random_checkpoint import cached_random_checkpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    tune_allocator()
    dtype = DTYPES[a.vae_dtype]
    if kernel_dtype(dtype) != dtype:
        log("warning: this CPU has no oneDNN bfloat16 kernels: diffusers' bfloat16 decode runs torch's reference "
            "convolution (very slow) while ours computes in float32; use --vae-dtype fp32 to compare like with like")
    ckpt = open_checkpoint(str(cached_random_checkpoint(a.arch)))
    cfg = ckpt.config
    side = a.latent or 128
    tile, reuse = budget_vae_tile(cfg, dtype, a.budget_mb, rss_mb(), a.vae_tile)
    z = torch.randn(1, cfg.vae.embed_dim, side, side, generator=torch.Generator().manual_seed(0))
    load_start = [round(x, 2) for x in os.getloadavg()]
    stats = TiledRunStats()
    out_bytes = {}
    with vae_half(ckpt, "decoder", dtype, torch.device("cpu")) as vae:
        twin = diffusers_decoder_twin(vae, cfg, dtype)
        twin.enable_tiling()

        def ours():
            with decode_tiled(vae, z, tile=tile, dtype=dtype, spill_dir=a.spill_dir, output="uint8", stats=stats,
                              reuse_heap=reuse) as arr:
                out_bytes["ours"] = arr.nbytes

        def theirs():
            twin.decode(z.to(dtype), return_dict=False)[0]

        fns = {"ours": ours, "diffusers": theirs}
        log(f"{side}x{side} latent ({side * 8}² image), {a.vae_dtype}, {torch.get_num_threads()} threads, "
            f"our tile {tile} latent px{', heap reused' if reuse else ''}, {a.repeats} rounds")
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in fns}
        with torch.inference_mode():
            for r in range(a.repeats):
                order = list(fns) if r % 2 == 0 else list(fns)[::-1]
                for n in order:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fns[n]()
                    times[n].append((time.perf_counter() - t0, time.process_time() - c0))
                log(f"  round {r + 1}/{a.repeats}: " + "  ".join(f"{n} {times[n][-1][0]:.2f}s" for n in fns))
    ratios = [o[0] / d[0] for o, d in zip(times["ours"], times["diffusers"])]
    cpu_ratios = [o[1] / d[1] for o, d in zip(times["ours"], times["diffusers"])]
    est = estimate_spill_bytes(cfg.vae, side, side, dtype)
    out = {
        "arch": a.arch, "dtype": a.vae_dtype, "latent": side, "tile": tile, "reuse_heap": reuse,
        "threads": torch.get_num_threads(),
        "ours_s": [round(t[0], 3) for t in times["ours"]], "diffusers_s": [round(t[0], 3) for t in times["diffusers"]],
        "ratio_ours_to_diffusers": [round(x, 4) for x in ratios],
        "median_ratio": round(statistics.median(ratios), 4),
        "median_cpu_ratio": round(statistics.median(cpu_ratios), 4),
        "peak_spill_bytes": stats.peak_spill_bytes, "estimated_spill_bytes": est,
        "passes": stats.passes, "tile_steps": stats.tiles,
        "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    if a.exact_latent:
        out["exactness"] = exactness(ckpt, dtype, a.exact_latent, max(8, a.exact_latent // 3))
    print(f"ours      {' '.join(f'{t:.2f}' for t in out['ours_s'])} s (median {statistics.median(out['ours_s']):.2f})")
    print(f"diffusers {' '.join(f'{t:.2f}' for t in out['diffusers_s'])} s "
          f"(median {statistics.median(out['diffusers_s']):.2f})")
    print(f"ours / diffusers per round {' '.join(f'{x:.3f}' for x in ratios)}: median {out['median_ratio']:.3f} "
          f"(cpu {out['median_cpu_ratio']:.3f})")
    print(f"spill: peak {stats.peak_spill_bytes} bytes measured, {est} estimated "
          f"({stats.passes} passes, {stats.tiles} tile steps)")
    if "exactness" in out:
        e = out["exactness"]
        print(f"exactness at {e['latent']}² latent, tile {e['tile']}: tiled vs untiled {e['tiled_vs_untiled']:.3g}, "
              f"tiled vs fp32 {e['tiled_vs_fp32']:.3g}, untiled vs fp32 {e['untiled_vs_fp32']:.3g}")
    print(f"load average (1/5/15 min) at start {load_start}, at end {out['loadavg_end']} on {os.cpu_count()} CPUs")
    if a.json:
        write_json(a.json, out)
    return out
