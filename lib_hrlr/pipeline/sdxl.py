"""What the pipeline does differently for SDXL, in one place.

* the base image is generated at the standard SDXL bucket (about 1024² px) closest to the
  target's aspect ratio (:func:`sdxl_base_size`);
* text encoding gives a context *and* a pooled embedding per prompt
  (:func:`split_conditions`), the empty negative prompt as zeros;
* the UNet takes SDXL's ADM vector ``y``: for the base pass a plain SDXL generation of the
  base size (:func:`base_added`), for the tiled pass per tile under the chosen
  micro-conditioning policy (:func:`tiled_added`, :mod:`lib_hrlr.sampling.micro_conditioning`);
* TAESD is the TAESDXL pair (:func:`taesd_kind`): the two families have identical shapes, so
  the wrong pair would decode garbage without any error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from ..config.architectures import ModelConfig
from ..errors import InvalidInput
from ..models.unet import adm_vector
from ..sampling.micro_conditioning import AddedConditioning, base_micro

# (width, height) of the SDXL training buckets around 1024² px
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))


def is_sdxl(cfg: ModelConfig) -> bool:
    return cfg.family == "sdxl"


def sdxl_base_size(width: int, height: int, native: int = 1024) -> tuple[int, int]:
    """The SDXL bucket whose aspect ratio is closest to ``width / height`` (scaled to
    ``native`` for test models of another native size), never larger than the target."""
    aspect = math.log(width / height)
    bw, bh = min(SDXL_BUCKETS, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))
    if native != 1024:  # tiny test models: the same shape at their native area, multiples of 8
        bw, bh = max(8, round(bw * native / 1024 / 8) * 8), max(8, round(bh * native / 1024 / 8) * 8)
    return min(bw, width), min(bh, height)


def taesd_kind(cfg: ModelConfig) -> str:
    """The TAESD family of a model: ``taesdxl`` for SDXL, ``taesd`` for SD 1.x."""
    return "taesdxl" if is_sdxl(cfg) else "taesd"


def split_conditions(conds: Sequence) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(contexts, pooled) of the :class:`~lib_hrlr.text.sdxl_conditioning.SdxlCondition` list."""
    return [c.context for c in conds], [c.pooled for c in conds]


def base_added(cfg: ModelConfig, pooled: torch.Tensor, negative: torch.Tensor, height: int, width: int) -> dict:
    """EpsDenoiser keyword arguments of the base pass: a plain SDXL generation of ``height x width``."""
    ids = torch.tensor([base_micro(height, width).time_ids()], dtype=torch.float32)
    dim = cfg.unet.added_time_dim
    return {"added": adm_vector(pooled, ids, dim), "added_uncond": adm_vector(negative, ids, dim)}


def tiled_added(cfg: ModelConfig, pooled: Sequence[torch.Tensor], negative: torch.Tensor, policy: str,
                height: int, width: int) -> AddedConditioning:
    """The MixtureDenoiser's ``added`` for a ``height x width`` px canvas: ``pooled`` of the
    global prompt then of each region, ``negative`` of the negative prompt."""
    return AddedConditioning(pooled, negative, cfg.unet.added_time_dim, policy, height, width, cfg.vae.downscale)


TAESDXL_FILES = ("taesdxl_encoder.safetensors", "taesdxl_decoder.safetensors")


def taesdxl_files(explicit: str | None) -> tuple[Path, Path]:
    """TAESDXL's (encoder, decoder) files in ``--taesd-dir`` (else ``$HRLR_TAESD_DIR``)."""
    d = explicit or os.environ.get("HRLR_TAESD_DIR")
    if not d:
        raise InvalidInput("taesd_dir", "--vae taesd with an SDXL model needs the TAESDXL weights: pass --taesd-dir "
                                        f"DIR (or set HRLR_TAESD_DIR) to a folder with {' and '.join(TAESDXL_FILES)}")
    from ..weights.taesd_files import PARTS, weight_file

    p = Path(d).expanduser()
    found = [weight_file(p, "taesdxl", part) for part in PARTS]
    missing = [f for f, path in zip(TAESDXL_FILES, found) if path is None]
    if missing:
        raise InvalidInput("taesd_dir", f"'{p}' lacks {', '.join(missing)} (a .pth of the same name works too), "
                                        "which an SDXL model needs (the SD 1.x taesd_* files have the same shapes but "
                                        "decode SDXL latents wrongly)")
    return found[0], found[1]


def vae_dtype(cfg: ModelConfig, vae_mode: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the VAE passes: SDXL's full VAE overflows in float16 (its decoder's
    activations exceed 65504 and come out as inf/NaN), so it runs in float32 instead;
    bfloat16 (float32's range) and TAESDXL are kept as asked."""
    if is_sdxl(cfg) and vae_mode == "full" and dtype == torch.float16:
        return torch.float32
    return dtype
