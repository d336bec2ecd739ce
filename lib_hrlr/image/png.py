"""Streaming PNG writer: an 8-bit RGB image of any size, written band by band.

The rows come from any object with ``.height``, ``.width``, ``.channels == 3`` and
``.read_rows(y0, y1) -> numpy (h, width, 3) uint8`` (a uint8
:class:`~lib_hrlr.image.spill.SpillArray` is one), a band of a few hundred kB at a time:
each band is filtered (per row, the PNG filter with the smallest sum of absolute
residuals, as libpng's heuristic does), fed to one zlib stream, and the compressed
bytes leave as ``IDAT`` chunks.  Nothing proportional to the image is ever in memory.

Text goes into ``tEXt`` chunks when it is Latin-1 and into uncompressed UTF-8 ``iTXt``
chunks otherwise; Pillow reads either back as ``Image.open(p).info[key]``.  The webui
reads its infotext from the ``parameters`` key.

The file is written under a temporary name in the destination folder and renamed over
``path`` only once complete, so ``path`` is never a partial PNG; on any exception
(KeyboardInterrupt included) the temporary file is removed and any earlier file at
``path`` is left as it was.
"""

from __future__ import annotations

import operator
import os
import secrets
import struct
import zlib
from typing import Mapping

import numpy as np

from ..errors import InvalidInput

SIGNATURE = b"\x89PNG\r\n\x1a\n"
BAND_BYTES = 1 << 19  # raw bytes per band (before filtering)
IDAT_BYTES = 1 << 18  # compressed bytes per IDAT chunk
MAX_DIM = 2**31 - 1


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _keyword(key: str) -> bytes:
    if not isinstance(key, str):
        raise InvalidInput("text", f"keys must be str, got {type(key).__name__}")
    try:
        raw = key.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidInput("text", f"key {key!r} must be Latin-1 (PNG keywords are)") from None
    ok = all(32 <= b <= 126 or b >= 161 for b in raw)
    if not (1 <= len(raw) <= 79) or not ok or key != key.strip() or "  " in key:
        raise InvalidInput(
            "text",
            f"key {key!r} is not a PNG keyword: 1-79 printable Latin-1 characters, "
            "no leading, trailing or double spaces",
        )
    return raw


def text_chunk(key: str, value: str) -> bytes:
    """``tEXt`` for Latin-1 values, ``iTXt`` (UTF-8, uncompressed) for anything else."""
    kw = _keyword(key)
    if not isinstance(value, str):
        raise InvalidInput("text", f"value of {key!r} must be str, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInput("text", f"value of {key!r} contains a NUL character, which PNG text cannot hold")
    try:
        return chunk(b"tEXt", kw + b"\x00" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag, NUL, empty translated keyword, NUL
        return chunk(b"iTXt", kw + b"\x00\x00\x00" + b"\x00" + b"\x00" + value.encode("utf-8"))


def filter_band(band: np.ndarray, prev: np.ndarray | None, bpp: int = 3) -> bytes:
    """Filtered scanlines of ``band`` ((h, row_bytes) uint8), each prefixed with its filter
    type; ``prev`` is the raw row above the band (None for the image's first row)."""
    h, n = band.shape
    x = band.astype(np.int16)
    up = np.empty_like(x)
    up[0] = 0 if prev is None else prev
    up[1:] = x[:-1]
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    upleft = np.zeros_like(x)
    upleft[:, bpp:] = up[:, :-bpp]
    # Paeth predictor: the neighbour closest to left + up - upleft (ties: left, up, upleft)
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    candidates = np.stack([x, x - left, x - up, x - ((left + up) >> 1), x - paeth]).astype(np.uint8)
    cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=2)  # (5, h)
    best = cost.argmin(axis=0)
    out = np.empty((h, n + 1), dtype=np.uint8)
    out[:, 0] = best
    out[:, 1:] = candidates[best, np.arange(h)]
    return out.tobytes()


def _check_rows(rows) -> tuple[int, int]:
    for attr in ("height", "width", "channels", "read_rows"):
        if not hasattr(rows, attr):
            raise InvalidInput("rows", f"needs .height, .width, .channels and .read_rows(y0, y1); it has no .{attr}")
    try:
        h, w, c = operator.index(rows.height), operator.index(rows.width), operator.index(rows.channels)
    except TypeError:
        raise InvalidInput("rows", "height, width and channels must be integers") from None
    if c != 3:
        raise InvalidInput("rows", f"must have 3 channels (RGB), got {c}")
    if not (1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM):
        raise InvalidInput("rows", f"size must be positive integers up to {MAX_DIM}, got {w}x{h}")
    return h, w


def write_png(path: str | os.PathLike, rows, text: Mapping[str, str] | None = None, *, compress_level: int = 6,
              band_rows: int | None = None) -> None:
    """Write ``rows`` (8-bit RGB, read by bands) to ``path`` as a PNG with ``text`` chunks,
    atomically: ``path`` appears only once the file is complete.

    ``band_rows``: rows read per ``read_rows`` call (default: about 512 kB of pixels).
    """
    height, width = _check_rows(rows)
    if isinstance(compress_level, bool) or not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise InvalidInput("compress_level", f"must be an integer 0..9, got {compress_level!r}")
    if band_rows is None:
        band_rows = max(1, BAND_BYTES // (width * 3))
    elif isinstance(band_rows, bool) or not isinstance(band_rows, int) or band_rows < 1:
        raise InvalidInput("band_rows", f"must be a positive integer, got {band_rows!r}")
    text_chunks = [text_chunk(k, v) for k, v in (text or {}).items()]
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidInput("path", f"folder {folder} does not exist")
    base = os.path.basename(path)
    if not base:
        raise InvalidInput("path", f"'{path}' names a folder, not a file")
    while True:
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(SIGNATURE)
            f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
            for c in text_chunks:
                f.write(c)
            comp = zlib.compressobj(compress_level)
            pending = bytearray()
            prev = None
            for y0 in range(0, height, band_rows):
                y1 = min(y0 + band_rows, height)
                band = np.asarray(rows.read_rows(y0, y1))
                if band.dtype != np.uint8 or band.shape != (y1 - y0, width, 3):
                    raise InvalidInput(
                        "rows", f"read_rows({y0}, {y1}) gave {band.dtype} {band.shape}; expected uint8 "
                                f"{(y1 - y0, width, 3)}"
                    )
                flat = band.reshape(y1 - y0, width * 3)
                pending += comp.compress(filter_band(flat, prev))
                prev = flat[-1].copy()
                del band, flat
                while len(pending) >= IDAT_BYTES:
                    f.write(chunk(b"IDAT", bytes(pending[:IDAT_BYTES])))
                    del pending[:IDAT_BYTES]
            pending += comp.flush()
            for i in range(0, len(pending), IDAT_BYTES):
                f.write(chunk(b"IDAT", bytes(pending[i:i + IDAT_BYTES])))
            f.write(chunk(b"IEND", b""))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
