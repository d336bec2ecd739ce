"""The txt2img/img2img accordion: an AlwaysOn script that tiles the webui's own sampling and VAE
(imports the webui).  Attributes it sets on webui objects for a run are put back after it."""

from __future__ import annotations

import os

import gradio as gr
import torch
from modules import devices, scripts, shared
from modules.ui_components import FormRow

from lib_hrlr.adapters.ldm import LdmBackend
from lib_hrlr.pipeline.backend import RunSettings
from lib_hrlr.tiling.wrap import TiledDenoiser

from . import infotext_paste as paste
from .accordion_plan import AccordionArgs, accordion_args, encode_first_stage_divisor, plan_accordion_tiles
from .lifecycle import model_config
from .request import MODEL_TILE, OVERLAP_HELP, QUARTER_OVERLAP, TILE_HELP, VAE_CHOICES, WEIGHTING_CHOICES
from .run import webui_taesd_dir
from .tab import TILES_PER_CALL, TITLE


class HrlrScript(scripts.Script):
    """Tiled denoising + tiled VAE for ordinary txt2img / img2img runs (incl. hires fix)."""

    def __init__(self):
        super().__init__()
        self._undo: list = []
        self._args: AccordionArgs | None = None

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        d = AccordionArgs()
        with gr.Accordion(TITLE, open=False, elem_id=self.elem_id("accordion")):
            enabled = gr.Checkbox(d.enabled, label="Enable tiled denoising and tiled VAE",
                                  elem_id=self.elem_id("enabled"))
            with FormRow():
                tile = gr.Slider(MODEL_TILE, 128, value=d.tile, step=8, label=f"Tile (latent px; {TILE_HELP})",
                                 elem_id=self.elem_id("tile"))
                overlap = gr.Slider(QUARTER_OVERLAP, 64, value=d.overlap, step=1, label=f"Overlap ({OVERLAP_HELP})",
                                    elem_id=self.elem_id("overlap"))
                batch = gr.Slider(1, 16, value=d.tiles_per_call, step=1, label=TILES_PER_CALL,
                                  elem_id=self.elem_id("batch"))
            with FormRow():
                weighting = gr.Radio(list(WEIGHTING_CHOICES), value=d.weighting, label="Tile weights",
                                     elem_id=self.elem_id("weighting"))
                vae = gr.Radio(list(VAE_CHOICES), value=d.vae, label="VAE", elem_id=self.elem_id("vae"))
        self.infotext_fields = [
            (enabled, lambda p: "HRLR tile" in p),
            (tile, "HRLR tile"), (overlap, "HRLR overlap"), (batch, "HRLR tile batch"),
            (weighting, lambda p: paste.weighting_label(p) or gr.update()),
            (vae, lambda p: paste.vae_label(p) or gr.update()),
        ]
        # the positional order of the API's args: enabled, tile, overlap, tiles per call, weights, VAE
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
        self._args = None

    def process(self, p, *args):
        a = accordion_args(args)
        if not a.enabled:
            return
        model = p.sd_model
        cfg = model_config(model.sd_checkpoint_info.filename)
        a = a.for_model(cfg)  # tile 0 / overlap -1: this model's own (SD 1.x 64/16, SDXL 128/32)
        self._args = a
        mode = a.vae_value
        p.extra_generation_params.update({"HRLR tile": a.tile, "HRLR overlap": a.overlap,
                                          "HRLR tile batch": a.tiles_per_call,
                                          "HRLR weighting": a.weighting_value, "HRLR VAE": mode})
        backend = LdmBackend(model, cfg, "", "")
        backend.prepare(RunSettings(dtype=devices.dtype_vae, device=devices.device, vae_dtype=devices.dtype_vae,
                                    vae_device=devices.device, vae_mode=mode,
                                    taesd_dir=os.environ.get("HRLR_TAESD_DIR") or webui_taesd_dir()), None)
        divisor = encode_first_stage_divisor(cfg)  # SDXL's encode_first_stage returns scaled latents
        tile = a.tile

        def decode_first_stage(z, *_a, **_k):
            outs = []
            for i in range(z.shape[0]):
                arr = backend.decode(z[i : i + 1].float(), tile=tile, output="float",
                                     should_stop=lambda: shared.state.interrupted)
                try:
                    outs.append(arr.to_tensor())  # (1, 3, H, W) in [-1, 1]
                finally:
                    arr.close()
            return torch.cat(outs).to(device=z.device, dtype=z.dtype if z.is_floating_point() else torch.float32)

        def encode_first_stage(x, *_a, **_k):
            from lib_hrlr.vae.tiled_vae import TensorImageSource

            outs = [backend.encode(TensorImageSource(x[i].float().cpu()), px_tile=tile * 8) / divisor
                    for i in range(x.shape[0])]
            return torch.cat(outs).to(device=x.device, dtype=x.dtype)

        self._set(model, "decode_first_stage", decode_first_stage)
        self._set(model, "encode_first_stage", encode_first_stage)

    def process_before_every_sampling(self, p, *args, **kwargs):
        a = self._args
        if a is None or getattr(p, "sampler", None) is None:
            return
        x = kwargs.get("x")
        if x is None:
            return
        h, w = x.shape[-2:]
        plan = plan_accordion_tiles(int(h), int(w), a.tile, a.overlap)
        if plan is None:
            return  # the canvas fits in one tile: the webui's own pass is the tiled result
        wrapper = p.sampler.model_wrap_cfg
        inner = wrapper.inner_model  # builds the webui's k-diffusion wrapper if needed
        self._set(wrapper, "model_wrap", _Tiled(inner, plan, a.weighting_value, a.tiles_per_call))

    def postprocess(self, p, processed, *args):
        self._restore()
        self._args = None


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
