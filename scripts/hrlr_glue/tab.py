"""The HighRes-LowRAM tab, its paste fields and PNG Info's "Send to HighRes-LowRAM" (imports the webui)."""

from __future__ import annotations

import html
import json

import gradio as gr
from modules import call_queue, infotext_utils, shared, ui_common
from modules.ui_components import FormRow, ToolButton

from lib_hrlr.errors import HrlrError, Interrupted
from lib_hrlr.tiling.regions import WEIGHT_HELP

from . import infotext_paste as paste
from .memory_html import error_html, memory_html, warnings_html
from .request import (DEFAULTS, LOWRAM_DTYPE_CHOICES, MODEL_TILE, OVERLAP_HELP, QUARTER_OVERLAP, REGION_HEADERS,
                      REGION_TEMPLATE, SIZE_PRESETS, TILE_HELP, VAE_CHOICES, WEIGHTING_CHOICES, HrlrRequest, label_of,
                      regions_from_table, request_from, slider_tiles)
from .run import output_dir, run_generation
from .samplers import sampler_names, scheduler_names

TITLE = "HighRes-LowRAM"
TABNAME = "hrlr"
TILES_PER_CALL = "Tiles per UNet call"  # one label for the tab and the accordion
REQ = HrlrRequest.__fields__ if hasattr(HrlrRequest, "__fields__") else HrlrRequest.model_fields


def _default(name: str):
    f = REQ[name]
    return getattr(f, "default", None)


# the tab's inputs after the hidden task id, by request field (plus the size preset)
TAB_INPUTS = ("prompt", "negative_prompt", "preset", "width", "height", "sampler_name", "scheduler", "steps",
              "cfg_scale", "seed", "denoising_strength", "tile", "overlap", "tile_batch", "weighting", "regions",
              "vae", "budget_mb", "lowram", "lowram_dtype", "restore_model")


def tab_request(values: dict) -> HrlrRequest:
    """The request for the tab's input values (labels mapped, the preset applied)."""
    v = dict(values)
    preset = v.pop("preset", None)
    if SIZE_PRESETS.get(preset):
        v["width"], v["height"] = SIZE_PRESETS[preset]
    v["regions"] = regions_from_table(v.get("regions"))
    v["weighting"] = WEIGHTING_CHOICES.get(v.get("weighting"), v.get("weighting"))
    v["vae"] = VAE_CHOICES.get(v.get("vae"), v.get("vae"))
    v["lowram_dtype"] = LOWRAM_DTYPE_CHOICES.get(v.get("lowram_dtype"), v.get("lowram_dtype"))
    for k in ("width", "height", "steps", "seed", "tile", "overlap", "tile_batch"):
        if v.get(k) is not None:
            v[k] = int(v[k])
    v["tile"], v["overlap"] = slider_tiles(v.get("tile"), v.get("overlap"))
    return request_from(v)


def tab_generate(id_task, *values):
    try:
        req = tab_request(dict(zip(TAB_INPUTS, values)))
        res = run_generation(req)
    except Interrupted:
        return [], "", "", "", "<div class='hrlr-interrupted'>Interrupted: no image was written.</div>"
    except HrlrError as e:
        return [], "", "", "", error_html(e)
    info = json.dumps({"infotexts": [res["infotext"]], "all_prompts": [req.prompt], "seed": res["seed"],
                       "all_seeds": [res["seed"]], "index_of_first_image": 0})
    return ([res["path"]], info, f"<p>{html.escape(res['infotext'])}</p>", memory_html(res["memory"]),
            warnings_html(res["warnings"]) + f"<div class='hrlr-saved'>Saved {html.escape(res['path'])}</div>")


# ----------------------------------------------------------------------------- PNG Info -> this tab
class PngInfoSend:
    """A "Send to HighRes-LowRAM" button next to PNG Info's own "Send to" buttons.

    PNG Info is built before extension tabs: its components are caught as they are created
    (``on_after_component``), and the button is bound to this tab's paste fields once the tab
    has registered them (a binding to a tab without paste fields would break the webui's UI).
    """

    def __init__(self):
        self.components: dict = {}
        self.button = None

    def after_component(self, component, **kwargs):
        elem_id = kwargs.get("elem_id")
        if elem_id in ("pnginfo_image", "pnginfo_generation_info"):
            self.components[elem_id] = component
            if elem_id == "pnginfo_image":
                self.button = None  # a new UI is being built ("Reload UI")
        elif elem_id == "extras_tab" and self.button is None and len(self.components) == 2:
            # inside PNG Info's row of "Send to" buttons
            self.button = gr.Button(f"Send to {TITLE}", elem_id="hrlr_send_from_pnginfo")

    def bind(self):
        if self.button is None:
            return
        infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
            paste_button=self.button, tabname=TABNAME,
            source_text_component=self.components["pnginfo_generation_info"],
            source_image_component=self.components["pnginfo_image"]))


def paste_fields(c: dict) -> list:
    """What an infotext puts into the tab's components ``c`` (by request field)."""
    return [
        (c["prompt"], "Prompt"), (c["negative_prompt"], "Negative prompt"), (c["steps"], "Steps"),
        (c["cfg_scale"], "CFG scale"), (c["seed"], "Seed"),
        (c["denoising_strength"], paste.guide_strength),
        (c["sampler_name"], "Sampler"), (c["scheduler"], "Schedule type"),
        (c["width"], "Size-1"), (c["height"], "Size-2"),
        (c["preset"], lambda d: "Custom"),
        (c["tile"], "HRLR tile"), (c["overlap"], "HRLR overlap"),
        (c["weighting"], lambda d: paste.weighting_label(d) or gr.update()),
        (c["vae"], lambda d: paste.vae_label(d) or gr.update()),
        (c["budget_mb"], "HRLR budget MB"),
        (c["lowram"], lambda d: d.get("HRLR mode") == "LowRAM"),
        (c["lowram_dtype"], lambda d: paste.lowram_dtype_label(d) or gr.update()),
        (c["regions"], lambda d: paste.regions_rows(d) or gr.update()),
    ]


def on_ui_tabs(send: PngInfoSend):
    c: dict = {}
    size_default = next((k for k, v in SIZE_PRESETS.items() if v == (DEFAULTS["width"], DEFAULTS["height"])), "Custom")
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column(scale=6):
                c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="hrlr_prompt",
                                         placeholder="Prompt (Ctrl+Enter to generate)")
                c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id="hrlr_neg_prompt")
            with gr.Column(scale=1, min_width=160):
                id_task = gr.Textbox(visible=False, elem_id="hrlr_id_task")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="hrlr_generate")
                interrupt_btn = gr.Button("Interrupt", elem_id="hrlr_interrupt")
                paste_btn = ToolButton("↙️", elem_id="hrlr_paste", tooltip="Read generation parameters from the prompt")
        with gr.Row():
            with gr.Column(scale=1):
                with FormRow():
                    c["preset"] = gr.Dropdown(list(SIZE_PRESETS), value=size_default, label="Size",
                                              elem_id="hrlr_preset")
                    c["width"] = gr.Number(value=DEFAULTS["width"], label="Width", precision=0, elem_id="hrlr_width")
                    c["height"] = gr.Number(value=DEFAULTS["height"], label="Height", precision=0,
                                            elem_id="hrlr_height")
                with FormRow():
                    c["sampler_name"] = gr.Dropdown(sampler_names(), value=_default("sampler_name"),
                                                    label="Sampling method", elem_id="hrlr_sampler")
                    c["scheduler"] = gr.Dropdown(scheduler_names(), value=_default("scheduler"),
                                                 label="Schedule type", elem_id="hrlr_scheduler")
                with FormRow():
                    c["steps"] = gr.Slider(1, 150, value=DEFAULTS["steps"], step=1, label="Sampling steps",
                                           elem_id="hrlr_steps")
                    c["cfg_scale"] = gr.Slider(1.0, 30.0, value=DEFAULTS["cfg"], step=0.5, label="CFG Scale",
                                               elem_id="hrlr_cfg")
                with FormRow():
                    c["seed"] = gr.Number(value=DEFAULTS["seed"], label="Seed", precision=0, elem_id="hrlr_seed")
                    random_seed = ToolButton("🎲️", elem_id="hrlr_random_seed", tooltip="Random seed (-1)")
                    reuse_seed = ToolButton("♻️", elem_id="hrlr_reuse_seed", tooltip="Reuse the last seed")
                    c["denoising_strength"] = gr.Slider(0.05, 1.0, value=DEFAULTS["strength"], step=0.01,
                                                        label="Guide strength", elem_id="hrlr_strength")
                with gr.Accordion("Tiles and regions", open=False):
                    with FormRow():
                        c["tile"] = gr.Slider(MODEL_TILE, 128, value=MODEL_TILE, step=8,
                                              label=f"Tile (latent px; {TILE_HELP})", elem_id="hrlr_tile")
                        c["overlap"] = gr.Slider(QUARTER_OVERLAP, 64, value=QUARTER_OVERLAP, step=1,
                                                 label=f"Overlap (latent px; {OVERLAP_HELP})", elem_id="hrlr_overlap")
                        c["tile_batch"] = gr.Slider(0, 16, value=0, step=1,
                                                    label=f"{TILES_PER_CALL} (0 = as many as the budget allows)",
                                                    elem_id="hrlr_tile_batch")
                    c["weighting"] = gr.Radio(list(WEIGHTING_CHOICES),
                                              value=label_of(WEIGHTING_CHOICES, DEFAULTS["weighting"]), label="Tile weights",
                                              elem_id="hrlr_weighting")
                    c["regions"] = gr.Dataframe(headers=REGION_HEADERS, datatype=["number"] * 5 + ["str"],
                                                value=[list(REGION_TEMPLATE)], row_count=(1, "dynamic"),
                                                col_count=(6, "fixed"), type="array",
                                                label="Regions (pixels; weight 1 = the region's prompt alone "
                                                      "inside it; rows without a prompt are skipped)",
                                                tooltip=WEIGHT_HELP, elem_id="hrlr_regions")
                with FormRow():
                    c["vae"] = gr.Radio(list(VAE_CHOICES), value=label_of(VAE_CHOICES, DEFAULTS["vae"]), label="VAE",
                                        elem_id="hrlr_vae")
                    c["budget_mb"] = gr.Number(value=DEFAULTS["budget_mb"], label="Memory budget (MB)", precision=0,
                                               elem_id="hrlr_budget")
                with FormRow():
                    c["lowram"] = gr.Checkbox(_default("lowram"), label="LowRAM mode (stream the UNet from the checkpoint file)",
                                              elem_id="hrlr_lowram")
                    c["lowram_dtype"] = gr.Radio(list(LOWRAM_DTYPE_CHOICES),
                                                 value=label_of(LOWRAM_DTYPE_CHOICES, _default("lowram_dtype")),
                                                 label="LowRAM precision", elem_id="hrlr_lowram_dtype")
                    c["restore_model"] = gr.Checkbox(_default("restore_model"), label="Reload the webui's model afterwards",
                                                     elem_id="hrlr_restore")
            with gr.Column(scale=1):
                panel = ui_common.create_output_panel(TABNAME, output_dir())
                memory = gr.HTML(elem_id="hrlr_memory")

        inputs = [id_task] + [c[name] for name in TAB_INPUTS]
        outputs = [panel.gallery, panel.generation_info, panel.infotext, memory, panel.html_log]
        for trigger in (generate_btn.click, c["prompt"].submit):
            trigger(fn=call_queue.wrap_gradio_gpu_call(tab_generate, extra_outputs=[[], "", "", ""]),
                    _js="hrlr_submit", inputs=inputs, outputs=outputs, show_progress=False)
        interrupt_btn.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
        c["preset"].change(lambda p: [gr.update(value=SIZE_PRESETS[p][0]), gr.update(value=SIZE_PRESETS[p][1])]
                           if SIZE_PRESETS.get(p) else [gr.update(), gr.update()],
                           inputs=[c["preset"]], outputs=[c["width"], c["height"]], show_progress=False)
        random_seed.click(fn=None, _js="function(){setRandomSeed('hrlr_seed')}", inputs=[], outputs=[])
        reuse_seed.click(fn=lambda info: json.loads(info or "{}").get("seed", -1),
                         inputs=[panel.generation_info], outputs=[c["seed"]], show_progress=False)

        infotext_utils.add_paste_fields(TABNAME, None, paste_fields(c))
        infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
            paste_button=paste_btn, tabname=TABNAME, source_text_component=c["prompt"], source_image_component=None))
        send.bind()
    return [(tab, TITLE, "hrlr_tab")]
