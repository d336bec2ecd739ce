"""The SDXL peer of ``bench --arch sdxl --peer diffusers``: the image the way a diffusers user makes it.

Run as a child process (``python -m lib_hrlr.bench.peer_diffusers_xl ARGS``) on the diffusers
folder :mod:`.diffusers_export` writes from the bench's SDXL checkpoint.  What a diffusers
user does for a large SDXL image on a CPU: one ``StableDiffusionXLPipeline`` at the output
size directly (no base pass, no tiles), the VAE decode tiled, and whatever offload the
pipeline accepts.  Stages, timed:

* ``load``: ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` and
  ``CLIPTextModelWithProjection`` ``from_pretrained`` in the compute dtype; the tokenizers;
  the pipeline; VAE tiling (``pipe.enable_vae_tiling()`` where the pipeline still has it,
  else ``pipe.vae.enable_tiling()``, which is what that method called); the offload
  attempts (below);
* ``text_encoder``: ``pipe.encode_prompt`` (prompt and negative, both encoders);
* ``unet``: the pipeline's denoising loop, ``output_type="latent"``, ``steps`` steps of
  DPMSolverMultistepScheduler with Karras sigmas (the SD 1.5 peer's, :func:`.peer_diffusers.scheduler`)
  and classifier-free guidance 7.0 (so 2 UNet evaluations per step, at the full latent size);
* ``vae_decode``: ``pipe.vae.decode`` of ``latents / scaling_factor``, tiled (diffusers'
  blended tiles);
* ``png_write``: ``image_processor.postprocess`` and ``PIL.Image.save``.

Tokenizers: the one CLIP ViT-L/14 BPE tokenizer folder (``--tokenizer``) for both; the
second is loaded with ``pad_token="!"``, which is how real SDXL's ``tokenizer_2`` differs
from its ``tokenizer`` (same vocabulary and merges).

Offload: ``enable_model_cpu_offload()`` is called on the pipeline, and if it refuses,
``enable_sequential_cpu_offload()``; each call's outcome is recorded under ``offload`` as
``{"used": bool, "error": "<exception type>: <text>"}``.  On a CPU-only
machine diffusers refuses both (without ``accelerate``: ImportError; with it: "requires
accelerator, but not found"), so the run is the plain pipeline on the CPU; an offload that
is accepted is kept (and then used for the run).  ``enable_group_offload`` is not tried:
its onload device would be the CPU itself, so it could move nothing anywhere.

Progress goes to stdout as one JSON line per event, flushed: ``{"starting": stage}`` before
a stage and ``{"stage": name, "seconds": s, "vm_hwm_mb": ..., "vm_rss_mb": ...}`` after it,
so that a run that is killed (OOM) leaves the point it reached.  The last line is the
result: ``{"stages": {name: seconds}, "wall_s", "load_peak_rss_mb", "run_peak_rss_mb",
"unet_evals", "offload", "vae_tiling", "tokenizers", "size", "diffusers", "torch",
"accelerate" (None when not installed: diffusers then loads each model without
``low_cpu_mem_usage``, initialising it in full before the weights are read), ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from ..memory.meter import reset_peak_rss
from .peer_diffusers import _status_kb, count_samples, peer_args, scheduler, torch_for

STAGES = ("load", "text_encoder", "unet", "vae_decode", "png_write")


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _try_offload(pipe, method: str) -> dict:
    try:
        getattr(pipe, method)()
    except Exception as e:  # noqa: BLE001 - recorded verbatim, the run goes on without it
        return {"used": False, "error": f"{type(e).__name__}: {e}"}
    return {"used": True, "error": None}


def main(argv: list[str] | None = None) -> int:
    a = peer_args("python -m lib_hrlr.bench.peer_diffusers_xl", lambda p: None).parse_args(argv)
    t_start = time.perf_counter()
    torch, dtype = torch_for(a)
    import diffusers
    import transformers

    stages: dict[str, float] = {}

    def begin(name: str) -> float:
        _emit({"starting": name})
        return time.perf_counter()

    def done(name: str, t0: float) -> None:
        stages[name] = round(time.perf_counter() - t0, 3)
        _emit({"stage": name, "seconds": stages[name], "vm_hwm_mb": round(_status_kb("VmHWM") / 1024, 1),
               "vm_rss_mb": round(_status_kb("VmRSS") / 1024, 1)})

    t0 = begin("load")
    f = a.folder
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(f, "unet"), torch_dtype=dtype)
    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(f, "vae"), torch_dtype=dtype)
    text = transformers.CLIPTextModel.from_pretrained(os.path.join(f, "text_encoder"), dtype=dtype)
    text2 = transformers.CLIPTextModelWithProjection.from_pretrained(os.path.join(f, "text_encoder_2"), dtype=dtype)
    tok = transformers.CLIPTokenizer.from_pretrained(a.tokenizer)
    tok2 = transformers.CLIPTokenizer.from_pretrained(a.tokenizer, pad_token="!")
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok,
                                               tokenizer_2=tok2, unet=unet, scheduler=scheduler(),
                                               add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "enable_vae_tiling"):
        pipe.enable_vae_tiling()
        tiling = "pipe.enable_vae_tiling()"
    else:  # removed from the pipelines after its deprecation; it called this
        pipe.vae.enable_tiling()
        tiling = f"pipe.vae.enable_tiling() (StableDiffusionXLPipeline of diffusers {diffusers.__version__} " \
                 "has no enable_vae_tiling)"
    offload = {"enable_model_cpu_offload": _try_offload(pipe, "enable_model_cpu_offload")}
    if not offload["enable_model_cpu_offload"]["used"]:
        offload["enable_sequential_cpu_offload"] = _try_offload(pipe, "enable_sequential_cpu_offload")
    evals = count_samples(unet)
    done("load", t0)
    load_peak_kb = _status_kb("VmHWM")
    reset = reset_peak_rss()
    gen = torch.Generator().manual_seed(1)

    with torch.inference_mode():
        t0 = begin("text_encoder")
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(a.prompt, device="cpu", num_images_per_prompt=1,
                                                              do_classifier_free_guidance=True,
                                                              negative_prompt=a.negative)
        done("text_encoder", t0)

        t0 = begin("unet")
        latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                       negative_pooled_prompt_embeds=neg_pooled, height=a.height, width=a.width,
                       num_inference_steps=a.steps, guidance_scale=7.0, generator=gen, output_type="latent").images
        done("unet", t0)

        t0 = begin("vae_decode")
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        del latents
        done("vae_decode", t0)

        t0 = begin("png_write")
        pil = pipe.image_processor.postprocess(image, output_type="pil")[0]
        del image
        pil.save(a.out)
        done("png_write", t0)

    _emit({
        "stages": stages, "wall_s": round(time.perf_counter() - t_start, 3),
        "load_peak_rss_mb": round(load_peak_kb / 1024, 1),
        "run_peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1) if reset else None,
        "unet_evals": evals["samples"], "offload": offload, "vae_tiling": tiling,
        "tokenizers": {"tokenizer": a.tokenizer, "tokenizer_2": f"{a.tokenizer} with pad_token '!'"},
        "threads": torch.get_num_threads(), "diffusers": diffusers.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "accelerate": _version("accelerate"), "size": list(pil.size),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
