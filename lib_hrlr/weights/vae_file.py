"""A separate VAE file (``--vae FILE``) in place of the checkpoint's own VAE.

Accepted, read by headers only (safetensors JSON, or the ``.ckpt`` pickle through the safe
reader, which runs no code):

* single-file LDM VAEs such as ``vae-ft-mse-840000-ema-pruned.safetensors`` / ``.ckpt``:
  keys ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*`` (optionally below
  ``first_stage_model.`` or inside ``state_dict``; training leftovers such as ``loss.*`` and
  ``model_ema.*`` are ignored); a whole SD checkpoint lends its VAE the same way;
* diffusers ``AutoencoderKL`` weights (``encoder.down_blocks.*`` names), as the file
  ``diffusion_pytorch_model.safetensors`` or as its folder (``config.json`` beside it).

:func:`with_vae_file` returns the checkpoint with its ``vae`` component pointing at the
file, so every VAE stage (encode, decode, any backend path) streams the new weights.  The
VAE must fit the model's VAE architecture (every weight present with its size).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..config.architectures import VAE_PREFIX, VAEConfig
from ..errors import CheckpointError
from .checkpoint import Checkpoint, _apply_map, _component_files, _read_tensor_table
from .file_hash import cached_sha256
from .safetensors_file import TensorSource

FIELD = "vae_file"
ALLOWED = ("a VAE file: single-file LDM (encoder./decoder./quant_conv. keys) or diffusers AutoencoderKL "
           "weights, .safetensors or .ckpt")


def _err(msg: str) -> CheckpointError:
    return CheckpointError(FIELD, msg)


@dataclass(frozen=True)
class VaeFile:
    """An opened VAE file: its weights under our VAE parameter names, and how to name it."""

    path: Path
    format: str  # "ldm" | "diffusers"
    sources: dict[str, TensorSource]

    @property
    def name(self) -> str:
        """The webui's ``VAE`` infotext value: the file name."""
        return self.path.name

    @property
    def hash(self) -> str:
        """The webui's ``VAE hash``: the first 10 hex digits of the file's sha256."""
        return cached_sha256(self.weights_file)[:10]

    @property
    def weights_file(self) -> Path:
        return Path(next(iter(self.sources.values())).path)

    def infotext_fields(self) -> dict[str, str]:
        return {"VAE hash": self.hash, "VAE": self.name}


def _weights_path(p: Path) -> Path:
    if p.is_dir():  # a diffusers vae/ folder
        files = _component_files(p, None)
        if len(files) != 1:
            raise _err(f"'{p}' holds a sharded VAE ({len(files)} files); give {ALLOWED}")
        return files[0]
    return p


def open_vae_file(path: str | os.PathLike, cfg: VAEConfig) -> VaeFile:
    """Open ``path`` as a VAE for the architecture ``cfg``; raise CheckpointError (field
    ``vae_file``) when it is missing, not a VAE, or of another shape."""
    p = Path(path).expanduser()
    if not p.exists():
        raise _err(f"'{p}' does not exist; give {ALLOWED}")
    f = _weights_path(p)
    try:
        _, tensors, _ = _read_tensor_table(f)
    except CheckpointError as e:
        raise _err(f"'{f.name}' cannot be read as weights ({e.message}); give {ALLOWED}") from None
    table = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: TensorSource(str(f), info)
             for k, info in tensors.items()}
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in table or "decoder.up_blocks.0.resnets.0.conv1.weight" in table:
        from ..models.vae import diffusers_key_map

        fmt, sources = "diffusers", _apply_map(table, diffusers_key_map(cfg))
    elif "decoder.conv_in.weight" in table or "encoder.conv_in.weight" in table:
        fmt, sources = "ldm", table
    elif any(k.startswith("model.diffusion_model.") for k in tensors):
        raise _err(f"'{f.name}' is a whole model checkpoint, not a VAE; pass it as --model, or give {ALLOWED}")
    else:
        raise _err(f"'{f.name}' has no VAE weights (no encoder./decoder. keys); give {ALLOWED}")
    return VaeFile(p, fmt, _checked(sources, cfg, f))


def _checked(sources: dict[str, TensorSource], cfg: VAEConfig, f: Path) -> dict[str, TensorSource]:
    """Only the weights our VAE has, each present with the size the architecture needs."""
    import torch

    from ..models.vae import AutoencoderKL

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoencoderKL(cfg).state_dict().items()}
    missing = [n for n in shapes if n not in sources]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise _err(f"'{f.name}' lacks {len(missing)} weight(s) of the model's VAE: {shown}; give a VAE made for "
                   "this model family")
    out = {}
    for n, shape in shapes.items():
        info = sources[n].info
        if math.prod(info.shape) != math.prod(shape):
            raise _err(f"'{f.name}': '{n}' has shape {list(info.shape)}, the model's VAE needs {list(shape)}; "
                       "give a VAE made for this model family")
        if not info.dtype.is_floating_point:
            raise _err(f"'{f.name}': '{n}' is {info.dtype}; floating-point weights are required")
        out[n] = sources[n]
    return out


def with_vae_file(ckpt: Checkpoint, vae: VaeFile) -> Checkpoint:
    """``ckpt`` with its VAE weights taken from ``vae`` (the model hash stays the model's)."""
    out = dataclasses.replace(ckpt, components={**ckpt.components, "vae": dict(vae.sources)})
    if "sha256" in ckpt.__dict__:  # the model file's hash, already computed: keep it
        out.__dict__["sha256"] = ckpt.__dict__["sha256"]
    return out
