"""Disk-backed arrays: a whole-canvas tensor that never sits in resident memory.

A :class:`SpillArray` holds an ``(H, W, C)`` array in a temporary file and moves
rectangles in and out with ``pread``/``pwrite``.  File pages live in the kernel's page
cache, which is not part of the process's resident set (VmRSS/VmHWM), so a canvas of
any size costs only the tile being read or written.  The tiled VAE keeps its
activations between GroupNorm synchronisation points here, and decoded images wait
here for the PNG writer.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

_NP = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.uint8: np.uint8,
    torch.bfloat16: np.uint16,  # stored bit-for-bit; viewed back as bfloat16
}


def default_spill_dir() -> str:
    return os.environ.get("HRLR_SPILL_DIR") or tempfile.gettempdir()


class SpillArray:
    """An (height, width, channels) array stored in an unlinked temporary file."""

    def __init__(self, height: int, width: int, channels: int, dtype: torch.dtype = torch.float32,
                 directory: str | None = None):
        if dtype not in _NP:
            raise ValueError(f"dtype: {dtype} cannot be spilled; use one of {sorted(map(str, _NP))}")
        self.height, self.width, self.channels, self.dtype = int(height), int(width), int(channels), dtype
        self._np = _NP[dtype]
        self.itemsize = np.dtype(self._np).itemsize
        self.row_bytes = self.width * self.channels * self.itemsize
        fd, path = tempfile.mkstemp(prefix="hrlr-spill-", suffix=".bin", dir=directory or default_spill_dir())
        os.unlink(path)  # nothing is left on disk, whatever happens to the process
        self._fd = fd
        os.ftruncate(fd, self.row_bytes * self.height)

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.height

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SpillArray":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort for forgotten arrays
        try:
            self.close()
        except Exception:
            pass

    def _check(self, y0: int, y1: int, x0: int, x1: int) -> None:
        if not (0 <= y0 <= y1 <= self.height and 0 <= x0 <= x1 <= self.width):
            raise IndexError(f"region y[{y0}:{y1}] x[{x0}:{x1}] outside {self.height}x{self.width}")

    def write(self, y0: int, x0: int, chw: torch.Tensor) -> None:
        """Write a (C, h, w) tensor with its top-left corner at (y0, x0)."""
        c, h, w = chw.shape
        if c != self.channels:
            raise ValueError(f"channels: got {c}, array has {self.channels}")
        self._check(y0, y0 + h, x0, x0 + w)
        hwc = chw.detach().to(device="cpu", dtype=self.dtype).permute(1, 2, 0).contiguous()
        if self.dtype == torch.bfloat16:
            hwc = hwc.view(torch.int16)
        data = hwc.numpy()
        if w == self.width:
            os.pwrite(self._fd, memoryview(data).cast("B"), y0 * self.row_bytes)
            return
        off = x0 * self.channels * self.itemsize
        for r in range(h):
            os.pwrite(self._fd, memoryview(data[r]).cast("B"), (y0 + r) * self.row_bytes + off)

    def read_hwc(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Read a region as a numpy (h, w, C) array."""
        x1 = self.width if x1 is None else x1
        self._check(y0, y1, x0, x1)
        h, w = y1 - y0, x1 - x0
        out = np.empty((h, w, self.channels), dtype=self._np)
        if h == 0 or w == 0:
            return out
        span = w * self.channels * self.itemsize
        if w == self.width:
            n = os.preadv(self._fd, [memoryview(out).cast("B")], y0 * self.row_bytes)
            if n != span * h:
                raise IOError("spill file: short read")
            return out
        off = x0 * self.channels * self.itemsize
        for r in range(h):
            n = os.preadv(self._fd, [memoryview(out[r]).cast("B")], (y0 + r) * self.row_bytes + off)
            if n != span:
                raise IOError("spill file: short read")
        return out

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Read a region as a (C, h, w) tensor of the array's dtype."""
        t = torch.from_numpy(self.read_hwc(y0, y1, x0, x1))
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.permute(2, 0, 1).contiguous()

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0..y1 as (h, W, C) numpy; for uint8 images this is what a PNG writer wants."""
        return self.read_hwc(y0, y1)

    def to_tensor(self) -> torch.Tensor:
        """The whole array as (1, C, H, W); for tests and small canvases only."""
        return self.read(0, self.height, 0, self.width).unsqueeze(0)
