"""The text-to-image pipeline, stage by stage, one model component resident at a time.

    text encoding → base image at native size → guide (upscale + tiled VAE encode + noise)
    → tiled region denoising over the full canvas → tiled VAE decode → PNG

Every stage runs inside a memory-meter label, so the report says which stage and which
module set the peak.  Nothing is written to ``params.out`` until the PNG is complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from ..config.architectures import ModelConfig
from ..image.guide import UpscaledImageSource
from ..image.png import write_png
from ..image.spill import choose_spill_dir, disk_full_error
from ..memory import budget
from ..memory.budget import BudgetPlan, plan_budget
from ..memory.meter import MemoryMeter, rss_mb
from ..runtime import DTYPE_NAMES, resolve_device, resolve_dtype, trim_allocator
from ..sampling.denoiser import EpsDenoiser
from ..sampling.samplers import SamplerSpec, get_sampler
from ..sampling import schedule as sched
from ..tiling.mixture import MixtureDenoiser
from ..tiling.plan import plan_tiles
from ..weights.prepared import cache_folder
from ..errors import InvalidInput
from ..image.init_image import InitImage, load_init_image
from .disk import check_output_folder, estimate_run_spill_bytes, png_bytes_bound
from .params import GenerationParams, base_size, validate, with_model_defaults
from .progress import Progress
from .work import stage_work
from .timing import FirstCallTimer, per_sample_seconds
from . import components
from . import sdxl
from .backend import Backend, CheckpointBackend, RunSettings


@dataclass
class GenerationResult:
    path: str
    infotext: str
    params: GenerationParams
    plan: BudgetPlan
    report: dict
    stats: dict = field(default_factory=dict)


class NoiseSource:
    """Seeded Gaussian noise drawn for the whole canvas, so results don't depend on tiling."""

    def __init__(self, seed: int):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


def build_infotext(p: GenerationParams, model_name: str, model_hash: str, plan: BudgetPlan,
                   spec: SamplerSpec | None = None, extra: dict | None = None) -> str:
    from ..image.infotext import format_infotext

    spec = spec or get_sampler(p.sampler)
    fields = {
        "Steps": p.steps,
        "Sampler": spec.label,
        "Schedule type": spec.schedule.capitalize().replace("_", " "),
        "CFG scale": p.cfg,
        "Seed": p.seed,
        "Size": f"{p.width}x{p.height}",
        "Model hash": model_hash,
        "Model": model_name,
        # its own key: the webui reads "Denoising strength" as hires fix's and would switch it on
        "HRLR guide strength": p.strength,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
        "HRLR base steps": p.base_steps if p.base_steps not in (None, p.steps) else None,
        "HRLR tile": p.tile,
        "HRLR overlap": p.overlap,
        "HRLR weighting": p.weighting,
        "HRLR tile batch": plan.tile_batch,
        "HRLR VAE": p.vae,
        "HRLR regions": json.dumps([asdict(r) for r in p.regions]) if p.regions else None,
        "HRLR region feather": p.region_feather,
        "HRLR budget MB": int(p.budget_mb),
        "HRLR LoRA": ", ".join(f"{s.display_name}:{s.weight:g}" + ("" if s.te_weight is None else f" te {s.te_weight:g}")
                               for s in p.loras) or None,
        "HRLR embeddings": ", ".join(os.path.basename(e.rstrip("/\\")) for e in p.embeddings) or None,
        **(extra or {}),
    }
    return format_infotext(p.prompt, p.negative, {k: v for k, v in fields.items() if v is not None})


def base_latent_pixels(cfg: ModelConfig, width: int, height: int) -> int:
    """Latent px of the native-size base pass of a ``width`` x ``height`` run."""
    f = cfg.vae.downscale
    bw, bh = (sdxl.sdxl_base_size if sdxl.is_sdxl(cfg) else base_size)(width, height, cfg.native_size)
    return (bw // f) * (bh // f)


def open_backend(params: GenerationParams) -> CheckpointBackend:
    """The checkpoint of ``params.model`` (the default hub model without one), streamed, with
    its VAE replaced by ``params.vae_file`` when given."""
    ckpt = components.open_model(params.model)
    vae = None
    if params.vae_file:
        from ..weights.vae_file import open_vae_file, with_vae_file

        vae = open_vae_file(params.vae_file, ckpt.config.vae)
        ckpt = with_vae_file(ckpt, vae)
    backend = CheckpointBackend(ckpt)
    backend.vae_file = vae
    return backend


def vae_infotext(params: GenerationParams, backend) -> dict:
    """The webui's ``VAE hash`` / ``VAE`` fields of a run with a separate VAE file."""
    vae = getattr(backend, "vae_file", None)
    if params.vae_file and vae is None:
        raise InvalidInput("vae_file", "a separate VAE file needs the model streamed from its checkpoint "
                                       "(open_backend), not a model already loaded elsewhere")
    return vae.infotext_fields() if vae is not None else {}


def generate(
    params: GenerationParams,
    *,
    meter: MemoryMeter | None = None,
    progress: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    backend: Backend | None = None,
    sampler: SamplerSpec | None = None,
    infotext_extra: dict | None = None,
    on_preview: Callable[[torch.Tensor], None] | None = None,
    init: InitImage | None = None,
) -> GenerationResult:
    """Run the whole pipeline and write ``params.out``; raise HrlrError subclasses on bad input.

    With ``params.init_image`` the user's image, resized to the target, replaces the base
    pass (``init``: that image already read, e.g. once for a batch; the caller closes it).

    ``backend`` supplies the networks (default: stream them from ``params.model``);
    ``sampler`` replaces the sampler named by ``params.sampler`` (e.g. the webui's own, with
    its scheduler); ``on_preview(latent)`` sees the canvas after every step of the tiled pass.
    """
    own_meter = meter is None
    meter = meter or MemoryMeter()
    if own_meter:
        meter.start()
    prog = Progress(progress)
    say = log or (lambda s: None)
    stats: dict = {}
    own_init = None
    t_start = time.perf_counter()
    try:
        device = resolve_device(params.device)
        dtype = resolve_dtype(params.dtype, device)
        with meter.stage("load"):
            if backend is None:
                backend = open_backend(params)
        vae_fields = vae_infotext(params, backend)
        dtype = backend.model_dtype or dtype  # a resident model computes in its own dtype
        vae_device = resolve_device(params.vae_device)
        vae_dtype = dtype if vae_device.type == device.type else resolve_dtype(params.dtype, vae_device)
        vae_dtype = sdxl.vae_dtype(backend.config, params.vae, vae_dtype)  # SDXL's VAE overflows in fp16
        if device.type == "cuda":
            meter.cuda_device = device
        cfg: ModelConfig = backend.config
        params = with_model_defaults(params, cfg)
        validate(params, cfg)
        check_output_folder(params.out, png_bytes_bound(params.width, params.height))
        params = params.with_seed()
        f = cfg.vae.downscale
        lh, lw = params.height // f, params.width // f
        tiles = plan_tiles(lh, lw, params.tile, params.overlap)
        if (params.loras or params.embeddings) and not getattr(backend, "applies_networks", False):
            from ..errors import InvalidInput

            raise InvalidInput("loras" if params.loras else "embeddings",
                               "this backend (a resident model) applies its own LoRAs and embeddings; pass them to it, "
                               "or run from the checkpoint file")
        if params.vae == "taesd":  # fail now, not after the UNet passes
            sdxl.taesdxl_files(params.taesd_dir) if sdxl.is_sdxl(cfg) else components.taesd_dir(params.taesd_dir)
        # the spill folder: checked (writable, on disk, room for the planned spill) before anything
        # is spilled, the user's image included
        spill = choose_spill_dir(params.spill_dir, estimate_run_spill_bytes(params, cfg, vae_dtype))
        if spill.warning:
            say(f"warning: {spill.warning}")
        params = replace(params, spill_dir=spill.path)
        meter.spill = (spill.need_bytes, spill.path)
        stats["spill"] = {"planned_bytes": spill.need_bytes, "dir": spill.path, "filesystem": spill.filesystem,
                          "free_bytes": spill.free_bytes, "warning": spill.warning}
        if params.init_image is not None and init is None:  # read it now: a bad file fails before any work
            with meter.stage("init_image"):
                init = own_init = load_init_image(params.init_image, params.width, params.height,
                                                  spill_dir=params.spill_dir, log=log, should_stop=should_stop)
            trim_allocator()
        if init is not None and (init.width, init.height) != (params.width, params.height):
            raise InvalidInput("init_image", f"was read at {init.width}x{init.height}, the run is {params.width}x{params.height}")

        # a backend holding its weights already counts them in the RSS: the budget is what the
        # run adds on top of what the process holds now
        baseline = rss_mb() if backend.resident_mb == 0 and params.budget_scope == "process" else 0.0
        plan = plan_budget(
            cfg,
            budget_mb=params.budget_mb,
            baseline_mb=baseline,
            safety=budget.HOST_SAFETY if params.budget_scope == "run" else budget.SAFETY,
            tile=params.tile,
            n_tiles=len(tiles.tiles) + len(params.regions),
            dtype_bytes=torch.finfo(dtype).bits // 8,
            taesd=params.vae == "taesd",
            tile_batch=params.tile_batch,
            vae_tile=params.vae_tile,
            unet_total_mb=backend.unet_total_mb(dtype),
            samples_per_tile=1 if params.cfg == 1.0 else 2,
            canvas_pixels=lh * lw,
            base_pixels=None if init is not None else base_latent_pixels(cfg, params.width, params.height),
        )
        say(plan.table())
        cache_bytes = int(plan.unet_cache_mb * 1024 * 1024)
        noise = NoiseSource(params.seed)
        backend.prepare(RunSettings(dtype=dtype, device=device, vae_dtype=vae_dtype, vae_device=vae_device,
                                    cache_bytes=cache_bytes, vae_mode=params.vae, taesd_dir=params.taesd_dir,
                                    spill_dir=params.spill_dir, vae_attention=params.vae_attention,
                                    vae_reuse_heap=plan.vae_reuse_heap,
                                    loras=params.loras, embeddings=params.embeddings,
                                    weight_cache=cache_folder(params.weight_cache)), meter)
        prepared = getattr(backend, "prepared", None)
        if prepared is not None:
            stats["weight_cache"] = {"status": prepared.status, "path": prepared.path,
                                     "bytes": prepared.nbytes, "reason": prepared.reason or None}
            if prepared.status == "written":
                say(f"prepared the UNet's weights in {DTYPE_NAMES[dtype]} once ({prepared.nbytes / 2**30:.2f} GiB): "
                    f"{prepared.path}")
            elif prepared.reason:
                say(f"note: the UNet streams with per-call conversion: {prepared.reason}")
        stats["warnings"] = list(getattr(backend, "warnings", ()))
        for w in stats["warnings"]:
            say(f"warning: {w}")

        # expected work per stage: the run's progress and ETA weigh the stages by it
        prog.plan(stage_work(cfg, params, n_jobs=len(tiles.tiles) + len(params.regions), with_base=init is None))

        # 1. text encoding ---------------------------------------------------------------
        prompts = [params.prompt, params.negative] + [r.prompt for r in params.regions]
        with meter.stage("text_encoder"):
            prog.stage("text", len(prompts))
            if sdxl.is_sdxl(cfg):  # the empty negative prompt is zeros, as the webui does for SDXL
                contexts, pooled = sdxl.split_conditions(backend.encode_text(
                    prompts, params.clip_skip, zero_if_empty=[i == 1 for i in range(len(prompts))],
                    should_stop=should_stop))
            else:
                contexts = backend.encode_text(prompts, params.clip_skip, should_stop=should_stop)
            prog.update(len(prompts))
        trim_allocator()
        cond, uncond, region_ctx = contexts[0], contexts[1], contexts[2:]

        spec = sampler or get_sampler(params.sampler)
        schedule = sched.sd_schedule()
        base_steps = params.base_steps or params.steps

        def full_sigmas(n: int) -> torch.Tensor:
            return spec.sigmas(n) if spec.sigmas is not None else schedule.sigmas_for(spec.schedule, n)

        # 2. base image at native size ---------------------------------------------------
        if sdxl.is_sdxl(cfg):
            bw, bh = sdxl.sdxl_base_size(params.width, params.height, cfg.native_size)
        else:
            bw, bh = base_size(params.width, params.height, cfg.native_size)
        timed: dict = {}
        if init is None:
            with meter.stage("base_unet"), backend.unet() as unet:
                added = sdxl.base_added(cfg, pooled[0], pooled[1], bh, bw) if sdxl.is_sdxl(cfg) else {}
                den = EpsDenoiser(FirstCallTimer(unet, device, timed), schedule, cond, uncond, params.cfg, dtype=dtype,
                                  max_samples=plan.samples_per_call, **added)
                sigmas = full_sigmas(base_steps)
                prog.stage("base", len(sigmas) - 1)
                x = noise((1, cfg.unet.in_channels, bh // f, bw // f)) * sigmas[0]
                base_latent = spec.fn(den, x, sigmas, noise=noise, should_stop=should_stop,
                                      callback=lambda info: prog.update(info["i"] + 1, f"step {info['i'] + 1}"))
                stats["base_unet_evals"] = den.samples
            trim_allocator()

            # 3. guide: decode the base, upscale, encode at the target size, add noise -------
            with meter.stage("base_decode"):
                prog.stage("base decode", 1)
                arr = backend.decode(base_latent, tile=plan.vae_tile, output="uint8", should_stop=should_stop)
                base_image = components.spill_to_pil(arr)
                arr.close()
                prog.update(1)
            trim_allocator()
            source = UpscaledImageSource(base_image, params.width, params.height)
        else:  # the user's image, already resized to the target, is the guide
            stats["base_unet_evals"] = 0
            source = init
        with meter.stage("guide_encode"):
            prog.stage("guide encode", 1)
            guide = backend.encode(source, px_tile=plan.vae_tile * f, should_stop=should_stop,
                                   progress=lambda d, t: prog.update(d, "tile segments", total=t))
        trim_allocator()

        # 4. tiled region denoising over the full canvas ----------------------------------
        sigmas = (sched.img2img_tail(full_sigmas(params.steps), params.steps, params.strength)
                  if params.strength > 0 else torch.zeros(1))
        if len(sigmas) < 2:  # strength 0 (init image only): the VAE round trip of the guide
            latent = guide
            stats["tiled_unet_evals"] = stats["unet_calls"] = 0
        else:
            with meter.stage("tiled_unet"):
                with backend.unet() as unet:
                    den = EpsDenoiser(FirstCallTimer(unet, device, timed), schedule, cond, uncond, params.cfg, dtype=dtype,
                                      max_samples=plan.samples_per_call)
                    steps_total = len(sigmas) - 1
                    step = {"i": 0}
                    mix = MixtureDenoiser(
                        den, tiles, [cond] + list(region_ctx), negative=uncond, regions=params.regions,
                        weighting=params.weighting, feather=params.region_feather, batch_size=den.samples_per_job * plan.tile_batch,
                        should_stop=should_stop,
                        added=(sdxl.tiled_added(cfg, [pooled[0]] + pooled[2:], pooled[1], params.micro_conditioning,
                                                params.height, params.width) if sdxl.is_sdxl(cfg) else None),
                        progress=lambda done, total: prog.update(
                            step["i"] * total + done, f"step {step['i'] + 1}/{steps_total} tile {done}/{total}"),
                    )
                    prog.stage("tiled", steps_total * len(mix.jobs))
                    x = guide + noise(tuple(guide.shape)) * sigmas[0]

                    def on_step(info):
                        step["i"] = info["i"] + 1
                        if on_preview is not None:
                            on_preview(info["x"])

                    latent = spec.fn(mix, x, sigmas, noise=noise, callback=on_step, should_stop=should_stop)
                    stats["tiled_unet_evals"] = den.samples
                    stats["unet_calls"] = den.unet_calls
            trim_allocator()

        # 5. decode and write ---------------------------------------------------------------
        infotext = build_infotext(params, backend.name, backend.hash, plan, spec,
                                  {**(init.infotext_fields() if init is not None else {}), **vae_fields,
                                   **({"HRLR micro-conditioning": params.micro_conditioning} if sdxl.is_sdxl(cfg) else {}),
                                   **(infotext_extra or {})})
        with meter.stage("vae_decode"):
            prog.stage("decode", 1)
            arr = backend.decode(latent, tile=plan.vae_tile, output="uint8", should_stop=should_stop,
                                 progress=lambda d, t: prog.update(d, "tile segments", total=t))
        with meter.stage("png_write"):
            try:
                write_png(params.out, arr, {"parameters": infotext})
            except OSError as e:  # the disk filled up (or failed) under the PNG: nothing is left
                raise disk_full_error("out", os.path.dirname(os.path.abspath(params.out)), e, "the PNG") from None
            finally:
                arr.close()
        stats["unet_evals"] = stats["base_unet_evals"] + stats["tiled_unet_evals"]
        stats["unet_eval_s"] = per_sample_seconds(timed)
        stats["unet_eval_timed_samples"] = timed.get("samples", 0)
        stats["wall_s"] = time.perf_counter() - t_start
        stats["dtype"] = DTYPE_NAMES[dtype]
        stats["device"] = str(device)
        stats["tiles"] = len(tiles.tiles)
        stats["tile_batch"] = plan.tile_batch
        stats["samples_per_call"] = plan.samples_per_call
        stats["unet_cache_mb"] = round(plan.unet_cache_mb, 1)
        stats["seed"] = params.seed
        stats["base_size"] = f"{bw}x{bh}" if init is None else None
        if init is not None:
            stats["source_size"] = init.source_size
    finally:
        if own_init is not None:
            own_init.close()
        if own_meter:
            meter.stop()
    rep = meter.report().as_dict()
    result = GenerationResult(path=params.out, infotext=infotext, params=params, plan=plan, report=rep, stats=stats)
    if params.report:
        write_report(params.report, result)
    return result


def write_report(path: str, result: GenerationResult) -> None:
    data = {
        "output": result.path,
        "infotext": result.infotext,
        "stats": result.stats,
        "plan": {"tile_batch": result.plan.tile_batch, "unet_cache_mb": result.plan.unet_cache_mb,
                 "vae_tile": result.plan.vae_tile, "samples_per_call": result.plan.samples_per_call,
                 "vae_reuse_heap": result.plan.vae_reuse_heap,
                 "stages": [asdict(s) for s in result.plan.stages]},
        "memory": result.report,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)
