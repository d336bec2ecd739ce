"""Where a generation's networks come from: the pipeline asks a backend, never a file.

:class:`CheckpointBackend` streams every component from a checkpoint on disk (the CLI, and
the webui's LowRAM mode).  Other backends wrap a model that is already loaded (the webui's
own, see :mod:`lib_hrlr.adapters.ldm`).  A backend is created for one run with the plan's
numbers (dtype, device, weight cache) and offers:

* ``config`` / ``name`` / ``hash`` — the architecture and how the infotext names the model;
* ``resident_mb`` — weights already in memory before the run (0 when streamed);
* ``model_dtype`` — the dtype a resident UNet computes in (the run follows it), or None
  when the weights are materialised in whatever dtype the run asks for;
* ``encode_text(prompts, clip_skip, should_stop=None)`` — one float32 ``(1, 77k, ctx)``
  conditioning per prompt (SDXL: one :class:`~lib_hrlr.text.sdxl_conditioning.SdxlCondition`,
  context and pooled, with ``zero_if_empty`` marking the negative prompt); ``should_stop()``
  is polled between 75-token chunks where the backend encodes them itself;
* ``unet()`` — a context manager yielding ``eps(x, t, context)``;
* ``decode(latent, ...)`` / ``encode(source, ...)`` — tiled VAE passes on *scaled* latents.

A backend with ``applies_networks = True`` honours ``RunSettings.loras`` and
``RunSettings.embeddings`` (LoRA merged as weights stream in, textual-inversion vectors in
the prompts) and lists what it skipped in ``warnings``; others (a resident webui model, which
applies the webui's own networks) refuse a run that asks for them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import torch

from ..config.architectures import ModelConfig
from ..memory.meter import MemoryMeter
from ..weights.checkpoint import Checkpoint
from . import components, sdxl


@dataclass(frozen=True)
class RunSettings:
    """What every backend needs to know about the run (from the params and the budget plan)."""

    dtype: torch.dtype
    device: torch.device
    vae_dtype: torch.dtype
    vae_device: torch.device
    cache_bytes: int = 0
    vae_mode: str = "full"
    taesd_dir: str | None = None
    spill_dir: str | None = None
    vae_attention: str = "global"
    vae_reuse_heap: bool = False  # the exact tiled VAE's tiles from glibc's heap (BudgetPlan.vae_reuse_heap)
    loras: tuple = ()  # LoraSpec, applied by backends with applies_networks
    embeddings: tuple[str, ...] = ()  # textual-inversion files or folders
    weight_cache: str | None = None  # folder of the UNet weights prepared in the compute dtype; None: off


class Backend(Protocol):
    config: ModelConfig
    name: str
    hash: str
    resident_mb: float
    model_dtype: torch.dtype | None

    def prepare(self, settings: RunSettings, meter: MemoryMeter | None) -> None: ...

    def encode_text(self, prompts: list[str], clip_skip: int, should_stop=None) -> list[torch.Tensor]: ...

    def unet(self) -> ContextManager[Callable]: ...

    def decode(self, latent: torch.Tensor, *, tile: int, output: str, progress=None, should_stop=None): ...

    def encode(self, source, *, px_tile: int, progress=None, should_stop=None) -> torch.Tensor: ...

    def unet_total_mb(self, dtype: torch.dtype) -> float: ...


class CheckpointBackend:
    """Every component streamed from ``ckpt`` and freed when its stage ends."""

    resident_mb = 0.0
    model_dtype = None
    applies_networks = True

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config: ModelConfig = ckpt.config
        self.name = ckpt.name
        self.settings: RunSettings | None = None
        self.meter: MemoryMeter | None = None
        self.loras = None  # LoraSet of the run
        self.embeddings: dict | None = None  # name -> vectors
        self.warnings: list[str] = []
        self.prepared = None  # the UNet's sources for the run (lib_hrlr.weights.prepared.Prepared)

    @property
    def hash(self) -> str:
        return self.ckpt.sha256_short

    def prepare(self, settings: RunSettings, meter: MemoryMeter | None) -> None:
        """Also parses the run's LoRA files (headers only) and reads its embeddings: a file
        that does not fit the model fails here, before any network runs.  With
        ``settings.weight_cache``, the UNet's weights are prepared in the compute dtype (written
        once: :mod:`lib_hrlr.weights.prepared`); ``self.prepared`` says what the cache did."""
        from ..text.embeddings import load_embeddings
        from ..weights.lora import load_loras
        from ..weights.prepared import prepared_sources

        self.settings, self.meter = settings, meter
        self.loras = load_loras(settings.loras, self.config)
        self.prepared = prepared_sources(self.ckpt.component("unet"), "unet", settings.dtype, settings.weight_cache)
        found = load_embeddings(settings.embeddings, self.config.text.hidden_size) if settings.embeddings else None
        self.embeddings = found.vectors() if found is not None else None
        self.warnings = list(self.loras.warnings) + (list(found.warnings) if found is not None else [])

    def _merger(self, component: str):
        merger = self.loras.merger(component) if self.loras is not None else None
        return merger if merger is not None else contextlib.nullcontext()

    def unet_total_mb(self, dtype: torch.dtype) -> float:
        return components.component_mb(self.ckpt, "unet", dtype)

    def encode_text(self, prompts: list[str], clip_skip: int, zero_if_empty=None, should_stop=None) -> list:
        s = self.settings
        if self.config.family == "sdxl":
            from ..errors import InvalidInput
            from .sdxl_text import encode_text_sdxl

            if s.loras or s.embeddings:
                raise InvalidInput("loras" if s.loras else "embeddings",
                                   "LoRAs and embeddings are not applied to SDXL models yet; run without them")
            if clip_skip != 1:
                raise InvalidInput("clip_skip", f"{clip_skip}; SDXL conditions on fixed layers (the webui ignores clip "
                                                "skip for SDXL too): use 1")
            return encode_text_sdxl(self.ckpt, prompts, zero_if_empty, s.dtype, s.device, s.cache_bytes,
                                    should_stop=should_stop)
        with self._merger("text") as merge:
            return components.encode_text(self.ckpt, prompts, clip_skip, s.dtype, s.device, s.cache_bytes,
                                          transform=merge, embeddings=self.embeddings, should_stop=should_stop)

    @contextlib.contextmanager
    def unet(self):
        s = self.settings
        with self._merger("unet") as merge, components.unet_streamer(self.ckpt, s.dtype, s.device, s.cache_bytes,
                                                                     self.meter, transform=merge,
                                                                     sources=self.prepared.sources) as eps:
            yield eps

    def _vae_kw(self, should_stop) -> dict:
        s = self.settings
        return dict(dtype=s.vae_dtype, device=s.vae_device, spill_dir=s.spill_dir, attention=s.vae_attention,
                    reuse_heap=s.vae_reuse_heap, should_stop=should_stop)

    def decode(self, latent, *, tile, output, progress=None, should_stop=None):
        s = self.settings
        return components.decode_latent(self.ckpt, s.vae_mode, s.taesd_dir, latent, tile=tile, output=output,
                                        progress=progress, taesd_kind=sdxl.taesd_kind(self.config),
                                        **self._vae_kw(should_stop))

    def encode(self, source, *, px_tile, progress=None, should_stop=None):
        s = self.settings
        return components.encode_image(self.ckpt, s.vae_mode, s.taesd_dir, source, px_tile=px_tile,
                                       progress=progress, taesd_kind=sdxl.taesd_kind(self.config),
                                       **self._vae_kw(should_stop))

