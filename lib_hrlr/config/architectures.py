"""Model architectures as plain data.

Every model in ``lib_hrlr.models`` is built from one of these frozen dataclasses, so a
plan (memory budget, tile size, streaming units) can be reasoned about without building
anything.  ``SD15`` is the exact Stable Diffusion 1.x architecture; ``TINY`` keeps every
structural feature (attention at several levels, cross-attention, 8x latent factor,
GroupNorm with 32 groups) at a size that runs in milliseconds, for fast tests.

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
    transformer_depth: int = 1
    norm_groups: int = 32
    use_linear_in_transformer: bool = False  # SD 1.x: 1x1 conv proj_in / proj_out


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


@dataclass(frozen=True)
class ModelConfig:
    """One Stable Diffusion model: its three networks and its native resolution."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    native_size: int = 512  # pixels; the native latent tile is native_size // vae.downscale

    @property
    def latent_tile(self) -> int:
        return self.native_size // self.vae.downscale

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

ARCHITECTURES = {"sd15": SD15, "tiny": TINY}
