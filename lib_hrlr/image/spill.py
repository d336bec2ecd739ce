"""Disk-backed arrays: a whole-canvas tensor that never sits in resident memory.

A :class:`SpillArray` holds an ``(H, W, C)`` array in a temporary file and moves
rectangles in and out with ``pread``/``pwrite``.  File pages live in the kernel's page
cache, which is not part of the process's resident set (VmRSS/VmHWM), so a canvas of
any size costs only the tile being read or written.  The tiled VAE keeps its
activations between GroupNorm synchronisation points here, and decoded images wait
here for the PNG writer.

Where the files go (:func:`choose_spill_dir`, checked before a run's first UNet call): the
folder the user chose (``--spill-dir`` / ``spill_dir``, or ``$HRLR_SPILL_DIR``), else the
system temp folder unless it is RAM-backed (tmpfs or ramfs, as ``/tmp`` is on Debian 13,
Fedora and Arch: the spill would then live in memory, outside the budget), in which case the
user's cache folder (``$HRLR_CACHE/spill``, default ``~/.cache/hrlr/spill``) is used, with a
warning.  The folder must exist, be writable, not be RAM-backed (a chosen one is refused) and
have room for the run's spill estimate plus :data:`SPILL_HEADROOM`; otherwise the run is
refused with a :class:`~lib_hrlr.errors.DiskError` naming ``--spill-dir`` and the bytes
needed.  A write that fails later (the disk filled up meanwhile: ``ENOSPC``) raises the same
error; spill files are unlinked as soon as they are created, so nothing is left behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DiskError

_NP = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.uint8: np.uint8,
    torch.bfloat16: np.uint16,  # stored bit-for-bit; viewed back as bfloat16
}


RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
SPILL_HEADROOM = 64 * 1024 * 1024  # free space kept beyond the estimate (other writers, metadata)
SPILL_ENV = "HRLR_SPILL_DIR"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def default_spill_dir() -> str:
    return os.environ.get(SPILL_ENV) or tempfile.gettempdir()


def format_bytes(n: int) -> str:
    """``"4.0 GiB (4294967296 bytes)"``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _unescape_mount(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type (``ext4``, ``tmpfs``...) of the filesystem holding ``path``: the mount with the
    longest mount point above its real path (the last of stacked mounts); ``"unknown"`` where
    the kernel does not say (not Linux)."""
    real = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        point = _unescape_mount(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, right.split()[0]
    return best_type


def is_ram_backed(path: str) -> bool:
    return filesystem_type(path) in RAM_FILESYSTEMS


def user_spill_dir() -> str:
    """The disk-backed fallback: ``<user cache folder>/spill``."""
    from ..runtime import cache_dir

    return os.path.join(cache_dir(), "spill")


@dataclass(frozen=True)
class SpillPlace:
    """Where a run's spill files go, and what was checked."""

    path: str
    filesystem: str
    free_bytes: int
    need_bytes: int
    chosen: bool  # the user named the folder (option or environment)
    warning: str | None = None


def _refuse(folder: str, why: str, need: int, chosen_by: str) -> DiskError:
    return DiskError(
        "spill_dir",
        f"{why}; the run needs {format_bytes(need)} of temporary files there (the exact VAE's activations). "
        f"Choose a writable folder on a disk with room with --spill-dir (spill_dir){chosen_by}",
    )


def choose_spill_dir(requested: str | None, need_bytes: int, headroom: int = SPILL_HEADROOM) -> SpillPlace:
    """Pick and check the spill folder of a run that will spill ``need_bytes`` (module doc)."""
    env = os.environ.get(SPILL_ENV)
    chosen = requested or env
    chosen_by = "" if requested or not env else f"; it came from ${SPILL_ENV}"
    warning = None
    if chosen:
        folder = os.path.abspath(os.path.expanduser(chosen))
        if not os.path.isdir(folder):
            raise _refuse(folder, f"'{folder}' is not an existing folder", need_bytes, chosen_by)
        fs = filesystem_type(folder)
        if fs in RAM_FILESYSTEMS:
            raise _refuse(folder, f"'{folder}' is on {fs}, which keeps files in RAM: the spill would count against "
                                  f"memory, outside the budget", need_bytes, chosen_by)
    else:
        folder = tempfile.gettempdir()
        fs = filesystem_type(folder)
        if fs in RAM_FILESYSTEMS:
            fallback = user_spill_dir()
            warning = (f"the temp folder {folder} is on {fs} (RAM); spill files go to {fallback} instead "
                       f"(choose another folder with --spill-dir)")
            folder = fallback
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise _refuse(folder, f"cannot create '{folder}' ({e.strerror})", need_bytes, chosen_by) from None
            fs = filesystem_type(folder)
            if fs in RAM_FILESYSTEMS:
                raise _refuse(folder, f"both the temp folder and '{folder}' are on {fs} (RAM)", need_bytes, chosen_by)
    try:
        fd, probe = tempfile.mkstemp(prefix=".hrlr-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _refuse(folder, f"cannot write to '{folder}' ({e.strerror or e})", need_bytes, chosen_by) from None
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes + headroom:
        raise _refuse(folder, f"'{folder}' has {format_bytes(free)} free, less than the spill plus "
                              f"{headroom >> 20} MiB of headroom", need_bytes, chosen_by)
    return SpillPlace(folder, fs, free, need_bytes, bool(chosen), warning)


def disk_full_error(field: str, folder: str, exc: OSError, what: str) -> DiskError:
    """The error for a write that failed because the disk is full (or any other write error)."""
    reason = "the disk is full" if exc.errno in DISK_FULL_ERRNOS else (exc.strerror or str(exc))
    option = "--spill-dir (spill_dir)" if field == "spill_dir" else "--out (out)"
    return DiskError(field, f"writing {what} in '{folder}' failed: {reason}. Nothing was kept; free space there "
                            f"or choose another folder with {option}")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (a write may be short); 0 bytes written raises."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"pwrite wrote {n} of {len(view)} bytes")
        view = view[n:]
        offset += n


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
        self.directory = directory or default_spill_dir()
        self._fd = -1
        try:
            fd, path = tempfile.mkstemp(prefix="hrlr-spill-", suffix=".bin", dir=self.directory)
        except OSError as e:
            raise disk_full_error("spill_dir", self.directory, e, "a spill file") from None
        os.unlink(path)  # nothing is left on disk, whatever happens to the process
        self._fd = fd
        try:
            os.ftruncate(fd, self.row_bytes * self.height)
        except OSError as e:
            self.close()
            raise disk_full_error("spill_dir", self.directory, e, "a spill file") from None

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
        try:
            if w == self.width:
                pwrite_all(self._fd, memoryview(data).cast("B"), y0 * self.row_bytes)
                return
            off = x0 * self.channels * self.itemsize
            for r in range(h):
                pwrite_all(self._fd, memoryview(data[r]).cast("B"), (y0 + r) * self.row_bytes + off)
        except OSError as e:
            raise disk_full_error("spill_dir", self.directory, e, "a spill file") from None

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
