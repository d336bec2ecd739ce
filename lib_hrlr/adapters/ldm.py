"""A backend over an already-loaded LDM ``LatentDiffusion`` model (what the webui holds).

Duck-typed: the model needs ``get_learned_conditioning(list[str]) -> (B, T, C)``,
``apply_model(x, t, cond) -> eps`` and ``first_stage_model`` (an LDM ``AutoencoderKL``
with the original parameter names, which is what :mod:`lib_hrlr.vae.tiled_vae` reads), and
``scale_factor``.  Nothing here imports the webui: the glue in ``scripts/`` passes its model
and, optionally, its own text function (for prompt syntax, embeddings, LoRA).

SDXL (an sgm ``DiffusionEngine``, as the webui builds it): ``get_learned_conditioning``
returns ``{"crossattn": (B, 77k, 2048), "vector": (B, 2816)}`` and ``apply_model`` takes that
dict (``crossattn`` -> the UNet's context, ``vector`` -> its ``y``).  The conditioner's
``vector`` concatenates its 2-D outputs in the order of its embedders: bigG's pooled
projection (``ModelConfig.pooled_dim`` = 1280 wide) first, then the Fourier embeddings of
original size, crop and target size, which the webui computes for its own image size (1024²
for a plain prompt list).  Only the pooled part is kept (:meth:`LdmBackend.encode_text`); the
size part of every UNet call's ``vector`` is the pipeline's own ``y`` (the base pass's size,
then per tile under the run's micro-conditioning policy:
:mod:`lib_hrlr.sampling.micro_conditioning`), exactly what the streamed UNet receives.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..config.architectures import ModelConfig, VAEConfig
from ..errors import InvalidInput
from ..pipeline.backend import RunSettings
from ..runtime import DTYPES
from ..pipeline import components, sdxl
from ..memory.meter import MemoryMeter, attach_module_labels


class LdmVaeView:
    """What the tiled VAE needs of an autoencoder (``cfg``, which halves exist, parameters by
    name) seen on an LDM ``AutoencoderKL`` without copying it."""

    def __init__(self, module: torch.nn.Module, cfg: VAEConfig):
        self.module, self.cfg = module, cfg
        self.has_encoder = hasattr(module, "encoder")
        self.has_decoder = hasattr(module, "decoder")

    def parameters(self):
        return self.module.parameters()

    def get_submodule(self, path: str) -> torch.nn.Module:
        return self.module.get_submodule(path)


def module_mb(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


class LdmBackend:
    """UNet, VAE and text encoder of ``model``, all resident already (nothing is loaded or freed).

    ``text_fn(prompts) -> (B, T, C)``: defaults to ``model.get_learned_conditioning``; rows
    share T (the webui pads every prompt of a batch to the longest).  For an SDXL ``config``
    it returns the sgm dict ``{"crossattn": (B, T, C), "vector": (B, adm)}`` (module
    docstring).  ``model_dtype`` is the UNet's own parameter dtype when it is a compute dtype
    (fp32, fp16, bf16): the run computes in it, whatever dtype was asked for (a resident model
    computes in the precision it was loaded in).
    """

    def __init__(self, model, config: ModelConfig, name: str, hash: str,
                 text_fn: Callable[[list[str]], torch.Tensor] | None = None,
                 wrap_call: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model = model
        self.config = config
        self.name = name
        self.hash = hash
        self.text_fn = text_fn or model.get_learned_conditioning
        self.wrap_call = wrap_call or contextlib.nullcontext
        self.resident_mb = module_mb(model)
        self.unet_module = model.model.diffusion_model if hasattr(model, "model") else None
        # storage-only dtypes (the webui's fp8 weights, computed under autocast) leave the choice
        # to the run, which the glue sets from the webui's own compute dtype
        params = self.unet_module.parameters() if self.unet_module is not None else ()
        first = next((p.dtype for p in params if p.is_floating_point()), None)
        self.model_dtype: torch.dtype | None = first if first in DTYPES.values() else None
        self.settings: RunSettings | None = None
        self.meter: MemoryMeter | None = None

    # -- protocol -------------------------------------------------------------------------------
    def prepare(self, settings: RunSettings, meter: MemoryMeter | None) -> None:
        self.settings, self.meter = settings, meter

    def unet_total_mb(self, dtype: torch.dtype) -> float:
        return 0.0  # resident already: counted in the process RSS, not in the run's budget

    def encode_text(self, prompts: list[str], clip_skip: int, zero_if_empty=None, should_stop=None) -> list:
        """One ``(1, T, C)`` float32 conditioning per prompt; SDXL: one
        :class:`~lib_hrlr.text.sdxl_conditioning.SdxlCondition` (context, pooled) per prompt,
        zeros for prompt ``i`` where ``zero_if_empty[i]`` and it is ``""`` (the webui zeroes an
        empty negative prompt; called with a plain list, its conditioner does not know which
        prompt is the negative, so it is done here).  ``clip_skip`` is the webui's own setting."""
        # the webui's conditioning encodes every chunk in one call: the run can stop before it only
        if should_stop is not None and should_stop():
            from ..errors import Interrupted

            raise Interrupted("text encoding stopped by request")
        with torch.no_grad(), self.wrap_call():
            c = self.text_fn(list(prompts))
        if sdxl.is_sdxl(self.config):
            return self._sdxl_conditions(c, prompts, zero_if_empty)
        if isinstance(c, dict):  # SDXL-style conditioning for a model configured as SD 1.x
            c = c["crossattn"]
        return [c[i : i + 1].detach().float().cpu() for i in range(c.shape[0])]

    def _sdxl_conditions(self, c, prompts: list[str], zero_if_empty) -> list:
        from ..text.sdxl_conditioning import SdxlCondition

        cfg = self.config
        if not isinstance(c, dict) or "crossattn" not in c or "vector" not in c:
            raise InvalidInput("model", f"'{self.name}' is configured as SDXL ({cfg.name}) but its conditioning is "
                                        f"{type(c).__name__}, not the sgm dict with 'crossattn' and 'vector'")
        ctx, vec = c["crossattn"], c["vector"]
        adm, n = cfg.unet.adm_in_channels, len(prompts)
        if vec.ndim != 2 or vec.shape[1] != adm or vec.shape[0] != n or ctx.ndim != 3 or ctx.shape[0] != n:
            raise InvalidInput("model", f"'{self.name}' gave conditioning crossattn {tuple(ctx.shape)}, vector "
                                        f"{tuple(vec.shape)} for {n} prompts; {cfg.name} needs ({n}, T, "
                                        f"{cfg.unet.context_dim}) and ({n}, {adm})")
        flags = [False] * n if zero_if_empty is None else list(zero_if_empty)
        if len(flags) != n:
            raise InvalidInput("zero_if_empty", f"needs one bool per prompt ({n})")
        pooled = vec[:, : cfg.pooled_dim]  # bigG's pooled projection: the conditioner's first vector output
        out = []
        for i, text in enumerate(prompts):
            context = ctx[i : i + 1].detach().float().cpu()
            pool = pooled[i : i + 1].detach().float().cpu()
            if flags[i] and text == "":
                context, pool = torch.zeros_like(context), torch.zeros_like(pool)
            out.append(SdxlCondition(context, pool))
        return out

    @contextlib.contextmanager
    def unet(self):
        labels = contextlib.ExitStack()
        if self.meter is not None and self.unet_module is not None:
            labels.enter_context(attach_module_labels(self.meter, components.unet_block_labels(self.unet_module)))
        device = self.settings.device

        xl = sdxl.is_sdxl(self.config)

        def eps(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            """The streamed UNet's signature; SDXL's ``y`` (B, adm) goes in as the sgm cond's ``vector``."""
            if xl != (y is not None):
                raise InvalidInput("model", f"{self.config.name} UNet called {'without' if xl else 'with'} the ADM "
                                            "vector y")
            cond = {"crossattn": context.to(device), "vector": y.to(device)} if xl else context.to(device)
            with self.wrap_call():
                out = self.model.apply_model(x.to(device), t.to(device), cond)
            return out.float().cpu()

        with torch.no_grad(), labels:
            yield eps

    def _vae_kw(self, progress, should_stop) -> dict:
        """Arguments of the shared VAE stage functions: the webui's autoencoder in its own dtype
        (SDXL's fp16 VAE computes in float32, :func:`.sdxl.vae_dtype`: the tiled VAE converts
        each step's weights) and device; TAESD (TAESDXL for SDXL) in the run's VAE dtype/device."""
        s = self.settings
        kw = dict(spill_dir=s.spill_dir, attention=s.vae_attention, reuse_heap=s.vae_reuse_heap, progress=progress,
                  should_stop=should_stop,
                  scaling_factor=self.config.vae.scaling_factor, taesd_kind=sdxl.taesd_kind(self.config))
        if s.vae_mode == "taesd":
            return dict(kw, dtype=s.vae_dtype, device=s.vae_device)
        vae = LdmVaeView(self.model.first_stage_model, self.config.vae)
        p = next(vae.parameters())
        return dict(kw, dtype=sdxl.vae_dtype(self.config, s.vae_mode, p.dtype), device=p.device, vae=vae)

    def decode(self, latent, *, tile, output, progress=None, should_stop=None):
        s = self.settings
        return components.decode_latent(None, s.vae_mode, s.taesd_dir, latent, tile=tile, output=output,
                                        **self._vae_kw(progress, should_stop))

    def encode(self, source, *, px_tile, progress=None, should_stop=None):
        s = self.settings
        return components.encode_image(None, s.vae_mode, s.taesd_dir, source, px_tile=px_tile,
                                       **self._vae_kw(progress, should_stop))
