"""Weights prepared in the compute dtype: one cache file per model, written once, read every step.

A streamed UNet reads all of its weights once per call.  When the checkpoint's dtype is not
the compute dtype (fp16 files, bf16 compute on CPUs; fp32 ``.ckpt`` files) every read also
converts, and on a small machine that conversion costs more than the read: for SD 1.5,
1.9 CPU-seconds per UNet call against 0.4 s for the plain read, on a prefetch thread that
shares the cores with the UNet itself.  :func:`prepared_sources` converts once, into a
safetensors file in the user cache, and returns sources pointing there; the streamer then
reads each tensor straight into its arena slot with ``pread``.

The file (``<cache>/prepared/<stem>-<component>-<dtype>-<key>.safetensors``) holds every
tensor of the component in the dtype the streamer materialises (floating tensors in the
compute dtype, others as stored), in the order of the source file(s), under the model's
names.  ``key`` is the sha256 (first 16 hex digits) of the source files' real paths, sizes
and modification times, the component, the dtype and :data:`FORMAT`, so an edited or
replaced checkpoint gets a new file.  It is written under a temporary name, through a
4 MiB buffer (memory stays flat), and renamed into place when complete: a reader never sees
half of it, and an interrupted write leaves nothing behind but a temporary file that the
next writer removes.  A lock file serialises writers.

Only a file no larger than the original is made: fp16 -> bf16 (same size) and fp32 -> bf16
or fp16 (half).  For fp16 -> fp32 (CPUs without fast bf16) the prepared file would double
the bytes read per UNet call, and that measured slower than converting while reading
(SD 1.5, 2-core AVX2 EPYC, batch 2: 1.17x the resident UNet's time against 1.05x), so the
checkpoint is streamed as it is.

Disk cost: the component's size in the compute dtype: SD 1.5's UNet 1.60 GiB in bf16 (as
large as its fp16 original), SDXL's 4.78 GiB.  The cache is an optimisation: when the folder
cannot be written or the disk lacks room (the file's size plus :data:`FREE_MARGIN_BYTES`),
the sources are returned unchanged, the streamer converts as before, and the returned
:class:`Prepared` says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime import cache_dir
from .safetensors_file import TensorInfo, TensorSource, build_header, pread_into, read_header, tensor_memoryview

FORMAT = "hrlr-prepared/1"
COPY_BYTES = 4 * 1024 * 1024
FREE_MARGIN_BYTES = 1 << 30  # leave at least this much free on the cache's disk
SUBDIR = "prepared"


SETTINGS = ("auto", "off")  # or a folder


def cache_folder(setting: str) -> str | None:
    """The folder a ``weight_cache`` setting names: ``auto`` is ``<user cache>/prepared``, ``off`` none."""
    if setting == "off":
        return None
    if setting == "auto":
        return os.path.join(cache_dir(), SUBDIR)
    return setting


@dataclass(frozen=True)
class Prepared:
    """The sources to stream from, and what the cache did: ``status`` is ``hit`` (an existing
    file), ``written``, ``same-dtype`` (nothing to convert: the originals are used), ``wider``
    (the compute dtype is wider than the file's, e.g. fp32 from fp16: a prepared file would
    double the bytes read per step, which costs more than converting while reading, so the
    originals are used), ``off``, or ``skipped`` (``reason`` says why: no room, folder not
    writable, ...)."""

    sources: dict[str, TensorSource]
    status: str
    path: str | None = None
    nbytes: int = 0
    reason: str = ""


def target_dtype(src: TensorSource, dtype: torch.dtype) -> torch.dtype:
    """What the streamer materialises a tensor as: floating ones in ``dtype``, others as stored."""
    return dtype if src.info.dtype.is_floating_point else src.info.dtype


def needs_conversion(sources: dict[str, TensorSource], dtype: torch.dtype) -> bool:
    return any(target_dtype(s, dtype) != s.info.dtype for s in sources.values())


def cache_key(sources: dict[str, TensorSource], component: str, dtype: torch.dtype) -> str:
    h = hashlib.sha256(f"{FORMAT}|{component}|{dtype}".encode())
    for path in sorted({s.path for s in sources.values()}):
        real = os.path.realpath(path)
        st = os.stat(real)
        h.update(f"|{real}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepared_path(folder: str | os.PathLike, sources: dict[str, TensorSource], component: str, dtype: torch.dtype) -> Path:
    first = min(sources.values(), key=lambda s: (s.path, s.info.offset)).path
    stem = Path(first).name.split(".")[0] or "model"
    dt = str(dtype).removeprefix("torch.")
    return Path(folder) / f"{stem}-{component}-{dt}-{cache_key(sources, component, dtype)}.safetensors"


def _ordered(sources: dict[str, TensorSource]) -> list[tuple[str, TensorSource]]:
    """Tensors in file order (sequential reads while writing; the streamer reads in model order)."""
    return sorted(sources.items(), key=lambda kv: (kv[1].path, kv[1].info.offset))


def _matches(path: Path, sources: dict[str, TensorSource], dtype: torch.dtype) -> dict[str, TensorSource] | None:
    """The prepared file's sources when it holds exactly the expected tensors, else None."""
    try:
        header = read_header(path)
    except Exception:
        return None
    if header.metadata.get("format") != FORMAT or set(header.tensors) != set(sources):
        return None
    out = {}
    for name, src in sources.items():
        info = header.tensors[name]
        if info.dtype != target_dtype(src, dtype) or info.numel != src.info.numel:
            return None
        # the model's shape (a diffusers 2-D linear read into a 1x1 conv keeps the source's view)
        out[name] = TensorSource(str(path), TensorInfo(info.name, info.dtype, src.info.shape, info.offset, info.nbytes))
    return out


def _write(tmp: Path, sources: dict[str, TensorSource], dtype: torch.dtype, should_stop=None) -> None:
    items = _ordered(sources)
    header, _ = build_header([(n, target_dtype(s, dtype), s.info.shape) for n, s in items], {"format": FORMAT})
    fds: dict[str, int] = {}
    buf = torch.empty(COPY_BYTES, dtype=torch.uint8)
    try:
        with open(tmp, "wb") as out:
            out.write(header)
            for _, src in items:  # back to back, in the header's order
                if should_stop is not None and should_stop():
                    from ..errors import Interrupted

                    raise Interrupted("preparing the weights")
                fd = fds.get(src.path)
                if fd is None:
                    fd = fds[src.path] = os.open(src.path, os.O_RDONLY)
                info, to = src.info, target_dtype(src, dtype)
                isz, osz = info.dtype.itemsize, to.itemsize
                per = COPY_BYTES // max(isz, osz)
                for start in range(0, info.numel, per):
                    n = min(per, info.numel - start)
                    raw = buf[: n * isz]
                    pread_into(fd, info.offset + start * isz, tensor_memoryview(raw))
                    if to == info.dtype:
                        out.write(tensor_memoryview(raw))
                        continue
                    conv = raw.view(info.dtype).to(to)
                    out.write(tensor_memoryview(conv.view(torch.uint8)))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for fd in fds.values():
            os.close(fd)


@contextlib.contextmanager
def _locked(folder: Path):
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepared_sources(sources: dict[str, TensorSource], component: str, dtype: torch.dtype,
                     folder: str | os.PathLike | None, log=None, should_stop=None,
                     margin_bytes: int = FREE_MARGIN_BYTES) -> Prepared:
    """Sources of ``component`` in ``dtype`` from the cache in ``folder`` (written on first use).

    ``folder`` None turns the cache off.  Never raises for cache trouble (a folder that
    cannot be made or written, less free space than the file plus ``margin_bytes``): the
    original sources come back with the reason.  ``should_stop`` is polled per tensor while
    writing (:class:`~lib_hrlr.errors.Interrupted`, nothing left behind)."""
    if folder is None:
        return Prepared(sources, "off")
    if not needs_conversion(sources, dtype):
        return Prepared(sources, "same-dtype")
    nbytes = sum(s.info.numel * target_dtype(s, dtype).itemsize for s in sources.values())
    if nbytes > sum(s.info.nbytes for s in sources.values()):
        return Prepared(sources, "wider", None, nbytes)
    folder = Path(folder)
    path = prepared_path(folder, sources, component, dtype)
    found = _matches(path, sources, dtype) if path.exists() else None
    if found is not None:
        return Prepared(found, "hit", str(path), nbytes)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            found = _matches(path, sources, dtype) if path.exists() else None  # another process wrote it meanwhile
            if found is not None:
                return Prepared(found, "hit", str(path), nbytes)
            for stale in glob.glob(str(folder / ".*.tmp")):  # an interrupted writer's leftovers
                with contextlib.suppress(OSError):
                    os.unlink(stale)
            free = shutil.disk_usage(folder).free
            if free < nbytes + margin_bytes:
                return Prepared(sources, "skipped", None, nbytes,
                                f"{folder} has {free / 2**30:.2f} GiB free; the prepared {component} needs "
                                f"{nbytes / 2**30:.2f} GiB plus {margin_bytes / 2**30:.0f} GiB to spare")
            if log:
                log(f"preparing the {component} weights in {str(dtype).removeprefix('torch.')} once "
                    f"({nbytes / 2**30:.2f} GiB in {folder}) ...")
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            try:
                _write(tmp, sources, dtype, should_stop)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        return Prepared(sources, "skipped", None, nbytes, f"cannot write the prepared weights in {folder}: {e.strerror or e}")
    found = _matches(path, sources, dtype)
    if found is None:  # pragma: no cover - what we just wrote does not read back
        return Prepared(sources, "skipped", None, nbytes, f"{path} did not read back as written")
    return Prepared(found, "written", str(path), nbytes)
