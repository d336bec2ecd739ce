"""Open a Stable Diffusion 1.x model — single file or diffusers folder — without loading it.

:func:`open_checkpoint` reads only headers (safetensors JSON, the pickle of a ``.ckpt``),
detects the architecture, checks that every weight the models need is present with the
right element count, and returns a :class:`Checkpoint` whose components map our parameter
names (the LDM names below the component prefix) to :class:`TensorSource` records — file
path plus offset — ready for :class:`~lib_hrlr.weights.streaming.WeightStreamer`.

Formats:

* single-file LDM ``.safetensors`` / ``.ckpt`` (``.pt``, ``.pth``): keys below
  ``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``
  (text keys with or without ``text_model.``), at the top level or under ``state_dict``;
* a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``):
  ``*.safetensors`` preferred over ``*.bin`` (read by the safe ``.ckpt`` reader), the plain
  file preferred over the ``.fp16`` variant unless ``variant="fp16"``, sharded files with
  an ``.index.json`` accepted; names are mapped with the models' ``diffusers_key_map``.

Architecture: a safetensors ``__metadata__["hrlr_config"]`` (a ``ModelConfig`` as JSON,
written by :mod:`lib_hrlr.weights.random_checkpoint`) is taken as is; otherwise an SD 1.x
config is inferred from the key shapes (or, for a folder, from the diffusers configs).
SDXL, SD 2.x, SD3/Flux, inpainting UNets and non-model files are recognised and refused.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config.architectures import (
    ARCHITECTURES,
    SD15,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from ..errors import CheckpointError, InvalidInput
from .ckpt_file import read_ckpt
from .file_hash import cached_sha256
from .safetensors_file import TensorInfo, TensorSource, read_header

__all__ = ["Checkpoint", "TensorSource", "TensorInfo", "open_checkpoint", "COMPONENTS", "SUPPORTED"]

COMPONENTS = ("unet", "vae", "text")
SUPPORTED = "HighRes-LowRAM supports Stable Diffusion 1.x checkpoints (.safetensors, .ckpt, diffusers folders)"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _err(msg: str) -> CheckpointError:
    return CheckpointError("model", msg)


@dataclass
class Checkpoint:
    """An opened model: architecture, and where each weight lies.  Holds no tensor data."""

    path: Path
    name: str
    config: ModelConfig
    format: str  # "safetensors" | "ckpt" | "diffusers"
    components: dict[str, dict[str, TensorSource]]
    hash_file: Path  # the file whose sha256 is the model hash
    metadata: dict[str, str] = field(default_factory=dict)
    config_source: str = "inferred"  # "metadata" | "inferred" | "diffusers-config"

    def component(self, name: str) -> dict[str, TensorSource]:
        """Our parameter name -> source, for "unet", "vae" or "text" (a new dict each call)."""
        if name == "text_encoder":
            name = "text"
        if name not in self.components:
            raise InvalidInput("component", f"{name!r}; allowed are {', '.join(COMPONENTS)}")
        return dict(self.components[name])

    def component_bytes(self, name: str) -> int:
        """Bytes the component occupies in its file(s)."""
        return sum(s.info.nbytes for s in self.components["text" if name == "text_encoder" else name].values())

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the checkpoint file (the UNet file of a folder): computed once per
        object, and across runs cached by (path, size, mtime) in the user cache folder
        (:mod:`~lib_hrlr.weights.file_hash`)."""
        return cached_sha256(self.hash_file)

    @property
    def sha256_short(self) -> str:
        """The webui-style short model hash: the first 10 hex digits of :attr:`sha256`."""
        return self.sha256[:10]


# ---------------------------------------------------------------------------------- entry


def open_checkpoint(path: str | os.PathLike, *, variant: str | None = None, validate: bool = True) -> Checkpoint:
    """Open an SD 1.x checkpoint file or diffusers folder; raise CheckpointError otherwise.

    ``variant="fp16"`` prefers the ``.fp16`` files of a diffusers folder.  ``validate``
    builds the three models on ``meta`` and checks that every weight is present with the
    right size (cheap: no memory is allocated).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise _err(f"'{p}' does not exist; {SUPPORTED}")
    if p.is_dir():
        ckpt = _open_diffusers(p, variant)
    elif p.is_file():
        ckpt = _open_single_file(p)
    else:
        raise _err(f"'{p}' is neither a file nor a folder; {SUPPORTED}")
    if validate:
        check_components(ckpt)
    return ckpt


# ---------------------------------------------------------------------------- single file


def _read_tensor_table(p: Path) -> tuple[str, dict[str, TensorInfo], dict[str, str]]:
    """(format, name -> TensorInfo, metadata) of one weights file, dispatching on content."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise _err(f"cannot read '{p}': {e.strerror}") from None
    if size == 0:
        raise _err(f"'{p}' is empty (0 bytes); {SUPPORTED}")
    if head[:4] == b"PK\x03\x04":
        return "ckpt", read_ckpt(p).tensors, {}
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin") and not _plausible_safetensors(head, size):
        read_ckpt(p)  # raises with the right explanation
    try:
        header = read_header(p)
    except CheckpointError as e:
        if p.suffix.lower() == ".safetensors":
            raise
        raise _err(f"'{p}' is neither a safetensors file nor a PyTorch zip checkpoint ({e.message}); {SUPPORTED}") from None
    return "safetensors", header.tensors, header.metadata


def _plausible_safetensors(head: bytes, size: int) -> bool:
    return len(head) == 8 and 2 <= int.from_bytes(head, "little") <= size - 8


def _open_single_file(p: Path) -> Checkpoint:
    fmt, tensors, metadata = _read_tensor_table(p)
    path = str(p)
    keys = list(tensors)
    config, source = _config_from_metadata(metadata, p)
    if config is None:
        _refuse_foreign_single_file(keys, tensors, p)
    parts: dict[str, dict[str, TensorSource]] = {"unet": {}, "vae": {}, "text": {}}
    ignorable = _ignorable_text_keys()
    for name, info in tensors.items():
        if name.startswith(UNET_PREFIX):
            parts["unet"][name[len(UNET_PREFIX):]] = TensorSource(path, info)
        elif name.startswith(VAE_PREFIX):
            parts["vae"][name[len(VAE_PREFIX):]] = TensorSource(path, info)
        elif name.startswith(TEXT_PREFIX):
            key = _canonical_text_key(name[len(TEXT_PREFIX):])  # pre-4.x transformers lack text_model.
            if key not in ignorable:
                parts["text"][key] = TensorSource(path, info)
    for comp, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", TEXT_PREFIX)):
        if not parts[comp]:
            raise _err(
                f"'{p}' has no {comp} weights (no '{prefix}*' keys); {SUPPORTED} containing UNet, VAE and text encoder"
            )
    if config is None:
        unet, text = _infer_unet(parts["unet"], p), _infer_text(parts["text"], p)
        if unet.context_dim != text.hidden_size:
            raise _err(
                f"'{p.name}': the UNet attends to a {unet.context_dim}-wide context but the text encoder is "
                f"{text.hidden_size} wide; {SUPPORTED}"
            )
        config = _named(ModelConfig("sd1x", unet, _infer_vae(parts["vae"], p), text, SD15.native_size))
        source = "inferred"
    return Checkpoint(p, _stem(p), config, fmt, parts, p, metadata, source)


def _stem(p: Path) -> str:
    name = p.name
    for suf in SINGLE_FILE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def _config_from_metadata(metadata: dict[str, str], p: Path) -> tuple[ModelConfig | None, str]:
    raw = metadata.get("hrlr_config")
    if raw is None:
        return None, "inferred"
    try:
        return ModelConfig.from_json(raw), "metadata"
    except (ValueError, KeyError, TypeError) as e:
        raise _err(f"'{p}' has an unreadable hrlr_config in its metadata ({type(e).__name__}: {e})") from None


def _refuse_foreign_single_file(keys: list[str], tensors: dict[str, TensorInfo], p: Path) -> None:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    def looks(what: str, why: str) -> CheckpointError:
        return _err(f"'{p.name}' looks like {what} ({why}); {SUPPORTED}")

    if has("conditioner.") or has(UNET_PREFIX + "label_emb."):
        raise looks("SDXL", "found 'conditioner.' / 'label_emb' keys")
    if has(UNET_PREFIX + "joint_blocks.") or has("model.diffusion_model.x_embedder") or has("text_encoders."):
        raise looks("Stable Diffusion 3", "found MMDiT 'joint_blocks' keys")
    if has(UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        raise looks("Flux", "found 'double_blocks' keys")
    if has("cond_stage_model.model."):
        raise looks("Stable Diffusion 2.x", "found an OpenCLIP text encoder under 'cond_stage_model.model.'")
    ctx = [t for k, t in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0].shape[-1] == 1024:
        raise looks("Stable Diffusion 2.x", "cross-attention context dimension 1024")
    if ctx and ctx[0].shape[-1] == 2048:
        raise looks("SDXL", "cross-attention context dimension 2048")
    if not has(UNET_PREFIX):
        if any(k.startswith(("lora_", "lora_unet_", "lora_te_")) or ".lora_" in k for k in keys):
            raise looks("a LoRA", "found lora_* keys")
        if has("encoder.conv_in.") and has("decoder.conv_out."):
            raise looks("a standalone VAE", "only encoder./decoder. keys")
        if any(k.startswith("unet.") or k.startswith("down_blocks.") for k in keys):
            raise looks("a diffusers component file", "diffusers-style keys; open the whole folder instead")
        raise _err(f"'{p.name}' does not look like a Stable Diffusion model (no '{UNET_PREFIX}*' keys); {SUPPORTED}")


# ------------------------------------------------------------------------ inference (LDM)


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _shape(src: dict[str, TensorSource], key: str, p: Path, what: str) -> tuple[int, ...]:
    s = src.get(key)
    if s is None:
        raise _err(f"'{p.name}' lacks the {what} weight '{key}'; {SUPPORTED}")
    return s.info.shape


def _infer_unet(src: dict[str, TensorSource], p: Path) -> UNetConfig:
    keys = list(src)
    conv_in = _shape(src, "input_blocks.0.0.weight", p, "UNet")
    mc, in_ch = conv_in[0], conv_in[1]
    if in_ch != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(in_ch, f"a UNet with {in_ch} input channels")
        raise _err(f"'{p.name}' looks like {kind} ({in_ch} latent input channels); {SUPPORTED} for text-to-image (4 channels)")
    out_ch = _shape(src, "out.2.weight", p, "UNet")[0]
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    downs = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight")
    nrb = (downs[0] - 1) if downs else (len(blocks) - 1)
    levels = len(downs) + 1
    if nrb < 1 or len(blocks) != 1 + levels * nrb + len(downs):
        raise _err(f"'{p.name}' has an input-block layout that is not SD 1.x's; {SUPPORTED}")
    mult, attn = [], []
    depth, ctx, linear = 1, 768, False
    for level in range(levels):
        n = 1 + level * (nrb + 1)
        ch = _shape(src, f"input_blocks.{n}.0.out_layers.3.weight", p, "UNet")[0]
        if ch % mc:
            raise _err(f"'{p.name}': level {level} has {ch} channels, not a multiple of {mc}; {SUPPORTED}")
        mult.append(ch // mc)
        has_attn = f"input_blocks.{n}.1.proj_in.weight" in src
        attn.append(has_attn)
        if has_attn:
            depth = len(_indices(keys, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\."))
            ctx = _shape(src, f"input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight", p, "UNet")[1]
            linear = len(src[f"input_blocks.{n}.1.proj_in.weight"].info.shape) == 2
    if ctx in (1024, 2048):
        raise _err(f"'{p.name}' has a cross-attention context of {ctx} (SD 1.x uses 768); {SUPPORTED}")
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=nrb,
        attention_levels=tuple(attn),
        num_heads=8 if mc % 8 == 0 else 1,  # not recorded in the weights; SD 1.x uses 8
        context_dim=ctx,
        transformer_depth=depth,
        use_linear_in_transformer=linear,
    )


def _infer_vae(src: dict[str, TensorSource], p: Path) -> VAEConfig:
    keys = list(src)
    conv_in = _shape(src, "encoder.conv_in.weight", p, "VAE")
    ch = conv_in[0]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise _err(f"'{p.name}' lacks the VAE encoder levels (encoder.down.*); {SUPPORTED}")
    nrb = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight"))
    mult = []
    for i in levels:
        c = _shape(src, f"encoder.down.{i}.block.0.conv2.weight", p, "VAE")[0]
        mult.append(c // ch)
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=_shape(src, "decoder.conv_out.weight", p, "VAE")[0],
        ch=ch,
        ch_mult=tuple(mult),
        num_res_blocks=nrb,
        z_channels=_shape(src, "encoder.conv_out.weight", p, "VAE")[0] // 2,
        embed_dim=_shape(src, "quant_conv.weight", p, "VAE")[0] // 2,
    )


def _infer_text(src: dict[str, TensorSource], p: Path) -> TextEncoderConfig:
    keys = list(src)
    vocab, hidden = _shape(src, "text_model.embeddings.token_embedding.weight", p, "text encoder")
    layers = _indices(keys, r"text_model\.encoder\.layers\.(\d+)\.")
    if not layers:
        raise _err(f"'{p.name}' lacks the text encoder layers; {SUPPORTED}")
    return TextEncoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=len(layers),
        num_heads=max(1, hidden // 64),  # CLIP ViT-L/14: 768 / 64 = 12 heads
        intermediate_size=_shape(src, "text_model.encoder.layers.0.mlp.fc1.weight", p, "text encoder")[0],
        max_positions=_shape(src, "text_model.embeddings.position_embedding.weight", p, "text encoder")[0],
    )


# ------------------------------------------------------------------------------- diffusers

_FILE_BASES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _component_files(folder: Path, variant: str | None) -> list[Path]:
    """The weight file(s) of one diffusers component folder, by preference."""
    variants = [f".{variant}", ""] if variant else ["", ".fp16"]
    for ext in (".safetensors", ".bin"):
        for var in variants:
            for base in _FILE_BASES:
                single = folder / f"{base}{var}{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{base}{var}{ext}.index.json"
                if index.is_file():
                    try:
                        weight_map = json.loads(index.read_text())["weight_map"]
                        return [folder / f for f in dict.fromkeys(weight_map.values())]
                    except (OSError, ValueError, KeyError, TypeError) as e:
                        raise _err(f"'{index}' is not a valid shard index ({e})") from None
    raise _err(
        f"'{folder}' holds no weights file (expected diffusion_pytorch_model/model[.fp16].safetensors or .bin); {SUPPORTED}"
    )


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise _err(f"cannot read '{path}': {e.strerror}; a diffusers folder needs it") from None
    except ValueError as e:
        raise _err(f"'{path}' is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _err(f"'{path}' is not a JSON object")
    return doc


def _open_diffusers(p: Path, variant: str | None) -> Checkpoint:
    index = p / "model_index.json"
    if not index.is_file():
        raise _err(f"'{p}' is a folder without model_index.json, so not a diffusers model; {SUPPORTED}")
    model_index = _read_json(index)
    cls = str(model_index.get("_class_name", ""))
    if "XL" in cls or "text_encoder_2" in model_index:
        raise _err(f"'{p.name}' looks like SDXL (pipeline {cls or 'with text_encoder_2'}); {SUPPORTED}")
    if cls.startswith(("StableDiffusion3", "Flux")):
        raise _err(f"'{p.name}' is a {cls}, not Stable Diffusion 1.x; {SUPPORTED}")
    for sub in ("unet", "vae", "text_encoder"):
        if not (p / sub).is_dir():
            raise _err(f"diffusers folder '{p}' lacks its {sub}/ folder; {SUPPORTED}")
    config = config_from_diffusers(
        _read_json(p / "unet" / "config.json"),
        _read_json(p / "vae" / "config.json"),
        _read_json(p / "text_encoder" / "config.json"),
        p,
    )
    from ..models.unet import diffusers_key_map as unet_map
    from ..models.vae import diffusers_key_map as vae_map

    parts: dict[str, dict[str, TensorSource]] = {}
    files: dict[str, list[Path]] = {}
    for comp, sub in (("unet", "unet"), ("vae", "vae"), ("text", "text_encoder")):
        files[comp] = _component_files(p / sub, variant)
        table: dict[str, TensorSource] = {}
        for f in files[comp]:
            _, tensors, _ = _read_tensor_table(f)
            for name, info in tensors.items():
                table[name] = TensorSource(str(f), info)
        if comp == "unet":
            parts[comp] = _apply_map(table, unet_map(config.unet))
        elif comp == "vae":
            parts[comp] = _apply_map(table, vae_map(config.vae))
        else:  # transformers >= 5 saves CLIPTextModel without the text_model. level
            ignorable = _ignorable_text_keys()
            canon = {_canonical_text_key(k): v for k, v in table.items()}
            parts[comp] = {k: v for k, v in canon.items() if k not in ignorable}
    return Checkpoint(p, p.name, config, "diffusers", parts, files["unet"][0], {}, "diffusers-config")


_LEGACY_ATTENTION = ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn."))


def _apply_map(table: dict[str, TensorSource], key_map: dict[str, str]) -> dict[str, TensorSource]:
    out: dict[str, TensorSource] = {}
    for theirs, ours in key_map.items():
        src = table.get(theirs)
        if src is None:  # VAE attention of diffusers < 0.14: query/key/value/proj_attn
            for new, old in _LEGACY_ATTENTION:
                if new in theirs and (src := table.get(theirs.replace(new, old))) is not None:
                    break
        if src is not None:
            out[ours] = src
    return out


def _heads(unet: dict) -> int:
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise _err(f"the UNet has different head counts per level ({heads}); {SUPPORTED}")
        heads = heads[0]
    return int(heads)


def config_from_diffusers(unet: dict, vae: dict, text: dict, where: Path | str = "") -> ModelConfig:
    """An SD 1.x ModelConfig from the three diffusers ``config.json`` documents."""
    name = Path(where).name if where else "diffusers model"
    ctx = unet.get("cross_attention_dim", 768)
    if isinstance(ctx, (list, tuple)):
        ctx = ctx[0]
    hidden = int(text.get("hidden_size", 768))
    if unet.get("addition_embed_type") or ctx == 2048:
        raise _err(f"'{name}' looks like SDXL (UNet with addition_embed_type / context 2048); {SUPPORTED}")
    if ctx == 1024:
        raise _err(f"'{name}' looks like Stable Diffusion 2.x (context dimension 1024); {SUPPORTED}")
    if ctx != hidden or unet.get("class_embed_type") or unet.get("time_cond_proj_dim") or unet.get("encoder_hid_dim"):
        raise _err(
            f"'{name}' has a UNet that is not SD 1.x (context {ctx} for a {hidden}-wide text encoder, or extra embeddings); {SUPPORTED}"
        )
    in_ch = int(unet.get("in_channels", 4))
    if in_ch != 4:
        raise _err(f"'{name}' has a UNet with {in_ch} input channels (inpainting or similar); {SUPPORTED} for text-to-image (4 channels)")
    boc = list(unet.get("block_out_channels", (320, 640, 1280, 1280)))
    down = list(unet.get("down_block_types", ()))
    if len(down) != len(boc) or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise _err(f"'{name}' has UNet down blocks {down}; SD 1.x uses CrossAttnDownBlock2D/DownBlock2D; {SUPPORTED}")
    depth = unet.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise _err(f"'{name}' has different transformer depths per level ({depth}); {SUPPORTED}")
        depth = depth[0]
    u = UNetConfig(
        in_channels=in_ch,
        out_channels=int(unet.get("out_channels", 4)),
        model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=int(unet.get("layers_per_block", 2)),
        attention_levels=tuple(t == "CrossAttnDownBlock2D" for t in down),
        num_heads=_heads(unet),
        context_dim=int(ctx),
        transformer_depth=int(depth),
        norm_groups=int(unet.get("norm_num_groups", 32)),
        use_linear_in_transformer=bool(unet.get("use_linear_projection", False)),
    )
    vboc = list(vae.get("block_out_channels", (128, 256, 512, 512)))
    latent = int(vae.get("latent_channels", 4))
    v = VAEConfig(
        in_channels=int(vae.get("in_channels", 3)),
        out_channels=int(vae.get("out_channels", 3)),
        ch=vboc[0],
        ch_mult=tuple(c // vboc[0] for c in vboc),
        num_res_blocks=int(vae.get("layers_per_block", 2)),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=int(vae.get("norm_num_groups", 32)),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
    )
    t = TextEncoderConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=int(text.get("hidden_size", 768)),
        num_layers=int(text.get("num_hidden_layers", 12)),
        num_heads=int(text.get("num_attention_heads", 12)),
        intermediate_size=int(text.get("intermediate_size", 3072)),
        max_positions=int(text.get("max_position_embeddings", 77)),
        layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)),
        hidden_act=str(text.get("hidden_act", "quick_gelu")),
    )
    native = int(unet.get("sample_size", 64)) * v.downscale
    return _named(ModelConfig("sd1x", u, v, t, native))


def _named(cfg: ModelConfig) -> ModelConfig:
    """The known architecture equal to ``cfg`` (ignoring native size for single files), else ``cfg``."""
    for known in ARCHITECTURES.values():
        if (known.unet, known.vae, known.text) == (cfg.unet, cfg.vae, cfg.text):
            return known
    return cfg


# ------------------------------------------------------------------------------ validation


def _canonical_text_key(key: str) -> str:
    from ..text.clip_text import canonical_text_key

    return canonical_text_key(key)


def _ignorable_text_keys() -> frozenset[str]:
    """Text keys (our names) that checkpoints may carry and the model does not have."""
    from ..text.clip_text import ignorable_text_keys

    return frozenset(k for k in ignorable_text_keys() if k.startswith("text_model."))


def expected_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Our parameter names and shapes of the three models of ``config`` (built on meta)."""
    import torch

    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL
    from ..text.clip_text import ClipTextEncoder

    try:
        with torch.device("meta"):
            models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae), "text": ClipTextEncoder(config.text)}
    except (InvalidInput, ValueError, RuntimeError) as e:
        raise _err(f"the checkpoint describes an architecture the models cannot build ({e}); {SUPPORTED}") from None
    return {k: {n: tuple(t.shape) for n, t in m.state_dict().items()} for k, m in models.items()}


def _squeeze_trailing(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_components(ckpt: Checkpoint) -> None:
    """Every weight the models need is present with the right shape (up to trailing 1s)."""

    for comp, shapes in expected_shapes(ckpt.config).items():
        have = ckpt.components[comp]
        missing = [n for n in shapes if n not in have]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise _err(
                f"'{ckpt.path.name}' lacks {len(missing)} {comp} weight(s) of the {ckpt.config.name} architecture: {shown}; "
                f"{SUPPORTED} with all their weights"
            )
        for n, shape in shapes.items():
            info = have[n].info
            # exact shapes, whatever declared the config (inferred or hrlr_config metadata); only
            # trailing 1s may differ: a 1x1 convolution stored as a linear layer and vice versa
            if _squeeze_trailing(info.shape) != _squeeze_trailing(shape):
                raise _err(
                    f"'{ckpt.path.name}': {comp} weight '{n}' has shape {list(info.shape)}, the {ckpt.config.name} "
                    f"architecture needs {list(shape)}; {SUPPORTED}"
                )
            if not info.dtype.is_floating_point:
                raise _err(f"'{ckpt.path.name}': {comp} weight '{n}' is {info.dtype}; floating-point weights are required")
