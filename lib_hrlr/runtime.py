"""Where and in what precision we compute, and how the process allocator behaves.

Everything here is explicit: nothing runs at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import dataclass

import torch

from .errors import InvalidInput

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """bf16 matmuls are only fast with AVX512-BF16 or AMX; elsewhere they fall back to slow paths."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InvalidInput("device", f"'{name}' is not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise InvalidInput("device", f"'{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device", f"'{name}' was asked for but torch sees no CUDA device; use cpu")
    return dev


def resolve_dtype(name: str, device: torch.device, flags: frozenset[str] | None = None) -> torch.dtype:
    """``auto`` is fp16 on CUDA, bf16 on CPUs with AVX512-BF16/AMX, fp32 otherwise."""
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16(flags) else torch.float32
    if name not in DTYPES:
        raise InvalidInput("dtype", f"'{name}' is not a compute dtype; use auto, fp32, bf16 or fp16")
    return DTYPES[name]


@dataclass(frozen=True)
class AllocatorTuning:
    applied: bool
    detail: str


# oneDNN (torch's CPU convolutions and bf16 matmuls) keeps up to 1024 compiled primitives by
# default, on the malloc heap.  Measured on a streamed SD 1.5 UNet call of 10 bf16 samples:
# the heap grew by 20-40 MB over calls of the same shapes (more when the batch changes) and
# the call peaked 26 MB higher than with no cache, at the same speed (33 s either way).
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 20  # tune_allocator's: blocks above it are mmapped, and unmapped when freed
# reused_heap's: every tile tensor of the exact tiled VAE (at most ~25 MB, by its tile sizes) and
# glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
REUSE_MMAP_THRESHOLD = 32 << 20


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library with ``mallopt``/``malloc_trim`` (glibc, Linux), looked up once
    (``find_library`` runs a subprocess), or None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _set_mmap_threshold(libc, threshold: int) -> bool:
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1) & bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 4 * threshold) == 1)


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, arenas: int = 2, onednn_cache: int = 0) -> AllocatorTuning:
    """Make glibc return freed tensor memory to the kernel at once, and keep oneDNN from caching.

    Tensors above ``mmap_threshold`` bytes are served by mmap and unmapped on free, instead
    of glibc's default, which raises the threshold dynamically and keeps freed blocks in its
    heaps (resident memory that no longer holds anything).  Fewer arenas keep worker threads
    from each hoarding their own heap.  oneDNN's primitive cache is limited to
    ``onednn_cache`` entries (:data:`ONEDNN_CACHE_ENV`, unless the environment sets it); it
    reads that once, at its first primitive, so in a process that already ran a convolution
    (a webui) it keeps its own.  Process-wide; call once from a program's entry point.
    """
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(onednn_cache))
    if not sys.platform.startswith("linux"):
        return AllocatorTuning(False, "not glibc/Linux")
    libc = _glibc()
    if libc is None:
        return AllocatorTuning(False, "glibc's mallopt not found")
    ok = _set_mmap_threshold(libc, mmap_threshold) & (libc.mallopt(_M_ARENA_MAX, arenas) == 1)
    return AllocatorTuning(bool(ok), f"mmap_threshold={mmap_threshold} arenas={arenas} "
                                     f"onednn_cache={os.environ[ONEDNN_CACHE_ENV]}")


@contextlib.contextmanager
def reused_heap(threshold: int = REUSE_MMAP_THRESHOLD, after: int = MMAP_THRESHOLD):
    """Within: blocks up to ``threshold`` bytes come from glibc's heap, and freed ones stay
    there for the next allocation of the same size; on leaving, the threshold goes to
    ``after`` (:func:`tune_allocator`'s) and the free heap memory back to the kernel
    (:func:`trim_allocator`).  No-op without glibc.

    For loops that allocate the same tensors tile after tile.  Through mmap each such tensor
    costs a page fault and a zero fill per 4 KB, every time: the exact tiled VAE decoding a
    256x256 image (SD 1.5, fp32) took 1,043,792 minor page faults and 2.5 s of system time
    with the 1 MB threshold, 10,249 faults and 0.2 s within this context (RSS +8 MB).
    Process-wide while it lasts, like every mallopt setting."""
    libc = _glibc()
    if libc is None:
        yield
        return
    _set_mmap_threshold(libc, threshold)
    try:
        yield
    finally:
        _set_mmap_threshold(libc, after)
        libc.malloc_trim(0)


def trim_allocator() -> None:
    """Hand free heap memory back to the kernel (glibc ``malloc_trim``); no-op elsewhere.

    Cheap enough to call after every UNet call (milliseconds against seconds): the small
    tensors of a streamed call (biases, norms, chunks under the mmap threshold) leave freed
    but still resident pages in glibc's heaps, which otherwise add up over the calls of a
    pass (SDXL in fp32: 62 MB after one step, measured with ``/proc/self/status``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def cache_dir() -> str:
    return os.environ.get("HRLR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hrlr")
