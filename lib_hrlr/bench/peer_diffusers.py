"""The peer side of ``bench --peer diffusers``: our job done the way a diffusers user does it.

Run as a child process (``python -m lib_hrlr.bench.peer_diffusers ARGS``) on the diffusers
folder :mod:`.diffusers_export` writes from the bench's checkpoint.  Stages, timed like ours
and named like ours:

* ``load``: the three models ``from_pretrained`` in the compute dtype, the CLIP tokenizer;
* ``text_encoder``: ``pipe.encode_prompt`` (prompt and negative);
* ``base_unet``: ``StableDiffusionPipeline`` at the model's native size, ``output_type="latent"``;
* ``base_decode``: ``vae.decode`` of the base latent, and the Lanczos upscale to the output size (PIL);
* ``guide_encode``: ``vae.enable_tiling()`` then ``vae.encode`` of the upscaled image (latent mean);
* ``tiled_unet``: ``StableDiffusionPanoramaPipeline`` (MultiDiffusion) over the noised guide
  latent, its views exactly our tiles (:func:`lib_hrlr.tiling.plan.plan_tiles`, same tile
  size and overlap), ``view_batch_size`` views per UNet call, the same number of steps our
  img2img pass takes (so the same number of UNet evaluations);
* ``vae_decode``: ``vae.enable_tiling()`` then ``vae.decode`` (diffusers' tiled decode, which
  blends overlapping tiles: an approximation, ours is exact);
* ``png_write``: ``image_processor.postprocess`` and ``PIL.Image.save``.

Both pipelines use DPMSolverMultistepScheduler with Karras sigmas (our default sampler,
dpmpp_2m_karras) and classifier-free guidance 7.0.  Random weights make the image
meaningless; what is compared is the work and its cost.  Prints one JSON line:
``{"stages": {name: seconds}, "wall_s", "run_peak_rss_mb", "views", "view_batch_size", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..memory.meter import reset_peak_rss


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", use_karras_sigmas=True,
                                       algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)


def peer_args(prog: str, add_job) -> argparse.ArgumentParser:
    """The arguments every peer child takes; ``add_job(p)`` adds the job's own."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--folder", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    add_job(p)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "fp16"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--out", required=True)
    return p


def torch_for(a):
    """torch with the child's thread count, and its compute dtype."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    return torch, {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[a.dtype]


def count_samples(unet) -> dict:
    """``{"samples": n}``, kept up to date with the batch rows ``unet`` is called on (changes nothing)."""
    evals = {"samples": 0}
    unet.register_forward_pre_hook(lambda m, args, kw: evals.__setitem__("samples", evals["samples"] + args[0].shape[0]),
                                   with_kwargs=True)
    return evals


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--native", type=int, required=True, help="base pass size in px")
    p.add_argument("--tiled-steps", type=int, required=True)
    p.add_argument("--tile", type=int, required=True, help="latent px")
    p.add_argument("--overlap", type=int, required=True, help="latent px")
    p.add_argument("--view-batch-size", type=int, required=True)


def main(argv: list[str] | None = None) -> int:
    a = peer_args("python -m lib_hrlr.bench.peer_diffusers", _job_args).parse_args(argv)
    t_start = time.perf_counter()
    torch, dtype = torch_for(a)
    import diffusers
    import transformers
    from PIL import Image

    from ..tiling.plan import plan_tiles

    stages: dict[str, float] = {}

    def stage(name, t0):
        stages[name] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(a.folder, "unet"), torch_dtype=dtype)
    vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(a.folder, "vae"), torch_dtype=dtype)
    text = transformers.CLIPTextModel.from_pretrained(os.path.join(a.folder, "text_encoder"), dtype=dtype)
    tok = transformers.CLIPTokenizer.from_pretrained(a.tokenizer)
    parts = dict(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler(), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    base_pipe = diffusers.StableDiffusionPipeline(**parts)
    pano = diffusers.StableDiffusionPanoramaPipeline(**parts)
    for pipe in (base_pipe, pano):
        pipe.set_progress_bar_config(disable=True)
    evals = count_samples(unet)
    stage("load", t0)
    load_peak_kb = _status_kb("VmHWM")
    reset = reset_peak_rss()
    gen = torch.Generator().manual_seed(1)
    sf = vae.config.scaling_factor

    with torch.inference_mode():
        t0 = time.perf_counter()
        cond, uncond = base_pipe.encode_prompt(a.prompt, "cpu", 1, True, a.negative)
        stage("text_encoder", t0)

        t0 = time.perf_counter()
        base = base_pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=a.native, width=a.native,
                         num_inference_steps=a.steps, guidance_scale=7.0, generator=gen, output_type="latent").images
        stage("base_unet", t0)

        t0 = time.perf_counter()
        img = vae.decode(base / sf, return_dict=False)[0]
        pil = base_pipe.image_processor.postprocess(img, output_type="pil")[0]
        del img
        guide_img = pil.resize((a.width, a.height), Image.LANCZOS)
        stage("base_decode", t0)

        t0 = time.perf_counter()
        vae.enable_tiling()
        x = base_pipe.image_processor.preprocess(guide_img).to(dtype)
        guide = vae.encode(x).latent_dist.mean * sf
        del x
        stage("guide_encode", t0)

        t0 = time.perf_counter()
        plan = plan_tiles(a.height // 8, a.width // 8, a.tile, a.overlap)
        views = [(t.y, t.y1, t.x, t.x1) for t in plan.tiles]
        pano.get_views = lambda *args, **kw: views  # MultiDiffusion over our tiles (its default: 64 px windows, stride 8)
        # img2img start: the guide noised to the first of the pass's sigmas; the pipeline scales by init_noise_sigma (1)
        sched = pano.scheduler
        sched.set_timesteps(a.tiled_steps)
        noise = torch.randn(guide.shape, generator=gen, dtype=torch.float32).to(dtype)
        latents = sched.add_noise(guide, noise, sched.timesteps[:1])
        out = pano(prompt_embeds=cond, negative_prompt_embeds=uncond, height=a.height, width=a.width,
                   num_inference_steps=a.tiled_steps, guidance_scale=7.0, view_batch_size=a.view_batch_size,
                   latents=latents, generator=gen, output_type="latent").images
        del latents, noise, guide
        stage("tiled_unet", t0)

        t0 = time.perf_counter()
        vae.enable_tiling()
        image = vae.decode(out / sf, return_dict=False)[0]
        stage("vae_decode", t0)

        t0 = time.perf_counter()
        pil = base_pipe.image_processor.postprocess(image, output_type="pil")[0]
        del image
        pil.save(a.out)
        stage("png_write", t0)

    print(json.dumps({
        "stages": stages, "wall_s": round(time.perf_counter() - t_start, 3),
        "load_peak_rss_mb": round(load_peak_kb / 1024, 1),
        "run_peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1) if reset else None,
        "views": len(views), "view_batch_size": a.view_batch_size, "unet_evals": evals["samples"],
        "threads": torch.get_num_threads(), "diffusers": diffusers.__version__, "torch": torch.__version__,
        "size": list(pil.size),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
