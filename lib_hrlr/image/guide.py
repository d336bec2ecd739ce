"""The upscaled guide image, computed region by region from the small base image.

:class:`UpscaledImageSource` stands for the base image Lanczos-resized to the target
size without ever building that image: ``read(y0, y1, x0, x1)`` computes only the
requested region, with a separable Lanczos-3 resampler that follows Pillow's own
arithmetic (filter windows centred on the *whole-image* sample grid, coefficients
normalised and rounded to 22-bit fixed point, horizontal pass first and rounded to
8 bits, then the vertical pass).  So a region is bit-for-bit the same crop of
``image.resize((width, height), Image.LANCZOS)``, wherever its borders fall; Pillow's
own ``resize(box=...)`` recomputes the window centres from the box and can differ from
the whole-image result by a level or two at some pixels.

Values are float32 in [-1, 1], shape (3, h, w): the ``image_source`` interface that the
tiled VAE encoders read.  Memory: the base image plus a few region-sized arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidInput

MAX_SIDE = 1 << 16
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
LANCZOS_SUPPORT = 3.0


def lanczos3(x: np.ndarray) -> np.ndarray:
    """sinc(x) * sinc(x / 3) on [-3, 3), zero outside (Pillow's window)."""

    def sinc(v):
        pv = v * math.pi
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(v == 0.0, 1.0, np.sin(pv) / pv)

    return np.where((x >= -LANCZOS_SUPPORT) & (x < LANCZOS_SUPPORT), sinc(x) * sinc(x / 3.0), 0.0)


@dataclass(frozen=True)
class Taps:
    """Fixed-point filter taps of a run of output samples along one axis."""

    first: np.ndarray  # (n,) int64: first input index of each output sample's window
    count: np.ndarray  # (n,) int64: window length (taps past it have weight 0)
    weights: np.ndarray  # (n, ksize) int64, in units of 2**-PRECISION_BITS

    @property
    def span(self) -> tuple[int, int]:
        """Input indices [lo, hi) read by these samples."""
        return int(self.first.min()), int((self.first + self.count).max())


def lanczos_taps(in_size: int, out_size: int, o0: int, o1: int) -> Taps:
    """Pillow's coefficients (``precompute_coeffs`` + ``normalize_coeffs_8bpc``) for outputs
    o0..o1 of a whole-axis resize from ``in_size`` to ``out_size``."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = (np.arange(o0, o1, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.floor(centre - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.floor(centre + support + 0.5).astype(np.int64), in_size) - xmin
    t = np.arange(ksize, dtype=np.int64)
    inside = t[None, :] < xmax[:, None]
    k = lanczos3(((t[None, :] + xmin[:, None]) - centre[:, None] + 0.5) * (1.0 / filterscale))
    k = np.where(inside, k, 0.0)
    total = np.zeros(len(centre))
    for j in range(ksize):  # sequential, in Pillow's order
        total = total + k[:, j]
    k = np.where(total[:, None] != 0.0, k / np.where(total == 0.0, 1.0, total)[:, None], k)
    fixed = k * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int64)
    return Taps(first=xmin, count=xmax, weights=fixed)


def _apply(src: np.ndarray, taps: Taps, axis: int, offset: int) -> np.ndarray:
    """One 8-bit pass along ``axis`` (0: rows, 1: columns) of (h, w, 3) uint8 ``src``, whose
    index 0 along that axis is input index ``offset`` (Pillow's ``ImagingResample*_8bpc``)."""
    n, ksize = taps.weights.shape
    idx = np.clip(taps.first[:, None] - offset + np.arange(ksize)[None, :], 0, src.shape[axis] - 1)
    shape = (src.shape[0], n, 3) if axis == 1 else (n, src.shape[1], 3)
    acc = np.full(shape, 1 << (PRECISION_BITS - 1), dtype=np.int64)
    for j in range(ksize):  # taps past a window have weight 0, whatever index they clip to
        if axis == 1:
            acc += src[:, idx[:, j], :].astype(np.int64) * taps.weights[None, :, j, None]
        else:
            acc += src[idx[:, j], :, :].astype(np.int64) * taps.weights[:, j, None, None]
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def uint8_to_signed_unit(hwc: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8 pixels as the VAE's (3, h, w) float32 input in [-1, 1]."""
    out = np.ascontiguousarray(hwc.transpose(2, 0, 1)).astype(np.float32)
    out /= np.float32(127.5)
    out -= np.float32(1.0)
    return torch.from_numpy(out)


class UpscaledImageSource:
    """``image`` (PIL, base size) resized with Lanczos to ``width`` x ``height``, read by region."""

    def __init__(self, image: Image.Image, width: int, height: int):
        if not isinstance(image, Image.Image):
            raise InvalidInput("image", f"must be a PIL.Image, got {type(image).__name__}")
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
                raise InvalidInput(name, f"must be an integer from 1 to {MAX_SIDE}, got {v!r}")
        if image.mode != "RGB":
            try:
                image = image.convert("RGB")
            except (ValueError, OSError) as e:
                raise InvalidInput("image", f"mode {image.mode} cannot be converted to RGB ({e})") from e
        self._base = np.asarray(image, dtype=np.uint8)  # (bh, bw, 3), the small base image
        self.width, self.height, self.channels = width, height, 3

    @property
    def base_size(self) -> tuple[int, int]:
        return self._base.shape[1], self._base.shape[0]

    def read_uint8(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The region as (h, w, 3) uint8, equal to the same crop of Pillow's whole-image resize."""
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise IndexError(f"region y[{y0}:{y1}] x[{x0}:{x1}] outside {self.height}x{self.width} or empty")
        bh, bw = self._base.shape[:2]
        # Pillow skips a pass whose axis keeps its size; so do we (it is not an exact identity)
        if self.height != bh:
            vt = lanczos_taps(bh, self.height, y0, y1)
            r0, r1 = vt.span
        else:
            vt, (r0, r1) = None, (y0, y1)
        rows = self._base[r0:r1]
        if self.width != bw:
            rows = _apply(rows, lanczos_taps(bw, self.width, x0, x1), axis=1, offset=0)
        else:
            rows = rows[:, x0:x1]
        if vt is not None:
            rows = _apply(rows, vt, axis=0, offset=r0)
        return np.ascontiguousarray(rows)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """The region as a (3, h, w) float32 tensor in [-1, 1]."""
        return uint8_to_signed_unit(self.read_uint8(y0, y1, x0, x1))

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0..y1 as (h, width, 3) uint8: lets the guide itself be written as a PNG."""
        return self.read_uint8(y0, y1, 0, self.width)
