"""What a run writes to disk, planned before its first UNet call: the spill files of the VAE
stages (their peak, for :func:`~lib_hrlr.image.spill.choose_spill_dir`) and the output PNG
(its folder is checked with the other inputs)."""

from __future__ import annotations

import os
import tempfile

import torch

from ..config.architectures import ModelConfig
from ..errors import DiskError
from ..image.spill import format_bytes
from .params import GenerationParams, base_size

PNG_SLACK = 1 << 20  # chunk headers, text chunks, zlib's worst case on incompressible rows


def estimate_run_spill_bytes(p: GenerationParams, cfg: ModelConfig, vae_dtype: torch.dtype) -> int:
    """Peak bytes of spill files any one stage keeps open (the stages run one after the other):
    the base decode, the guide encode at the target size and the final decode, for the exact
    tiled VAE or TAESD (whose decode spills only the uint8 image), plus the user's image when
    there is one."""
    return init_image_spill_bytes(p) + _stage_spill_bytes(p, cfg, vae_dtype)


def init_image_spill_bytes(p: GenerationParams) -> int:
    """The user's image, decoded (at most the target size: a target is never smaller than its
    source) and resized to the target, as uint8 RGB files open for the whole run."""
    return 2 * p.width * p.height * 3 if p.init_image is not None else 0


def _stage_spill_bytes(p: GenerationParams, cfg: ModelConfig, vae_dtype: torch.dtype) -> int:
    f = cfg.vae.downscale
    bw, bh = base_size(p.width, p.height, cfg.native_size)
    if p.vae == "taesd":
        from ..models.taesd import TAESDEncoder
        from ..vae.tiled_taesd import estimate_encode_spill_bytes

        with torch.device("meta"):
            encoder = TAESDEncoder().to(vae_dtype)
        return max(bw * bh * 3, estimate_encode_spill_bytes(encoder, p.height, p.width), p.width * p.height * 3)
    from ..vae.tiled_vae import estimate_spill_bytes

    kw = dict(attention=p.vae_attention)
    return max(
        estimate_spill_bytes(cfg.vae, bh // f, bw // f, vae_dtype, kind="decode", **kw),
        estimate_spill_bytes(cfg.vae, p.height, p.width, vae_dtype, kind="encode", **kw),
        estimate_spill_bytes(cfg.vae, p.height // f, p.width // f, vae_dtype, kind="decode", **kw),
    )


def png_bytes_bound(width: int, height: int) -> int:
    """An upper bound on the PNG's size: raw RGB rows with their filter bytes, plus slack."""
    return height * (width * 3 + 1) * 1001 // 1000 + PNG_SLACK


def check_output_folder(out: str, need_bytes: int) -> None:
    """The output's folder exists, takes a new file and has room for ``need_bytes``; raises
    :class:`DiskError` naming ``out`` otherwise (checked before any model work)."""
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise DiskError("out", f"the folder '{folder}' does not exist; create it or choose another --out")
    if os.path.isdir(os.path.abspath(out)):
        raise DiskError("out", f"'{out}' is a folder; --out needs a .png file path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hrlr-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DiskError("out", f"cannot write to '{folder}' ({e.strerror or e}); choose a writable folder with --out") from None
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise DiskError("out", f"'{folder}' has {format_bytes(free)} free; the PNG may need up to {format_bytes(need_bytes)}; "
                               f"free space there or choose another folder with --out")
