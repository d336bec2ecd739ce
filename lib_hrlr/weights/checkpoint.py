"""Open a Stable Diffusion 1.x or SDXL model — single file or diffusers folder — without loading it.

:func:`open_checkpoint` reads only headers (safetensors JSON, the pickle of a ``.ckpt``),
detects the architecture, checks that every weight the models need is present with the
right element count, and returns a :class:`Checkpoint` whose components map our parameter
names (the LDM names below the component prefix) to :class:`TensorSource` records — file
path plus offset — ready for :class:`~lib_hrlr.weights.streaming.WeightStreamer`.

Formats:

* single-file LDM ``.safetensors`` / ``.ckpt`` (``.pt``, ``.pth``): keys below
  ``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``
  (text keys with or without ``text_model.``), at the top level or under ``state_dict``;
* single-file SDXL (the layout the webui and ComfyUI load): ``model.diffusion_model.``,
  ``first_stage_model.``, CLIP ViT-L/14 below ``conditioner.embedders.0.transformer.`` and
  OpenCLIP ViT-bigG/14 below ``conditioner.embedders.1.model.`` in OpenCLIP's names
  (mapped by :mod:`lib_hrlr.text.openclip`: ``in_proj_weight`` split into q/k/v byte
  ranges, ``text_projection`` streamed as stored and listed in :attr:`Checkpoint.transposed`);
* a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, and
  ``text_encoder_2/`` for SDXL): ``*.safetensors`` preferred over ``*.bin`` (read by the
  safe ``.ckpt`` reader), the plain file preferred over the ``.fp16`` variant unless
  ``variant="fp16"``, sharded files with an ``.index.json`` accepted; names are mapped with
  the models' ``diffusers_key_map``.

Architecture: a safetensors ``__metadata__["hrlr_config"]`` (a ``ModelConfig`` as JSON,
written by :mod:`lib_hrlr.weights.random_checkpoint`) is taken as is; otherwise an SD 1.x
or SDXL config is inferred from the key shapes (or, for a folder, from the diffusers
configs).  SD 2.x, the SDXL refiner, SD3/Flux, inpainting/instruct UNets and non-model
files are recognised and refused, naming what was found.

``families`` limits what a caller accepts (both SD 1.x and SDXL by default: the
generation pipeline runs both); a checkpoint of another family is refused naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config.architectures import (
    ARCHITECTURES,
    SD15,
    SDXL,
    SDXL_TEXT2_PREFIX,
    SDXL_TEXT_PREFIX,
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

COMPONENTS = ("unet", "vae", "text", "text2")  # text2: SDXL's OpenCLIP ViT-bigG/14
FAMILIES = ("sd1x", "sdxl")
# the families open_checkpoint accepts by default: those the generation pipeline runs
RUNNABLE_FAMILIES = FAMILIES
SUPPORTED = ("HighRes-LowRAM supports Stable Diffusion 1.x checkpoints and SDXL base checkpoints "
             "(.safetensors, .ckpt, diffusers folders)")
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
    # "component.name" of weights whose stored bytes are the transpose of the model's tensor
    # (their TensorInfo carries the model's shape): OpenCLIP's text_projection in SDXL files
    transposed: frozenset[str] = frozenset()

    def component(self, name: str) -> dict[str, TensorSource]:
        """Our parameter name -> source, for "unet", "vae", "text" or (SDXL) "text2" (a new dict each call)."""
        name = _ALIASES.get(name, name)
        if name not in self.components:
            raise InvalidInput("component", f"{name!r}; allowed are {', '.join(self.components)}")
        return dict(self.components[name])

    def component_bytes(self, name: str) -> int:
        """Bytes the component occupies in its file(s)."""
        return sum(s.info.nbytes for s in self.components[_ALIASES.get(name, name)].values())

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


_ALIASES = {"text_encoder": "text", "text_encoder_2": "text2"}


def open_checkpoint(path: str | os.PathLike, *, variant: str | None = None, validate: bool = True,
                    families: tuple[str, ...] = RUNNABLE_FAMILIES) -> Checkpoint:
    """Open an SD 1.x or SDXL checkpoint file or diffusers folder; raise CheckpointError otherwise.

    ``variant="fp16"`` prefers the ``.fp16`` files of a diffusers folder.  ``validate``
    builds the models on ``meta`` and checks that every weight is present with the right
    shape (cheap: no memory is allocated).  ``families``: the model families the caller
    can use (:data:`FAMILIES`); a checkpoint of another family is refused, saying what it is.
    """
    if isinstance(families, str) or not set(families) <= set(FAMILIES) or not families:
        raise InvalidInput("families", f"{families!r}; a tuple of {', '.join(FAMILIES)} is allowed")
    p = Path(path).expanduser()
    if not p.exists():
        raise _err(f"'{p}' does not exist; {SUPPORTED}")
    if p.is_dir():
        ckpt = _open_diffusers(p, variant)
    elif p.is_file():
        ckpt = _open_single_file(p)
    else:
        raise _err(f"'{p}' is neither a file nor a folder; {SUPPORTED}")
    if ckpt.config.family not in families:
        raise _err(f"'{p.name}' is an {ckpt.config.family.upper()} model ({ckpt.config.name}); allowed here: "
                   f"{', '.join(f.upper() for f in families)} models")
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
    from ..text.openclip import openclip_text_infos

    fmt, tensors, metadata = _read_tensor_table(p)
    path = str(p)
    keys = list(tensors)
    config, source = _config_from_metadata(metadata, p)
    if config is None:
        _refuse_foreign_single_file(keys, tensors, p)
    xl = any(k.startswith(SDXL_TEXT_PREFIX) for k in keys) or any(k.startswith(SDXL_TEXT2_PREFIX) for k in keys)
    layout = SDXL if xl else SD15
    if config is not None and config.family != layout.family:
        raise _err(f"'{p.name}': its hrlr_config describes an {config.family} model but its keys are laid out as "
                   f"{layout.family}; {SUPPORTED}")
    prefixes = layout.prefixes
    parts: dict[str, dict[str, TensorSource]] = {c: {} for c in prefixes}
    openclip: dict[str, TensorInfo] = {}
    ignorable = _ignorable_text_keys()
    for name, info in tensors.items():
        for comp, prefix in prefixes.items():
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):]
            if comp == "text2":
                openclip[key] = info
            elif comp == "text":
                key = _canonical_text_key(key)  # pre-4.x transformers lack text_model.
                if key not in ignorable:
                    parts["text"][key] = TensorSource(path, info)
            else:
                parts[comp][key] = TensorSource(path, info)
            break
    transposed: frozenset[str] = frozenset()
    if xl:
        infos, flipped = openclip_text_infos(openclip)
        parts["text2"] = {k: TensorSource(path, v) for k, v in infos.items()}
        transposed = frozenset(f"text2.{k}" for k in flipped)
    for comp, prefix in prefixes.items():
        if not parts[comp]:
            what = "UNet, VAE and both text encoders" if xl else "UNet, VAE and text encoder"
            raise _err(f"'{p}' has no {comp} weights (no '{prefix}*' keys); {SUPPORTED} containing {what}")
    if config is None:
        config = _infer_single_file_config(parts, p, xl)
        source = "inferred"
    return Checkpoint(p, _stem(p), config, fmt, parts, p, metadata, source, transposed)


def _infer_single_file_config(parts: dict[str, dict[str, TensorSource]], p: Path, xl: bool) -> ModelConfig:
    unet, text = _infer_unet(parts["unet"], p), _infer_text(parts["text"], p)
    text2 = _infer_text(parts["text2"], p, openclip=True) if xl else None
    width = text.hidden_size + (text2.hidden_size if text2 else 0)
    if unet.context_dim != width:
        encoders = f"{text.hidden_size} + {text2.hidden_size}" if text2 else f"{text.hidden_size}"
        raise _err(f"'{p.name}': the UNet attends to a {unet.context_dim}-wide context but the text encoder(s) give "
                   f"{encoders}; {SUPPORTED}")
    vae = _infer_vae(parts["vae"], p)
    if not xl:
        if unet.adm_in_channels:
            raise _err(f"'{p.name}' has a UNet label embedding (label_emb) but no SDXL text encoders; {SUPPORTED}")
        return _named(ModelConfig("sd1x", unet, vae, text, SD15.native_size))
    # the width of each size/crop embedding is not recorded in the weights: what the label
    # embedding's input leaves after the pooled text, in 6 equal parts (SDXL base: 256)
    rest = (unet.adm_in_channels or 0) - (text2.projection_dim or text2.hidden_size)
    if rest > 0 and rest % 6 == 0:
        unet = dataclasses.replace(unet, added_time_dim=rest // 6)
    return _named(_sdxl_config(unet, vae, text, text2, p.name))


def _sdxl_config(unet: UNetConfig, vae: VAEConfig, text: TextEncoderConfig, text2: TextEncoderConfig,
                 where: str) -> ModelConfig:
    """An SDXL-family ModelConfig (SDXL's VAE scale and native size), after checking that the
    UNet's ADM vector is what SDXL base builds: pooled bigG + 6 size/crop embeddings."""
    pooled = text2.projection_dim or text2.hidden_size
    expected = pooled + 6 * unet.added_time_dim
    if unet.adm_in_channels != expected:
        hint = " (2560 wide: the SDXL refiner's, with aesthetic score)" if unet.adm_in_channels == 2560 else ""
        raise _err(f"'{where}' has a UNet label embedding over {unet.adm_in_channels} values{hint}; SDXL base uses "
                   f"{expected} (pooled text {pooled} + 6 x {unet.added_time_dim}); {SUPPORTED}")
    vae = dataclasses.replace(vae, scaling_factor=SDXL.vae.scaling_factor)
    return ModelConfig("sdxl", unet, vae, text, SDXL.native_size, text2)


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

    # markers of models that share SD/SDXL's networks but not their sampling (ComfyUI reads the same keys)
    if "edm_mean" in keys or "edm_std" in keys:
        raise looks("Playground v2.5", "found 'edm_mean'/'edm_std': an EDM model with its own latent statistics; "
                    "the pipeline samples epsilon-prediction models")
    if "edm_vpred.sigma_max" in keys:
        raise looks("an EDM v-prediction model (CosXL or similar)", "found 'edm_vpred.sigma_max'; the pipeline "
                    "samples epsilon-prediction models")
    if "v_pred" in keys:
        raise looks("a v-prediction model", "found the 'v_pred' marker key (e.g. NoobAI-XL v-pred); the pipeline "
                    "samples epsilon-prediction models")
    if has("conditioner.embedders.0.model."):
        raise looks("the SDXL refiner", "its only text encoder, OpenCLIP ViT-bigG/14, is 'conditioner.embedders.0.model.'; "
                    "use an SDXL base model")
    if has("conditioner.") and not (has(SDXL_TEXT_PREFIX) and has(SDXL_TEXT2_PREFIX)):
        found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")})
        raise looks("SDXL with text encoders other than SDXL base's", f"found {', '.join(found[:4])}")
    xl = has(SDXL_TEXT_PREFIX)
    if has(UNET_PREFIX + "label_emb.") and not xl:
        raise looks("SDXL without its text encoders", "found 'label_emb' but no 'conditioner.' keys")
    if has(UNET_PREFIX + "joint_blocks.") or has("model.diffusion_model.x_embedder") or has("text_encoders."):
        raise looks("Stable Diffusion 3", "found MMDiT 'joint_blocks' keys")
    if has(UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        raise looks("Flux", "found 'double_blocks' keys")
    if has("cond_stage_model.model."):
        raise looks("Stable Diffusion 2.x", "found an OpenCLIP text encoder under 'cond_stage_model.model.'")
    ctx = [t for k, t in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0].shape[-1] == 1024:
        raise looks("Stable Diffusion 2.x", "cross-attention context dimension 1024")
    if ctx and ctx[0].shape[-1] == 2048 and not xl:
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
        raise _err(f"'{p.name}' has an input-block layout that is not SD 1.x's or SDXL's; {SUPPORTED}")
    mult, attn, depths = [], [], []
    ctx, linear = 768, False
    for level in range(levels):
        n = 1 + level * (nrb + 1)
        ch = _shape(src, f"input_blocks.{n}.0.out_layers.3.weight", p, "UNet")[0]
        if ch % mc:
            raise _err(f"'{p.name}': level {level} has {ch} channels, not a multiple of {mc}; {SUPPORTED}")
        mult.append(ch // mc)
        has_attn = f"input_blocks.{n}.1.proj_in.weight" in src
        attn.append(has_attn)
        depths.append(len(_indices(keys, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.")) if has_attn else 0)
        if has_attn:
            ctx = _shape(src, f"input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight", p, "UNet")[1]
            linear = len(src[f"input_blocks.{n}.1.proj_in.weight"].info.shape) == 2
    middle = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    adm = src["label_emb.0.0.weight"].info.shape[1] if "label_emb.0.0.weight" in src else None
    if ctx == 1024 or (ctx == 2048 and adm is None):
        raise _err(f"'{p.name}' has a cross-attention context of {ctx} (SD 1.x uses 768, SDXL 2048 with a label "
                   f"embedding); {SUPPORTED}")
    used = {d for d in depths if d}
    if len(used) == 1 and middle in used:  # one depth everywhere (SD 1.x): a single count
        depth: int | tuple[int, ...] = used.pop()
        depth_middle = None
    else:
        depth = tuple(depths)
        depth_middle = None if middle == (depths[-1] or None) else middle
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=nrb,
        attention_levels=tuple(attn),
        # head counts are not recorded in the weights: SD 1.x uses 8 heads, SDXL 64-channel heads
        num_heads=8 if mc % 8 == 0 else 1,
        num_head_channels=64 if adm is not None else None,
        context_dim=ctx,
        transformer_depth=depth,
        transformer_depth_middle=depth_middle,
        use_linear_in_transformer=linear,
        adm_in_channels=adm,
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


def _infer_text(src: dict[str, TensorSource], p: Path, openclip: bool = False) -> TextEncoderConfig:
    """CLIP ViT-L-like (quick GELU, no projection) or, ``openclip``, an OpenCLIP text tower
    (GELU, with the projection whose shape the mapped source carries)."""
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
        # not recorded in the weights: OpenCLIP's towers use GELU, OpenAI's CLIP quick GELU
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=_shape(src, "text_projection.weight", p, "text encoder")[0] if openclip else None,
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
    if cls.startswith(("StableDiffusion3", "Flux")):
        raise _err(f"'{p.name}' is a {cls}, not Stable Diffusion 1.x or SDXL; {SUPPORTED}")

    def listed(sub: str) -> bool:  # model_index lists a component as [library, class], [null, null] when absent
        entry = model_index.get(sub)
        return isinstance(entry, list) and any(entry)

    xl = listed("text_encoder_2") or "XL" in cls
    if xl and not listed("text_encoder"):
        raise _err(f"'{p.name}' looks like the SDXL refiner (pipeline {cls or '?'} with text_encoder_2 only); "
                   f"use an SDXL base model; {SUPPORTED}")
    scheduler = p / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():  # how the model is sampled: only epsilon prediction on the discrete DDPM schedule
        sched = _read_json(scheduler)
        kind, pred = str(sched.get("_class_name", "")), sched.get("prediction_type", "epsilon")
        if kind.startswith("EDM") or pred not in ("epsilon", None):
            raise _err(f"'{p.name}' is sampled with {kind or 'its scheduler'} (prediction_type {pred!r}); the pipeline "
                       f"samples epsilon-prediction models only; {SUPPORTED}")
    subs = {"unet": "unet", "vae": "vae", "text": "text_encoder", **({"text2": "text_encoder_2"} if xl else {})}
    for sub in subs.values():
        if not (p / sub).is_dir():
            raise _err(f"diffusers folder '{p}' lacks its {sub}/ folder; {SUPPORTED}")
    config = config_from_diffusers(
        _read_json(p / "unet" / "config.json"),
        _read_json(p / "vae" / "config.json"),
        _read_json(p / "text_encoder" / "config.json"),
        p,
        text2=_read_json(p / "text_encoder_2" / "config.json") if xl else None,
    )
    from ..models.unet import diffusers_key_map as unet_map
    from ..models.vae import diffusers_key_map as vae_map

    parts: dict[str, dict[str, TensorSource]] = {}
    files: dict[str, list[Path]] = {}
    for comp, sub in subs.items():
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
            canon = {k if k.startswith("text_projection.") else _canonical_text_key(k): v for k, v in table.items()}
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


def _heads(unet: dict, channels: list[int], attention: tuple[bool, ...], name: str) -> tuple[int, int | None]:
    """(num_heads, num_head_channels) from diffusers' head settings: one head count for every
    level (SD 1.x), or counts per level that all give heads of the same width (SDXL: 64)."""
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    if not isinstance(heads, (list, tuple)):
        return int(heads), None
    if len(heads) != len(channels):
        raise _err(f"'{name}' lists {len(heads)} head counts for {len(channels)} UNet levels; {SUPPORTED}")
    if len(set(heads)) == 1:
        return int(heads[0]), None
    widths = {c // int(h) for c, h, a in zip(channels, heads, attention) if a}
    if len(widths) != 1 or any(c % int(h) for c, h in zip(channels, heads)):
        raise _err(f"'{name}' has head counts {list(heads)} for channels {channels}, neither one count nor one head "
                   f"width; {SUPPORTED}")
    return 8, widths.pop()


def _text_config(text: dict, projection: bool) -> TextEncoderConfig:
    return TextEncoderConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=int(text.get("hidden_size", 768)),
        num_layers=int(text.get("num_hidden_layers", 12)),
        num_heads=int(text.get("num_attention_heads", 12)),
        intermediate_size=int(text.get("intermediate_size", 3072)),
        max_positions=int(text.get("max_position_embeddings", 77)),
        layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)),
        hidden_act=str(text.get("hidden_act", "quick_gelu")),
        projection_dim=int(text.get("projection_dim", 512)) if projection else None,
    )


def config_from_diffusers(unet: dict, vae: dict, text: dict, where: Path | str = "", *,
                          text2: dict | None = None) -> ModelConfig:
    """An SD 1.x, or with ``text2`` (text_encoder_2's config) an SDXL, ModelConfig from the
    diffusers ``config.json`` documents."""
    name = Path(where).name if where else "diffusers model"
    ctx = unet.get("cross_attention_dim", 768)
    if isinstance(ctx, (list, tuple)):
        ctx = ctx[0]
    hidden = int(text.get("hidden_size", 768)) + (int(text2.get("hidden_size", 1280)) if text2 is not None else 0)
    added = unet.get("addition_embed_type")
    if text2 is None and (added or ctx == 2048):
        raise _err(f"'{name}' looks like SDXL (UNet with addition_embed_type / context 2048) but has no "
                   f"text_encoder_2; {SUPPORTED}")
    if text2 is not None and added != "text_time":
        raise _err(f"'{name}' has two text encoders but its UNet's addition_embed_type is {added!r}; SDXL base "
                   f"uses 'text_time'; {SUPPORTED}")
    if ctx == 1024:
        raise _err(f"'{name}' looks like Stable Diffusion 2.x (context dimension 1024); {SUPPORTED}")
    if ctx != hidden or unet.get("class_embed_type") or unet.get("time_cond_proj_dim") or unet.get("encoder_hid_dim"):
        raise _err(
            f"'{name}' has a UNet that is not SD 1.x or SDXL (context {ctx} for {hidden}-wide text encoder states, "
            f"or extra embeddings); {SUPPORTED}"
        )
    in_ch = int(unet.get("in_channels", 4))
    if in_ch != 4:
        raise _err(f"'{name}' has a UNet with {in_ch} input channels (inpainting or similar); {SUPPORTED} for text-to-image (4 channels)")
    boc = list(unet.get("block_out_channels", (320, 640, 1280, 1280)))
    down = list(unet.get("down_block_types", ()))
    if len(down) != len(boc) or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise _err(f"'{name}' has UNet down blocks {down}; SD 1.x uses CrossAttnDownBlock2D/DownBlock2D; {SUPPORTED}")
    attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
    depth = unet.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(depth) != len(boc) or any(isinstance(d, (list, tuple)) for d in depth):
            raise _err(f"'{name}' has transformer depths {depth}; one count per UNet level is allowed; {SUPPORTED}")
        middle = int(depth[-1])  # diffusers' mid block takes the last level's count
        per_level = tuple(int(d) if a else 0 for d, a in zip(depth, attention))
        used = {d for d in per_level if d}
        if len(used) == 1 and middle in used:  # one depth everywhere (SD 1.x): a single count
            depth, depth_middle = middle, None
        else:
            depth, depth_middle = per_level, (None if middle == per_level[-1] else middle)
    else:
        depth_middle = None
    num_heads, head_channels = _heads(unet, boc, attention, name)
    adm = unet.get("projection_class_embeddings_input_dim") if added == "text_time" else None
    u = UNetConfig(
        in_channels=in_ch,
        out_channels=int(unet.get("out_channels", 4)),
        model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=int(unet.get("layers_per_block", 2)),
        attention_levels=attention,
        num_heads=num_heads,
        num_head_channels=head_channels,
        context_dim=int(ctx),
        transformer_depth=depth if isinstance(depth, tuple) else int(depth),
        transformer_depth_middle=depth_middle,
        norm_groups=int(unet.get("norm_num_groups", 32)),
        use_linear_in_transformer=bool(unet.get("use_linear_projection", False)),
        adm_in_channels=int(adm) if adm else None,
        added_time_dim=int(unet.get("addition_time_embed_dim") or 256),
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
    t = _text_config(text, projection=False)
    native = int(unet.get("sample_size", 64)) * v.downscale
    if text2 is None:
        return _named(ModelConfig("sd1x", u, v, t, native))
    cfg = _sdxl_config(u, v, t, _text_config(text2, projection=True), name)
    return _named(dataclasses.replace(cfg, native_size=native, vae=v))


def _named(cfg: ModelConfig) -> ModelConfig:
    """The known architecture equal to ``cfg`` (ignoring native size for single files), else ``cfg``."""
    for known in ARCHITECTURES.values():
        if (known.unet, known.vae, known.text, known.text2) == (cfg.unet, cfg.vae, cfg.text, cfg.text2):
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
    """Our parameter names and shapes of the models of ``config`` (built on meta)."""
    import torch

    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL
    from ..text.clip_text import ClipTextEncoder

    try:
        with torch.device("meta"):
            models = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae), "text": ClipTextEncoder(config.text)}
            if config.text2 is not None:
                models["text2"] = ClipTextEncoder(config.text2)
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
