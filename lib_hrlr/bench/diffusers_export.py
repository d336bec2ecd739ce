"""The bench's random checkpoint as a diffusers folder, so the peer runs on the very same weights.

Written once beside the checkpoint (``<checkpoint stem>-diffusers/``), by copying each
tensor's bytes from the single file under diffusers' / transformers' names (no model is
built, memory stays at one 4 MB buffer): ``unet/``, ``vae/`` and ``text_encoder/`` with their
``config.json`` and ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``.  The
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


def _meta_models(cfg):
    import diffusers
    import transformers

    from ..weights.random_checkpoint import diffusers_configs

    ucfg, vcfg, tcfg = diffusers_configs(cfg)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**ucfg)
        vae = diffusers.AutoencoderKL(**vcfg)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tcfg))
    return unet, vae, text


def _name_maps(cfg, models) -> dict[str, dict[str, str]]:
    """component -> {their name: our name}, for every tensor their model holds."""
    from ..models.unet import diffusers_key_map as unet_map
    from ..models.vae import diffusers_key_map as vae_map
    from ..text.clip_text import canonical_text_key, ignorable_text_keys

    unet, vae, text = models
    text_map = {k: canonical_text_key(k) for k in text.state_dict()
                if k not in ignorable_text_keys() and canonical_text_key(k) not in ignorable_text_keys()}
    return {"unet": unet_map(cfg.unet), "vae": vae_map(cfg.vae), "text": text_map}


def _write_component(path: Path, sources: dict, names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
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
    """The diffusers folder of ``ckpt_path`` (an SD 1.x single file), written once and reused."""
    from ..weights.checkpoint import open_checkpoint

    ckpt_path = Path(ckpt_path)
    out = Path(out) if out is not None else ckpt_path.with_name(ckpt_path.stem + "-diffusers")
    if (out / DONE).is_file():
        return out
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (out / DONE).is_file():
                return out
            ckpt = open_checkpoint(ckpt_path)
            models = _meta_models(ckpt.config)
            maps = _name_maps(ckpt.config, models)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                for comp, model, sub, fname in (("unet", models[0], "unet", "diffusion_pytorch_model.safetensors"),
                                                ("vae", models[1], "vae", "diffusion_pytorch_model.safetensors"),
                                                ("text", models[2], "text_encoder", "model.safetensors")):
                    (tmp / sub).mkdir(parents=True)
                    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                    names = {k: v for k, v in maps[comp].items() if k in shapes}
                    missing = sorted(set(shapes) - set(names) - {"text_model.embeddings.position_ids",
                                                                  "embeddings.position_ids"})
                    if missing:
                        raise RuntimeError(f"{comp}: no source for {missing[:3]}")
                    _write_component(tmp / sub / fname, ckpt.component(comp), names, shapes)
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
