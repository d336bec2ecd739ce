"""The model components as the pipeline uses them: built on ``meta``, weights streamed in,
released when the stage ends.  This is the one place that knows how models, checkpoints,
streaming and the tiled VAEs fit together.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch

from ..config.architectures import ModelConfig
from ..errors import CheckpointError
from ..memory.meter import MemoryMeter, attach_module_labels
from ..runtime import trim_allocator
from ..weights.checkpoint import Checkpoint, open_checkpoint
from ..weights.streaming import WeightStreamer

DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_HUB_LICENCE = "CreativeML OpenRAIL-M"
# what the default model needs from the hub (fp32 weights; the loader reads these names)
DEFAULT_HUB_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                     "text_encoder/model.safetensors")


def default_model_help() -> str:
    """How to get the default model by hand (offline), or how to use another one."""
    return (f"pass --model PATH (an SD 1.x .safetensors/.ckpt or diffusers folder), or download "
            f"{', '.join(DEFAULT_HUB_FILES)} from https://huggingface.co/{DEFAULT_HUB_MODEL} "
            f"(licence {DEFAULT_HUB_LICENCE}) into one folder, keeping the subfolders, and pass --model FOLDER")
MB = 1024 * 1024


# ----------------------------------------------------------------------------------- model
def open_model(path: str | None) -> Checkpoint:
    """Open ``path``; with none, fetch the default SD 1.5 diffusers folder from the hub.

    Offline (or without huggingface_hub) this fails at once with a message that says how to
    pass a local model, instead of hanging on the network.
    """
    if path:
        from ..weights.checkpoint import FAMILIES  # the pipeline runs SD 1.x and SDXL

        return open_checkpoint(path, families=FAMILIES)
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            "model", "no --model given and huggingface_hub is not installed to fetch the default "
                     f"'{DEFAULT_HUB_MODEL}' (pip install 'hrlr[hub]'); {default_model_help()}"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise CheckpointError("model", f"no --model given and HF_HUB_OFFLINE is set, so the default "
                                       f"'{DEFAULT_HUB_MODEL}' cannot be fetched; {default_model_help()}")
    import sys

    print(f"no --model given: fetching {DEFAULT_HUB_MODEL} (licence {DEFAULT_HUB_LICENCE}, "
          f"https://huggingface.co/{DEFAULT_HUB_MODEL}) into the Hugging Face cache", file=sys.stderr)
    try:
        folder = huggingface_hub.snapshot_download(DEFAULT_HUB_MODEL, allow_patterns=list(DEFAULT_HUB_FILES),
                                                   etag_timeout=5)
    except Exception as e:  # any network/hub failure: say so at once, with the way out
        raise CheckpointError(
            "model", f"no --model given and the default '{DEFAULT_HUB_MODEL}' could not be fetched "
                     f"({type(e).__name__}); {default_model_help()}"
        ) from None
    return open_checkpoint(folder)


def component_mb(ckpt: Checkpoint, name: str, dtype: torch.dtype) -> float:
    """Size of a component's weights in the compute dtype."""
    elems = sum(s.info.nbytes // max(1, _itemsize(s.info.dtype)) for s in ckpt.component(name).values())
    return elems * _itemsize(dtype) / MB


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build().eval()


def _streamer_events(meter: MemoryMeter | None, label: str):
    """An on_event callback that sums load/wait time per kind into the meter."""
    if meter is None:
        return None, lambda: None
    totals = {"load": 0.0, "wait": 0.0, "bytes": 0}

    def on_event(kind: str, name: str, nbytes: int, seconds: float) -> None:
        if kind in ("load", "prefetch"):
            totals["load"] += seconds
            totals["bytes"] += nbytes
        elif kind == "wait":
            totals["wait"] += seconds

    def flush(streamer: WeightStreamer | None = None) -> None:
        st = streamer.stats if streamer is not None else None
        meter.note(
            f"{label} streaming cache",
            (st.pinned_bytes / MB) if st else 0.0,
            seconds=totals["wait"],
            loaded_gb=round(totals["bytes"] / 1e9, 3),
            load_s=round(totals["load"], 2),
            **({"pinned_units": st.pinned_units, "peak_inflight_mb": round(st.peak_inflight_bytes / MB, 1)} if st else {}),
        )

    return on_event, flush


class DeviceModel:
    """Calls ``model`` on ``device`` with CPU tensors in and out (the pipeline keeps latents on the CPU).

    ``trim``: hand the heap's freed pages back to the kernel after every call
    (:func:`~lib_hrlr.runtime.trim_allocator`), so that a streamed pass's many calls do not pile
    up freed-but-resident heap memory on top of the next call's peak."""

    def __init__(self, model: Callable, device: torch.device, trim: bool = False):
        self.model, self.device, self.trim = model, device, trim

    def __call__(self, *args):
        try:
            if self.device.type == "cpu":
                return self.model(*args)
            out = self.model(*(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args))
            return out.to("cpu")
        finally:
            if self.trim:
                trim_allocator()


# ------------------------------------------------------------------------------------ text
def encode_text(ckpt: Checkpoint, prompts: list[str], clip_skip: int, dtype: torch.dtype,
                device: torch.device, cache_bytes: int, transform=None, embeddings=None,
                should_stop=None) -> list[torch.Tensor]:
    """Conditionings (1, 77k, hidden) float32 on the CPU, one per prompt; the encoder is gone afterwards.

    ``transform``: the streamer's weight transform (a LoRA merger); ``embeddings``: name ->
    textual-inversion vectors; ``should_stop()``: polled before every 75-token chunk (Interrupted)."""
    from ..text.clip_text import ClipTextEncoder
    from ..text.prompts import encode_prompts

    cfg: ModelConfig = ckpt.config
    enc = _meta(lambda: ClipTextEncoder(cfg.text))
    with torch.inference_mode(), WeightStreamer(enc, ckpt.component("text"), dtype=dtype, device=device,
                                                cache_bytes=cache_bytes, transform=transform):
        ctx = encode_prompts(_DeviceEncoder(enc, device), prompts, clip_skip=clip_skip, embeddings=embeddings,
                             should_stop=should_stop)
    return [c.float().cpu() for c in ctx]


class _DeviceEncoder:
    """The streamed encoder seen from ``encode_prompts``: token ids in and hidden states out on
    the CPU, whatever device the encoder computes on (its parameters are on ``meta`` between calls)."""

    def __init__(self, enc, device):
        self.enc, self.device = enc, device

    def parameters(self):
        return iter(())

    def __call__(self, ids, clip_skip=1, token_vectors=()):
        return self.enc(ids.to(self.device), clip_skip=clip_skip, token_vectors=token_vectors).cpu()


# ------------------------------------------------------------------------------------ UNet
UNET_MODULE_LABELS = ("input_blocks", "middle_block", "output_blocks")


@contextlib.contextmanager
def unet_streamer(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, cache_bytes: int,
                  meter: MemoryMeter | None = None, prefetch: bool = True, transform=None,
                  sources: dict | None = None):
    """The UNet as an eps callable whose weights stream from the checkpoint; freed on exit.

    ``transform``: the streamer's weight transform (a LoRA merger, merged as layers stream in).
    ``sources``: where to read the UNet's weights instead of the checkpoint's own (the same
    tensors prepared in ``dtype``: :mod:`lib_hrlr.weights.prepared`)."""
    from ..models.unet import STREAM_CHUNKING, UNet

    cfg: ModelConfig = ckpt.config
    unet = _meta(lambda: UNet(cfg.unet))
    unet.set_chunking(**STREAM_CHUNKING)
    on_event, flush = _streamer_events(meter, "unet")
    streamer = WeightStreamer(unet, sources or ckpt.component("unet"), dtype=dtype, device=device, cache_bytes=cache_bytes,
                              prefetch=prefetch, on_event=on_event, unit_types=_unet_unit_types(),
                              transform=transform)
    labels = contextlib.ExitStack()
    if meter is not None:
        labels.enter_context(attach_module_labels(meter, unet_block_labels(unet)))
    try:
        with torch.inference_mode(), streamer, labels:
            model = DeviceModel(unet, device, trim=True)
            model.streamer = streamer
            yield model
            if meter is not None:
                flush(streamer)
    finally:
        labels.close()
        streamer.close()


def unet_block_labels(unet) -> dict[str, list]:
    """Meter labels for the UNet's three block groups (each label covers all blocks of its group)."""
    out = {}
    for n in UNET_MODULE_LABELS:
        part = getattr(unet, n)
        out[f"unet.{n}"] = list(part) if isinstance(part, torch.nn.ModuleList) else [part]
    return out


def _unet_unit_types() -> tuple[type, ...]:
    """Modules streamed as one unit: the chunked feed-forward calls its linears once per chunk."""
    from ..models.unet import FeedForward

    return (FeedForward,)


# ------------------------------------------------------------------------------------- VAE
TAESD_FILES = ("taesd_encoder.safetensors", "taesd_decoder.safetensors")
# TAESD's encoder runs one resolution at a time over 256 px tiles (their working set measured
# +88 MB at 2048², and the same at 1024²; 512 px tiles +278 MB for no gain in time)
TAESD_ENCODE_TILE = 256


def taesd_dir(explicit: str | None) -> Path:
    """Where the TAESD weights are: ``--taesd-dir``, else ``$HRLR_TAESD_DIR``, else the user
    cache, fetched into it when online (:mod:`lib_hrlr.weights.taesd_files`)."""
    from ..weights.taesd_files import find_taesd

    return find_taesd(explicit)


@contextlib.contextmanager
def vae_half(ckpt: Checkpoint, half: str, dtype: torch.dtype, device: torch.device):
    """The SD VAE with only its encoder or decoder, weights resident for the stage; freed on exit."""
    from ..models.vae import AutoencoderKL

    cfg: ModelConfig = ckpt.config
    vae = _meta(lambda: AutoencoderKL(cfg.vae, encoder=half == "encoder", decoder=half == "decoder"))
    wanted = ("encoder.", "quant_conv.") if half == "encoder" else ("decoder.", "post_quant_conv.")
    sources = {k: v for k, v in ckpt.component("vae").items() if k.startswith(wanted)}
    with torch.inference_mode(), WeightStreamer(vae, sources, dtype=dtype, device=device, prefetch=False,
                                                arena=False) as streamer:
        streamer.materialize_all()
        yield vae


@contextlib.contextmanager
def _vae_or_half(vae, ckpt: Checkpoint, half: str, dtype: torch.dtype, device: torch.device):
    """``vae`` as given (a resident model), else the checkpoint's ``half`` streamed in for the stage."""
    if vae is None:
        with vae_half(ckpt, half, dtype, device) as v:
            yield v
    else:  # no_grad, not inference_mode: the caller's tensors (e.g. the webui's) stay ordinary
        with torch.no_grad():
            yield vae


def _taesd_file(explicit: str | None, kind: str, index: int) -> Path:
    """The encoder (0) or decoder (1) file of TAESD family ``kind`` (``.safetensors``, else ``.pth``)."""
    if kind == "taesd":
        from ..weights.taesd_files import PARTS, weight_file

        return weight_file(taesd_dir(explicit), kind, PARTS[index])
    from .sdxl import taesdxl_files

    return taesdxl_files(explicit)[index]


def decode_latent(ckpt: Checkpoint, vae_mode: str, taesd: str | None, latent: torch.Tensor, *,
                  dtype: torch.dtype, device: torch.device, tile: int, output: str, spill_dir: str | None,
                  attention: str = "global", progress=None, should_stop=None, scaling_factor: float | None = None,
                  vae=None, taesd_kind: str = "taesd", reuse_heap: bool = False):
    """Decode a *scaled* latent (what the UNet works on) to a SpillArray image (H, W, 3).

    ``vae``: an already-loaded autoencoder to use instead of the checkpoint's (``ckpt`` may then
    be None, as with TAESD, given the model's ``scaling_factor``).  ``taesd_kind``: the TAESD
    family of the model ("taesd" for SD 1.x, "taesdxl" for SDXL, :func:`.sdxl.taesd_kind`).
    ``reuse_heap``: for the exact tiled VAE (:func:`~lib_hrlr.vae.tiled_vae.decode_tiled`)."""
    scale = scaling_factor if scaling_factor is not None else ckpt.config.vae.scaling_factor
    z = latent / scale
    if vae_mode == "taesd":
        from ..models.taesd import load_taesd_decoder
        from ..vae.tiled_taesd import decode_tiled

        dec = load_taesd_decoder(_taesd_file(taesd, taesd_kind, 1), dtype=dtype).to(device)
        with torch.inference_mode():
            return decode_tiled(dec, z.to(device), tile=tile, output=output, scaling_factor=scale,
                                spill_dir=spill_dir, progress=progress, should_stop=should_stop)
    from ..vae.tiled_vae import decode_tiled

    with _vae_or_half(vae, ckpt, "decoder", dtype, device) as v:
        return decode_tiled(v, z.to(device), tile=tile, dtype=dtype, spill_dir=spill_dir, attention=attention,
                            output=output, progress=progress, should_stop=should_stop, reuse_heap=reuse_heap)


def encode_image(ckpt: Checkpoint, vae_mode: str, taesd: str | None, source, *, dtype: torch.dtype,
                 device: torch.device, px_tile: int, spill_dir: str | None, attention: str = "global",
                 progress=None, should_stop=None, scaling_factor: float | None = None, vae=None,
                 taesd_kind: str = "taesd", reuse_heap: bool = False) -> torch.Tensor:
    """Encode an image source (``read(y0, y1, x0, x1)`` in [-1, 1]) to a *scaled* latent, float32 CPU.

    ``vae``, ``scaling_factor``, ``taesd_kind`` and ``reuse_heap`` as for :func:`decode_latent`."""
    scale = scaling_factor if scaling_factor is not None else ckpt.config.vae.scaling_factor
    if vae_mode == "taesd":
        from ..models.taesd import load_taesd_encoder
        from ..vae.tiled_taesd import encode_tiled

        enc = load_taesd_encoder(_taesd_file(taesd, taesd_kind, 0), dtype=dtype).to(device)
        with torch.inference_mode():
            z = encode_tiled(enc, source, tile=min(px_tile, TAESD_ENCODE_TILE), scaling_factor=scale,
                             spill_dir=spill_dir, progress=progress, should_stop=should_stop)
    else:
        from ..vae.tiled_vae import encode_tiled

        with _vae_or_half(vae, ckpt, "encoder", dtype, device) as v:
            z = encode_tiled(v, source, tile=px_tile, dtype=dtype, spill_dir=spill_dir, attention=attention,
                             progress=progress, should_stop=should_stop, reuse_heap=reuse_heap)
    return (z.float() * scale).cpu()


def spill_to_pil(arr):
    """A small uint8 SpillArray (the base image) as a PIL image."""
    from PIL import Image

    return Image.fromarray(arr.read_rows(0, arr.height), "RGB")
