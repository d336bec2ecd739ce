"""Tiled TAESD decode and encode: exact, with memory independent of the image size.

TAESD has no normalisation and no attention, so each output pixel depends only on a
bounded window of the input: its *receptive field*.  We compute that window from the
layers themselves (:func:`receptive_halo`): 19 latent px each side for the decoder,
145 px left/above and 138 px right/below for the encoder.  Each tile is run on its core
plus that halo (clipped at the image edges, where the network's own zero padding then
matches the whole-image run), and only the core is kept.  Because the halo covers the
whole receptive field, the result equals the untiled run up to float summation order;
no blending is needed and there are no seams.

Work is kept small by cropping as we go: after every top-level layer the activation is
cut down to what the remaining layers still need for the core (tracked in absolute
coordinates, start aligned to the next stride), so a decoder tile carries its 19-latent
halo only at latent resolution and just 5 px of it at full resolution.  A validity
interval is tracked alongside; if the core ever depended on a pixel the tile could not
compute exactly, we raise instead of returning a wrong image.

Conventions (those of ``lib_hrlr.vae.tiled_vae`` for the full SD VAE, so the pipeline
can use either the same way: ``decode_tiled(model, z, ...)``, ``encode_tiled(model, image, ...)``):

* latents are **unscaled** SD latents ``z`` (the SD VAE's own encoder output); TAESD
  works on ``z * scaling_factor`` (0.18215 for SD 1.x/2.x) and we convert both ways;
* decode writes into a :class:`~lib_hrlr.image.spill.SpillArray` of shape (H, W, 3):
  ``output="uint8"`` gives 0..255 (what :func:`lib_hrlr.image.png.write_png` reads),
  ``output="float"`` gives float32 in [-1, 1] (unclamped, as the full VAE's);
* encode reads an image source with ``.height``, ``.width`` and
  ``.read(y0, y1, x0, x1) -> (3, h, w)`` float32 in [-1, 1], and returns a (1, 4, H/8, W/8)
  float32 tensor;
* ``tile`` is the core size: latent px for decode (default 32), image px for encode
  (default 256, a multiple of 8), as in the full VAE's functions;
* ``progress(done, total)`` is called after each tile; ``should_stop()`` is polled before
  each tile and a true answer raises :class:`lib_hrlr.errors.Interrupted`.

Memory: one tile's activations (64 channels) plus the output canvas, which lives on disk.
Measured peaks are in ``tests/test_taesd.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import Interrupted, InvalidInput
from ..image.spill import SpillArray
from ..models.taesd import Block, SoftClamp, TAESDDecoder, TAESDEncoder, Upsample2x

SD_SCALING_FACTOR = 0.18215
LATENT_FACTOR = 8
OUTPUTS = ("uint8", "float")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Op:
    """One spatial operation along one axis: a convolution or an upsampling.

    ``conv``: output J reads inputs s*J - p .. s*J - p + k - 1 (zero outside the image).
    ``up``: output J reads input J // f (nearest neighbour).
    """

    kind: str  # "conv" | "up"
    k: int = 1
    s: int = 1
    p: int = 0
    f: int = 1

    def out_size(self, n: int) -> int:
        if self.kind == "up":
            return n * self.f
        return (n + 2 * self.p - self.k) // self.s + 1

    def need(self, j0: int, j1: int) -> tuple[int, int]:
        """Inclusive input interval read by the inclusive output interval [j0, j1]."""
        if self.kind == "up":
            return j0 // self.f, j1 // self.f
        return self.s * j0 - self.p, self.s * j1 - self.p + self.k - 1

    def origin(self, o: int) -> int:
        """Absolute index of local output 0 when local input 0 sits at absolute ``o``."""
        if self.kind == "up":
            return o * self.f
        if o % self.s:
            raise AssertionError(f"tile origin {o} not aligned to stride {self.s}")
        return o // self.s

    def valid(self, v0: int, v1: int, n_in: int, n_out: int) -> tuple[int, int]:
        """Outputs computed exactly from an input exact on [v0, v1] (inclusive) of an axis of
        ``n_in`` pixels: those whose window, cut to the image, lies inside [v0, v1]."""
        if self.kind == "up":
            return v0 * self.f, v1 * self.f + self.f - 1
        lo = 0 if v0 <= 0 else -((-(v0 + self.p)) // self.s)  # ceil((v0 + p) / s)
        hi = n_out - 1 if v1 >= n_in - 1 else (v1 + self.p - self.k + 1) // self.s
        return lo, hi


def layer_ops(module: nn.Module) -> tuple[Op, ...]:
    """The spatial operations of one top-level TAESD layer, in order (pointwise layers: none)."""
    if isinstance(module, nn.Conv2d):
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        if len({k[0], k[1]}) != 1 or len({s[0], s[1]}) != 1 or not isinstance(p, tuple) or p[0] != p[1] or d != (1, 1):
            raise TypeError(f"unsupported convolution geometry: {module}")
        return (Op("conv", k=k[0], s=s[0], p=p[0]),)
    if isinstance(module, Block):
        return tuple(op for m in module.conv for op in layer_ops(m))
    if isinstance(module, Upsample2x):
        return (Op("up", f=module.factor),)
    if isinstance(module, (nn.ReLU, SoftClamp)):
        return ()
    raise TypeError(f"no tiling geometry for layer {type(module).__name__}")


def _stride(ops: Sequence[Op]) -> int:
    s = 1
    for op in ops:
        if op.kind == "conv":
            s *= op.s
    return s


@dataclass(frozen=True)
class AxisPlan:
    """How one tile is computed along one axis: for each layer boundary i (0 = network
    input, len(layers) = output) the absolute inclusive interval kept there."""

    keep: tuple[tuple[int, int], ...]
    core: tuple[int, int]  # inclusive output interval that is written


def plan_axis(layers: Sequence[tuple[Op, ...]], n_in: int, core0: int, core1: int) -> AxisPlan:
    """Intervals to keep after each layer so that output [core0, core1) is exact."""
    sizes = [n_in]
    for ops in layers:
        n = sizes[-1]
        for op in ops:
            n = op.out_size(n)
        sizes.append(n)
    if not (0 <= core0 < core1 <= sizes[-1]):
        raise AssertionError(f"core [{core0}, {core1}) outside output of {sizes[-1]}")
    keep = [(core0, core1 - 1)]
    for i in range(len(layers) - 1, -1, -1):
        j0, j1 = keep[0]
        for op in reversed(layers[i]):
            j0, j1 = op.need(j0, j1)
        j0, j1 = max(j0, 0), min(j1, sizes[i] - 1)
        s = _stride(layers[i])
        keep.insert(0, (j0 - j0 % s, j1))
    return AxisPlan(keep=tuple(keep), core=(core0, core1 - 1))


def receptive_halo(model: nn.Sequential) -> tuple[int, int]:
    """Input px before and after an input interval that the outputs over it depend on,
    computed from the layers (interior of a large image, no edge effects).

    TAESD decoder: (19, 19) latent px; encoder: (145, 138) image px.
    """
    layers = [layer_ops(m) for m in model]
    stride = up = 1
    for ops in layers:
        for op in ops:
            stride *= op.s if op.kind == "conv" else 1
            up *= op.f if op.kind == "up" else 1
    a, b = 1024 * stride, 1088 * stride  # input interval [a, b), aligned to the total stride
    j0, j1 = a * up // stride, b * up // stride - 1  # the output interval it maps to
    for ops in reversed(layers):
        for op in reversed(ops):
            j0, j1 = op.need(j0, j1)
    return a - j0, j1 - (b - 1)


# --------------------------------------------------------------------------- running


def _check_hooks(progress, should_stop) -> None:
    if progress is not None and not callable(progress):
        raise InvalidInput("progress", "must be a callable progress(done, total) or None")
    if should_stop is not None and not callable(should_stop):
        raise InvalidInput("should_stop", "must be a callable returning bool, or None")


def _check_tile(tile) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise InvalidInput("tile", f"must be a positive integer number of latent px, got {tile!r}")
    return tile


def _spans(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _run_tile(model: nn.Sequential, layers, x: torch.Tensor, py: AxisPlan, px: AxisPlan,
              n_y: int, n_x: int) -> torch.Tensor:
    """Run the layers on ``x`` (which covers ``py.keep[0]`` x ``px.keep[0]`` of an input of
    ``n_y`` x ``n_x``), cropping to the planned intervals after each layer; return the core,
    after checking that it was computed exactly."""
    oy, ox = py.keep[0][0], px.keep[0][0]  # absolute position of the activation's (0, 0)
    vy, vx = py.keep[0], px.keep[0]  # absolute inclusive intervals computed exactly
    for i, (module, ops) in enumerate(zip(model, layers)):
        x = module(x)
        for op in ops:
            vy = op.valid(*vy, n_y, op.out_size(n_y))
            vx = op.valid(*vx, n_x, op.out_size(n_x))
            n_y, n_x = op.out_size(n_y), op.out_size(n_x)
            oy, ox = op.origin(oy), op.origin(ox)
        (ky0, ky1), (kx0, kx1) = py.keep[i + 1], px.keep[i + 1]
        h, w = x.shape[-2:]
        if not (oy <= ky0 and ky1 < oy + h and ox <= kx0 and kx1 < ox + w):
            raise AssertionError("tile plan: kept interval outside the computed activation")
        x = x[..., ky0 - oy:ky1 - oy + 1, kx0 - ox:kx1 - ox + 1]
        oy, ox = ky0, kx0
        vy, vx = (max(vy[0], ky0), min(vy[1], ky1)), (max(vx[0], kx0), min(vx[1], kx1))
    (cy0, cy1), (cx0, cx1) = py.core, px.core
    if not (vy[0] <= cy0 and cy1 <= vy[1] and vx[0] <= cx0 and cx1 <= vx[1]):
        raise AssertionError("tile plan: the core depends on pixels outside the tile's halo")
    return x[..., cy0 - oy:cy1 - oy + 1, cx0 - ox:cx1 - ox + 1]


def _tiles(model: nn.Sequential, in_h: int, in_w: int, out_spans_y, out_spans_x):
    """(plan_y, plan_x) for every tile, row-major."""
    layers = [layer_ops(m) for m in model]
    plans_y = [plan_axis(layers, in_h, a, b) for a, b in out_spans_y]
    plans_x = [plan_axis(layers, in_w, a, b) for a, b in out_spans_x]
    return layers, [(py, px) for py in plans_y for px in plans_x]


def decode_tiled(
    decoder: TAESDDecoder,
    z: torch.Tensor,
    *,
    tile: int = 32,
    output: str = "uint8",
    scaling_factor: float = SD_SCALING_FACTOR,
    spill_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SpillArray:
    """Decode ``z`` (1, 4, h, w), *unscaled* SD latents, into a SpillArray (8h, 8w, 3).

    ``tile``: core size in latent px.  ``output="uint8"``: 0..255 (what the PNG writer
    reads); ``output="float"``: float32 in [-1, 1], unclamped (TAESD can overshoot a
    little).  Exact (equal to the untiled decoder up to float rounding) for any ``tile``,
    which only trades memory against the halo's extra work.  The caller closes the array.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[0] != 1 or z.shape[1] != 4:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InvalidInput("latent", f"must be a tensor of shape (1, 4, h, w), got {got}")
    if output not in OUTPUTS:
        raise InvalidInput("output", f"'{output}' is not one of: {', '.join(OUTPUTS)}")
    tile = _check_tile(tile)
    _check_hooks(progress, should_stop)
    h, w = int(z.shape[2]), int(z.shape[3])
    H, W = h * LATENT_FACTOR, w * LATENT_FACTOR
    device, dtype = _model_place(decoder)
    spans_y = [(a * LATENT_FACTOR, b * LATENT_FACTOR) for a, b in _spans(h, tile)]
    spans_x = [(a * LATENT_FACTOR, b * LATENT_FACTOR) for a, b in _spans(w, tile)]
    layers, jobs = _tiles(decoder, h, w, spans_y, spans_x)
    out = SpillArray(H, W, 3, torch.uint8 if output == "uint8" else torch.float32, directory=spill_dir)
    try:
        with torch.inference_mode():
            for done, (py, px) in enumerate(jobs):
                if should_stop is not None and should_stop():
                    raise Interrupted("TAESD decode stopped by request")
                (y0, y1), (x0, x1) = py.keep[0], px.keep[0]
                zt = z[:, :, y0:y1 + 1, x0:x1 + 1].to(device=device, dtype=dtype) * scaling_factor
                zt = zt.contiguous(memory_format=torch.channels_last)
                rgb = _run_tile(decoder, layers, zt, py, px, h, w)[0]
                if output == "uint8":
                    rgb = rgb.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)
                else:
                    rgb = rgb.float().mul_(2).sub_(1)
                out.write(py.core[0], px.core[0], rgb)
                del rgb, zt
                if progress is not None:
                    progress(done + 1, len(jobs))
    except BaseException:
        out.close()
        raise
    return out


def _segments(model: nn.Sequential) -> list[nn.Sequential]:
    """``model`` cut after each strided convolution: the pieces between resolutions.

    Run one piece over the whole image before the next, and a tile needs only that piece's
    halo (TAESD's encoder: 5 px at full resolution instead of the whole network's 145), at
    the price of keeping the activation between pieces, which lives on disk."""
    out, cur = [], []
    for m in model:
        cur.append(m)
        if isinstance(m, nn.Conv2d) and m.stride[0] > 1:
            out.append(nn.Sequential(*cur))
            cur = []
    if cur:
        out.append(nn.Sequential(*cur))
    return out


def _out_size(layers, n: int) -> int:
    for ops in layers:
        for op in ops:
            n = op.out_size(n)
    return n


def _run_segment(segment: nn.Sequential, read, in_h: int, in_w: int, tile: int, write, *,
                 should_stop, tick) -> None:
    """Run ``segment`` over an ``in_h`` x ``in_w`` input in tiles of about ``tile`` input px.

    ``read(y0, y1, x0, x1)`` gives the input region as a (1, C, h, w) tensor on the model's
    device and dtype; ``write(y, x, chw)`` stores a tile's exact output core."""
    layers = [layer_ops(m) for m in segment]
    out_h, out_w = _out_size(layers, in_h), _out_size(layers, in_w)
    core = max(1, tile // _stride([op for ops in layers for op in ops]))
    _, jobs = _tiles(segment, in_h, in_w, _spans(out_h, core), _spans(out_w, core))
    for py, px in jobs:
        if should_stop is not None and should_stop():
            raise Interrupted("TAESD encode stopped by request")
        (y0, y1), (x0, x1) = py.keep[0], px.keep[0]
        x = read(y0, y1 + 1, x0, x1 + 1).contiguous(memory_format=torch.channels_last)
        y = _run_tile(segment, layers, x, py, px, in_h, in_w)
        del x
        write(py.core[0], px.core[0], y[0])
        del y
        tick()


def _segment_tiles(segments: Sequence[nn.Sequential], in_h: int, in_w: int, tile: int) -> int:
    """How many tiles :func:`_run_segment` will run over all ``segments`` (for progress)."""
    total = 0
    for seg in segments:
        layers = [layer_ops(m) for m in seg]
        out_h, out_w = _out_size(layers, in_h), _out_size(layers, in_w)
        core = max(1, tile // _stride([op for ops in layers for op in ops]))
        total += len(_spans(out_h, core)) * len(_spans(out_w, core))
        in_h, in_w = out_h, out_w
    return total


def encode_tiled(
    encoder: TAESDEncoder,
    image,
    *,
    tile: int = 512,
    scaling_factor: float = SD_SCALING_FACTOR,
    spill_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Encode ``image`` into *unscaled* SD latents (1, 4, H/8, W/8), float32.

    ``image``: ``.height``, ``.width`` (multiples of 8) and ``.read(y0, y1, x0, x1)`` ->
    (3, h, w) float32 in [-1, 1] (e.g. :class:`lib_hrlr.image.guide.UpscaledImageSource`).

    The encoder runs one resolution at a time (:func:`_segments`): each piece goes over the
    whole image in tiles of ``tile`` px of its own input (a multiple of 8; memory grows with
    its square), writing its 64-channel output to a disk-backed
    :class:`~lib_hrlr.image.spill.SpillArray` in ``spill_dir`` that the next piece reads.
    Tiles carry only their piece's few px of halo, so the work is that of the untiled
    encoder plus a few percent, and the result equals it up to float rounding.
    """
    for attr in ("height", "width", "read"):
        if not hasattr(image, attr):
            raise InvalidInput("image", f"needs .height, .width and .read(y0, y1, x0, x1); it has no .{attr}")
    H, W = int(image.height), int(image.width)
    if H < LATENT_FACTOR or W < LATENT_FACTOR or H % LATENT_FACTOR or W % LATENT_FACTOR:
        raise InvalidInput("image", f"height and width must be positive multiples of {LATENT_FACTOR} px, got {W}x{H}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < LATENT_FACTOR or tile % LATENT_FACTOR:
        raise InvalidInput("tile", f"must be a positive multiple of {LATENT_FACTOR} image px, got {tile!r}")
    _check_hooks(progress, should_stop)
    device, dtype = _model_place(encoder)
    segments = _segments(encoder)
    total = _segment_tiles(segments, H, W, tile)
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    def read_image(y0, y1, x0, x1):
        region = image.read(y0, y1, x0, x1)
        if tuple(region.shape) != (3, y1 - y0, x1 - x0):
            raise InvalidInput("image", f"read({y0}, {y1}, {x0}, {x1}) returned shape "
                                        f"{tuple(region.shape)}, expected (3, {y1 - y0}, {x1 - x0})")
        return ((region.to(device=device, dtype=torch.float32) + 1) * 0.5).to(dtype).unsqueeze(0)

    latent = torch.empty(1, 4, H // LATENT_FACTOR, W // LATENT_FACTOR, dtype=torch.float32)

    def write_latent(y, x, chw):
        latent[0, :, y:y + chw.shape[1], x:x + chw.shape[2]] = chw.float().cpu() / scaling_factor

    spill_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    read, in_h, in_w = read_image, H, W
    arrays: list[SpillArray] = []
    try:
        with torch.inference_mode():
            for i, seg in enumerate(segments):
                layers = [layer_ops(m) for m in seg]
                out_h, out_w = _out_size(layers, in_h), _out_size(layers, in_w)
                if i == len(segments) - 1:
                    _run_segment(seg, read, in_h, in_w, tile, write_latent, should_stop=should_stop, tick=tick)
                    break
                out = SpillArray(out_h, out_w, seg[-1].out_channels, spill_dtype, directory=spill_dir)
                arrays.append(out)
                _run_segment(seg, read, in_h, in_w, tile, out.write, should_stop=should_stop, tick=tick)
                if len(arrays) > 1:
                    arrays[-2].close()  # read in full by this piece
                read, in_h, in_w = _spill_reader(out, device, dtype), out_h, out_w
    finally:
        for arr in arrays:
            arr.close()
    return latent


def estimate_encode_spill_bytes(encoder: TAESDEncoder, height: int, width: int) -> int:
    """Peak bytes of spill files :func:`encode_tiled` keeps open for a ``height x width`` image:
    each piece's output but the last is spilled in the encoder's dtype, and at most two are
    open at once (the one being read and the one being written).  ``encoder`` may live on
    ``meta``."""
    _, dtype = _model_place(encoder)
    spill_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    item = torch.empty((), dtype=spill_dtype).element_size()
    sizes, h, w = [], int(height), int(width)
    for seg in _segments(encoder)[:-1]:
        layers = [layer_ops(m) for m in seg]
        h, w = _out_size(layers, h), _out_size(layers, w)
        sizes.append(h * w * seg[-1].out_channels * item)
    return max([a + b for a, b in zip(sizes, sizes[1:])] + sizes + [0])


def _spill_reader(arr: SpillArray, device: torch.device, dtype: torch.dtype):
    def read(y0, y1, x0, x1):
        return arr.read(y0, y1, x0, x1).to(device=device, dtype=dtype).unsqueeze(0)
    return read
