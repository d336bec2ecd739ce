"""HighRes-LowRAM inside the AUTOMATIC1111 webui: the tab, the AlwaysOn script and the API route.

Thin glue: everything that thinks lives in ``lib_hrlr``.  This file turns webui objects into
engine inputs (the loaded model as an ``LdmBackend``, the webui's k-diffusion samplers and
schedulers as a ``SamplerSpec``, ``shared.state`` as progress / interrupt) and back (gallery,
outputs folder, infotext, memory panel, HTTP answers).  Attributes it sets on webui objects
for a run are put back when the run ends.
"""

import base64
import functools
import gc
import html
import inspect
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import gradio as gr
import torch
from pydantic import BaseModel, Field

from modules import (call_queue, devices, extra_networks, images, infotext_utils, processing, script_callbacks,
                     scripts, sd_hijack, sd_models, sd_schedulers, shared, ui_common)
from modules.ui_components import FormRow, ToolButton

from lib_hrlr.adapters.ldm import LdmBackend
from lib_hrlr.errors import HrlrError, Interrupted, InvalidInput
from lib_hrlr.image.preview import latent_preview
from lib_hrlr.memory.meter import MemoryMeter, reset_peak_rss, rss_mb
from lib_hrlr.pipeline.generate import generate
from lib_hrlr.pipeline.params import GenerationParams
from lib_hrlr.pipeline.components import TAESD_FILES
from lib_hrlr.runtime import DTYPE_NAMES, trim_allocator, tune_allocator
from lib_hrlr.sampling.samplers import SamplerSpec
from lib_hrlr.sampling.schedule import sd_schedule
from lib_hrlr.tiling.plan import plan_tiles
from lib_hrlr.tiling.regions import Region, check_disjoint
from lib_hrlr.tiling.wrap import TiledDenoiser
from lib_hrlr.weights.checkpoint import open_checkpoint

TITLE = "HighRes-LowRAM"
SIZE_PRESETS = {"2048×2048": (2048, 2048), "2560×1440": (2560, 1440), "1440×2560": (1440, 2560),
                "2048×1152": (2048, 1152), "Custom": None}
VAE_CHOICES = {"Tiled full VAE": "full", "TAESD": "taesd"}
WEIGHTING_CHOICES = {"Gaussian": "gaussian", "Uniform": "uniform"}
STAGES = ("load", "text", "base", "base decode", "guide encode", "tiled", "decode")
# k-diffusion samplers with the plain (model, x, sigmas, extra_args, callback, disable) signature
EXCLUDED_SAMPLERS = {"DPM fast", "DPM adaptive"}
REGION_HEADERS = ["x", "y", "w", "h", "weight", "prompt"]


# ----------------------------------------------------------------------------- samplers
def sampler_names() -> list[str]:
    from modules import sd_samplers_kdiffusion

    return [d.name for d in sd_samplers_kdiffusion.samplers_data_k_diffusion if d.name not in EXCLUDED_SAMPLERS]


def scheduler_names() -> list[str]:
    return [s.label for s in sd_schedulers.schedulers]


def webui_sampler(name: str, scheduler: str, seed: int) -> SamplerSpec:
    """The webui's k-diffusion sampler ``name`` on ``scheduler``, as an engine SamplerSpec."""
    import k_diffusion.external
    import k_diffusion.sampling
    from modules import sd_samplers_kdiffusion

    data = {d.name: d for d in sd_samplers_kdiffusion.samplers_data_k_diffusion}
    if name not in data or name in EXCLUDED_SAMPLERS:
        raise InvalidInput("sampler_name", f"unknown sampler '{name}'; choose one of: {', '.join(sampler_names())}")
    funcname = next(f for label, f, _, _ in sd_samplers_kdiffusion.samplers_k_diffusion if label == name)
    func = funcname if callable(funcname) else getattr(k_diffusion.sampling, funcname)
    options = data[name].options
    sched_map = {s.label: s for s in sd_schedulers.schedulers}
    sched_map.update({s.name: s for s in sd_schedulers.schedulers})
    if scheduler not in sched_map:
        raise InvalidInput("scheduler", f"unknown scheduler '{scheduler}'; choose one of: {', '.join(scheduler_names())}")
    sch = sched_map[scheduler]
    if sch.name == "automatic":
        sch = sd_schedulers.schedulers_map.get(options.get("scheduler") or "", None)
    discard = bool(options.get("discard_next_to_last_sigma", False))
    # the SD 1.x discrete schedule as k-diffusion sees it (what CompVisDenoiser builds from the model)
    ours = sd_schedule()
    inner = k_diffusion.external.DiscreteSchedule(ours.sigmas.float(), quantize=shared.opts.enable_quantization)

    def sigmas(n: int) -> torch.Tensor:
        steps = n + 1 if discard else n
        if sch is None or sch.function is None:
            s = inner.get_sigmas(steps)
        else:
            kw = {"sigma_min": inner.sigmas[0].item(), "sigma_max": inner.sigmas[-1].item()}
            if sch.need_inner_model:
                kw["inner_model"] = inner
            s = sch.function(n=steps, **kw, device="cpu")
        s = s.float().cpu()
        if discard:
            s = torch.cat([s[:-2], s[-1:]])
        return s

    params = inspect.signature(func).parameters

    def run(den, x, sigmas, *, noise=None, callback=None, should_stop=None):
        def model(x, sigma, **_):
            if should_stop is not None and should_stop():
                raise Interrupted()
            return den(x, sigma.reshape(-1)[0])

        kw = {}
        if "noise_sampler" in params and noise is not None and not options.get("brownian_noise"):
            kw["noise_sampler"] = lambda s, s_next: noise(x.shape)
        torch.manual_seed(seed)  # brownian / default noise samplers draw from the global RNG
        return func(model, x, sigmas, extra_args={}, callback=callback, disable=True, **kw)

    schedule = sch.label if sch is not None else "Automatic"
    return SamplerSpec(name=name, fn=run, schedule=schedule.lower(), label=name,
                       stochastic=bool(options.get("uses_ensd") or options.get("brownian_noise")), sigmas=sigmas)


# ----------------------------------------------------------------------------- model handling
@functools.lru_cache(maxsize=1)
def model_config(filename: str):
    """The architecture of the webui's checkpoint, read from the file's tensor table."""
    return open_checkpoint(filename).config


def release_webui_model():
    """Drop the webui's copy of the model (LowRAM mode); returns its CheckpointInfo or None."""
    model = sd_models.model_data.sd_model
    if model is None:
        return None
    info = model.sd_checkpoint_info
    try:
        sd_hijack.model_hijack.undo_hijack(model)
    except Exception:
        pass
    sd_models.model_data.sd_model = None
    sd_models.model_data.loaded_sd_models = [m for m in sd_models.model_data.loaded_sd_models if m is not model]
    # other webui objects (finished jobs, samplers, hijacks) may still point at the model:
    # move its tensors to the meta device so their memory goes whoever holds the module
    model.to(device="meta")
    del model
    gc.collect()
    devices.torch_gc()
    trim_allocator()
    return info


def restore_webui_model(info) -> None:
    if info is not None and sd_models.model_data.sd_model is None:
        sd_models.reload_model_weights(info=info)


def current_checkpoint_info():
    model = sd_models.model_data.sd_model
    if model is not None:
        return model.sd_checkpoint_info
    return sd_models.select_checkpoint()


@contextmanager
def extra_networks_active(prompts: list[str], model):
    """Parse ``<lora:...>`` etc. out of the prompts and activate them for the run."""
    stripped, data = extra_networks.parse_prompts(prompts)
    p = processing.StableDiffusionProcessingTxt2Img(sd_model=model, prompt=stripped[0], negative_prompt=stripped[1])
    extra_networks.activate(p, data)
    try:
        yield stripped, p.extra_generation_params
    finally:
        extra_networks.deactivate(p, data)


# ----------------------------------------------------------------------------- one run
def parse_regions(rows) -> tuple[Region, ...]:
    """Regions from the tab's table (list of rows or a DataFrame) or the API's list of dicts."""
    out = []
    if rows is None:
        return ()
    if hasattr(rows, "values") and hasattr(rows, "columns"):
        rows = rows.values.tolist()
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            vals = [row.get(k, 1.0 if k == "weight" else None) for k in REGION_HEADERS]
        else:
            vals = list(row) + [None] * (len(REGION_HEADERS) - len(row))
        x, y, w, h, weight, prompt = vals[:6]
        if not str(prompt or "").strip() and all(v in (None, "", 0, 0.0, "0") for v in (x, y, w, h)):
            continue  # the table's empty row (gradio fills number cells with 0)
        try:
            rect = [int(float(v)) for v in (x, y, w, h)]
            weight = 1.0 if weight in (None, "") else float(weight)
        except (TypeError, ValueError):
            raise InvalidInput(f"region[{i}]", "x, y, w, h must be integers (pixels) and weight a number")
        if not prompt or not str(prompt).strip():
            raise InvalidInput(f"region[{i}].prompt", "a region needs a prompt")
        out.append(Region(rect[0], rect[1], rect[2], rect[3], str(prompt), weight))
    check_disjoint(out)
    return tuple(out)


def output_dir() -> str:
    d = shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples or "outputs/txt2img-images"
    d = os.path.join(d, "hrlr") if not shared.opts.outdir_samples else d
    os.makedirs(d, exist_ok=True)
    return d


def run_generation(req: dict, *, on_event=None) -> dict:
    """One generation from a request dict (the tab's and the API's common form).

    Returns ``{"path", "infotext", "memory", "stats", "seed"}``; raises HrlrError on bad input
    and Interrupted when the user interrupts.  Runs inside the webui's queue (callers hold it).
    """
    state = shared.state
    lowram = bool(req.get("lowram", False))
    seed = int(req.get("seed", -1))
    regions = parse_regions(req.get("regions"))
    info = current_checkpoint_info()
    if info is None:
        raise InvalidInput("model", "no checkpoint is selected in the webui")
    params = GenerationParams(
        prompt=str(req.get("prompt", "")), negative=str(req.get("negative_prompt", "")),
        width=int(req.get("width", 2048)), height=int(req.get("height", 2048)),
        steps=int(req.get("steps", 20)), cfg=float(req.get("cfg_scale", 7.0)), seed=seed,
        strength=float(req.get("denoising_strength", 0.45)),
        tile=req.get("tile") or None, overlap=req.get("overlap"), tile_batch=req.get("tile_batch") or None,
        weighting=WEIGHTING_CHOICES.get(req.get("weighting"), req.get("weighting", "gaussian")),
        regions=regions, vae=VAE_CHOICES.get(req.get("vae"), req.get("vae", "full")),
        budget_mb=float(req.get("budget_mb", 800)), budget_scope="run",
        taesd_dir=req.get("taesd_dir") or os.environ.get("HRLR_TAESD_DIR") or _webui_taesd_dir(),
        model=info.filename, out="hrlr.png",
    ).with_seed()
    spec = webui_sampler(req.get("sampler_name", "DPM++ 2M"), req.get("scheduler", "Automatic"), params.seed)
    outdir = output_dir()
    out = os.path.join(outdir, f"{images.get_next_sequence_number(outdir, ''):05}-{params.seed}.png")
    params = replace(params, out=out)

    state.job_count = len(STAGES)
    state.job_no = 0
    stage_index = {name: i for i, name in enumerate(STAGES)}
    preview_every = max(1, int(getattr(shared.opts, "show_progress_every_n_steps", 1) or 1))
    step_counter = {"n": 0}

    def progress(ev):
        state.job_no = stage_index.get(ev.stage, state.job_no)
        state.sampling_steps = max(1, ev.total)
        state.sampling_step = ev.done
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
            params = replace(params, dtype="auto", device="cpu" if devices.device.type == "cpu" else "auto")
            result = generate(params, meter=meter, progress=progress, should_stop=should_stop,
                              sampler=spec, infotext_extra=extra, on_preview=preview)
        else:
            model = shared.sd_model
            prompts = [params.prompt, params.negative] + [r.prompt for r in regions]
            with extra_networks_active(prompts, model) as (stripped, net_params):
                cfg = model_config(info.filename)
                backend = LdmBackend(model, cfg, info.name_for_extra, info.shorthash or info.hash or "",
                                     text_fn=_text_fn(model, stripped, prompts),
                                     wrap_call=devices.autocast)
                dtype = DTYPE_NAMES.get(devices.dtype_unet, "fp32")
                run_params = replace(params, dtype=dtype, device=str(devices.device.type),
                                     vae_device=str(devices.device.type))
                extra.update({k: v for k, v in net_params.items() if isinstance(v, (str, int, float))})
                result = generate(run_params, backend=backend, meter=meter, progress=progress,
                                  should_stop=should_stop, sampler=spec, infotext_extra=extra, on_preview=preview)
    finally:
        meter.stop()
        if released is not None and req.get("restore_model", True):
            restore_webui_model(released)
    report = result.report
    # the meter's own maximum over the run: VmHWM is the process's since its last reset, which
    # is the webui's start-up peak where the kernel refused the reset
    peak = report["run_peak_rss_mb"]
    report["webui"] = {
        "rss_before_mb": round(rss_before, 1),
        "rss_idle_mb": round(rss_idle, 1),
        "peak_rss_mb": round(peak, 1),
        "added_mb": round(peak - rss_idle, 1),
        "lowram": lowram,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if getattr(shared, "mem_mon", None) is not None and not getattr(shared.mem_mon, "disabled", True):
        try:
            report["webui"]["vram"] = shared.mem_mon.read()
        except Exception:
            pass
    return {"path": result.path, "infotext": result.infotext, "memory": report, "stats": result.stats,
            "seed": result.params.seed}


def _text_fn(model, stripped: list[str], original: list[str]):
    """The webui's own conditioning (emphasis, embeddings, BREAK) on prompts without
    extra-network tags; the engine asks for the original prompts in the same order."""
    mapping = dict(zip(original, stripped))

    def fn(prompts):
        return model.get_learned_conditioning([mapping.get(p, p) for p in prompts])

    return fn


def _webui_taesd_dir() -> Optional[str]:
    d = os.path.join(shared.models_path, "VAE-approx")
    ok = all(os.path.isfile(os.path.join(d, f)) for f in TAESD_FILES)
    return d if ok else None


# ----------------------------------------------------------------------------- memory panel
def memory_html(memory: dict) -> str:
    mods = memory.get("modules", [])
    stages = [m for m in mods if m.get("kind") == "stage"] or mods
    w = memory.get("webui", {})
    idle = w.get("rss_idle_mb", 0)
    # bars show what each stage added to the process as it was before the run
    top = max([(m.get("peak_rss_mb") or 0) - idle for m in stages] + [1])
    rows = []
    for m in stages:
        peak = m.get("peak_rss_mb") or 0
        added = max(0.0, peak - idle)
        bar = f"<div class='hrlr-bar' style='width:{100 * added / top:.0f}%'></div>"
        rows.append(f"<tr><td>{html.escape(str(m['name']))}</td><td>{peak:.1f}</td><td>+{added:.1f}</td>"
                    f"<td>{(m.get('seconds') or 0):.1f}</td><td class='hrlr-barcell'>{bar}</td></tr>")
    head = (f"<p>Peak RSS <b>{w.get('peak_rss_mb', 0):.1f} MB</b>; process before the run "
            f"{w.get('rss_idle_mb', 0):.1f} MB; added by the run <b>{w.get('added_mb', 0):.1f} MB</b>"
            f"{' (LowRAM mode)' if w.get('lowram') else ''}; {w.get('wall_s', 0):.1f} s.</p>")
    if memory.get("peak_vram_mb") is not None:
        head += f"<p>Peak allocated VRAM {memory['peak_vram_mb']:.1f} MB</p>"
    return (f"<div id='hrlr_memory_report'>{head}<table class='hrlr-mem'><tr><th>stage / module</th>"
            f"<th>peak RSS MB</th><th>added MB</th><th>s</th><th></th></tr>{''.join(rows)}</table></div>")


def error_html(e: Exception) -> str:
    return f"<div class='error hrlr-error'>{html.escape(str(e))}</div>"


# ----------------------------------------------------------------------------- the tab
def tab_generate(id_task, prompt, negative, preset, width, height, sampler_name, scheduler, steps, cfg, seed,
                 strength, tile, overlap, tile_batch, weighting, regions, vae, budget, lowram, restore):
    if preset in SIZE_PRESETS and SIZE_PRESETS[preset] is not None:
        width, height = SIZE_PRESETS[preset]
    req = dict(prompt=prompt, negative_prompt=negative, width=int(width), height=int(height),
               sampler_name=sampler_name, scheduler=scheduler, steps=int(steps), cfg_scale=float(cfg),
               seed=int(seed), denoising_strength=float(strength), tile=int(tile), overlap=int(overlap),
               tile_batch=int(tile_batch) or None, weighting=weighting, regions=regions, vae=vae,
               budget_mb=float(budget), lowram=bool(lowram), restore_model=bool(restore))
    try:
        res = run_generation(req)
    except Interrupted:
        return [], "", "", "", "<div class='hrlr-interrupted'>Interrupted: no image was written.</div>"
    except HrlrError as e:
        return [], "", "", "", error_html(e)
    info = json.dumps({"infotexts": [res["infotext"]], "all_prompts": [prompt], "seed": res["seed"],
                       "all_seeds": [res["seed"]], "index_of_first_image": 0})
    return ([res["path"]], info, f"<p>{html.escape(res['infotext'])}</p>", memory_html(res["memory"]),
            f"<div class='hrlr-saved'>Saved {html.escape(res['path'])}</div>")


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column(scale=6):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="hrlr_prompt",
                                    placeholder="Prompt (Ctrl+Enter to generate)")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="hrlr_neg_prompt")
            with gr.Column(scale=1, min_width=160):
                id_task = gr.Textbox(visible=False, elem_id="hrlr_id_task")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="hrlr_generate")
                interrupt_btn = gr.Button("Interrupt", elem_id="hrlr_interrupt")
                paste_btn = ToolButton("↙️", elem_id="hrlr_paste", tooltip="Read generation parameters from the prompt")
        with gr.Row():
            with gr.Column(scale=1):
                with FormRow():
                    preset = gr.Dropdown(list(SIZE_PRESETS), value="2048×2048", label="Size", elem_id="hrlr_preset")
                    width = gr.Number(value=2048, label="Width", precision=0, elem_id="hrlr_width")
                    height = gr.Number(value=2048, label="Height", precision=0, elem_id="hrlr_height")
                with FormRow():
                    sampler = gr.Dropdown(sampler_names(), value="DPM++ 2M", label="Sampling method",
                                          elem_id="hrlr_sampler")
                    scheduler = gr.Dropdown(scheduler_names(), value="Automatic", label="Schedule type",
                                            elem_id="hrlr_scheduler")
                with FormRow():
                    steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="hrlr_steps")
                    cfg = gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG Scale", elem_id="hrlr_cfg")
                with FormRow():
                    seed = gr.Number(value=-1, label="Seed", precision=0, elem_id="hrlr_seed")
                    random_seed = ToolButton("🎲️", elem_id="hrlr_random_seed", tooltip="Random seed (-1)")
                    reuse_seed = ToolButton("♻️", elem_id="hrlr_reuse_seed", tooltip="Reuse the last seed")
                    strength = gr.Slider(0.05, 1.0, value=0.45, step=0.01, label="Guide strength",
                                         elem_id="hrlr_strength")
                with gr.Accordion("Tiles and regions", open=False):
                    with FormRow():
                        tile = gr.Slider(16, 128, value=64, step=8, label="Tile (latent px)", elem_id="hrlr_tile")
                        overlap = gr.Slider(0, 64, value=16, step=4, label="Overlap (latent px)",
                                            elem_id="hrlr_overlap")
                        tile_batch = gr.Slider(0, 16, value=0, step=1, label="Tile batch (0 = from the budget)",
                                               elem_id="hrlr_tile_batch")
                    weighting = gr.Radio(list(WEIGHTING_CHOICES), value="Gaussian", label="Tile weights",
                                         elem_id="hrlr_weighting")
                    regions = gr.Dataframe(headers=REGION_HEADERS, datatype=["number"] * 5 + ["str"],
                                           row_count=(1, "dynamic"), col_count=(6, "fixed"), type="array",
                                           label="Regions (pixels; weight 1 = as strong as the prompt)",
                                           elem_id="hrlr_regions")
                with FormRow():
                    vae = gr.Radio(list(VAE_CHOICES), value="Tiled full VAE", label="VAE", elem_id="hrlr_vae")
                    budget = gr.Number(value=800, label="Memory budget (MB)", precision=0, elem_id="hrlr_budget")
                with FormRow():
                    lowram = gr.Checkbox(False, label="LowRAM mode (stream the UNet from the checkpoint file)",
                                         elem_id="hrlr_lowram")
                    restore = gr.Checkbox(True, label="Reload the webui's model afterwards", elem_id="hrlr_restore")
            with gr.Column(scale=1):
                panel = ui_common.create_output_panel("hrlr", output_dir())
                memory = gr.HTML(elem_id="hrlr_memory")

        inputs = [id_task, prompt, negative, preset, width, height, sampler, scheduler, steps, cfg, seed,
                  strength, tile, overlap, tile_batch, weighting, regions, vae, budget, lowram, restore]
        outputs = [panel.gallery, panel.generation_info, panel.infotext, memory, panel.html_log]
        generate_btn.click(fn=call_queue.wrap_gradio_gpu_call(tab_generate, extra_outputs=[[], "", "", ""]),
                           _js="hrlr_submit", inputs=inputs, outputs=outputs, show_progress=False)
        prompt.submit(fn=call_queue.wrap_gradio_gpu_call(tab_generate, extra_outputs=[[], "", "", ""]),
                      _js="hrlr_submit", inputs=inputs, outputs=outputs, show_progress=False)
        interrupt_btn.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
        preset.change(lambda p: [gr.update(value=SIZE_PRESETS[p][0]), gr.update(value=SIZE_PRESETS[p][1])]
                      if SIZE_PRESETS.get(p) else [gr.update(), gr.update()],
                      inputs=[preset], outputs=[width, height], show_progress=False)
        random_seed.click(fn=None, _js="function(){setRandomSeed('hrlr_seed')}", inputs=[], outputs=[])
        reuse_seed.click(fn=lambda info: json.loads(info or "{}").get("seed", -1),
                         inputs=[panel.generation_info], outputs=[seed], show_progress=False)

        paste_fields = [
            (prompt, "Prompt"), (negative, "Negative prompt"), (steps, "Steps"), (cfg, "CFG scale"),
            (seed, "Seed"), (strength, "Denoising strength"),
            (sampler, "Sampler"), (scheduler, "Schedule type"),
            (width, "Size-1"), (height, "Size-2"),
            (preset, lambda d: "Custom"),
            (tile, "HRLR tile"), (overlap, "HRLR overlap"),
            (weighting, lambda d: {"gaussian": "Gaussian", "uniform": "Uniform"}.get(d.get("HRLR weighting"),
                                                                                   gr.update())),
            (vae, lambda d: {"full": "Tiled full VAE", "taesd": "TAESD"}.get(d.get("HRLR VAE"), gr.update())),
            (budget, "HRLR budget MB"),
            (lowram, lambda d: d.get("HRLR mode") == "LowRAM"),
            (regions, lambda d: [[r["x"], r["y"], r["w"], r["h"], r.get("weight", 1.0), r["prompt"]]
                                 for r in json.loads(d["HRLR regions"])] if d.get("HRLR regions") else gr.update()),
        ]
        infotext_utils.add_paste_fields("hrlr", None, paste_fields)
        infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
            paste_button=paste_btn, tabname="hrlr", source_text_component=prompt, source_image_component=None))
    return [(tab, TITLE, "hrlr_tab")]


# ----------------------------------------------------------------------------- API
class RegionModel(BaseModel):
    x: int
    y: int
    w: int
    h: int
    prompt: str
    weight: float = 1.0

class HrlrTxt2ImgRequest(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    width: int = 2048
    height: int = 2048
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    denoising_strength: float = Field(0.45, description="guide strength")
    tile: int = 64
    overlap: int = 16
    tile_batch: int = 0
    weighting: str = "gaussian"
    regions: list[RegionModel] = []
    vae: str = Field("full", description="full (tiled SD VAE) or taesd")
    budget_mb: float = 800
    lowram: bool = False
    restore_model: bool = True
    send_images: bool = True

class HrlrTxt2ImgResponse(BaseModel):
    images: list[str]
    info: str
    path: str
    seed: int
    memory: dict
    stats: dict

def on_app_started(_demo, app):
    from fastapi import Depends, HTTPException
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    deps = []
    if shared.cmd_opts.api_auth:
        creds = dict(c.split(":", 1) for c in shared.cmd_opts.api_auth.split(","))

        def auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
            ok = credentials.username in creds and secrets.compare_digest(credentials.password,
                                                                         creds[credentials.username])
            if not ok:
                raise HTTPException(status_code=401, detail="Incorrect username or password",
                                    headers={"WWW-Authenticate": "Basic"})
            return True

        deps = [Depends(auth)]

    def txt2img(req: HrlrTxt2ImgRequest):
        body = req.dict()
        body["regions"] = [r for r in body["regions"]]
        with call_queue.queue_lock:
            shared.state.begin(job="hrlr_txt2img")
            try:
                res = run_generation(body)
            except HrlrError as e:
                return JSONResponse(status_code=422, content={"detail": [
                    {"loc": ["body", e.field], "msg": str(e), "type": "value_error.hrlr"}]})
            except Interrupted:
                return JSONResponse(status_code=409, content={"detail": "interrupted; no image was written"})
            finally:
                shared.state.end()
        imgs = []
        if req.send_images:
            with open(res["path"], "rb") as fh:
                imgs.append(base64.b64encode(fh.read()).decode())
        return HrlrTxt2ImgResponse(images=imgs, info=res["infotext"], path=res["path"], seed=res["seed"],
                                   memory=res["memory"], stats=res["stats"])

    def options():
        return {"samplers": sampler_names(), "schedulers": scheduler_names(), "size_presets": list(SIZE_PRESETS),
                "vae": list(VAE_CHOICES.values()), "weighting": list(WEIGHTING_CHOICES.values())}

    app.add_api_route("/hrlr/v1/txt2img", txt2img, methods=["POST"], response_model=HrlrTxt2ImgResponse,
                      dependencies=deps, tags=["HighRes-LowRAM"])
    app.add_api_route("/hrlr/v1/options", options, methods=["GET"], dependencies=deps, tags=["HighRes-LowRAM"])


# ----------------------------------------------------------------------------- AlwaysOn script
class HrlrScript(scripts.Script):
    """Tiled denoising + tiled VAE for ordinary txt2img / img2img runs (incl. hires fix)."""

    def __init__(self):
        super().__init__()
        self._undo: list = []

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion(TITLE, open=False, elem_id=self.elem_id("accordion")):
            enabled = gr.Checkbox(False, label="Enable tiled denoising and tiled VAE", elem_id=self.elem_id("enabled"))
            with FormRow():
                tile = gr.Slider(16, 128, value=64, step=8, label="Tile (latent px)", elem_id=self.elem_id("tile"))
                overlap = gr.Slider(0, 64, value=16, step=4, label="Overlap", elem_id=self.elem_id("overlap"))
                batch = gr.Slider(1, 16, value=1, step=1, label="Tiles per call", elem_id=self.elem_id("batch"))
            with FormRow():
                weighting = gr.Radio(list(WEIGHTING_CHOICES), value="Gaussian", label="Tile weights",
                                     elem_id=self.elem_id("weighting"))
                vae = gr.Radio(list(VAE_CHOICES), value="Tiled full VAE", label="VAE", elem_id=self.elem_id("vae"))
        self.infotext_fields = [
            (enabled, lambda d: "HRLR tile" in d),
            (tile, "HRLR tile"), (overlap, "HRLR overlap"), (batch, "HRLR tile batch"),
            (weighting, lambda d: {"gaussian": "Gaussian", "uniform": "Uniform"}.get(d.get("HRLR weighting"),
                                                                                   gr.update())),
            (vae, lambda d: {"full": "Tiled full VAE", "taesd": "TAESD"}.get(d.get("HRLR VAE"), gr.update())),
        ]
        return [enabled, tile, overlap, batch, weighting, vae]

    # -- patches live for one run -------------------------------------------------------------
    def _restore(self):
        while self._undo:
            obj, name, had, old = self._undo.pop()
            if had:
                setattr(obj, name, old)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass

    def _set(self, obj, name, value):
        had = name in vars(obj) or name in getattr(obj, "_modules", {})
        self._undo.append((obj, name, had, getattr(obj, name) if had else None))
        setattr(obj, name, value)

    def before_process(self, p, *args):
        self._restore()  # a run that failed before postprocess leaves nothing behind

    def process(self, p, enabled=False, tile=64, overlap=16, batch=1, weighting="Gaussian", vae="Tiled full VAE"):
        if not enabled:
            return
        tile, overlap, batch = int(tile), int(overlap), int(batch)
        if overlap >= tile:
            raise InvalidInput("overlap", f"must be smaller than the tile ({tile}), got {overlap}")
        mode = VAE_CHOICES.get(vae, "full")
        p.extra_generation_params.update({"HRLR tile": tile, "HRLR overlap": overlap, "HRLR tile batch": batch,
                                          "HRLR weighting": WEIGHTING_CHOICES.get(weighting, "gaussian"),
                                          "HRLR VAE": mode})
        model = p.sd_model
        cfg = model_config(model.sd_checkpoint_info.filename)
        settings_taesd = os.environ.get("HRLR_TAESD_DIR") or _webui_taesd_dir()
        backend = LdmBackend(model, cfg, "", "")
        from lib_hrlr.pipeline.backend import RunSettings

        backend.prepare(RunSettings(dtype=devices.dtype_vae, device=devices.device, vae_dtype=devices.dtype_vae,
                                    vae_device=devices.device, vae_mode=mode, taesd_dir=settings_taesd), None)
        scale = cfg.vae.scaling_factor

        def decode_first_stage(z, *a, **k):
            outs = []
            for i in range(z.shape[0]):
                arr = backend.decode(z[i : i + 1].float(), tile=tile, output="float",
                                     should_stop=lambda: shared.state.interrupted)
                try:
                    outs.append(arr.to_tensor())  # (1, 3, H, W) in [-1, 1]
                finally:
                    arr.close()
            return torch.cat(outs).to(device=z.device, dtype=z.dtype if z.is_floating_point() else torch.float32)

        def encode_first_stage(x, *a, **k):
            from lib_hrlr.vae.tiled_vae import TensorImageSource

            outs = [backend.encode(TensorImageSource(x[i].float().cpu()), px_tile=tile * 8) / scale
                    for i in range(x.shape[0])]
            return torch.cat(outs).to(device=x.device, dtype=x.dtype)

        self._set(model, "decode_first_stage", decode_first_stage)
        self._set(model, "encode_first_stage", encode_first_stage)
        self._settings = (tile, overlap, batch, WEIGHTING_CHOICES.get(weighting, "gaussian"))

    def process_before_every_sampling(self, p, enabled=False, *args, **kwargs):
        if not enabled or getattr(p, "sampler", None) is None:
            return
        tile, overlap, batch, weighting = self._settings
        x = kwargs.get("x")
        if x is None:
            return
        h, w = x.shape[-2:]
        t = min(tile, h, w)
        plan = plan_tiles(h, w, t, min(overlap, max(0, t - 8)))
        wrapper = p.sampler.model_wrap_cfg
        inner = wrapper.inner_model  # builds the webui's k-diffusion wrapper if needed
        tiled = _Tiled(inner, plan, weighting, batch)
        self._set(wrapper, "model_wrap", tiled)

    def postprocess(self, p, processed, *args):
        self._restore()


class _Tiled(torch.nn.Module):
    """The webui's k-diffusion model wrapper seen through a TiledDenoiser; a Module because the
    webui keeps it as a child module, and it still answers the attribute reads the webui makes
    on the wrapper (sigmas, sigma_to_t...)."""

    def __init__(self, inner, plan, weighting, batch):
        super().__init__()
        self.inner = inner
        self.tiled = TiledDenoiser(inner, plan, weighting=weighting, batch=batch,
                                   should_stop=lambda: bool(shared.state.interrupted))

    def forward(self, x, sigma, **kwargs):
        return self.tiled(x, sigma, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
