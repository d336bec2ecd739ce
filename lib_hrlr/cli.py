"""Command line: ``hrlr generate|upscale|bench ...`` (or ``python -m lib_hrlr ...``), a thin layer
over the Python API (:mod:`lib_hrlr.api`).

Exit status: 0 done, 2 bad input (the message names the field), 130 interrupted, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline.params import GenerationParams


TXT2IMG_STRENGTH = 0.45  # generate's default; the upscaler's is lib_hrlr.api.UPSCALE_STRENGTH (0.3)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="text to image at any size in a fixed memory budget")
    g.add_argument("--prompt", required=True)
    g.add_argument("--width", type=int, required=True)
    g.add_argument("--height", type=int, required=True)
    g.add_argument("--init-image", default=None, metavar="IMAGE",
                   help="start from this PNG/JPEG/WebP (resized to --width x --height) instead of a base image")
    _add_run_options(g, TXT2IMG_STRENGTH, "how much the tiled pass may change the upscaled base")


def _add_upscale(sub) -> None:
    from .api import UPSCALE_STRENGTH

    u = sub.add_parser("upscale", help="your PNG/JPEG/WebP, bigger: resized, re-detailed in tiles, in a fixed memory budget")
    u.add_argument("image", metavar="IMAGE", help="the PNG, JPEG or WebP to upscale")
    u.add_argument("--scale", type=float, default=None, help="2 or 4: output = scale x the input (default 2)")
    u.add_argument("--width", type=int, default=None, help="output width instead of --scale (alone: keeps the aspect ratio)")
    u.add_argument("--height", type=int, default=None, help="output height instead of --scale")
    u.add_argument("--prompt", default="", help="what the image shows (helps the added detail)")
    _add_run_options(u, UPSCALE_STRENGTH, f"how much the tiled pass may change your image (default {UPSCALE_STRENGTH}, "
                                          f"lower than generate's {TXT2IMG_STRENGTH}; 0: only the VAE round trip)")


def _add_run_options(g, strength: float, strength_help: str) -> None:
    """The options generate and upscale share."""
    g.add_argument("--negative", default="")
    g.add_argument("--model", default=None,
                   help="SD 1.x checkpoint (.safetensors, .ckpt) or diffusers folder; "
                        "without it the default hub model is used when online")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--base-steps", type=int, default=None, help="steps of the native-size base pass (default: --steps)")
    g.add_argument("--strength", type=float, default=strength, help=strength_help)
    g.add_argument("--sampler", default="dpmpp_2m_karras",
                   help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim (or the webui's names)")
    g.add_argument("--cfg", type=float, default=7.0)
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--tile", type=int, default=None,
                   help="tile size in latent px (default: the model's native size, 64 = 512 px for SD 1.x)")
    g.add_argument("--overlap", type=int, default=None, help="tile overlap in latent px (default: a quarter of the tile)")
    g.add_argument("--tile-batch", type=int, default=None, help="tiles per UNet call (default: what the budget allows)")
    g.add_argument("--weighting", default="gaussian", choices=None, help="gaussian (Mixture of Diffusers) or uniform (MultiDiffusion)")
    g.add_argument("--micro-conditioning", default="offset", metavar="POLICY",
                   help="SDXL: what each tile's size/crop conditioning says: offset (default; the tile's crop offset "
                        "in a canvas of the output size), zero (each tile a whole picture) or canvas (the webui's "
                        "values, output size and crop 0, for every tile)")
    g.add_argument("--region", action="append", default=[], metavar="X,Y,W,H[,WEIGHT]:PROMPT",
                   help="a rectangle in output pixels with its own prompt; repeatable. WEIGHT (default 1) is the "
                        "prompt's share of the blend inside it, fading to 0 across --region-feather at its edges")
    g.add_argument("--region-feather", type=float, default=None, metavar="PX",
                   help="width of each region's soft edge in px (default: 1/8 of the region's shorter side; 0: hard edge)")
    g.add_argument("--decoder", default=None, choices=("full", "taesd"),
                   help="full (tiled SD VAE, exact; the default) or taesd (fast)")
    g.add_argument("--vae", default=None, metavar="FILE",
                   help="a VAE file (single-file LDM or diffusers AutoencoderKL, .safetensors or .ckpt) replacing "
                        "the checkpoint's own; the values full/taesd are still read as --decoder")
    g.add_argument("--vae-tile", type=int, default=None, help="VAE decode tile in latent px (default: from the budget)")
    g.add_argument("--vae-attention", default="global", help="global (exact) or tile (faster, approximate)")
    g.add_argument("--taesd-dir", default=None, help="folder with taesd_encoder/decoder.safetensors (or $HRLR_TAESD_DIR)")
    g.add_argument("--clip-skip", type=int, default=1, help="as the webui: 1 = last CLIP layer, 2 = penultimate")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA (kohya/webui or diffusers/PEFT .safetensors/.pt) merged as weights stream in; repeatable")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="textual-inversion file or folder; its file stem used as a word in the prompt expands; repeatable")
    g.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 (auto: bf16 on CPUs with AVX512-BF16, else fp32; fp16 on CUDA)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--vae-device", default="cpu", help="where the VAE runs (cpu keeps VRAM for the UNet)")
    g.add_argument("--budget-mb", type=float, default=800.0)
    g.add_argument("--weight-cache", default="auto", metavar="auto|off|DIR",
                   help="where the UNet's weights are kept converted to the compute dtype, written once on the first "
                        "run (SD 1.5: 1.60 GiB, SDXL: 4.78 GiB; only where that is no larger than the checkpoint, e.g. fp16 -> bf16) so that streaming reads need no conversion "
                        "(default auto: ~/.cache/hrlr/prepared or $HRLR_CACHE/prepared; off: convert on every read)")
    g.add_argument("--spill-dir", default=None, help="folder on a disk for the tiled VAE's temporary files, checked for room before the run "
                        "(default: $HRLR_SPILL_DIR, else the system temp folder, or ~/.cache/hrlr/spill where that is tmpfs)")
    g.add_argument("--out", default=None,
                   help="the PNG to write (NAME-SEED.png each with --batch-count); default: "
                        "OUTDIR/txt2img-images (img2img-, upscale-)/YYYY-MM-DD/NNNNN-SEED.png, never overwriting")
    g.add_argument("--outdir", default="outputs", help="root of the default output folders (default: outputs)")
    g.add_argument("--batch-count", type=int, default=1, help="images with consecutive seeds, the model opened once")
    g.add_argument("--report", default=None, help="write the memory/time report as JSON here")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="measure peak RSS and time of generate in a child process, with random weights")
    b.add_argument("--arch", default="sd15",
                   help="sd15 or sdxl (the exact architectures), tiny or tiny_xl (small test configurations)")
    b.add_argument("--width", type=int, default=2048)
    b.add_argument("--height", type=int, default=2048)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--strength", type=float, default=None, help="default 0.45 (txt2img), 0.3 (upscale)")
    b.add_argument("--mode", default="txt2img", choices=("txt2img", "upscale"),
                   help="txt2img: generate; upscale: hrlr upscale of --image to --width x --height")
    b.add_argument("--image", default=None, help="with --mode upscale: the input (default: skimage's astronaut, 512²)")
    b.add_argument("--sampler", default="dpmpp_2m_karras")
    b.add_argument("--vae", default="full")
    b.add_argument("--dtype", default="auto")
    b.add_argument("--budget-mb", type=float, default=800.0)
    b.add_argument("--weight-cache", default="auto", metavar="auto|off|DIR",
                   help="generate's --weight-cache; the bench prepares the file before the timed run and reports "
                        "how long that took")
    b.add_argument("--tile-batch", type=int, default=None)
    b.add_argument("--tile", type=int, default=None, help="tile in latent px (default: generate's, the model's native latent)")
    b.add_argument("--overlap", type=int, default=None, help="tile overlap in latent px (default: generate's)")
    b.add_argument("--taesd-dir", default=None)
    b.add_argument("--json", default=None, help="write the results here")
    b.add_argument("--keep-image", default=None, help="also keep the generated PNG here")
    # the budget sweep (lib_hrlr/bench/sweep.py)
    b.add_argument("--sweep", action="store_true",
                   help="run the 30 budget-sweep configurations, 2 steps each (--arch and --json apply): estimate, "
                        "measured peak and margin for each; exit 1 if any peak exceeds its budget")
    b.add_argument("--sweep-only", default=None, metavar="I,J,...", help="with --sweep: only these rows (0-based)")
    b.add_argument("--sweep-bf16", action="store_true",
                   help="with --sweep: run the bf16 rows even on a CPU without AVX512-BF16/AMX (skipped there "
                        "otherwise: torch's fallback kernels take days)")
    # UNet-only side-by-side timing (lib_hrlr/bench/unet_speed.py)
    b.add_argument("--unet-only", action="store_true",
                   help="time one UNet evaluation in one process: diffusers, ours resident, chunked, streamed")
    b.add_argument("--variants", default="diffusers,resident,chunked,streamed", help="with --unet-only")
    b.add_argument("--batches", default="2,10", help="with --unet-only: samples per call, comma-separated")
    b.add_argument("--repeats", type=int, default=3, help="with --unet-only: interleaved rounds")
    b.add_argument("--latent", type=int, default=None, help="with --unet-only: latent px (default: the model's tile)")
    b.add_argument("--unet-dtype", default="bf16", choices=("fp32", "bf16"), help="with --unet-only")
    b.add_argument("--threads", type=int, default=2,
                   help="with --unet-only and --peer: torch threads (0: torch's default)")
    b.add_argument("--allocator", default="tuned", choices=("tuned", "default"),
                   help="with --unet-only: tuned = generate's allocator settings (runtime.tune_allocator)")
    b.add_argument("--cache-mb", type=float, default=0.0, help="with --unet-only: the streamed UNet's weight cache")
    b.add_argument("--no-prefetch", action="store_true", help="with --unet-only: stream without the prefetch thread")
    # VAE-only side-by-side timing (lib_hrlr/bench/vae_speed.py)
    b.add_argument("--vae-only", action="store_true",
                   help="time our exact tiled VAE decode against diffusers' tiled decode on the same latent, in one "
                        "process (--latent: latent px, default 128; --repeats, --threads apply)")
    b.add_argument("--vae-dtype", default="bf16", choices=("fp32", "bf16"), help="with --vae-only")
    b.add_argument("--vae-tile", type=int, default=None,
                   help="with --vae-only: our tile in latent px (default: what --budget-mb picks)")
    b.add_argument("--exact-latent", type=int, default=32,
                   help="with --vae-only: latent px of the tiled-vs-untiled exactness check (0: skip)")
    b.add_argument("--spill-dir", default=None, help="with --vae-only: folder of our spill files")
    # side by side with a peer (lib_hrlr/bench/peer.py), and inside a memory cgroup (lib_hrlr/bench/child.py)
    b.add_argument("--peer", default=None, choices=("diffusers",),
                   help="also run the same job with diffusers (MultiDiffusion panorama over our tiles, tiled VAE) "
                        "in a child process and print speed_ratio per stage and memory_ratio")
    b.add_argument("--peer-view-batch", type=int, default=None,
                   help="with --peer: diffusers' view_batch_size (default: our plan's tiles per UNet call)")
    b.add_argument("--cgroup-limit-mb", type=float, default=None,
                   help="run the child(ren) in a fresh memory cgroup with this hard limit (page cache counted); "
                        "refused with the reason where no cgroup can be made")
    b.add_argument("--cold", action="store_true", help="drop the page cache before each child (needs root)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="hrlr", description="HighRes-LowRAM: Stable Diffusion at 2K+ in 800 MB")
    p.add_argument("--version", action="version", version=f"hrlr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_upscale(sub)
    _add_bench(sub)
    return p


def params_from_args(a) -> "GenerationParams":
    from .pipeline.params import GenerationParams
    from .text.extra_networks import parse_lora_option
    from .tiling.regions import parse_region

    regions = tuple(parse_region(s, index=i) for i, s in enumerate(a.region))
    decoder, vae_file = decoder_and_vae_file(a.decoder, a.vae)
    return GenerationParams(
        prompt=a.prompt, negative=a.negative, width=a.width, height=a.height, model=a.model,
        steps=a.steps, base_steps=a.base_steps, strength=a.strength, sampler=a.sampler, cfg=a.cfg,
        seed=a.seed, tile=a.tile, overlap=a.overlap, weighting=a.weighting, regions=regions,
        micro_conditioning=a.micro_conditioning,
        region_feather=a.region_feather,
        tile_batch=a.tile_batch, vae=decoder, vae_file=vae_file, vae_tile=a.vae_tile, vae_attention=a.vae_attention,
        taesd_dir=a.taesd_dir, clip_skip=a.clip_skip, dtype=a.dtype, device=a.device,
        vae_device=a.vae_device, budget_mb=a.budget_mb, spill_dir=a.spill_dir, out=a.out or "hrlr.png",
        report=a.report, init_image=getattr(a, "init_image", None),
        loras=tuple(parse_lora_option(s, "lora") for s in a.lora), embeddings=tuple(a.embedding),
        weight_cache=a.weight_cache,
    )


def run_generate(a, params: "GenerationParams | None" = None, kind: str | None = None) -> int:
    from .api import run_batch
    from .memory.meter import MemoryMeter
    from .pipeline.progress import TerminalBar
    from .runtime import tune_allocator

    tune_allocator()
    params = params or params_from_args(a)
    from .text.extra_networks import with_prompt_loras

    for w in with_prompt_loras(params, None)[1]:  # the CLI takes LoRAs from --lora only
        print(f"warning: {w}; pass the file with --lora FILE[:WEIGHT]", file=sys.stderr)
    def log(line: str) -> None:  # with --quiet, warnings only
        if not a.quiet or line.startswith("warning:"):
            print(line, file=sys.stderr)

    with MemoryMeter() as meter:
        results = run_batch(params, a.batch_count, out=a.out, outdir=a.outdir, kind=kind, meter=meter, log=log,
                            progress=None if a.quiet else TerminalBar())
    print(meter.report().table(), file=sys.stderr)
    for r in results:
        print(f"wrote {r.path} ({r.params.width}x{r.params.height}, seed {r.seed})")
    return 0


def decoder_and_vae_file(decoder: str | None, vae: str | None) -> tuple[str, str | None]:
    """``--decoder`` and ``--vae``: ``--vae full|taesd`` is the old spelling of ``--decoder``;
    any other ``--vae`` value is a VAE file."""
    from .errors import InvalidInput

    if vae in ("full", "taesd"):
        if decoder is not None and decoder != vae:
            raise InvalidInput("decoder", f"--decoder {decoder} and --vae {vae} (the old spelling of --decoder) disagree")
        return vae, None
    return decoder or "full", vae


def run_upscale(a) -> int:
    from .api import upscale_params

    a.init_image = None
    base = params_from_args(a)
    params = upscale_params(a.image, scale=a.scale, width=a.width, height=a.height, strength=a.strength, params=base)
    return run_generate(a, params, kind="upscale")


# torch's CPU allocator: with this set to 1 when torch starts, every tensor of 2 MB or more is
# 2 MB-aligned and advised to the kernel as transparent huge pages (madvise MADV_HUGEPAGE, used
# where THP is "always" or "madvise"), so it is faulted in 2 MB at a time instead of 4 KB.  Such
# tensors are still unmapped when freed, so nothing stays resident after them.  SD 1.5, fp32,
# 4 samples at 64x64, 2 threads, one resident UNet call: 2.87 M minor page faults, 12.0 s of
# system time and 43.2 s wall without it; 0.35 M, 6.7 s and 40.9 s with it.
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def entry() -> int:
    """The ``hrlr`` command and ``python -m lib_hrlr``: :func:`main`, with large tensors in
    transparent huge pages (:data:`THP_ENV`, unless the environment sets it; torch reads it once,
    so this must run before torch is imported)."""
    os.environ.setdefault(THP_ENV, "1")
    return main()


def main(argv: list[str] | None = None) -> int:
    from .errors import HrlrError, Interrupted

    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "upscale":
            return run_upscale(args)
        if args.vae_only:
            from .bench.vae_speed import run_vae_bench

            run_vae_bench(args)
            return 0
        if args.sweep:
            from .bench.sweep import main_sweep

            return main_sweep(args)
        from .bench.run import run_bench

        return run_bench(args)
    except HrlrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print("interrupted: no image was written", file=sys.stderr)
        return 130
