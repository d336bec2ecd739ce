"""One HighRes-LowRAM generation inside the webui, from an :class:`HrlrRequest` (imports the webui).

Everything the request can get wrong is checked before the webui's model is touched; errors
name the request's fields (``names.api_error``).  LowRAM mode releases the webui's model for
the run and loads it back afterwards (``lifecycle``), whatever happened in between.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

from modules import devices, extra_networks, images, paths, processing, shared

from lib_hrlr.adapters.ldm import LdmBackend
from lib_hrlr.errors import HrlrError, InvalidInput
from lib_hrlr.image.preview import latent_preview
from lib_hrlr.memory.meter import MemoryMeter, reset_peak_rss, rss_mb
from lib_hrlr.pipeline.generate import generate
from lib_hrlr.pipeline.params import validate, with_model_defaults
from lib_hrlr.pipeline.progress import format_eta
from lib_hrlr.runtime import DTYPE_NAMES, tune_allocator
from lib_hrlr.text.extra_networks import loras_from_prompts
from lib_hrlr.weights.taesd_files import folder_with_taesd

from .lifecycle import current_checkpoint_info, model_config, release_webui_model, restore_webui_model
from .names import api_error
from .prompt_checks import lora_warnings, strip_lora
from .request import HrlrRequest, lowram_dtype, to_params
from .samplers import webui_sampler

STAGES = ("text", "base", "base decode", "guide encode", "tiled", "decode")
PROGRESS_STEPS = 1000  # the webui's bar: sampling_step / sampling_steps of one job


def stage_line(ev) -> str:
    """The console line printed when a stage starts."""
    n = STAGES.index(ev.stage) + 1 if ev.stage in STAGES else "?"
    share = f", {100 * ev.overall:.0f}% of the run done" if ev.overall is not None else ""
    eta = f", ETA {format_eta(ev.overall_eta_s)}" if ev.overall_eta_s is not None else ""
    return f"HighRes-LowRAM: stage {n}/{len(STAGES)} {ev.stage}{share}{eta}"


@contextmanager
def extra_networks_active(prompt: str, model):
    """Parse ``<lora:...>`` etc. out of the prompt and activate them for the run (as txt2img
    does, from the prompt only)."""
    stripped, data = extra_networks.parse_prompts([prompt])
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=model, prompt=stripped[0])
    extra_networks.activate(p, data)
    try:
        yield stripped[0], p.extra_generation_params
    finally:
        extra_networks.deactivate(p, data)


def _text_fn(model, mapping: dict):
    """The webui's own conditioning (emphasis, embeddings, BREAK) on prompts without
    extra-network tags; the engine asks for the original prompts."""

    def fn(prompts):
        return model.get_learned_conditioning([mapping.get(p, p) for p in prompts])

    return fn


def webui_taesd_dir() -> Optional[str]:
    """The webui's own TAESD folder (``models/VAE-approx``) when it holds an encoder + decoder
    pair: the webui's ``.pth`` downloads or ``.safetensors``, TAESD or TAESDXL."""
    found = folder_with_taesd(os.path.join(paths.models_path, "VAE-approx"))
    return str(found) if found is not None else None


def known_loras() -> Optional[set]:
    """The LoRA names the webui's built-in Lora extension can load (None where it is absent)."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "available_networks"):
        return None
    return set(networks.available_networks) | set(getattr(networks, "available_network_aliases", {}))


def lora_path(name: str) -> Optional[str]:
    """A ``<lora:name>`` tag's file from the webui's Lora registry (None: unknown)."""
    networks = sys.modules.get("networks")
    if networks is None:
        return None
    found = getattr(networks, "available_network_aliases", {}).get(name) or \
        getattr(networks, "available_networks", {}).get(name)
    return getattr(found, "filename", None)


def embedding_files(texts) -> tuple:
    """The webui's loaded textual-inversion embeddings whose names the prompts use, as files."""
    try:
        from modules import sd_hijack

        words = sd_hijack.model_hijack.embedding_db.word_embeddings
    except Exception:
        return ()
    joined = "\n".join(texts)
    return tuple(sorted({e.filename for name, e in words.items()
                         if name in joined and getattr(e, "filename", None)}))


def output_dir() -> str:
    d = shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples or "outputs/txt2img-images"
    d = os.path.join(d, "hrlr") if not shared.opts.outdir_samples else d
    os.makedirs(d, exist_ok=True)
    return d


def _lowram_dtype(choice: str) -> str:
    compute = getattr(devices, "dtype_inference", None) or devices.dtype_unet
    return lowram_dtype(choice, webui_dtype=DTYPE_NAMES.get(compute, "fp32"),
                        precision_full=getattr(shared.cmd_opts, "precision", "") == "full",
                        no_half=bool(getattr(shared.cmd_opts, "no_half", False)), device=devices.device.type)


def prepare(req: HrlrRequest):
    """Parameters, sampler and warnings for ``req``, every check done; raises HrlrError in
    request field names."""
    try:
        info = current_checkpoint_info()
        if info is None:
            raise InvalidInput("model", "no checkpoint is selected in the webui")
        # LowRAM mode resolves the prompt's LoRAs itself (with its own warnings for unknown names)
        warnings = lora_warnings(req.prompt, req.negative_prompt, [r.prompt for r in req.regions],
                                 None if req.lowram else known_loras())
        dtype = _lowram_dtype(req.lowram_dtype) if req.lowram else "auto"
        params = to_params(req, model=info.filename, dtype=dtype,
                           taesd_dir=os.environ.get("HRLR_TAESD_DIR") or webui_taesd_dir())
        # tags outside the prompt are not applied (warned above): the text encoder must not read them as words
        params = replace(params, negative=strip_lora(params.negative),
                         regions=tuple(replace(r, prompt=strip_lora(r.prompt)) for r in params.regions))
        if req.lowram:  # the webui's LoRAs and embeddings, streamed by the engine
            found = loras_from_prompts([params.prompt], lora_path)
            warnings += list(found.warnings)
            texts = [params.prompt, params.negative] + [r.prompt for r in params.regions]
            params = replace(params, loras=tuple(params.loras) + found.loras,
                             embeddings=tuple(params.embeddings) + embedding_files(texts))
        cfg = model_config(info.filename)  # one validation, the engine's (overlapping regions blend by weight)
        validate(with_model_defaults(params, cfg), cfg)
        params = params.with_seed()
        spec = webui_sampler(req.sampler_name, req.scheduler, params.seed)
    except HrlrError as e:
        raise api_error(e) from e
    return info, params, spec, warnings


def run_generation(req: HrlrRequest, *, on_event=None) -> dict:
    """One generation; returns ``{"path", "infotext", "memory", "stats", "seed", "warnings"}``.

    Raises HrlrError on bad input and Interrupted when the user interrupts.  Runs inside the
    webui's queue (callers hold it).
    """
    state = shared.state
    info, params, spec, warnings = prepare(req)
    lowram = req.lowram
    outdir = output_dir()
    out = os.path.join(outdir, f"{images.get_next_sequence_number(outdir, ''):05}-{params.seed}.png")
    params = replace(params, out=out)

    # the webui's bar and ETA follow the run's share of its expected time (stages weighted by
    # their work, lib_hrlr.pipeline.work), not a count of stages
    state.job_count = 1
    state.job_no = 0
    state.sampling_steps = PROGRESS_STEPS
    state.sampling_step = 0
    preview_every = max(1, int(getattr(shared.opts, "show_progress_every_n_steps", 1) or 1))
    step_counter = {"n": 0}
    current = {"stage": None}

    def progress(ev):
        if ev.stage != current["stage"]:  # one console line per stage, as txt2img prints its bars
            current["stage"] = ev.stage
            print(stage_line(ev), flush=True)
        if ev.overall is not None:
            state.sampling_step = min(PROGRESS_STEPS, int(PROGRESS_STEPS * ev.overall))
        state.textinfo = f"{ev.stage} {ev.detail}".strip()
        if on_event:
            on_event(ev)

    def preview(latent):
        step_counter["n"] += 1
        if shared.opts.live_previews_enable and step_counter["n"] % preview_every == 0:
            state.assign_current_image(latent_preview(latent))

    def should_stop():
        return bool(state.interrupted or state.skipped or getattr(state, "stopping_generation", False))

    # glibc keeps freed blocks below its (dynamic) mmap threshold in its heaps: streamed weights
    # (GBs freed per UNet pass) would stay resident.  Serve big tensors by mmap from now on.
    tune_allocator()
    released = None
    rss_before = rss_mb()
    rss_idle = rss_before
    meter = MemoryMeter(cuda_device=devices.device if devices.device.type == "cuda" else None)
    t0 = time.perf_counter()
    extra = {"HRLR mode": "LowRAM" if lowram else "webui model"}
    if spec.schedule != "automatic":
        extra["Schedule type"] = spec.schedule.title()
    try:
        if lowram:  # before the meter starts: the run's peak is measured from the model-less process
            released = release_webui_model()
        rss_idle = rss_mb()
        reset_peak_rss()
        meter.start()
        if lowram:
            extra["HRLR dtype"] = params.dtype
            params = replace(params, device="cpu" if devices.device.type == "cpu" else "auto")
            result = generate(params, meter=meter, progress=progress, should_stop=should_stop,
                              sampler=spec, infotext_extra=extra, on_preview=preview)
        else:
            model = shared.sd_model
            with extra_networks_active(params.prompt, model) as (stripped, net_params):
                cfg = model_config(info.filename)
                backend = LdmBackend(model, cfg, info.name_for_extra, info.shorthash or info.hash or "",
                                     text_fn=_text_fn(model, {params.prompt: stripped}),
                                     wrap_call=devices.autocast)
                dtype = DTYPE_NAMES.get(devices.dtype_unet, "fp32")
                run_params = replace(params, dtype=dtype, device=str(devices.device.type),
                                     vae_device=str(devices.device.type))
                extra["HRLR dtype"] = DTYPE_NAMES.get(backend.model_dtype, dtype)
                extra.update({k: v for k, v in net_params.items() if isinstance(v, (str, int, float))})
                result = generate(run_params, backend=backend, meter=meter, progress=progress,
                                  should_stop=should_stop, sampler=spec, infotext_extra=extra, on_preview=preview)
    except HrlrError as e:
        raise api_error(e) from e
    finally:
        meter.stop()
        if released is not None and req.restore_model:
            warnings += restore_webui_model(released)  # raises only when the webui could not load it at all
    report = result.report
    # the meter's own maximum over the run: VmHWM is the process's since its last reset, which
    # is the webui's start-up peak where the kernel refused the reset
    peak = report["run_peak_rss_mb"]
    report["webui"] = {
        "rss_before_mb": round(rss_before, 1),
        "rss_idle_mb": round(rss_idle, 1),
        "peak_rss_mb": round(peak, 1),
        "added_mb": round(peak - rss_idle, 1),
        "budget_mb": params.budget_mb,
        "lowram": lowram,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if getattr(shared, "mem_mon", None) is not None and not getattr(shared.mem_mon, "disabled", True):
        try:
            report["webui"]["vram"] = shared.mem_mon.read()
        except Exception:
            pass
    return {"path": result.path, "infotext": result.infotext, "memory": report, "stats": result.stats,
            "seed": result.params.seed, "warnings": warnings}
