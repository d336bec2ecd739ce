"""A strict reader of the safetensors format that never maps the file.

Layout: 8 bytes little-endian ``N``, then ``N`` bytes of JSON (padded with spaces), then the
data area.  The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin,
end]}`` with offsets relative to the data area, plus an optional ``__metadata__`` mapping of
strings to strings.

We parse it ourselves so that every check is explicit and so that tensors are read with
``os.preadv`` into memory we own: ``mmap`` would make the file's pages count in the
process's resident set, which is exactly what the memory budget forbids.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# Headers of real models are a few hundred kB; the reference implementation caps at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
del _name, _attr
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("lib_hrlr.weights reads little-endian tensor files and needs a little-endian CPU")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file: ``nbytes`` contiguous bytes at absolute ``offset``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _bad(path: Path | str, what: str) -> CheckpointError:
    return CheckpointError(
        "model",
        f"'{path}' is not a valid .safetensors file: {what}. "
        "Allowed are complete safetensors files (8-byte header length, JSON header, tensor data).",
    )


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(raw: bytes, data_size: int, path: Path | str = "<memory>", data_start: int = 0) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON against a data area of ``data_size`` bytes.

    Returns the tensors (offsets made absolute by adding ``data_start``) in file order, and
    the metadata.  Every inconsistency raises :class:`CheckpointError`.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, "the header is not UTF-8") from None
    if not text.lstrip().startswith("{"):
        raise _bad(path, "the header is not a JSON object")
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as e:
        raise _bad(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _bad(path, "the header is not a JSON object")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")

    spans: list[tuple[int, int, str]] = []
    infos: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"entry {name!r} must have exactly dtype, shape and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise _bad(path, f"tensor {name!r} has dtype {code!r}; known dtypes are {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad(path, f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _bad(path, f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_size:
            raise _bad(
                path,
                f"tensor {name!r} ends at byte {end} of a data area of {data_size} bytes (the file is truncated)",
            )
        dtype = DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise _bad(
                path,
                f"tensor {name!r} spans {end - begin} bytes but shape {shape} of {code} needs {nbytes}",
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, nbytes)

    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _bad(path, f"tensors {n0!r} and {n1!r} overlap")
    ordered = {name: infos[name] for _, _, name in spans}
    return ordered, dict(metadata)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError("model", f"cannot open '{path}': {e.strerror}") from None
    try:
        file_size = os.fstat(fd).st_size
        if file_size < 8:
            raise _bad(path, f"it is {file_size} bytes long, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"the header claims {n} bytes (more than {MAX_HEADER_BYTES})")
        if 8 + n > file_size:
            raise _bad(path, f"the header claims {n} bytes but the file has only {file_size - 8} after the length")
        raw = bytearray(n)
        pread_into(fd, 8, memoryview(raw))
    finally:
        os.close(fd)
    data_start = 8 + n
    tensors, metadata = parse_header(bytes(raw), file_size - data_start, path, data_start)
    return SafetensorsHeader(path, tensors, metadata, data_start, file_size)


def tensor_memoryview(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (keep ``t`` alive while using it)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_memoryview needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def pread_into(fd: int, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` with the bytes of ``fd`` from ``offset``; short reads are retried, EOF raises."""
    done, total = 0, len(buf)
    while done < total:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise CheckpointError(
                "model",
                f"unexpected end of file at byte {offset + done} while reading {total} bytes at {offset}; the file is truncated",
            )
        done += got


def read_into(fd: int, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
    """Read the tensor ``info`` describes into ``out`` (contiguous CPU, the file's dtype, same numel)."""
    if out.dtype != info.dtype:
        raise ValueError(f"{info.name}: out has dtype {out.dtype}, the file holds {info.dtype}")
    if out.numel() * out.element_size() != info.nbytes:
        raise ValueError(f"{info.name}: out has {out.numel()} elements, the file holds {info.numel}")
    pread_into(fd, info.offset, tensor_memoryview(out))
    return out


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """A freshly allocated CPU tensor holding ``info``'s data in the file's dtype."""
    out = torch.empty(info.shape, dtype=info.dtype)
    return read_into(fd, info, out)


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included, JSON padded to 8 bytes) for tensors laid out
    back to back in the given order; returns it with each tensor's offset in the data area."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets, pos = [], 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors code")
        nbytes = math.prod(shape) * dtype.itemsize
        doc[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


@dataclass(frozen=True)
class TensorSource:
    """One tensor of a checkpoint: the file holding it and where in that file."""

    path: str
    info: TensorInfo
