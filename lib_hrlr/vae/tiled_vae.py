"""Exact tiled encode / decode of the full SD autoencoder, in memory independent of size.

How it works
------------
The network is cut at its GroupNorms.  Each *segment* (one or two convolutions and the
pointwise work around them) runs over all tiles of its output before the next segment
starts, and its output canvas lives in a :class:`~lib_hrlr.image.spill.SpillArray` (page
cache, not resident memory).  Tiles partition each canvas; a tile reads its input region
with exactly the halo its convolution needs (1 px for a 3x3 conv; a stride-2 conv and a
nearest x2 upsample map the region by arithmetic), applies GroupNorm with the statistics
of the *whole* input canvas and SiLU, and zero-pads only where the region crosses the
image border, which is what the untiled convolution's padding does.  The tile's core
output is therefore the untiled output, up to float rounding.

While a segment writes its tiles it accumulates per-channel statistics of what it wrote
(each tile's core once; cores partition the canvas): per tile its mean and variance
(``torch.var_mean``, two-pass in float32, so nothing cancels), merged over tiles and then
over the channels of each group in float64 with Chan's parallel-variance formula.  The
next segment normalises with these exact whole-image group statistics, folded (in
float64) into one per-channel scale and bias as torch's GroupNorm kernel folds them, and
applied with SiLU in one float32 pass; nothing uses per-tile statistics.

Canvases are stored in the compute dtype.  The convolutions and matmuls run in it too,
except bfloat16 on a CPU without native bfloat16 kernels (:func:`kernel_dtype`), where
they run in float32 on the bfloat16 values.

Residual adds read the shortcut canvas at the tile core (through the 1x1 ``nin_shortcut``
where channels change); when the shortcut canvas is not needed afterwards the output
overwrites it in place (each tile reads only its own core of it), so a ResNet block keeps
two canvases, not three.  Every canvas is closed right after its last reader.

The mid-block self-attention is global and exact: one pass normalises each tile (with
the shared statistics) and writes its keys and values to one spill canvas; then each
tile's queries stream that canvas in chunks with an online softmax (running max and
sum), so memory is bounded by the tile and chunk sizes.  ``attention="tile"`` instead
attends within each tile only: faster, approximate (no global context), no K/V canvas.

A segment's tiles allocate the same few tensors again and again.  By default each is a
fresh mapping that the kernel faults in and zeroes page by page (the program's tuned
allocator, :func:`~lib_hrlr.runtime.tune_allocator`): decoding 512² with the SD VAE in
fp32 takes ~1.8 M minor page faults and ~11 % of its CPU time in the kernel.  With
``reuse_heap=True`` they come from glibc's heap instead, reused tile after tile
(:func:`~lib_hrlr.runtime.reused_heap`), and the heap is handed back after each segment:
~10x fewer faults, ~12 % less time, but the freed tensors' holes stay resident while the
segment runs, so the step's peak can reach :data:`HEAP_REUSE_FACTOR` times
:func:`estimate_tile_bytes`.  The budget planner turns it on only where that fits.

Tile size
---------
``tile`` is the side, in latent pixels, of the work unit of the widest layers
(``C_max = ch * max(ch_mult)`` channels, 512 for SD).  Every segment processes tiles of
about ``tile**2 * C_max`` activations: a segment with C channels uses tiles of side
``tile * sqrt(C_max / C)`` in its own pixels (rounded down to a multiple of 8).  So the
working set of one step depends on ``tile`` only (see :func:`estimate_tile_bytes`) and
never on the image size.  For encoding ``tile`` is given in image pixels and divided by
the VAE factor (8), so ``encode_tiled(tile=512)`` uses the same work unit as
``decode_tiled(tile=64)``.

Disk (spill) use
----------------
The peak is reached at the full-resolution level of the decoder, where the first ResNet
block reads the upsampled 256-channel canvas and writes two 128-channel ones.  For SD at
2048x2048: 8.0 GiB of spill in float32 (4.0 GiB in bfloat16), plus the 12 MiB uint8
output; 4096x4096 needs four times that.  Encoding a 2048x2048 image peaks at 4.0 GiB
(float32).  :func:`estimate_spill_bytes` gives the exact figure for any size.  The files
are unlinked at creation, so nothing is left behind, even when the process is killed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..config.architectures import VAEConfig
from ..errors import Interrupted, InvalidInput
from ..image.spill import SpillArray
from ..runtime import reused_heap, trim_allocator

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATTENTION_MODES = ("global", "tile")
OUTPUTS = ("uint8", "float")
MIN_LATENT_TILE = 8
MIN_KV_CHUNK = 256  # keys per streamed attention chunk, at least
STEP_SLACK_BYTES = 4 << 20  # allocator and library scratch around a step (measured: 1-3 MiB)
# a step's peak over estimate_tile_bytes with reuse_heap=True (freed tensors' holes): the tiny
# config's decoder at tile 64, whose tensors straddle the 1 MB mmap threshold, measured
# 0.8-2.4 over 512²-2048² and from run to run (tests/test_tiled_vae.py); SD 1.5's decoder at
# tile 64, 512², +17 MB of VmHWM over fresh mappings on an estimate of 74 MB
HEAP_REUSE_FACTOR = 3.0


class ImageSource(Protocol):
    """What :func:`encode_tiled` reads: a (3, H, W) image in [-1, 1], region by region."""

    height: int
    width: int

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor: ...


class TensorImageSource:
    """An in-memory (C, H, W) or (1, C, H, W) tensor as an :class:`ImageSource`."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3:
            raise InvalidInput("image", f"expected a (C, H, W) or (1, C, H, W) tensor, got {tuple(tensor.shape)}")
        self.tensor = tensor
        self.channels, self.height, self.width = (int(s) for s in tensor.shape)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return self.tensor[:, y0:y1, x0:x1]


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Step:
    """One segment: everything between two GroupNorm synchronisation points.

    ``kind``: ``conv`` (3x3, stride 1), ``up`` (nearest x2 then 3x3), ``down`` (pad
    bottom/right by one, 3x3 stride 2), ``kv`` (normalise, write keys and values),
    ``attn`` (normalise, queries against all keys/values, proj_out, + residual).
    Names are module paths inside the AutoencoderKL and canvas names of the plan.
    """

    kind: str
    src: str
    dst: str
    c_in: int
    c_out: int
    conv: str | None = None  # the 3x3 conv (conv kinds) or the AttnBlock (kv / attn)
    norm: str | None = None  # GroupNorm applied with src's whole-canvas statistics
    pre: str | None = None  # 1x1 conv on the raw input, before the zero padding
    post: str | None = None  # 1x1 conv on the output; its first c_out channels are kept
    res: str | None = None  # canvas added at the tile core
    res_conv: str | None = None  # 1x1 conv applied to the residual first
    kv: str | None = None  # attn: the canvas of keys and values (None: attend within the tile)

    @property
    def reads_halo(self) -> bool:
        return self.kind in ("conv", "up", "down")

    @property
    def silu(self) -> bool:
        return self.reads_halo and self.norm is not None


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    shapes: dict[str, tuple[int, int, int]]  # canvas -> (height, width, channels)
    source: str
    sink: str
    c_max: int
    last_use: dict[str, int] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)  # dst written in place over this canvas
    needs_stats: frozenset[str] = frozenset()


class _Builder:
    def __init__(self, shapes: dict[str, tuple[int, int, int]]):
        self.shapes = dict(shapes)
        self.steps: list[Step] = []

    def canvas(self, h: int, w: int, c: int) -> str:
        name = f"a{len(self.shapes)}"
        self.shapes[name] = (h, w, c)
        return name

    def add(self, step: Step) -> str:
        self.steps.append(step)
        return step.dst

    def resblock(self, path: str, x: str, c_in: int, c_out: int) -> str:
        h, w, _ = self.shapes[x]
        mid = self.add(Step("conv", x, self.canvas(h, w, c_out), c_in, c_out,
                            conv=f"{path}.conv1", norm=f"{path}.norm1"))
        return self.add(Step("conv", mid, self.canvas(h, w, c_out), c_out, c_out,
                             conv=f"{path}.conv2", norm=f"{path}.norm2", res=x,
                             res_conv=f"{path}.nin_shortcut" if c_in != c_out else None))

    def mid(self, path: str, x: str, c: int, attention: str) -> str:
        h, w, _ = self.shapes[x]
        x = self.resblock(f"{path}.block_1", x, c, c)
        kv = None
        if attention == "global":
            kv = self.add(Step("kv", x, self.canvas(h, w, 2 * c), c, 2 * c,
                               conv=f"{path}.attn_1", norm=f"{path}.attn_1.norm"))
        x = self.add(Step("attn", x, self.canvas(h, w, c), c, c, conv=f"{path}.attn_1",
                          norm=f"{path}.attn_1.norm", res=x, kv=kv))
        return self.resblock(f"{path}.block_2", x, c, c)


def _finish(b: _Builder, source: str, sink: str, c_max: int) -> Plan:
    last_use: dict[str, int] = {}
    needs_stats = set()
    for i, s in enumerate(b.steps):
        for name in (s.src, s.res, s.kv):
            if name is not None:
                last_use[name] = i
        if s.norm is not None:
            needs_stats.add(s.src)
    alias = {}
    for i, s in enumerate(b.steps):
        r = s.res
        if (r is not None and s.res_conv is None and last_use[r] == i and r != source
                and b.shapes[r] == b.shapes[s.dst] and (s.src != r or not s.reads_halo)):
            alias[s.dst] = r
    return Plan(tuple(b.steps), b.shapes, source, sink, c_max, last_use, alias, frozenset(needs_stats))


def decoder_plan(cfg: VAEConfig, latent_h: int, latent_w: int, attention: str = "global") -> Plan:
    """The segments of the decoder (post_quant_conv included) for an h x w latent."""
    n = len(cfg.ch_mult)
    b = _Builder({"z": (latent_h, latent_w, cfg.embed_dim)})
    c = cfg.ch * cfg.ch_mult[-1]
    x = b.add(Step("conv", "z", b.canvas(latent_h, latent_w, c), cfg.embed_dim, c,
                   conv="decoder.conv_in", pre="post_quant_conv"))
    x = b.mid("decoder.mid", x, c, attention)
    for i in reversed(range(n)):
        c_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            x = b.resblock(f"decoder.up.{i}.block.{j}", x, c, c_out)
            c = c_out
        if i != 0:
            h, w, _ = b.shapes[x]
            x = b.add(Step("up", x, b.canvas(2 * h, 2 * w, c), c, c, conv=f"decoder.up.{i}.upsample.conv"))
    h, w, _ = b.shapes[x]
    b.shapes["out"] = (h, w, cfg.out_channels)
    b.add(Step("conv", x, "out", c, cfg.out_channels, conv="decoder.conv_out", norm="decoder.norm_out"))
    return _finish(b, "z", "out", cfg.ch * max(cfg.ch_mult))


def encoder_plan(cfg: VAEConfig, height: int, width: int, attention: str = "global") -> Plan:
    """The segments of the encoder (quant_conv included, mean kept) for an H x W image."""
    n = len(cfg.ch_mult)
    b = _Builder({"image": (height, width, cfg.in_channels)})
    c = cfg.ch
    x = b.add(Step("conv", "image", b.canvas(height, width, c), cfg.in_channels, c, conv="encoder.conv_in"))
    for i in range(n):
        c_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            x = b.resblock(f"encoder.down.{i}.block.{j}", x, c, c_out)
            c = c_out
        if i != n - 1:
            h, w, _ = b.shapes[x]
            x = b.add(Step("down", x, b.canvas(h // 2, w // 2, c), c, c, conv=f"encoder.down.{i}.downsample.conv"))
    x = b.mid("encoder.mid", x, c, attention)
    h, w, _ = b.shapes[x]
    b.shapes["latent"] = (h, w, cfg.embed_dim)
    b.add(Step("conv", x, "latent", c, cfg.embed_dim, conv="encoder.conv_out", norm="encoder.norm_out",
               post="quant_conv"))
    return _finish(b, "image", "latent", cfg.ch * max(cfg.ch_mult))


def _side(tile_elems: int, channels: int) -> int:
    s = int(math.isqrt(max(1, tile_elems // max(1, channels))))
    return max(8, s - s % 8)


def _bounds(n: int, side: int) -> list[int]:
    k = max(1, -(-n // side))
    return [n * i // k for i in range(k + 1)]


def _step_side(step: Step, tile_elems: int) -> int:
    if step.kind in ("kv", "attn"):
        return _side(tile_elems, step.c_in)
    if step.kind == "down":  # the input region is twice the output side
        return _side(tile_elems, 4 * step.c_in)
    return _side(tile_elems, max(step.c_in, step.c_out))


@dataclass(frozen=True)
class SegmentInfo:
    """Where one segment's tile borders fall (in the pixels of its output canvas)."""

    kind: str
    name: str  # the module it runs
    height: int
    width: int
    channels: int
    tile_side: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def tiles(self) -> int:
        return (len(self.ys) - 1) * (len(self.xs) - 1)


def _segments(plan: Plan, tile_elems: int) -> list[SegmentInfo]:
    out = []
    for s in plan.steps:
        h, w, c = plan.shapes[s.src if s.kind == "kv" else s.dst]
        if s.kind == "kv":
            c = s.c_out
        side = _step_side(s, tile_elems)
        out.append(SegmentInfo(s.kind, s.conv or "", h, w, c, side, tuple(_bounds(h, side)), tuple(_bounds(w, side))))
    return out


def _tile_elems(cfg: VAEConfig, latent_tile: int) -> int:
    return latent_tile * latent_tile * cfg.ch * max(cfg.ch_mult)


def plan_segments(cfg: VAEConfig, height: int, width: int, tile: int, *, kind: str = "decode",
                  attention: str = "global") -> list[SegmentInfo]:
    """The segments of a tiled run and their tile grids; ``height``/``width``/``tile``
    are in latent px for ``kind="decode"`` and in image px for ``kind="encode"``."""
    latent_tile = _check_tile(cfg, tile, kind)
    _check_choice("attention", attention, ATTENTION_MODES)
    plan = decoder_plan(cfg, height, width, attention) if kind == "decode" else encoder_plan(cfg, height, width, attention)
    return _segments(plan, _tile_elems(cfg, latent_tile))


# --------------------------------------------------------------------------- estimates


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_spill_bytes(cfg: VAEConfig, height: int, width: int, dtype: torch.dtype = torch.float32, *,
                         kind: str = "decode", attention: str = "global", output: str = "uint8") -> int:
    """Peak bytes of spill files a tiled run keeps open (``height``/``width`` in latent
    px for ``kind="decode"``, image px for ``"encode"``)."""
    _check_choice("kind", kind, ("decode", "encode"))
    plan = decoder_plan(cfg, height, width, attention) if kind == "decode" else encoder_plan(cfg, height, width, attention)
    item = _itemsize(dtype)

    def size(name: str) -> int:
        h, w, c = plan.shapes[name]
        if name == "out":
            return h * w * c * (1 if output == "uint8" else 4)
        if name == "latent":
            return h * w * c * 4
        return h * w * c * item

    live: dict[str, int] = {plan.sink: size(plan.sink)}  # physical canvas -> bytes; the sink is made first
    owner: dict[str, str] = {}  # logical -> physical
    peak = 0
    for i, s in enumerate(plan.steps):
        if s.dst == plan.sink:
            pass
        elif s.dst in plan.alias:
            owner[s.dst] = owner[plan.alias[s.dst]]
        else:
            owner[s.dst] = s.dst
            live[s.dst] = size(s.dst)
        peak = max(peak, sum(live.values()))
        for name, last in plan.last_use.items():
            if last == i and name in owner:
                phys = owner.pop(name)
                if phys not in owner.values():
                    live.pop(phys, None)
    return peak


def estimate_tile_bytes(cfg: VAEConfig, tile: int, dtype: torch.dtype = torch.float32, *,
                        kind: str = "decode", attention: str = "global") -> int:
    """Peak working memory of one tile step (weights and the interpreter excluded).

    ``tile`` as for :func:`decode_tiled` (latent px) or :func:`encode_tiled` (image px).
    A bound on what the step allocates: the input region with its halo (and its padded
    copy), the output, the residual, a float32 copy where the compute dtype is narrower,
    the step's weights converted to the compute dtype, and for attention the query,
    accumulator and score blocks; plus ``STEP_SLACK_BYTES``.  It does not depend on the
    image size.  Measured on SD 1.5 (fp32, one thread), the real increase of VmHWM over
    the resident weights is 50-80 % of this figure at ``tile`` 32-64 (decode: 26 MB at
    32, 45 MB at 64).
    """
    latent_tile = _check_tile(cfg, tile, kind)
    _check_choice("attention", attention, ATTENTION_MODES)
    e = _tile_elems(cfg, latent_tile)
    item = _itemsize(dtype)
    wide = 0 if item == 4 else 4  # float32 working copy for narrow dtypes
    kitem = 4 if dtype == torch.bfloat16 else item  # kernels may run in float32 (kernel_dtype)
    plan_fn = decoder_plan if kind == "decode" else encoder_plan
    # a nominal 2x2-tile canvas at every level: the steps' structure does not depend on the size
    n = 2 * latent_tile * (1 if kind == "decode" else cfg.downscale)
    plan = plan_fn(cfg, n, n, attention)
    worst = 0
    for s in plan.steps:
        side = _step_side(s, e)
        core = side * side
        if s.kind in ("conv", "up", "down"):
            k = 3
            halo_side = side + 2 if s.kind != "down" else 2 * side + 1
            in_elems = s.c_in * halo_side * halo_side
            if s.kind == "up":
                in_elems += s.c_in * (side // 2 + 2) ** 2
            out_elems = s.c_out * core
            weights = s.c_in * s.c_out * k * k * kitem
            if s.pre or s.post:
                weights += 2 * cfg.z_channels * 2 * cfg.embed_dim * kitem
            res = out_elems + (s.c_in * core if s.res_conv else 0)
            b = (2 * in_elems * item + in_elems * wide + out_elems * (item + wide) + res * kitem
                 + 2 * weights)
        elif s.kind == "kv":
            b = core * s.c_in * (item + 4 + wide) + core * s.c_out * 4 + s.c_in * s.c_out * 4
        else:  # attn
            c = s.c_in
            chunk = max(MIN_KV_CHUNK, e // core)
            b = (core * c * (2 * item + 4 * 4) + core * chunk * 4 * 2 + chunk * 2 * c * (item + 4)
                 + 2 * c * c * 4)
            if s.kv is None:  # keys and values of the tile itself, and their weights
                b += 2 * core * c * 4 + 2 * c * c * 4
        worst = max(worst, b)
    return int(worst) + STEP_SLACK_BYTES


# --------------------------------------------------------------------------- statistics


class _Stats:
    """Running per-channel count / mean / centred sum of squares of one canvas."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def add(self, y: torch.Tensor) -> None:
        """Fold in a (1, C, h, w) tile (as written out: read, not modified)."""
        c = y.shape[1]
        t = y[0].permute(1, 2, 0).reshape(-1, c)  # a view for channels-last tiles
        if t.dtype != torch.float32 and t.dtype != torch.float64:
            t = t.float()
        nb = t.shape[0]
        if nb == 0:
            return
        # one stable pass per tile (torch's two-pass var_mean in float32), merged in float64
        var_b, mean_b = torch.var_mean(t, dim=0, correction=0)
        mean_b = mean_b.cpu().double()
        m2_b = var_b.cpu().double() * nb
        na = self.n
        n = na + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta * delta * (na * nb / n)
        self.n = n

    def group_affine(self, norm: torch.nn.GroupNorm, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias) per channel so that GroupNorm(x) = x * scale + bias (float32; folded
        in float64, as torch's own GroupNorm kernel folds mean, rstd and the affine)."""
        g = norm.num_groups
        c = self.mean.numel()
        cpg = c // g
        mean_c = self.mean.view(g, cpg)
        gmean = mean_c.mean(1)
        gm2 = self.m2.view(g, cpg).sum(1) + self.n * ((mean_c - gmean[:, None]) ** 2).sum(1)
        var = gm2 / (self.n * cpg)
        rstd = (var + norm.eps).rsqrt().repeat_interleave(cpg)
        gamma = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones(c, dtype=torch.float64)
        beta = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros(c, dtype=torch.float64)

        def as4(v: torch.Tensor) -> torch.Tensor:
            return v.float().view(1, c, 1, 1).to(device)

        scale = gamma * rstd
        return as4(scale), as4(beta - gmean.repeat_interleave(cpg) * scale)


# --------------------------------------------------------------------------- execution


def _axis(kind: str, o0: int, o1: int, n_out: int, n_in: int) -> tuple[int, int, int, int, int]:
    """Input range [r0, r1), zero padding (lo, hi) and crop offset for output [o0, o1)."""
    if kind == "conv":
        r0, r1 = max(o0 - 1, 0), min(o1 + 1, n_in)
        return r0, r1, r0 - (o0 - 1), (o1 + 1) - r1, 0
    if kind == "up":  # nearest x2: hi-res rows [a, b) come from low-res rows [a // 2, (b - 1) // 2 + 1)
        a, b = max(o0 - 1, 0), min(o1 + 1, n_out)
        r0, r1 = a // 2, (b - 1) // 2 + 1
        return r0, r1, a - (o0 - 1), (o1 + 1) - b, a - 2 * r0
    if kind == "down":  # pad (0, 1) then stride 2: output o reads input 2o .. 2o + 2
        r0, r1 = 2 * o0, min(2 * o1 + 1, n_in)
        return r0, r1, 0, 2 * o1 + 1 - r1, 0
    return o0, o1, 0, 0, 0


def _read(src, y0: int, y1: int, x0: int, x1: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A region as a (1, C, h, w) tensor that the caller owns (channels-last for spills)."""
    if isinstance(src, SpillArray):
        t = torch.from_numpy(src.read_hwc(y0, y1, x0, x1))
        if src.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        # (1, h, w, C) -> (1, C, h, w) with proper channels-last strides (batch stride h*w*C)
        t = t.unsqueeze(0).permute(0, 3, 1, 2)
        return t.to(device=device, dtype=dtype)
    t = src.read(y0, y1, x0, x1)
    return t.unsqueeze(0).to(device=device, dtype=dtype, memory_format=torch.channels_last, copy=True)


def _normalise(x: torch.Tensor, affine, silu: bool, dtype: torch.dtype) -> torch.Tensor:
    """x * scale + bias (then SiLU) in float32, one pass from any input dtype; returned in ``dtype``."""
    scale, bias = affine
    y = torch.addcmul(bias, x, scale)  # float32 (type promotion), x's channels-last layout
    if silu:
        F.silu(y, inplace=True)
    return y.to(dtype)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) → (h*w, C); a view for channels-last tensors."""
    return x[0].permute(1, 2, 0).reshape(-1, x.shape[1])


def _untokens(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return t.view(1, h, w, t.shape[1]).permute(0, 3, 1, 2)


def _pointwise(x: torch.Tensor, wb) -> torch.Tensor:
    """A 1x1 convolution as a matmul over tokens; keeps the channels-last layout."""
    w, b = wb
    return _untokens(F.linear(_tokens(x), w, b), x.shape[2], x.shape[3])


def _attend(q: torch.Tensor, chunks) -> torch.Tensor:
    """softmax(q kᵀ) v over key/value chunks, with a running max and sum (float32)."""
    nq = q.shape[0]
    m = torch.full((nq, 1), -math.inf, dtype=torch.float32, device=q.device)
    l = torch.zeros((nq, 1), dtype=torch.float32, device=q.device)
    acc = None
    for k, v in chunks:
        s = q @ k.T
        m_new = torch.maximum(m, s.amax(1, keepdim=True))
        s.sub_(m_new).exp_()
        corr = (m - m_new).exp_()
        l.mul_(corr).add_(s.sum(1, keepdim=True))
        if acc is None:
            acc = s @ v
        else:
            acc.mul_(corr).addmm_(s, v)
        m = m_new
        del s
    return acc.div_(l)


def kernel_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype the convolutions and matmuls of a ``dtype`` run execute in.

    ``dtype`` itself, except bfloat16 on a CPU where oneDNN has no bfloat16 kernels (its
    check: AVX512 BW/VL/DQ), where torch falls back to a reference convolution about ten
    times slower than float32 (measured on an AVX2 EPYC, 2 threads: 17 vs 170 GFLOP/s).
    There they run in float32 on the bfloat16 values (as a native kernel does: float32
    accumulation) and every canvas stays bfloat16, so the result and the spill are those of
    a bfloat16 run, rounded once per segment."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return dtype
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return dtype if native is not None and native() else torch.float32


class _Weights:
    """The step's parameters in the kernel dtype (converted once per segment)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device):
        self.model, self.dtype, self.device = model, dtype, device

    def conv(self, path: str):
        m = self.model.get_submodule(path)
        w = m.weight.detach().to(device=self.device, dtype=self.dtype)
        b = None if m.bias is None else m.bias.detach().to(device=self.device, dtype=self.dtype)
        return w, b, m.stride, m.kernel_size

    def linear(self, path: str, dtype: torch.dtype | None = None, keep: int | None = None):
        """A 1x1 conv's weight as an (out, in) matrix, optionally only its first ``keep`` outputs."""
        m = self.model.get_submodule(path)
        w = m.weight.detach()[:keep].to(device=self.device, dtype=dtype or self.dtype)
        b = None if m.bias is None else m.bias.detach()[:keep].to(device=self.device, dtype=dtype or self.dtype)
        return w.reshape(w.shape[0], -1), b


@dataclass
class TiledRunStats:
    """What a tiled run did, filled in when passed as ``stats=`` (benchmarks and tests)."""

    peak_spill_bytes: int = 0  # the most bytes of spill files open at once (the sink included)
    passes: int = 0  # segments run (each one pass over its input canvas)
    tiles: int = 0  # tile steps over all segments


@dataclass
class _Run:
    model: torch.nn.Module
    plan: Plan
    tile_elems: int
    dtype: torch.dtype
    device: torch.device
    spill_dir: str | None
    progress: Callable[[int, int], None] | None
    should_stop: Callable[[], bool] | None
    out_mode: str
    work: torch.dtype  # what the kernels run in (kernel_dtype); canvases are stored in ``dtype``
    reuse_heap: bool = False  # tile tensors from glibc's heap (module docstring)
    done: int = 0
    total: int = 0

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("tiled VAE stopped on request")


def _write(run: _Run, dst: SpillArray, name: str, y0: int, x0: int, y: torch.Tensor) -> None:
    if name == "out":
        if run.out_mode == "uint8":
            y = y.float().clamp_(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
        else:
            y = y.float()
    elif name == "latent":
        y = y.float()
    dst.write(y0, x0, y[0])


def _conv_step(run: _Run, s: Step, src, dst: SpillArray, res, stats_in: _Stats | None,
               stats_out: _Stats | None, seg: SegmentInfo) -> None:
    wts = _Weights(run.model, run.work, run.device)
    w, b, stride, ksize = wts.conv(s.conv)
    if ksize != (3, 3):
        raise ValueError(f"{s.conv}: expected a 3x3 convolution, got {ksize}")
    pre = wts.linear(s.pre) if s.pre else None
    post = wts.linear(s.post, keep=s.c_out) if s.post else None
    rconv = wts.linear(s.res_conv) if s.res_conv else None
    affine = stats_in.group_affine(run.model.get_submodule(s.norm), run.device) if s.norm else None
    hin, win = src.height, src.width
    for ty in range(len(seg.ys) - 1):
        for tx in range(len(seg.xs) - 1):
            run.check()
            y0, y1, x0, x1 = seg.ys[ty], seg.ys[ty + 1], seg.xs[tx], seg.xs[tx + 1]
            ry0, ry1, py0, py1, cy = _axis(s.kind, y0, y1, seg.height, hin)
            rx0, rx1, px0, px1, cx = _axis(s.kind, x0, x1, seg.width, win)
            # normalised inputs convert on the fly (the affine promotes to float32)
            x = _read(src, ry0, ry1, rx0, rx1, run.dtype if affine is not None else run.work, run.device)
            if s.kind == "up":
                hh = (y1 + 1 - py1) - (y0 - 1 + py0)
                ww = (x1 + 1 - px1) - (x0 - 1 + px0)
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")[:, :, cy:cy + hh, cx:cx + ww]
            if pre is not None:
                x = _pointwise(x, pre)
            if affine is not None:
                x = _normalise(x, affine, s.silu, run.work)
            if py0 or py1 or px0 or px1:
                x = F.pad(x, (px0, px1, py0, py1))
            y = F.conv2d(x, w, b, stride=stride)
            del x
            if post is not None:
                y = _pointwise(y, post)
            if res is not None:
                r = _read(res, y0, y1, x0, x1, run.work if rconv is not None else run.dtype, run.device)
                if rconv is not None:
                    r = _pointwise(r, rconv)
                y.add_(r)
                del r
            _write(run, dst, s.dst, y0, x0, y)
            if stats_out is not None:
                stats_out.add(y)
            del y
            run.tick()


def _kv_step(run: _Run, s: Step, src: SpillArray, dst: SpillArray, stats_in: _Stats, seg: SegmentInfo) -> None:
    wts = _Weights(run.model, run.work, run.device)
    wk, bk = wts.linear(f"{s.conv}.k")
    wv, bv = wts.linear(f"{s.conv}.v")
    w, b = torch.cat([wk, wv]), torch.cat([bk, bv])
    del wk, wv
    affine = stats_in.group_affine(run.model.get_submodule(s.norm), run.device)
    for ty in range(len(seg.ys) - 1):
        for tx in range(len(seg.xs) - 1):
            run.check()
            y0, y1, x0, x1 = seg.ys[ty], seg.ys[ty + 1], seg.xs[tx], seg.xs[tx + 1]
            x = _normalise(_read(src, y0, y1, x0, x1, run.dtype, run.device), affine, False, run.work)
            kv = F.linear(_tokens(x), w, b)
            del x
            dst.write(y0, x0, _untokens(kv, y1 - y0, x1 - x0)[0])
            del kv
            run.tick()


def _kv_chunks(kv: SpillArray, c: int, budget: int, device):
    """Stream a (H, W, 2C) key/value canvas as (keys, values) token blocks of ≤ budget."""
    h, w = kv.height, kv.width

    def split(t: torch.Tensor):
        t = t.reshape(-1, 2 * c).to(device=device, dtype=torch.float32)
        return t[:, :c], t[:, c:]

    def load(y0, y1, x0, x1):
        t = torch.from_numpy(kv.read_hwc(y0, y1, x0, x1))
        if kv.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return split(t)

    if budget >= w:
        rows = budget // w
        for y0 in range(0, h, rows):
            yield load(y0, min(h, y0 + rows), 0, w)
    else:
        for y0 in range(h):
            for x0 in range(0, w, budget):
                yield load(y0, y0 + 1, x0, min(w, x0 + budget))


def _attn_step(run: _Run, s: Step, src: SpillArray, kv: SpillArray | None, dst: SpillArray,
               stats_in: _Stats, stats_out: _Stats | None, seg: SegmentInfo) -> None:
    wts = _Weights(run.model, run.dtype, run.device)
    f32 = torch.float32
    c = s.c_in
    wq, bq = wts.linear(f"{s.conv}.q", f32)
    wq, bq = wq * c ** -0.5, bq * c ** -0.5  # fold the softmax scale into the query projection
    wo, bo = wts.linear(f"{s.conv}.proj_out", f32)
    if kv is None:
        wk, bk = wts.linear(f"{s.conv}.k", f32)
        wv, bv = wts.linear(f"{s.conv}.v", f32)
    affine = stats_in.group_affine(run.model.get_submodule(s.norm), run.device)
    for ty in range(len(seg.ys) - 1):
        for tx in range(len(seg.xs) - 1):
            run.check()
            y0, y1, x0, x1 = seg.ys[ty], seg.ys[ty + 1], seg.xs[tx], seg.xs[tx + 1]
            h, w = y1 - y0, x1 - x0
            x = _read(src, y0, y1, x0, x1, run.dtype, run.device)
            xn = _tokens(_normalise(x, affine, False, f32))
            q = F.linear(xn, wq, bq)
            chunk = max(MIN_KV_CHUNK, run.tile_elems // q.shape[0])
            if kv is not None:
                del xn
                out = _attend(q, _kv_chunks(kv, c, chunk, run.device))
            else:
                k, v = F.linear(xn, wk, bk), F.linear(xn, wv, bv)
                del xn
                out = _attend(q, ((k[i:i + chunk], v[i:i + chunk]) for i in range(0, k.shape[0], chunk)))
                del k, v
            del q
            o = F.linear(out, wo, bo)
            del out
            o.add_(_tokens(x).to(f32))
            del x
            y = _untokens(o.to(run.dtype), h, w)
            del o
            dst.write(y0, x0, y[0])
            if stats_out is not None:
                stats_out.add(y)
            del y
            run.tick()


def _execute(run: _Run, sources: dict, sink: SpillArray, stats_out: TiledRunStats | None = None) -> int:
    """Run every step; returns the peak spill bytes held.  Closes what it opened."""
    plan = run.plan
    segs = _segments(plan, run.tile_elems)
    run.total = sum(seg.tiles for seg in segs)
    arrays: dict[str, object] = dict(sources)  # logical canvas -> SpillArray / source
    arrays[plan.sink] = sink
    opened: list[SpillArray] = []
    stats: dict[str, _Stats] = {}
    peak = 0

    def live_bytes() -> int:
        return sum(a.nbytes for a in opened if a._fd >= 0) + sink.nbytes

    try:
        with reused_heap() if run.reuse_heap else contextlib.nullcontext():
            for i, (s, seg) in enumerate(zip(plan.steps, segs)):
                if s.dst == plan.sink:
                    pass
                elif s.dst in plan.alias:
                    arrays[s.dst] = arrays[plan.alias[s.dst]]
                else:
                    h, w, c = plan.shapes[s.dst]
                    arr = SpillArray(h, w, c, run.dtype, run.spill_dir)
                    opened.append(arr)
                    arrays[s.dst] = arr
                peak = max(peak, live_bytes())
                st_out = _Stats(plan.shapes[s.dst][2]) if s.dst in plan.needs_stats else None
                with torch.no_grad():
                    if s.kind == "kv":
                        _kv_step(run, s, arrays[s.src], arrays[s.dst], stats[s.src], seg)
                    elif s.kind == "attn":
                        _attn_step(run, s, arrays[s.src], arrays.get(s.kv) if s.kv else None, arrays[s.dst],
                                   stats[s.src], st_out, seg)
                    else:
                        _conv_step(run, s, arrays[s.src], arrays[s.dst], arrays.get(s.res) if s.res else None,
                                   stats.get(s.src), st_out, seg)
                if st_out is not None:
                    stats[s.dst] = st_out
                for name, last in plan.last_use.items():  # close what no later step reads
                    if last == i and name in arrays and name not in sources:
                        arr = arrays.pop(name)
                        stats.pop(name, None)
                        shared = any(a is arr for a in arrays.values())
                        if isinstance(arr, SpillArray) and arr is not sink and not shared:
                            arr.close()
                if run.reuse_heap:
                    trim_allocator()  # the next segment's tiles have other shapes
    finally:
        for arr in opened:
            arr.close()
    if stats_out is not None:
        stats_out.peak_spill_bytes, stats_out.passes, stats_out.tiles = peak, len(plan.steps), run.total
    return peak


# --------------------------------------------------------------------------- public API


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InvalidInput(name, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _check_tile(cfg: VAEConfig, tile: int, kind: str) -> int:
    _check_choice("kind", kind, ("decode", "encode"))
    if kind == "decode":
        if not isinstance(tile, int) or tile < MIN_LATENT_TILE:
            raise InvalidInput("tile", f"must be an integer of at least {MIN_LATENT_TILE} latent px; got {tile!r}")
        return tile
    f = cfg.downscale
    if not isinstance(tile, int) or tile < MIN_LATENT_TILE * f or tile % f:
        raise InvalidInput("tile", f"must be a multiple of {f} of at least {MIN_LATENT_TILE * f} px; got {tile!r}")
    return tile // f


def _check_dtype(vae: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    dtype = dtype or next(vae.parameters()).dtype
    if dtype not in DTYPES:
        raise InvalidInput("dtype", f"must be one of {', '.join(map(str, DTYPES))}; got {dtype}")
    return dtype


def decode_tiled(vae: torch.nn.Module, z: torch.Tensor, *, tile: int = 64, dtype: torch.dtype | None = None,
                 spill_dir: str | None = None, attention: str = "global", output: str = "uint8",
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, stats: TiledRunStats | None = None,
                 reuse_heap: bool = False) -> SpillArray:
    """Decode ``z`` (1, embed_dim, h, w), *unscaled*, to an (8h, 8w, 3) :class:`SpillArray`.

    ``vae``: an :class:`~lib_hrlr.models.vae.AutoencoderKL` with its decoder (``.cfg``,
    ``.post_quant_conv``, ``.decoder``).  ``tile``: latent px of the widest layers' work
    unit (module docstring).  ``dtype``: compute and spill dtype (default: the weights').
    ``output="uint8"``: pixels rounded from [-1, 1] to 0..255 (what a PNG writer reads with
    ``read_rows``); ``"float"``: float32 in [-1, 1], unclamped.  ``progress(done, total)``
    after each tile of each segment; ``should_stop()`` before each tile: True raises
    :class:`~lib_hrlr.errors.Interrupted`.  ``stats``: filled with what the run did
    (:class:`TiledRunStats`).  ``reuse_heap``: tile tensors from glibc's heap, faster, with
    a step peak up to :data:`HEAP_REUSE_FACTOR` x :func:`estimate_tile_bytes` (module
    docstring).  The caller closes the returned array.
    """
    if not getattr(vae, "has_decoder", False):
        raise InvalidInput("vae", "needs an AutoencoderKL built with its decoder")
    cfg: VAEConfig = vae.cfg
    _check_tile(cfg, tile, "decode")
    _check_choice("attention", attention, ATTENTION_MODES)
    _check_choice("output", output, OUTPUTS)
    dtype = _check_dtype(vae, dtype)
    if z.ndim != 4 or z.shape[0] != 1 or z.shape[1] != cfg.embed_dim or min(z.shape[2:]) < 1:
        raise InvalidInput("latent", f"expected a (1, {cfg.embed_dim}, h, w) tensor; got {tuple(z.shape)}")
    h, w = int(z.shape[2]), int(z.shape[3])
    plan = decoder_plan(cfg, h, w, attention)
    device = next(vae.parameters()).device
    oh, ow, oc = plan.shapes["out"]
    sink = SpillArray(oh, ow, oc, torch.uint8 if output == "uint8" else torch.float32, spill_dir)
    run = _Run(vae, plan, _tile_elems(cfg, tile), dtype, device, spill_dir, progress, should_stop, output,
               kernel_dtype(dtype, device), reuse_heap)
    try:
        _execute(run, {"z": TensorImageSource(z.detach().float()[0])}, sink, stats)
    except BaseException:
        sink.close()
        raise
    return sink


def encode_tiled(vae: torch.nn.Module, image: ImageSource, *, tile: int = 512, dtype: torch.dtype | None = None,
                 spill_dir: str | None = None, attention: str = "global",
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, stats: TiledRunStats | None = None,
                 reuse_heap: bool = False) -> torch.Tensor:
    """Encode an image source to its latent mean (1, embed_dim, H/8, W/8), *unscaled*, float32.

    ``image``: ``.height``, ``.width`` (multiples of 8) and ``.read(y0, y1, x0, x1)`` →
    (3, h, w) float32 in [-1, 1] (e.g. :class:`TensorImageSource`).  ``tile`` in image px
    (512 ≙ ``decode_tiled(tile=64)``).  Other arguments as for :func:`decode_tiled`.
    """
    if not getattr(vae, "has_encoder", False):
        raise InvalidInput("vae", "needs an AutoencoderKL built with its encoder")
    cfg: VAEConfig = vae.cfg
    latent_tile = _check_tile(cfg, tile, "encode")
    _check_choice("attention", attention, ATTENTION_MODES)
    dtype = _check_dtype(vae, dtype)
    f = cfg.downscale
    hh, ww = int(image.height), int(image.width)
    if hh < f or ww < f or hh % f or ww % f:
        raise InvalidInput("image", f"height and width must be positive multiples of {f}; got {hh}x{ww}")
    plan = encoder_plan(cfg, hh, ww, attention)
    device = next(vae.parameters()).device
    lh, lw, lc = plan.shapes["latent"]
    with SpillArray(lh, lw, lc, torch.float32, spill_dir) as sink:
        run = _Run(vae, plan, _tile_elems(cfg, latent_tile), dtype, device, spill_dir, progress, should_stop, "float",
                   kernel_dtype(dtype, device), reuse_heap)
        _execute(run, {"image": image}, sink, stats)
        return sink.to_tensor()
