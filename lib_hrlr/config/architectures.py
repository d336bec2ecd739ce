"""Model architectures as plain data.

Every model in ``lib_hrlr.models`` is built from one of these frozen dataclasses, so a
plan (memory budget, tile size, streaming units) can be reasoned about without building
anything.  ``SD15`` is the exact Stable Diffusion 1.x architecture; ``TINY`` keeps every
structural feature (attention at several levels, cross-attention, 8x latent factor,
GroupNorm with 32 groups) at a size that runs in milliseconds, for fast tests.

``SDXL`` is the SDXL base architecture, the same dataclasses with the fields SD 1.x leaves
at their defaults: per-level transformer depth (0, 2, 10) with no attention at level 0,
64-channel heads, linear ``proj_in``/``proj_out``, a 2048-wide context (CLIP ViT-L/14's 768
and OpenCLIP ViT-bigG/14's 1280 penultimate hidden states, concatenated), and the
``label_emb`` MLP over the 2816-wide "ADM" vector (bigG's 1280-wide pooled projection, then
six 256-wide sinusoidal embeddings of original size, crop top-left and target size).  Its
native size is 1024 px, so its latent tile is 128; the default tile overlap, a quarter of
the tile as for SD 1.x (:attr:`ModelConfig.default_overlap`), is 32 latent px (256 px): at
2048² that is 3 x 3 tiles, as many as with 16.  ``TINY_XL`` keeps every one of these
features (two text encoders of different widths, a pooled projection that is not square,
added time embedding, per-level depth, no attention at level 0) at a test size.

Parameter names of the models follow the original LDM checkpoint layout, below these
prefixes of a single-file checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# SDXL single files (sgm / webui / ComfyUI layout): CLIP ViT-L/14 in transformers' names,
# OpenCLIP ViT-bigG/14 in OpenCLIP's own names (see lib_hrlr.text.openclip)
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # one flag per level of channel_mult: does that level carry SpatialTransformers?
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8
    context_dim: int = 768
    # SpatialTransformer blocks: one count for every level, or one per level of channel_mult
    # (a level without attention may say 0)
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None  # None: the last level's depth
    norm_groups: int = 32
    use_linear_in_transformer: bool = False  # SD 1.x: 1x1 conv proj_in / proj_out
    # channels per attention head (SDXL: 64, so the head count grows with the level's width);
    # None: ``num_heads`` heads at every level (SD 1.x)
    num_head_channels: int | None = None
    # width of the vector ``y`` fed to the ``label_emb`` MLP and added to the time embedding
    # (SDXL: 2816); None: no label embedding (SD 1.x)
    adm_in_channels: int | None = None
    # width of each micro-conditioning scalar's sinusoidal embedding inside ``y`` (SDXL: 256)
    added_time_dim: int = 256

    def level_depth(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at ``level`` (0 where there is no attention)."""
        if not self.attention_levels[level]:
            return 0
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    @property
    def middle_depth(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        d = self.transformer_depth
        return d if isinstance(d, int) else d[-1]

    def heads(self, channels: int) -> int:
        """Attention heads of a SpatialTransformer with ``channels`` channels."""
        if self.num_head_channels:
            return max(1, channels // self.num_head_channels)
        return self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # output width of the text projection applied to the pooled (EOS) state (OpenCLIP
    # ViT-bigG/14: 1280); None: the encoder has no projection (CLIP ViT-L/14 as SD uses it)
    projection_dim: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """One Stable Diffusion model: its networks and its native resolution.

    ``text2`` is SDXL's second text encoder (OpenCLIP ViT-bigG/14, with projection); the
    UNet's context is then ``text.hidden_size + text2.hidden_size`` wide.
    """

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    native_size: int = 512  # pixels; the native latent tile is native_size // vae.downscale
    text2: TextEncoderConfig | None = None

    @property
    def family(self) -> str:
        """"sdxl" (two text encoders, added conditioning) or "sd1x"."""
        return "sdxl" if self.text2 is not None else "sd1x"

    @property
    def latent_tile(self) -> int:
        return self.native_size // self.vae.downscale

    @property
    def default_overlap(self) -> int:
        """Default overlap of neighbouring tiles, latent px: a quarter of the native tile
        (16 for SD 1.x, 32 for SDXL)."""
        return self.latent_tile // 4

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding inside the UNet's ``y`` (None without text2)."""
        if self.text2 is None:
            return None
        return self.text2.projection_dim or self.text2.hidden_size

    @property
    def prefixes(self) -> dict[str, str]:
        """Component -> key prefix in a single-file checkpoint of this family."""
        if self.text2 is None:
            return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}
        return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": SDXL_TEXT_PREFIX, "text2": SDXL_TEXT2_PREFIX}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "ModelConfig":
        raw = json.loads(text)

        def build(cls, data):
            kwargs = {}
            for f in dataclasses.fields(cls):
                if f.name in data:
                    v = data[f.name]
                    kwargs[f.name] = tuple(v) if isinstance(v, list) else v
            return cls(**kwargs)

        return ModelConfig(
            name=raw["name"],
            unet=build(UNetConfig, raw["unet"]),
            vae=build(VAEConfig, raw["vae"]),
            text=build(TextEncoderConfig, raw["text"]),
            native_size=raw.get("native_size", 512),
            text2=build(TextEncoderConfig, raw["text2"]) if raw.get("text2") is not None else None,
        )


SD15 = ModelConfig(name="sd15", unet=UNetConfig(), vae=VAEConfig(), text=TextEncoderConfig())

TINY = ModelConfig(
    name="tiny",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attention_levels=(True, True),
        num_heads=4,
        context_dim=32,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    text=TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    native_size=128,  # 16x16 latent tiles keep the tiny tests fast
)

CLIP_L = TextEncoderConfig()  # CLIP ViT-L/14, SD 1.x's and SDXL's first text encoder
OPENCLIP_BIGG = TextEncoderConfig(  # OpenCLIP ViT-bigG/14's text tower
    hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, hidden_act="gelu", projection_dim=1280,
)

SDXL = ModelConfig(
    name="sdxl",
    unet=UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_levels=(False, True, True),
        context_dim=CLIP_L.hidden_size + OPENCLIP_BIGG.hidden_size,  # 2048
        transformer_depth=(0, 2, 10),
        use_linear_in_transformer=True,
        num_head_channels=64,
        adm_in_channels=OPENCLIP_BIGG.projection_dim + 6 * 256,  # 2816
        added_time_dim=256,
    ),
    vae=VAEConfig(scaling_factor=0.13025),
    text=CLIP_L,
    text2=OPENCLIP_BIGG,
    native_size=1024,  # latent tile 128, default overlap 32
)

_TINY_CLIP_L = TINY.text
_TINY_BIGG = TextEncoderConfig(hidden_size=48, num_layers=3, num_heads=3, intermediate_size=96, hidden_act="gelu",
                               projection_dim=40)  # not square: a transposed projection shows
TINY_XL = ModelConfig(
    name="tiny_xl",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_levels=(False, True, True),
        context_dim=_TINY_CLIP_L.hidden_size + _TINY_BIGG.hidden_size,  # 80
        transformer_depth=(0, 1, 2),
        use_linear_in_transformer=True,
        num_head_channels=16,
        adm_in_channels=_TINY_BIGG.projection_dim + 6 * 8,  # 88
        added_time_dim=8,
    ),
    vae=dataclasses.replace(TINY.vae, scaling_factor=0.13025),
    text=_TINY_CLIP_L,
    text2=_TINY_BIGG,
    native_size=128,  # 16x16 latent tiles keep the tiny tests fast
)

ARCHITECTURES = {"sd15": SD15, "tiny": TINY, "sdxl": SDXL, "tiny_xl": TINY_XL}
