"""How much work each stage of a run is, before it runs: multiply-accumulates from the architecture.

The counts cover the convolutions, linear layers and attention products (what dominates the
time); norms, activations and the timestep MLP are left out.  They are exact for the layer
shapes (tests compare them with torch's FLOP counter on the models) and serve the progress
bar: a stage's expected time is its count times the seconds per multiply-accumulate measured
on an earlier stage of the same kind (see :class:`lib_hrlr.pipeline.progress.WorkTracker`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.architectures import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

CONTEXT_TOKENS = 77
TAESD_CHANNELS = 64


@dataclass(frozen=True)
class StageWork:
    """A stage's expected work: ``units`` multiply-accumulates in all, or ``per_unit`` for each
    unit of the stage's own count (a step, a tile-step), known when the stage starts.  Stages of
    one ``kind`` run at one measured rate (``unet``, ``decoder``, ``encoder``, ``text``)."""

    name: str
    kind: str
    units: float
    per_unit: float | None = None


def _res(cin: int, cout: int, p: float) -> float:
    """Two 3x3 convolutions (and a 1x1 skip when the channels change)."""
    return 9 * cin * cout * p + 9 * cout * cout * p + (cin * cout * p if cin != cout else 0)


def _transformer(u: UNetConfig, c: int, p: float, depth: int, tokens: int) -> float:
    """proj_in/out, then per block: self-attention (qkv, out, scores), cross-attention (q, out,
    k/v on the context, scores), GEGLU feed-forward (c -> 2x4c, 4c -> c)."""
    per_block = (4 * c * c * p + 2 * p * p * c
                 + 2 * c * c * p + 2 * tokens * u.context_dim * c + 2 * p * tokens * c
                 + 12 * c * c * p)
    return 2 * c * c * p + depth * per_block


def unet_macs(u: UNetConfig, h: int, w: int, tokens: int = CONTEXT_TOKENS) -> float:
    """One UNet evaluation of one sample on an ``h x w`` latent."""
    P = float(h * w)
    mc, L = u.model_channels, len(u.channel_mult)
    macs = 9 * u.in_channels * mc * P
    c, skips = mc, [mc]
    for lvl, mult in enumerate(u.channel_mult):
        p = P / 4**lvl
        for _ in range(u.num_res_blocks):
            macs += _res(c, mc * mult, p)
            c = mc * mult
            if u.attention_levels[lvl]:
                macs += _transformer(u, c, p, u.level_depth(lvl), tokens)
            skips.append(c)
        if lvl != L - 1:
            macs += 9 * c * c * p / 4
            skips.append(c)
    p = P / 4 ** (L - 1)
    middle = u.transformer_depth_middle if u.transformer_depth_middle is not None else u.level_depth(L - 1)
    macs += 2 * _res(c, c, p) + _transformer(u, c, p, middle, tokens)
    for lvl in reversed(range(L)):
        p = P / 4**lvl
        cout = mc * u.channel_mult[lvl]
        for _ in range(u.num_res_blocks + 1):
            macs += _res(c + skips.pop(), cout, p)
            c = cout
            if u.attention_levels[lvl]:
                macs += _transformer(u, c, p, u.level_depth(lvl), tokens)
        if lvl != 0:
            macs += 9 * c * c * P / 4 ** (lvl - 1)
    return macs + 9 * c * u.out_channels * P


def _vae_attention(c: int, p: float) -> float:
    return 4 * c * c * p + 2 * p * p * c


def vae_decoder_macs(v: VAEConfig, h: int, w: int) -> float:
    """The SD VAE decoder on an ``h x w`` latent (the mid-block attention over all of it)."""
    P = float(h * w)
    L = len(v.ch_mult)
    c = v.ch * v.ch_mult[-1]
    macs = v.embed_dim * v.z_channels * P + 9 * v.z_channels * c * P
    macs += 2 * _res(c, c, P) + _vae_attention(c, P)
    for lvl in reversed(range(L)):
        p = P * 4 ** (L - 1 - lvl)
        cout = v.ch * v.ch_mult[lvl]
        for _ in range(v.num_res_blocks + 1):
            macs += _res(c, cout, p)
            c = cout
        if lvl != 0:
            macs += 9 * c * c * p * 4
    return macs + 9 * c * v.out_channels * P * 4 ** (L - 1)


def vae_encoder_macs(v: VAEConfig, h: int, w: int) -> float:
    """The SD VAE encoder producing an ``h x w`` latent."""
    P = float(h * w)
    L = len(v.ch_mult)
    img = P * 4 ** (L - 1)
    macs = 9 * v.in_channels * v.ch * img
    c = v.ch
    for lvl in range(L):
        p = img / 4**lvl
        cout = v.ch * v.ch_mult[lvl]
        for _ in range(v.num_res_blocks):
            macs += _res(c, cout, p)
            c = cout
        if lvl != L - 1:
            macs += 9 * c * c * p / 4
    macs += 2 * _res(c, c, P) + _vae_attention(c, P)
    return macs + 9 * c * 2 * v.z_channels * P + 2 * v.z_channels * 2 * v.embed_dim * P


def taesd_decoder_macs(h: int, w: int, channels: int = TAESD_CHANNELS) -> float:
    P = float(h * w)
    cc = 9 * channels * channels
    macs = 9 * 4 * channels * P
    for k in range(3):  # 3 blocks (3 convs each) at P * 4^k, then a conv after the 2x upsampling
        macs += 9 * cc * P * 4**k + cc * P * 4 ** (k + 1)
    return macs + 3 * cc * P * 64 + 9 * channels * 3 * P * 64


def taesd_encoder_macs(h: int, w: int, channels: int = TAESD_CHANNELS) -> float:
    P = float(h * w)
    img = P * 64
    cc = 9 * channels * channels
    macs = 9 * 3 * channels * img + 3 * cc * img
    for k in range(1, 4):  # a stride-2 conv, then 3 blocks, at img / 4^k
        macs += cc * img / 4**k + 9 * cc * img / 4**k
    return macs + 9 * channels * 4 * P


def text_macs(t: TextEncoderConfig, tokens: int = CONTEXT_TOKENS) -> float:
    """One 77-token chunk through the text encoder."""
    h = t.hidden_size
    return t.num_layers * (4 * h * h * tokens + 2 * tokens * tokens * h + 2 * h * t.intermediate_size * tokens)


def stage_work(cfg: ModelConfig, params, *, n_jobs: int, with_base: bool = True) -> list[StageWork]:
    """The stages of a run of ``params`` (tile and overlap resolved) with their expected work.

    ``n_jobs``: tiles of the tiled pass (with region crops); ``with_base``: False when an init
    image replaces the base pass.
    """
    from .params import base_size

    f = cfg.vae.downscale
    lh, lw = params.height // f, params.width // f
    samples = 1 if params.cfg == 1.0 else 2
    taesd = params.vae == "taesd"
    dec = (lambda h, w: taesd_decoder_macs(h, w)) if taesd else (lambda h, w: vae_decoder_macs(cfg.vae, h, w))
    enc = (lambda h, w: taesd_encoder_macs(h, w)) if taesd else (lambda h, w: vae_encoder_macs(cfg.vae, h, w))
    n_prompts = 2 + len(params.regions)
    out = [StageWork("text", "text", n_prompts * text_macs(cfg.text))]
    if with_base:
        bw, bh = base_size(params.width, params.height, cfg.native_size)
        per_step = samples * unet_macs(cfg.unet, bh // f, bw // f)
        steps = params.base_steps or params.steps
        out += [StageWork("base", "unet", steps * per_step, per_step),
                StageWork("base decode", "decoder", dec(bh // f, bw // f))]
    out.append(StageWork("guide encode", "encoder", enc(lh, lw)))
    tail = int(params.steps * params.strength)
    if params.strength > 0:
        per_tile = samples * unet_macs(cfg.unet, params.tile, params.tile)
        out.append(StageWork("tiled", "unet", max(1, tail) * n_jobs * per_tile, per_tile))
    out.append(StageWork("decode", "decoder", dec(lh, lw)))
    return out
