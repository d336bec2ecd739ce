"""The user's own image as the start of a run (``hrlr upscale``, ``generate --init-image``).

:func:`probe` reads only the header (size, format, frames, alpha) so that sizes can be
planned and bad files refused before anything heavy starts.  :func:`load_init_image`
decodes the file once, flattens alpha onto white, and Lanczos-resizes it to the target
size into a disk-backed :class:`~lib_hrlr.image.spill.SpillArray`, band by band:

* the decoded image is copied into a uint8 spill file in strips of rows and dropped, so
  the largest thing held is Pillow's own decoded copy (4 bytes per pixel: 64 MB for a
  4096² input) for the moment of the copy;
* each band of output rows is computed from the source rows its Lanczos windows need
  (read back from the spill file), with Pillow's own fixed-point arithmetic
  (:mod:`lib_hrlr.image.guide`), so the result equals ``image.resize((w, h), LANCZOS)``
  bit for bit while memory stays a few MB whatever the sizes.

The result is an image source for the tiled VAE encoders (``read`` in [-1, 1]) and a row
source for the PNG writer (``read_rows``).  Every refusal is an :class:`InvalidInput`
naming the field (``init_image``, ``width``/``height``, ``scale``) and what is allowed.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import InvalidInput
from ..weights.file_hash import sha256_file
from .guide import _apply, lanczos_taps, uint8_to_signed_unit
from .spill import SpillArray

FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
ALLOWED = "a PNG, JPEG or WebP still image"
FIELD = "init_image"
BAND_BYTES = 8 << 20  # int64 accumulator bytes per resize band
STRIP_BYTES = 4 << 20  # bytes of decoded rows copied per strip
MULTIPLE = 8  # the VAE's downscale factor: target sides are multiples of it
FLATTEN_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Probe:
    """What the header says: enough to plan sizes and refuse bad files before decoding."""

    path: str
    width: int  # as displayed: after the EXIF orientation (a phone's portrait JPEG is taller than wide)
    height: int
    format: str  # "PNG" | "JPEG" | "WebP"
    mode: str
    has_alpha: bool
    orientation: int = 1  # EXIF orientation tag (1: as stored)


def _open(path: str):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidInput(FIELD, f"must be the path of {ALLOWED}, got {path!r}")
    if not os.path.isfile(path):
        raise InvalidInput(FIELD, f"'{path}' does not exist or is not a file; give {ALLOWED}")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise InvalidInput(FIELD, f"'{path}' is not a readable image; give {ALLOWED}") from None
    except Image.DecompressionBombError as e:
        raise InvalidInput(FIELD, f"'{path}' is too large to decode safely ({e})") from None
    except OSError as e:
        raise InvalidInput(FIELD, f"cannot read '{path}' ({e}); give {ALLOWED}") from None


def _has_alpha(img) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _check(img, path: str) -> Probe:
    fmt = FORMATS.get(img.format or "")
    if fmt is None:
        raise InvalidInput(FIELD, f"'{path}' is a {img.format or 'unknown'} image; allowed are PNG, JPEG and WebP")
    frames = int(getattr(img, "n_frames", 1) or 1)
    if getattr(img, "is_animated", False) or frames > 1:
        raise InvalidInput(FIELD, f"'{path}' is animated ({frames} frames); give {ALLOWED} (export one frame)")
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidInput(FIELD, f"'{path}' has no pixels ({w}x{h})")
    orientation = _orientation(img)
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees when displayed
        w, h = h, w
    return Probe(str(path), w, h, fmt, img.mode, _has_alpha(img), orientation)


EXIF_ORIENTATION = 0x0112


def _orientation(img) -> int:
    try:
        v = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except (ValueError, TypeError, OSError, SyntaxError):  # an unreadable EXIF block: take the pixels as stored
        return 1
    return v if 1 <= v <= 8 else 1


def probe(path: str) -> Probe:
    """Header only: size, format, mode; refuses unreadable, foreign and animated files."""
    img = _open(path)
    try:
        return _check(img, str(path))
    finally:
        img.close()


def _round_up(v: float) -> int:
    return max(MULTIPLE, int(math.ceil(v / MULTIPLE - 1e-9)) * MULTIPLE)


def target_size(src_w: int, src_h: int, *, scale: float | None = None, width: int | None = None,
                height: int | None = None) -> tuple[int, int]:
    """The output size: ``scale`` x the source, or ``width``/``height`` (one of them keeps the
    aspect ratio), each side rounded up to a multiple of 8.  Never smaller than the source."""
    if scale is not None and (width is not None or height is not None):
        raise InvalidInput("scale", "give either --scale or --width/--height, not both")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 1 <= scale <= 8:
            raise InvalidInput("scale", f"must be a number from 1 to 8 (2 and 4 are usual), got {scale!r}")
        w, h = _round_up(src_w * scale), _round_up(src_h * scale)
    elif width is None and height is None:
        raise InvalidInput("scale", "give --scale (2 or 4) or --width/--height")
    else:
        for name, v in (("width", width), ("height", height)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidInput(name, f"must be a positive integer, got {v!r}")
        w = width if width is not None else _round_up(src_w * height / src_h)
        h = height if height is not None else _round_up(src_h * width / src_w)
    check_target(src_w, src_h, w, h)
    return w, h


def check_target(src_w: int, src_h: int, width: int, height: int) -> None:
    """The target must hold the source: this is an upscaler, not a thumbnailer."""
    for name, t, s in (("width", width, src_w), ("height", height, src_h)):
        if t < s:
            raise InvalidInput(name, f"the target {width}x{height} is smaller than the source image {src_w}x{src_h}; "
                                     f"the {name} must be at least {s} px (use --scale 2 or 4 to upscale)")


class InitImage:
    """The user's image resized to (width, height), held in a spill file; close() when done.

    ``read(y0, y1, x0, x1)``: (3, h, w) float32 in [-1, 1] (what the VAE encoders read);
    ``read_rows(y0, y1)``: (h, width, 3) uint8 (what the PNG writer reads).
    """

    channels = 3

    def __init__(self, pixels: SpillArray, probe_: Probe, sha256: str, flattened: bool):
        self._px = pixels
        self.height, self.width = pixels.height, pixels.width
        self.probe = probe_
        self.sha256 = sha256
        self.flattened = flattened

    @property
    def source_size(self) -> str:
        return f"{self.probe.width}x{self.probe.height}"

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def infotext_fields(self) -> dict:
        return {"HRLR source size": self.source_size, "HRLR source hash": self.short_hash}

    def read_uint8(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise IndexError(f"region y[{y0}:{y1}] x[{x0}:{x1}] outside {self.height}x{self.width} or empty")
        return self._px.read_hwc(y0, y1, x0, x1)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return uint8_to_signed_unit(self.read_uint8(y0, y1, x0, x1))

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        return self._px.read_hwc(y0, y1)

    def close(self) -> None:
        self._px.close()

    def __enter__(self) -> "InitImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rgb_strip(img, y0: int, y1: int, alpha: bool) -> np.ndarray:
    from PIL import Image

    strip = img.crop((0, y0, img.width, y1))
    if alpha:
        strip = strip.convert("RGBA")
        bg = Image.new("RGBA", strip.size, FLATTEN_BACKGROUND + (255,))
        strip = Image.alpha_composite(bg, strip)
    if strip.mode != "RGB":
        strip = strip.convert("RGB")
    return np.array(strip, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)


def _decode_to_spill(path: str, spill_dir: str | None) -> tuple[SpillArray, Probe, bool]:
    """Decode ``path`` into an (h, w, 3) uint8 spill file, alpha flattened onto white."""
    img = opened = _open(path)
    try:
        pr = _check(img, path)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
            raise InvalidInput(FIELD, f"'{path}' is truncated or corrupt ({e}); give a complete {ALLOWED}") from None
        alpha = _has_alpha(img)
        if pr.orientation != 1:  # shown rotated/mirrored by viewers and the webui: use it as shown
            from PIL import ImageOps

            img = ImageOps.exif_transpose(img)
        src = SpillArray(pr.height, pr.width, 3, torch.uint8, directory=spill_dir)
        try:
            rows = max(1, STRIP_BYTES // (pr.width * 4))
            for y0 in range(0, pr.height, rows):
                y1 = min(y0 + rows, pr.height)
                src.write(y0, 0, torch.from_numpy(_rgb_strip(img, y0, y1, alpha)).permute(2, 0, 1))
        except BaseException:
            src.close()
            raise
    finally:
        img.close()
        opened.close()
    return src, pr, alpha


def resize_spill(src: SpillArray, width: int, height: int, spill_dir: str | None = None,
                 should_stop: Callable[[], bool] | None = None) -> SpillArray:
    """``src`` (uint8 RGB) Lanczos-resized to width x height, equal to Pillow's whole-image
    ``resize((width, height), Image.LANCZOS)``; computed band by band into a new spill file."""
    from ..errors import Interrupted

    sh, sw = src.height, src.width
    dst = SpillArray(height, width, 3, torch.uint8, directory=spill_dir)
    try:
        hx = lanczos_taps(sw, width, 0, width) if width != sw else None
        band = max(1, BAND_BYTES // (max(width, sw) * 3 * 8 * 2))
        for y0 in range(0, height, band):
            if should_stop is not None and should_stop():
                raise Interrupted()
            y1 = min(y0 + band, height)
            if height != sh:  # Pillow skips a pass whose axis keeps its size; so do we
                vt = lanczos_taps(sh, height, y0, y1)
                r0, r1 = vt.span
            else:
                vt, (r0, r1) = None, (y0, y1)
            rows = src.read_hwc(r0, r1)
            if hx is not None:
                rows = _apply(rows, hx, axis=1, offset=0)
            if vt is not None:
                rows = _apply(rows, vt, axis=0, offset=r0)
            dst.write(y0, 0, torch.from_numpy(np.ascontiguousarray(rows)).permute(2, 0, 1))
    except BaseException:
        dst.close()
        raise
    return dst


def load_init_image(path: str, width: int, height: int, *, spill_dir: str | None = None,
                    log: Callable[[str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> InitImage:
    """Read ``path``, check it against the target, and resize it to width x height."""
    pr = probe(path)
    check_target(pr.width, pr.height, width, height)
    sha = sha256_file(path)
    src, pr, alpha = _decode_to_spill(path, spill_dir)
    if alpha:
        msg = (f"init_image: '{path}' has an alpha channel ({pr.mode}); it was flattened onto white "
               "(transparent areas become white)")
        if log is not None:
            log("warning: " + msg)
        else:
            warnings.warn(msg, stacklevel=2)
    try:
        if (width, height) == (pr.width, pr.height):
            pixels = src
        else:
            pixels = resize_spill(src, width, height, spill_dir, should_stop)
            src.close()
    except BaseException:
        src.close()
        raise
    return InitImage(pixels, pr, sha, alpha)
