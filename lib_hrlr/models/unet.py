"""The Stable Diffusion 1.x and SDXL UNet (LDM / sgm ``openaimodel.UNetModel``), in plain torch.

Parameter names are exactly those of an LDM single-file checkpoint below
``model.diffusion_model.`` (:data:`lib_hrlr.config.architectures.UNET_PREFIX`)::

    time_embed.{0,2}                      timestep MLP
    input_blocks.0.0                      conv_in
    input_blocks.N.0                      ResBlock  (in_layers.{0,2}, emb_layers.1,
                                                     out_layers.{0,3}, skip_connection)
    input_blocks.N.1                      SpatialTransformer (norm, proj_in,
                                          transformer_blocks.D.{attn1,attn2,ff,norm1..3},
                                          proj_out)
    input_blocks.N.0.op                   Downsample conv
    middle_block.{0,1,2}                  ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.{0,1}                 ResBlock [, SpatialTransformer]
    output_blocks.N.{1|2}.conv            Upsample conv
    out.{0,2}                             GroupNorm, conv_out
    label_emb.0.{0,2}                     SDXL: MLP over the ADM vector ``y``, added to the
                                          time embedding (:func:`adm_vector` builds ``y``)

SDXL differs only by configuration (:class:`UNetConfig`): transformer depth per level,
no attention at level 0, heads of ``num_head_channels`` channels, linear
``proj_in``/``proj_out``, and ``adm_in_channels`` (the ``label_emb`` MLP).

:func:`diffusers_key_map` gives the names of diffusers' ``UNet2DConditionModel`` for the
same architecture.

Inference-oriented details:

* every parameter lives in a standard ``nn.Conv2d`` / ``nn.Linear`` / ``nn.GroupNorm`` /
  ``nn.LayerNorm``, always called through its ``__call__``, so weights can be streamed in
  by forward pre-hooks on those leaves.  Each leaf is called once per forward, except
  ``ff.net.0.proj`` and ``ff.net.2`` when the feed-forward is chunked: they are called
  once per token chunk, inside one call of their :class:`FeedForward` (stream that module
  as one unit to read its weights once per forward);
* activations are freed as soon as they are used, SiLU and residual additions happen in
  place when no gradient is being recorded;
* :meth:`UNet.set_chunking` splits the GEGLU feed-forward over tokens and the attention
  over query rows, which bounds the largest activations (the 8x-wide GEGLU projection and
  the attention scores) independently of the latent size, and runs the large 3x3
  convolutions in groups of output channels: the CPU convolution re-lays its whole weight
  out in a temporary copy at every call (118 MB for SD 1.5's 2560->1280 convolutions in
  fp32), and a group's copy is a fraction of that;
* any latent size works (the decoder upsamples to the size of the skip connection it is
  concatenated with, like diffusers does for sizes that are not multiples of 8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lib_hrlr.config.architectures import UNetConfig
from lib_hrlr.errors import InvalidInput

GROUPNORM_EPS = 1e-5  # ResBlocks and the output norm
TRANSFORMER_GROUPNORM_EPS = 1e-6  # SpatialTransformer.norm
LAYERNORM_EPS = 1e-5
# Chunk limits below this are raised to it.  Tiny chunks save no memory worth having, are
# slow, and make BLAS use other kernels (other rounding) for matrices of a few rows.  With
# balanced spans every chunk has at least MIN_CHUNK // 2 = 16 rows.  Chunked results are
# then often bit-identical to the unchunked run; otherwise they differ by float rounding
# (the attention kernel's blocking depends on the query count: a few 1e-7 per call, ~2e-6
# at the output of the tiny test UNet on a 15x17 latent, MKL on an AVX2 CPU).
MIN_CHUNK = 32

# The chunking the pipeline uses when it streams weights under a memory budget (measured on
# SD 1.5, fp32, 64x64 tiles, 4 samples per call: +590 MB with the feed-forward over 4096
# tokens and whole convolutions, +446 MB with these; no slower).  1024 tokens keep the 8x-wide
# GEGLU projection at 10 MB per sample at the 64x64 level; convolutions in groups of at most
# 32 MB of weights keep the CPU convolution's re-laid-out weight copy at 32 MB instead of
# 118 MB (SD 1.5's 2560->1280 convolutions in fp32).  The limit is in bytes, so only the few
# convolutions whose copy is large are split: in fp32 every 3x3 convolution above 8 M weights,
# in bf16/fp16 only those above 16 M (SD 1.5: the six 2560/1920->1280 decoder convolutions,
# in two groups each).  Each group re-lays out the input again: on SD 1.5 in bf16, 2 samples,
# one thread, the 8 M-weight groups cost 11 % more time in the affected convolutions than
# whole calls, 16 M-weight groups 4 % (tools: lib_hrlr/bench/unet_speed.py).
STREAM_FF_TOKENS = 1024
STREAM_ATTN_QUERIES = 4096
STREAM_CONV_BYTES = 32 * 1024 * 1024
# the keywords of set_chunking, as a streamed run sets them
STREAM_CHUNKING = {"ff_tokens": STREAM_FF_TOKENS, "attn_queries": STREAM_ATTN_QUERIES, "conv_bytes": STREAM_CONV_BYTES}


def chunk_spans(n: int, limit: int | None) -> list[tuple[int, int]]:
    """``[start, end)`` spans covering ``range(n)``, none longer than ``max(limit, MIN_CHUNK)``.

    Spans are balanced (their lengths differ by at most one), so no small remainder is left:
    when ``n`` exceeds the limit, every span is longer than half of it.
    """
    if not limit or limit >= n:
        return [(0, n)]
    count = -(-n // max(limit, MIN_CHUNK))
    base, extra = divmod(n, count)
    spans, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        spans.append((start, end))
        start = end
    return spans


def _silu(t: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when autograd does not need the input."""
    return F.silu(t, inplace=not t.requires_grad)


def _add(acc: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``acc + other``, written into ``acc`` when autograd allows it."""
    if acc.requires_grad or other.requires_grad:
        return acc + other
    acc += other
    return acc


def micro_conditioning_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's size/crop embedding: each of the (B, n) scalars through the ``dim``-wide sinusoid,
    concatenated per sample: (B, n * dim) float32 (sgm ``ConcatTimestepEmbedderND``; diffusers
    ``add_time_proj``)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.dim() != 2:
        raise InvalidInput("time_ids", f"shape {tuple(values.shape)}; (batch, 6) is needed")
    b, n = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(b, n * dim)


def adm_vector(pooled: torch.Tensor, time_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's ``y`` (B, pooled + 6 * dim) float32: the pooled text embedding, then the embedded
    ``time_ids`` rows ``(original_h, original_w, crop_top, crop_left, target_h, target_w)``."""
    pooled = torch.as_tensor(pooled)
    time_ids = torch.as_tensor(time_ids, dtype=torch.float32)
    if pooled.dim() != 2:
        raise InvalidInput("pooled", f"shape {tuple(pooled.shape)}; (batch, width) is needed")
    if time_ids.dim() != 2 or time_ids.shape[1] != 6 or time_ids.shape[0] != pooled.shape[0]:
        raise InvalidInput("time_ids", f"shape {tuple(time_ids.shape)}; ({pooled.shape[0]}, 6) is needed")
    return torch.cat([pooled.float(), micro_conditioning_embedding(time_ids, dim)], dim=1)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) in float32, cosines first (LDM; diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that can run over groups of its output channels, one call each.

    ``weight_limit`` (elements) and ``byte_limit`` (bytes of the weight in its dtype), set by
    :meth:`UNet.set_chunking` (None: no cap), cap the weight per call; the smaller one
    applies.  A group is a contiguous slice of the weight (no copy); each output channel is
    computed as in the whole call, the groups are concatenated.  Parameters and their names
    are those of ``nn.Conv2d``."""

    weight_limit: int | None = None
    byte_limit: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        caps = [c for c in (self.weight_limit, self.byte_limit and self.byte_limit // w.element_size()) if c]
        limit = max(1, min(caps)) if caps else None
        if not limit or w.numel() <= limit:
            return super().forward(x)
        spans = chunk_spans(self.out_channels, max(1, limit // w[0].numel()))
        b = self.bias
        parts = [F.conv2d(x, w[s:e], None if b is None else b[s:e], self.stride, self.padding, self.dilation)
                 for s, e in spans]
        return torch.cat(parts, dim=1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS),
            nn.SiLU(),
            GroupedConv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=GROUPNORM_EPS),
            nn.SiLU(),
            nn.Dropout(0.0),
            GroupedConv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """``emb_act`` is SiLU(time embedding), shared by every ResBlock."""
        h = _silu(self.in_layers[0](x))
        h2 = self.in_layers[2](h)
        del h
        h2 = _add(h2, self.emb_layers[1](emb_act)[:, :, None, None])
        h = _silu(self.out_layers[0](h2))
        del h2
        h2 = self.out_layers[3](h)
        del h
        if isinstance(self.skip_connection, nn.Identity):
            return _add(h2, x)
        skip = self.skip_connection(x)
        return _add(skip, h2)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, xn: torch.Tensor, residual: torch.Tensor, context: torch.Tensor | None = None,
                query_chunk: int | None = None) -> torch.Tensor:
        """``residual + to_out(attention(to_q(xn), to_k(ctx), to_v(ctx)))``, ``ctx`` = context or xn.

        The sum is written into ``residual`` when autograd allows.  With ``query_chunk``
        the attention kernel runs on spans of query rows (:func:`chunk_spans`), which
        bounds its scratch; every projection is still called once, on all tokens.
        """
        b, n, _ = xn.shape
        src = xn if context is None else context
        heads = self.heads
        q = self.to_q(xn)
        inner = q.shape[-1]
        dim_head = inner // heads
        q = q.view(b, n, heads, dim_head).transpose(1, 2)
        k = self.to_k(src).view(b, -1, heads, dim_head).transpose(1, 2)
        v = self.to_v(src).view(b, -1, heads, dim_head).transpose(1, 2)
        spans = chunk_spans(n, query_chunk)
        if len(spans) == 1:
            att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        else:
            att = q.new_empty(b, n, heads, dim_head)
            for s, e in spans:
                att[:, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k, v).transpose(1, 2)
        del q, k, v
        att = att.reshape(b, n, inner)
        out = self.to_out(att)
        del att
        return _add(residual, out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        value, gate = h.chunk(2, dim=-1)
        out = F.gelu(gate)
        del gate
        out = out.mul_(value) if not (out.requires_grad or value.requires_grad) else out * value
        return out


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, tokens: int | None = None) -> torch.Tensor:
        """``net(x)``; with ``residual`` (same shape as ``x``), ``residual + net(x)``, written
        into ``residual`` when autograd allows, computed over chunks of at most ``tokens``
        tokens per sample (:func:`chunk_spans`).

        The chunking lives here, inside the one module a streamer loads as a unit, so the
        weights are read once per call however many chunks there are.  Chunks are contiguous
        row ranges of the flattened (batch * tokens, dim) matrix, ``batch * tokens`` rows each
        (the same memory bound as ``tokens`` per sample; no strided copies of the input)."""
        if residual is None:
            return self.net[2](self.net[0](x))
        b, n, dim = x.shape
        spans = chunk_spans(b * n, tokens and b * tokens)
        if len(spans) == 1:
            return _add(residual, self.net[2](self.net[0](x)))
        flat = x.reshape(b * n, dim)
        if residual.requires_grad or x.requires_grad or not residual.is_contiguous():
            return residual + torch.cat([self.net[2](self.net[0](flat[s:e])) for s, e in spans]).view(b, n, dim)
        out = residual.view(b * n, dim)
        for s, e in spans:
            out[s:e] += self.net[2](self.net[0](flat[s:e]))
        return residual


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.ff_tokens: int | None = None
        self.attn_queries: int | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) tokens; updated in place when autograd allows."""
        xn = self.norm1(x)
        x = self.attn1(xn, x, None, self.attn_queries)
        del xn
        xn = self.norm2(x)
        x = self.attn2(xn, x, context, self.attn_queries)
        del xn
        xn = self.norm3(x)
        return self.ff(xn, x, self.ff_tokens)


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUPNORM_EPS)
        if linear:
            self.proj_in = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)
        )
        if linear:
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)
        if self.linear:
            t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)
            t = self.proj_in(t)
        else:
            t = self.proj_in(t)
            t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.linear:
            t = self.proj_out(t)
            out = t.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
            del t
        else:
            t2 = t.transpose(1, 2).reshape(b, c, h, w)
            del t
            out = self.proj_out(t2).contiguous()
            del t2
        return _add(out, x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = GroupedConv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = GroupedConv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            up = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            up = F.interpolate(x, size=tuple(size), mode="nearest")
        out = self.conv(up)
        del up
        return out


class TimestepBlock(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers applied in order."""

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor, context: torch.Tensor,
                up_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_act)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


def _check_config(cfg: UNetConfig) -> None:
    levels = len(cfg.channel_mult)
    if levels < 1:
        raise InvalidInput("channel_mult", "needs at least one level")
    if len(cfg.attention_levels) != levels:
        raise InvalidInput("attention_levels", f"needs one flag per level of channel_mult ({levels})")
    depth = cfg.transformer_depth
    if isinstance(depth, tuple):
        if len(depth) != levels or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depth):
            raise InvalidInput("transformer_depth", f"{depth}; one count >= 0 per level of channel_mult ({levels})")
    elif isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise InvalidInput("transformer_depth", f"{depth!r}; a positive integer or one count per level is allowed")
    for level, flag in enumerate(cfg.attention_levels):
        if flag and cfg.level_depth(level) < 1:
            raise InvalidInput("transformer_depth", f"level {level} has attention, so it needs at least one block")
    if cfg.middle_depth < 1:
        raise InvalidInput("transformer_depth_middle", f"{cfg.middle_depth}; the middle block needs at least one")
    if cfg.num_head_channels is not None and cfg.num_head_channels < 1:
        raise InvalidInput("num_head_channels", f"{cfg.num_head_channels}; a positive integer or None is allowed")
    if cfg.adm_in_channels is not None and cfg.adm_in_channels < 1:
        raise InvalidInput("adm_in_channels", f"{cfg.adm_in_channels}; a positive integer or None is allowed")
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        ch = cfg.model_channels * mult
        if ch % cfg.norm_groups:
            raise InvalidInput("norm_groups", f"{cfg.norm_groups} does not divide {ch} channels")
        if cfg.num_head_channels:  # where there is attention: the levels that have it, and the middle
            if (cfg.attention_levels[level] or level == last) and ch % cfg.num_head_channels:
                raise InvalidInput("num_head_channels", f"{cfg.num_head_channels} does not divide {ch} channels")
        elif ch % cfg.num_heads:
            raise InvalidInput("num_heads", f"{cfg.num_heads} does not divide {ch} channels")
    if cfg.model_channels % cfg.norm_groups:
        raise InvalidInput("norm_groups", f"{cfg.norm_groups} does not divide {cfg.model_channels} channels")


class UNet(nn.Module):
    """SD 1.x / SDXL UNet built from a :class:`UNetConfig`; ``forward(x, timesteps, context, y=None) -> eps``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        _check_config(cfg)
        self.config = cfg
        mc = cfg.model_channels
        emb_dim = mc * 4
        groups = cfg.norm_groups

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.heads(ch), depth, cfg.context_dim, groups,
                                      cfg.use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        else:
            self.label_emb = None

        self.input_blocks = nn.ModuleList([TimestepBlock([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult, groups)]
                ch = mc * mult
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, cfg.level_depth(level)))
                self.input_blocks.append(TimestepBlock(layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepBlock([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = TimestepBlock([
            ResBlock(ch, emb_dim, ch, groups),
            transformer(ch, cfg.middle_depth),
            ResBlock(ch, emb_dim, ch, groups),
        ])

        self.output_blocks = nn.ModuleList()
        for level in range(last, -1, -1):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch, cfg.level_depth(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch, eps=GROUPNORM_EPS),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.out_channels, 3, padding=1),
        )

    def set_chunking(self, ff_tokens: int | None, attn_queries: int | None,
                     conv_weights: int | None = None, conv_bytes: int | None = None) -> None:
        """Split the feed-forward over ``ff_tokens`` tokens and attention over ``attn_queries``
        query rows at a time, and run 3x3 convolutions over groups of output channels of at
        most ``conv_weights`` weight elements and ``conv_bytes`` bytes of weight (None: no split).

        The sequence is cut in balanced spans of at most ``max(value, MIN_CHUNK)`` tokens;
        results equal the unsplit ones up to float rounding.  The largest transient
        activations then are ``batch * ff_tokens * 8 * channels`` (GEGLU projection) and
        ``batch * heads * attn_queries * keys`` (attention scores, when the attention
        kernel materialises them)."""
        for name, value in (("ff_tokens", ff_tokens), ("attn_queries", attn_queries), ("conv_weights", conv_weights),
                            ("conv_bytes", conv_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidInput(name, f"{value!r}; a positive integer or None is allowed")
        for m in self.modules():
            if isinstance(m, BasicTransformerBlock):
                m.ff_tokens = ff_tokens
                m.attn_queries = attn_queries
            elif isinstance(m, GroupedConv2d):
                m.weight_limit = conv_weights
                m.byte_limit = conv_bytes

    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise InvalidInput("x", f"must be a tensor (batch, {cfg.in_channels}, height, width)")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise InvalidInput("x", f"empty latent {tuple(x.shape)}")
        b = x.shape[0]
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[2] != cfg.context_dim:
            raise InvalidInput("context", f"must be a tensor (batch, tokens, {cfg.context_dim})")
        if context.shape[0] != b or context.shape[1] < 1:
            raise InvalidInput("context", f"batch {context.shape[0]} and {context.shape[1]} tokens; "
                                          f"batch {b} and at least one token are needed")
        if cfg.adm_in_channels:
            if not isinstance(y, torch.Tensor) or y.dim() != 2 or tuple(y.shape) != (b, cfg.adm_in_channels):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else repr(y)
                raise InvalidInput("y", f"{got}; this UNet needs its ADM vector (batch {b}, {cfg.adm_in_channels})")
        elif y is not None:
            raise InvalidInput("y", "this UNet has no label embedding (adm_in_channels is None); pass y=None")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.reshape(1)
        if timesteps.dim() != 1 or timesteps.shape[0] not in (1, b):
            raise InvalidInput("timesteps", f"shape {tuple(timesteps.shape)}; (batch,) or a scalar is allowed")
        return timesteps.expand(b)

    def time_embedding(self, timesteps: torch.Tensor, dtype: torch.dtype, y: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(time_embed(sinusoid(timesteps)) [+ label_emb(y)]): (B, 4 * model_channels), what
        every ResBlock takes.  The sinusoid is computed in float32, then cast to ``dtype``."""
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(dtype)
        emb = self.time_embed[2](_silu(self.time_embed[0](t_emb)))
        if self.label_emb is not None:
            mlp = self.label_emb[0]
            emb = _add(emb, mlp[2](_silu(mlp[0](y.to(dtype)))))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 4, h, w) and context (B, T, context_dim) in the weights' dtype; timesteps (B,);
        ``y`` (B, adm_in_channels), SDXL's ADM vector (:func:`adm_vector`), only when the
        config has ``adm_in_channels``."""
        timesteps = self._check_inputs(x, timesteps, context, y)
        emb_act = self.time_embedding(timesteps, x.dtype, y)

        skips: list[torch.Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb_act, context)
            skips.append(h)
        h = self.middle_block(h, emb_act, context)
        for block in self.output_blocks:
            skip = skips.pop()
            hcat = torch.cat([h, skip], dim=1)
            del h, skip
            up_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(hcat, emb_act, context, up_size)
            del hcat
        n = _silu(self.out[0](h))
        del h
        return self.out[2](n)


def diffusers_key_map(cfg: UNetConfig) -> dict[str, str]:
    """diffusers ``UNet2DConditionModel`` parameter name -> our (LDM) name, for ``cfg``.

    Names only: tensors whose shapes differ but whose sizes match (1x1 conv vs linear
    ``proj_in``/``proj_out``) are the loader's business.
    """
    _check_config(cfg)
    out: dict[str, str] = {}

    def resnet(src: str, dst: str, has_skip: bool) -> None:
        pairs = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3")]
        if has_skip:
            pairs.append(("conv_shortcut", "skip_connection"))
        for a, b in pairs:
            for p in ("weight", "bias"):
                out[f"{src}.{a}.{p}"] = f"{dst}.{b}.{p}"

    def attention(src: str, dst: str, depth: int) -> None:
        names = ["norm", "proj_in", "proj_out"]
        for d in range(depth):
            tb = f"transformer_blocks.{d}"
            names += [f"{tb}.{n}" for n in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
                                              "norm1", "norm2", "norm3")]
            for a in ("attn1", "attn2"):
                for p in ("to_q", "to_k", "to_v"):
                    out[f"{src}.{tb}.{a}.{p}.weight"] = f"{dst}.{tb}.{a}.{p}.weight"
        for n in names:
            for p in ("weight", "bias"):
                out[f"{src}.{n}.{p}"] = f"{dst}.{n}.{p}"

    def plain(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{src}.{p}"] = f"{dst}.{p}"

    mc = cfg.model_channels
    plain("time_embedding.linear_1", "time_embed.0")
    plain("time_embedding.linear_2", "time_embed.2")
    if cfg.adm_in_channels:
        plain("add_embedding.linear_1", "label_emb.0.0")
        plain("add_embedding.linear_2", "label_emb.0.2")
    plain("conv_in", "input_blocks.0.0")
    n = 1
    ch = mc
    last = len(cfg.channel_mult) - 1
    skip_channels = [mc]
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(cfg.num_res_blocks):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{n}.0", ch != mc * mult)
            ch = mc * mult
            if cfg.attention_levels[level]:
                attention(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{n}.1", cfg.level_depth(level))
            skip_channels.append(ch)
            n += 1
        if level != last:
            plain(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
            skip_channels.append(ch)
            n += 1
    resnet("mid_block.resnets.0", "middle_block.0", False)
    attention("mid_block.attentions.0", "middle_block.1", cfg.middle_depth)
    resnet("mid_block.resnets.1", "middle_block.2", False)
    n = 0
    for up, level in enumerate(range(last, -1, -1)):
        mult = cfg.channel_mult[level]
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{n}.0", True)
            skip_channels.pop()
            ch = mc * mult
            index = 1
            if cfg.attention_levels[level]:
                attention(f"up_blocks.{up}.attentions.{j}", f"output_blocks.{n}.1", cfg.level_depth(level))
                index = 2
            if level and j == cfg.num_res_blocks:
                plain(f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{n}.{index}.conv")
            n += 1
    plain("conv_norm_out", "out.0")
    plain("conv_out", "out.2")
    return out
