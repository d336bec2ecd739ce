"""Random-weight checkpoints of any architecture, for tests and benchmarks.

:func:`write_random_checkpoint` writes a single-file LDM ``.safetensors`` (UNet, VAE and
text encoder under their LDM prefixes; for SDXL, the sgm layout of real SDXL files: CLIP
ViT-L/14 below ``conditioner.embedders.0.transformer.``, OpenCLIP ViT-bigG/14 below
``conditioner.embedders.1.model.`` in OpenCLIP's names with packed ``in_proj_*``, the
(hidden, projection) ``text_projection`` and ``logit_scale``) by streaming: the header is computed from the
models' shapes on ``meta``, then each tensor is generated in 1 Mi-element chunks and
written, so memory stays at a few MB whatever the model size.  The file is written to
``<path>.tmp`` and renamed into place, so a reader never sees half a file.

Values are deterministic per (seed, parameter name), independent of the file layout:

* weights of Conv/Linear/Embedding: normal, std ``1/sqrt(fan_in)`` (``fan_in`` = product
  of all dims but the first), which keeps activations of an SD 1.5-size network at unit
  scale through the GroupNorm/LayerNorm-fronted residual branches;
* GroupNorm/LayerNorm weights: ``1 + 0.02 * normal``; every bias: ``0.02 * normal`` (not
  exact constants, so that a loader mixing up tensors cannot go unnoticed).

:func:`write_random_diffusers_folder` writes the same weights (value for value) as a
diffusers folder with ``save_pretrained`` — for tests of the folder loader with tiny models.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..config.architectures import ARCHITECTURES, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ModelConfig
from ..errors import CheckpointError, InvalidInput
from .safetensors_file import build_header, read_header, tensor_memoryview

CHUNK_ELEMENTS = 1 << 20
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def meta_models(config: ModelConfig) -> dict[str, nn.Module]:
    """The models of ``config`` built on the meta device (no memory): unet, vae, text[, text2]."""
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL
    from ..text.clip_text import ClipTextEncoder

    with torch.device("meta"):
        models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae), "text": ClipTextEncoder(config.text)}
        if config.text2 is not None:
            models["text2"] = ClipTextEncoder(config.text2)
        return models


def tensor_plan(config: ModelConfig) -> list[tuple[str, str, str, tuple[int, ...], torch.dtype | None]]:
    """(component, key without prefix, init kind, shape, fixed dtype or None) per tensor of the
    single file, components in the order unet, vae, text[, text2].  Keys are our parameter
    names, except SDXL's ``text2``: OpenCLIP's names (:func:`lib_hrlr.text.openclip.openclip_shapes`).

    Kinds: "weight" (std 1/sqrt(fan_in)), "norm" (1 + small), "bias" (small), "int" (zeros).
    """
    from ..text.openclip import openclip_shapes

    plan = []
    for comp, model in meta_models(config).items():
        norms = {name for name, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
        entries = []
        for name, t in model.state_dict().items():
            owner, _, leaf = name.rpartition(".")
            if not t.is_floating_point():
                kind, fixed = "int", t.dtype
            elif owner in norms and leaf == "weight":
                kind, fixed = "norm", None
            elif leaf == "bias" or t.dim() < 2:
                kind, fixed = "bias", None
            else:
                kind, fixed = "weight", None
            entries.append((comp, name, kind, tuple(t.shape), fixed))
        if comp == "text2":  # the file's OpenCLIP keys; packed q/k/v are "weight"/"bias" like their parts
            entries = []
            for key, shape in openclip_shapes({n: tuple(t.shape) for n, t in model.state_dict().items()}).items():
                kind = ("norm" if key.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight"))
                        else "bias" if key.endswith("bias") or len(shape) < 2 else "weight")
                entries.append((comp, key, kind, shape, None))
        plan.extend(entries)
    return plan


def _name_seed(seed: int, full_name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{full_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_chunks(full_name: str, kind: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values, flat, as float32 chunks of at most CHUNK_ELEMENTS."""
    numel = math.prod(shape)
    g = torch.Generator().manual_seed(_name_seed(seed, full_name))
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    for start in range(0, numel, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, numel - start)
        if kind == "int":
            yield torch.zeros(n)
            continue
        x = torch.randn(n, generator=g)
        if kind == "weight":
            x.mul_(1.0 / math.sqrt(fan_in))
        elif kind == "norm":
            x.mul_(0.02).add_(1.0)
        else:
            x.mul_(0.02)
        yield x


def random_tensor(full_name: str, kind: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor (for small models); equal to what the streaming writer writes."""
    chunks = [c.to(dtype) for c in random_chunks(full_name, kind, shape, seed)]
    flat = torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype)
    return flat.reshape(shape)


def write_random_checkpoint(
    path: str | os.PathLike, config: ModelConfig, dtype: torch.dtype = torch.float16, seed: int = 0
) -> Path:
    """Write a random single-file LDM ``.safetensors`` of ``config``; returns its path."""
    if dtype not in _DTYPE_NAMES:
        raise InvalidInput("dtype", f"{dtype}; allowed are float16, bfloat16 and float32")
    path = Path(path)
    plan = tensor_plan(config)
    prefixes = config.prefixes
    entries = [(prefixes[c] + n, fixed or dtype, shape) for c, n, _, shape, fixed in plan]
    metadata = {
        "format": "pt",
        "hrlr_config": config.to_json(),
        "hrlr_random_seed": str(seed),
        "hrlr_random_dtype": _DTYPE_NAMES[dtype],
    }
    header, _ = build_header(entries, metadata)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for (comp, name, kind, shape, fixed), (full, out_dtype, _) in zip(plan, entries):
                for chunk in random_chunks(full, kind, shape, seed):
                    data = chunk.to(out_dtype)
                    f.write(tensor_memoryview(data))
                    del data
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("HRLR_CACHE") or Path.home() / ".cache" / "hrlr") / "random"


def _is_valid_random(path: Path, config: ModelConfig, dtype: torch.dtype, seed: int) -> bool:
    try:
        h = read_header(path)
    except CheckpointError:
        return False
    md = h.metadata
    if md.get("hrlr_random_seed") != str(seed) or md.get("hrlr_random_dtype") != _DTYPE_NAMES[dtype]:
        return False
    try:
        if ModelConfig.from_json(md.get("hrlr_config", "")) != config:
            return False
    except (ValueError, KeyError, TypeError):
        return False
    prefixes = config.prefixes
    expected = {prefixes[c] + n: shape for c, n, _, shape, _ in tensor_plan(config)}
    return {k: v.shape for k, v in h.tensors.items()} == expected


def cached_random_checkpoint(arch: str = "sd15", dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A random checkpoint of a named architecture under ``${HRLR_CACHE:-~/.cache/hrlr}/random/``.

    Reused when present and its header matches; otherwise written (SD 1.5 in fp16: 2.1 GB,
    about a minute).  A lock file serialises concurrent callers, so one process writes and
    the others wait and reuse.
    """
    if arch not in ARCHITECTURES:
        raise InvalidInput("arch", f"'{arch}'; allowed are {', '.join(ARCHITECTURES)}")
    if dtype not in _DTYPE_NAMES:
        raise InvalidInput("dtype", f"{dtype}; allowed are float16, bfloat16 and float32")
    config = ARCHITECTURES[arch]
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{arch}-{_DTYPE_NAMES[dtype]}-seed{seed}.safetensors"
    with open(d / (path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _is_valid_random(path, config, dtype, seed):
                write_random_checkpoint(path, config, dtype, seed)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


# ------------------------------------------------------------------------------ diffusers


def diffusers_configs(config: ModelConfig) -> tuple[dict, dict, dict]:
    """The diffusers UNet2DConditionModel / AutoencoderKL and transformers CLIPTextConfig
    arguments of an SD 1.x or SDXL ``config`` (inverse of checkpoint.config_from_diffusers;
    SDXL's second encoder: :func:`diffusers_text2_config`)."""
    u, v, t = config.unet, config.vae, config.text
    channels = [u.model_channels * m for m in u.channel_mult]
    if isinstance(u.transformer_depth, int) and u.transformer_depth_middle in (None, u.transformer_depth):
        depth: int | list[int] = u.transformer_depth
    else:  # diffusers' mid block takes the last level's count; levels without attention ignore theirs
        depth = [max(1, u.level_depth(i)) for i in range(len(channels))]
        if u.middle_depth != depth[-1]:
            raise InvalidInput("transformer_depth_middle", f"{u.middle_depth}; diffusers needs the last level's ({depth[-1]})")
    heads = u.num_heads if not u.num_head_channels else [u.heads(c) for c in channels]
    unet = dict(
        sample_size=config.latent_tile,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        block_out_channels=[u.model_channels * m for m in u.channel_mult],
        layers_per_block=u.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)],
        cross_attention_dim=u.context_dim,
        attention_head_dim=heads,  # diffusers' historical name for the head count (per level for SDXL)
        transformer_layers_per_block=depth,
        norm_num_groups=u.norm_groups,
        use_linear_projection=u.use_linear_in_transformer,
    )
    if u.adm_in_channels:
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=u.added_time_dim,
                    projection_class_embeddings_input_dim=u.adm_in_channels)
    n = len(v.ch_mult)
    vae = dict(
        in_channels=v.in_channels,
        out_channels=v.out_channels,
        block_out_channels=[v.ch * m for m in v.ch_mult],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=v.num_res_blocks,
        latent_channels=v.z_channels,
        norm_num_groups=v.norm_groups,
        scaling_factor=v.scaling_factor,
        sample_size=config.native_size,
    )
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_positions,
        layer_norm_eps=t.layer_norm_eps,
        hidden_act=t.hidden_act,
    )
    return unet, vae, text


def diffusers_text2_config(config: ModelConfig) -> dict:
    """transformers CLIPTextConfig arguments of SDXL's second text encoder (with projection)."""
    t = config.text2
    return dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_positions, layer_norm_eps=t.layer_norm_eps,
        hidden_act=t.hidden_act, projection_dim=t.projection_dim, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
    )


def write_random_diffusers_folder(
    path: str | os.PathLike, config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0, variant: str | None = None
) -> Path:
    """A diffusers folder holding exactly the weights :func:`write_random_checkpoint` writes
    for the same (config, dtype, seed).  Builds the diffusers/transformers models in full:
    meant for tiny architectures."""
    import diffusers
    import transformers

    from ..models.unet import diffusers_key_map as unet_map
    from ..models.vae import diffusers_key_map as vae_map
    from ..text.clip_text import canonical_text_key, ignorable_text_keys
    from ..text.openclip import openclip_origin

    path = Path(path)
    ucfg, vcfg, tcfg = diffusers_configs(config)
    models = {
        "unet": diffusers.UNet2DConditionModel(**ucfg),
        "vae": diffusers.AutoencoderKL(**vcfg),
        "text": transformers.CLIPTextModel(transformers.CLIPTextConfig(**tcfg)),
    }
    if config.text2 is not None:
        models["text2"] = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**diffusers_text2_config(config)))
    maps = {"unet": unet_map(config.unet), "vae": vae_map(config.vae), "text": None, "text2": None}
    plan = {(c, n): (kind, shape, fixed) for c, n, kind, shape, fixed in tensor_plan(config)}
    prefixes = config.prefixes
    for comp, model in models.items():
        state = {}
        for theirs, t in model.state_dict().items():
            # transformers 5 saves CLIPTextModel without the ``text_model.`` level, older ones with it
            if maps[comp] is not None:
                ours = maps[comp].get(theirs)
            else:
                ours = theirs if theirs.startswith("text_projection.") else canonical_text_key(theirs)
            if comp.startswith("text") and ours in ignorable_text_keys():
                continue
            key, third, flipped = (ours, None, False) if comp != "text2" else openclip_origin(ours)
            if (comp, key) not in plan:
                raise CheckpointError("model", f"diffusers {comp} parameter {theirs!r} has no counterpart in our model")
            kind, shape, fixed = plan[(comp, key)]
            value = random_tensor(prefixes[comp] + key, kind, shape, seed, fixed or dtype)
            if third is not None:  # one of q/k/v: a third of OpenCLIP's packed in_proj
                value = value.chunk(3, dim=0)[third]
            if flipped:  # OpenCLIP's (hidden, projection) matrix is the transpose of transformers' weight
                value = value.t().contiguous()
            state[theirs] = value.reshape(t.shape)
        model.load_state_dict(state, strict=False, assign=True)
        model.to(dtype)
    sub = {"unet": "unet", "vae": "vae", "text": "text_encoder", "text2": "text_encoder_2"}
    for comp, model in models.items():
        model.save_pretrained(str(path / sub[comp]), safe_serialization=True, variant=variant)
    index = {
        "_class_name": "StableDiffusionXLPipeline" if config.text2 is not None else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
    }
    if config.text2 is not None:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
