"""The Stable Diffusion autoencoder (AutoencoderKL), in plain torch.

Parameter names follow the original LDM checkpoint layout below ``first_stage_model.``
(``encoder.down.0.block.1.conv2.weight``, ``decoder.up.3.upsample.conv.bias``,
``quant_conv.weight`` ...), so a single-file checkpoint loads with its own names.  The
mid-block attention uses 1x1 convolutions for ``q``, ``k``, ``v`` and ``proj_out``, as the
LDM checkpoints store them.

Everything is built from a :class:`~lib_hrlr.config.architectures.VAEConfig`, can be
constructed on the meta device, and the encoder and decoder halves can be built alone
(``AutoencoderKL(cfg, encoder=False)`` holds only ``decoder.*`` and ``post_quant_conv.*``),
so a pipeline that only decodes never allocates the encoder.

The untiled :meth:`AutoencoderKL.encode` / :meth:`AutoencoderKL.decode` here are the
reference; :mod:`lib_hrlr.vae.tiled_vae` runs the same modules tile by tile with a
memory footprint that does not depend on the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.architectures import VAEConfig
from ..errors import InvalidInput

GN_EPS = 1e-6


def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm1 → SiLU → conv1 → norm2 → SiLU → conv2, plus the (1x1-projected) input."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(cfg, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, 1, h*w, c)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero pad one row/column at the bottom/right, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (a list of ResnetBlocks) and maybe a resampler."""


class _Mid(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i in range(n):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, block_in, block_out))
                block_in = block_out
            if i != n - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(cfg, block_in)
        self.norm_out = _norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(cfg, block_in)
        levels: list[_Level | None] = [None] * n
        for i in reversed(range(n)):  # built deepest first; stored by level index like LDM
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cfg, block_in, block_out))
                block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_in)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The SD VAE; build only the halves you need with ``encoder=`` / ``decoder=``.

    ``encode(x)``: x in [-1, 1], (B, 3, H, W) with H, W multiples of ``cfg.downscale``
    → latent mean (B, embed_dim, H/f, W/f), *unscaled* (multiply by ``cfg.scaling_factor``
    for the diffusion model).  ``decode(z)``: z unscaled (already divided by the scaling
    factor) → image (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped).
    """

    def __init__(self, cfg: VAEConfig, *, encoder: bool = True, decoder: bool = True):
        super().__init__()
        if not (encoder or decoder):
            raise InvalidInput("encoder/decoder", "build at least one half of the VAE")
        self.cfg = cfg
        if encoder:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        if decoder:
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
            self.decoder = Decoder(cfg)

    @property
    def has_encoder(self) -> bool:
        return hasattr(self, "encoder")

    @property
    def has_decoder(self) -> bool:
        return hasattr(self, "decoder")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_encoder:
            raise InvalidInput("vae", "this AutoencoderKL was built without its encoder")
        f = self.cfg.downscale
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise InvalidInput("image", f"expected (B, {self.cfg.in_channels}, H, W) with H and W "
                                        f"multiples of {f}, got {tuple(x.shape)}")
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.cfg.embed_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if not self.has_decoder:
            raise InvalidInput("vae", "this AutoencoderKL was built without its decoder")
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise InvalidInput("latent", f"expected (B, {self.cfg.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))


def _resnet_pairs(ours: str, theirs: str, has_shortcut: bool) -> list[tuple[str, str]]:
    pairs = [(f"{theirs}.{n}", f"{ours}.{n}") for n in ("norm1", "conv1", "norm2", "conv2")]
    if has_shortcut:
        pairs.append((f"{theirs}.conv_shortcut", f"{ours}.nin_shortcut"))
    return pairs


def _mid_pairs(ours: str, theirs: str) -> list[tuple[str, str]]:
    pairs = _resnet_pairs(f"{ours}.block_1", f"{theirs}.resnets.0", False)
    a, b = f"{theirs}.attentions.0", f"{ours}.attn_1"
    pairs += [(f"{a}.group_norm", f"{b}.norm"), (f"{a}.to_q", f"{b}.q"), (f"{a}.to_k", f"{b}.k"),
              (f"{a}.to_v", f"{b}.v"), (f"{a}.to_out.0", f"{b}.proj_out")]
    pairs += _resnet_pairs(f"{ours}.block_2", f"{theirs}.resnets.1", False)
    return pairs


def diffusers_key_map(cfg: VAEConfig) -> dict[str, str]:
    """Map every parameter name of diffusers' ``AutoencoderKL`` to ours (LDM layout).

    Keys are diffusers names (``decoder.up_blocks.0.resnets.1.conv1.weight``), values the
    names in this module (``decoder.up.3.block.1.conv1.weight``), both without the
    ``first_stage_model.`` prefix.  diffusers stores the mid-block attention projections
    as Linear (out, in) where ours are 1x1 convs (out, in, 1, 1): same numel, so a loader
    reshapes; the names are all this map provides.
    """
    n = len(cfg.ch_mult)
    pairs: list[tuple[str, str]] = [("encoder.conv_in", "encoder.conv_in")]
    block_in = cfg.ch
    for i in range(n):
        block_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            pairs += _resnet_pairs(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                   block_in != block_out)
            block_in = block_out
        if i != n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    pairs += _mid_pairs("encoder.mid", "encoder.mid_block")
    pairs += [("encoder.conv_norm_out", "encoder.norm_out"), ("encoder.conv_out", "encoder.conv_out"),
              ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
              ("decoder.conv_in", "decoder.conv_in")]
    pairs += _mid_pairs("decoder.mid", "decoder.mid_block")
    block_in = cfg.ch * cfg.ch_mult[-1]
    for k in range(n):  # diffusers counts up blocks from the deepest level
        i = n - 1 - k
        block_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            pairs += _resnet_pairs(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}",
                                   block_in != block_out)
            block_in = block_out
        if i != 0:
            pairs.append((f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{i}.upsample.conv"))
    pairs += [("decoder.conv_norm_out", "decoder.norm_out"), ("decoder.conv_out", "decoder.conv_out")]
    return {f"{theirs}.{p}": f"{ours}.{p}" for theirs, ours in pairs for p in ("weight", "bias")}
