"""The bench's random checkpoint as a diffusers folder, so the peer runs on the very same weights.

Written once beside the checkpoint (``<checkpoint stem>-diffusers/``), by copying each
tensor's bytes from the single file under diffusers' / transformers' names (no model is
built, memory stays at one 4 MB buffer): ``unet/``, ``vae/`` and ``text_encoder/`` with their
``config.json`` and ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``; for SDXL
(the sgm single-file layout) also ``text_encoder_2/`` (transformers'
``CLIPTextModelWithProjection``) from the OpenCLIP ViT-bigG/14 tower: each of q/k/v is its
contiguous third of OpenCLIP's packed ``in_proj_weight`` / ``in_proj_bias`` (a byte range,
:func:`lib_hrlr.text.openclip.split_rows`), and ``text_projection.weight`` is the transpose
of OpenCLIP's (hidden, projection) ``text_projection`` (the one tensor that is not a plain
byte copy: read whole, its elements transposed; 3.3 MB in bf16/fp16 for bigG).  The
folder is assembled under a temporary name and renamed into place, so a reader never sees
half of it.  No tokenizer and no scheduler are written: the peer takes the CLIP tokenizer
the tests use and builds its scheduler in code.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import torch

from ..weights.safetensors_file import build_header, pread_into

COPY_BYTES = 4 * 1024 * 1024
DONE = "hrlr-export-complete"


# (component, its diffusers sub-folder, weights file name)
COMPONENTS = (("unet", "unet", "diffusion_pytorch_model.safetensors"),
              ("vae", "vae", "diffusion_pytorch_model.safetensors"),
              ("text", "text_encoder", "model.safetensors"),
              ("text2", "text_encoder_2", "model.safetensors"))


def _meta_models(cfg) -> dict:
    """component -> the diffusers / transformers model of ``cfg`` on meta (text2 for SDXL only)."""
    import diffusers
    import transformers

    from ..weights.random_checkpoint import diffusers_configs, diffusers_text2_config

    ucfg, vcfg, tcfg = diffusers_configs(cfg)
    with torch.device("meta"):
        models = {"unet": diffusers.UNet2DConditionModel(**ucfg), "vae": diffusers.AutoencoderKL(**vcfg),
                  "text": transformers.CLIPTextModel(transformers.CLIPTextConfig(**tcfg))}
        if cfg.text2 is not None:
            models["text2"] = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**diffusers_text2_config(cfg)))
    return models


def _name_maps(cfg, models: dict) -> dict[str, dict[str, str]]:
    """component -> {their name: our name}, for every tensor their model holds."""
    from ..models.unet import diffusers_key_map as unet_map
    from ..models.vae import diffusers_key_map as vae_map
    from ..text.clip_text import canonical_text_key, ignorable_text_keys

    def text_map(model) -> dict[str, str]:
        out = {}
        for k in model.state_dict():
            ours = k if k.startswith("text_projection.") else canonical_text_key(k)
            if k not in ignorable_text_keys() and ours not in ignorable_text_keys():
                out[k] = ours
        return out

    maps = {"unet": unet_map(cfg.unet), "vae": vae_map(cfg.vae), "text": text_map(models["text"])}
    if "text2" in models:
        maps["text2"] = text_map(models["text2"])
    return maps


def _write_transposed(out, fd: int, info, shape: tuple[int, ...]) -> None:
    """Write the stored (a, b) matrix at ``info`` as its (b, a) transpose (``shape`` = (b, a))."""
    raw = bytearray(info.nbytes)
    pread_into(fd, info.offset, memoryview(raw))
    size = info.dtype.itemsize
    elems = torch.frombuffer(raw, dtype=torch.uint8).view(shape[1], shape[0], size)
    out.write(memoryview(elems.transpose(0, 1).contiguous().numpy()).cast("B"))


def _write_component(path: Path, sources: dict, names: dict[str, str], shapes: dict[str, tuple[int, ...]],
                     transposed: frozenset[str] = frozenset()) -> None:
    """``transposed``: our names whose stored bytes are the transpose of the model's tensor."""
    order = sorted(names)
    entries = [(k, sources[names[k]].info.dtype, tuple(shapes[k])) for k in order]
    header, _ = build_header(entries, {"format": "pt"})
    buf = bytearray(COPY_BYTES)
    fds: dict[str, int] = {}
    try:
        with open(path, "wb") as out:
            out.write(header)
            for k in order:
                src = sources[names[k]]
                fd = fds.get(src.path)
                if fd is None:
                    fd = fds[src.path] = os.open(src.path, os.O_RDONLY)
                if names[k] in transposed:
                    if len(shapes[k]) != 2 or src.info.nbytes > 64 * COPY_BYTES:
                        raise RuntimeError(f"{k}: a transposed {list(shapes[k])} tensor of {src.info.nbytes} bytes "
                                           "cannot be exported")
                    _write_transposed(out, fd, src.info, tuple(shapes[k]))
                    continue
                done = 0
                while done < src.info.nbytes:
                    n = min(COPY_BYTES, src.info.nbytes - done)
                    view = memoryview(buf)[:n]
                    pread_into(fd, src.info.offset + done, view)
                    out.write(view)
                    done += n
    finally:
        for fd in fds.values():
            os.close(fd)


def export_diffusers_folder(ckpt_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """The diffusers folder of ``ckpt_path`` (an SD 1.x or SDXL single file), written once and reused."""
    from ..weights.checkpoint import FAMILIES, open_checkpoint

    ckpt_path = Path(ckpt_path)
    out = Path(out) if out is not None else ckpt_path.with_name(ckpt_path.stem + "-diffusers")
    if (out / DONE).is_file():
        return out
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (out / DONE).is_file():
                return out
            ckpt = open_checkpoint(ckpt_path, families=FAMILIES)
            models = _meta_models(ckpt.config)
            maps = _name_maps(ckpt.config, models)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                for comp, sub, fname in COMPONENTS:
                    if comp not in models:
                        continue
                    model = models[comp]
                    (tmp / sub).mkdir(parents=True)
                    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                    names = {k: v for k, v in maps[comp].items() if k in shapes}
                    missing = sorted(set(shapes) - set(names) - {"text_model.embeddings.position_ids",
                                                                  "embeddings.position_ids"})
                    if missing:
                        raise RuntimeError(f"{comp}: no source for {missing[:3]}")
                    flipped = frozenset(k.split(".", 1)[1] for k in ckpt.transposed if k.startswith(comp + "."))
                    _write_component(tmp / sub / fname, ckpt.component(comp), names, shapes, flipped)
                    model.save_config(str(tmp / sub)) if hasattr(model, "save_config") else \
                        model.config.save_pretrained(str(tmp / sub))
                (tmp / DONE).write_text(str(ckpt_path))
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out
