"""Textual-inversion embeddings: files to named vectors, read without running any code.

Formats (the webui's and diffusers'):

* webui ``.pt``: ``{"string_to_param": {"*": (n, hidden)}, "string_to_token": ..., "name": ...}``;
* webui / kohya ``.safetensors``: ``{"emb_params": (n, hidden)}``;
* diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{"<token>": (hidden,) or (n, hidden)}``.

``.pt``/``.bin`` files are ``torch.save`` zips: their pickle is read by
:class:`~lib_hrlr.weights.ckpt_file.RestrictedUnpickler` (after its expansion check), which
resolves globals through a fixed table and never imports or calls anything else, so a file
naming ``os.system`` is refused.  Tensor bytes are then read with ``pread`` from the
uncompressed zip entries.

An embedding's *name* is its file's stem (as in the webui): ``--embedding style.pt`` makes
the word ``style`` in a prompt expand to the file's vectors (see
:func:`lib_hrlr.text.prompts.tokenize_prompt`).  A folder contributes every embedding file
below it; in a folder, files of another width (an SD 2.x or SDXL embedding next to SD 1.x
ones) are skipped with a warning, as the webui skips them.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import CheckpointError, InvalidInput
from ..weights.safetensors_file import TensorInfo, read_header, read_tensor

FIELD = "embedding"
SUFFIXES = (".pt", ".safetensors", ".bin")
MAX_VECTORS = 75  # one prompt chunk


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # (n, hidden) float32
    path: str

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True)
class EmbeddingSet:
    by_name: dict[str, Embedding]
    warnings: tuple[str, ...] = ()

    def vectors(self) -> dict[str, torch.Tensor]:
        return {n: e.vectors for n, e in self.by_name.items()}


def _err(msg: str) -> CheckpointError:
    return CheckpointError(FIELD, msg)


# ------------------------------------------------------------------------------ .pt reading
def _flatten(obj, prefix: str, out: dict, depth: int = 0) -> None:
    from ..weights.ckpt_file import TensorRef

    if depth > 4:
        return
    if isinstance(obj, TensorRef):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, (str, int)):
                _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, depth + 1)


def _local_data_offset(f, info: zipfile.ZipInfo, p: Path) -> int:
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise _err(f"'{p}': zip entry {info.filename} has a corrupt header; the file is damaged")
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def pt_tensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a ``torch.save`` zip, nested dict keys joined with dots, located
    (not read) through the restricted unpickler."""
    from ..weights.ckpt_file import RestrictedUnpickler, check_expansion

    p = Path(path)
    with open(p, "rb") as f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError) as e:
            raise _err(f"'{p}' is not a torch.save zip file ({e}); allowed are .safetensors and .pt/.bin zips") from None
        with zf:
            infos = {i.filename: i for i in zf.infolist()}
            pkls = [n for n in infos if n.endswith("data.pkl") and n.count("/") <= 1]
            if len(pkls) != 1:
                raise _err(f"'{p}' is a zip file but not a torch.save file (no single data.pkl)")
            prefix = pkls[0][: -len("data.pkl")]
            pickled = zf.read(pkls[0])
            try:
                check_expansion(pickled)
                obj = RestrictedUnpickler(io.BytesIO(pickled)).load()
            except CheckpointError as e:
                raise _err(f"'{p}': {e.message}") from None
            except Exception as e:  # a malformed pickle raises anything
                raise _err(f"'{p}' holds an unreadable pickle ({type(e).__name__}: {e})") from None
            refs: dict = {}
            _flatten(obj, "", refs)
            out: dict[str, TensorInfo] = {}
            for name, ref in refs.items():
                entry = infos.get(f"{prefix}data/{ref.storage.key}")
                if entry is None or entry.compress_type != zipfile.ZIP_STORED:
                    raise _err(f"'{p}': the storage of {name!r} is missing or compressed; the file is damaged")
                start = _local_data_offset(f, entry, p)
                isz = ref.dtype.itemsize
                numel = math.prod(ref.shape)
                contiguous = all(s == math.prod(ref.shape[i + 1:]) for i, s in enumerate(ref.stride) if ref.shape[i] != 1)
                if not contiguous or len(ref.stride) != len(ref.shape):
                    raise _err(f"'{p}': {name!r} is a non-contiguous tensor view; re-save it as .safetensors")
                offset = start + ref.storage_offset * isz
                if ref.storage_offset < 0 or (ref.storage_offset + numel) * isz > entry.file_size:
                    raise _err(f"'{p}': {name!r} lies outside its storage; the file is damaged")
                out[name] = TensorInfo(name, ref.dtype, tuple(ref.shape), offset, numel * isz)
            return out


# ------------------------------------------------------------------------------ embeddings
def _tensors(p: Path) -> dict[str, TensorInfo]:
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise _err(f"cannot read '{p}': {e.strerror}") from None
    if head == b"PK\x03\x04":
        return pt_tensors(p)
    try:
        return read_header(p).tensors
    except CheckpointError as e:
        raise _err(f"'{p}' is neither a .safetensors file nor a torch.save zip ({e.message})") from None


def _pick(p: Path, tensors: dict[str, TensorInfo]) -> TensorInfo:
    params = [k for k in tensors if k.startswith("string_to_param.")]
    if params:
        return tensors["string_to_param.*"] if "string_to_param.*" in tensors else tensors[params[0]]
    if "emb_params" in tensors:
        return tensors["emb_params"]
    if len(tensors) == 1:  # diffusers: {"<token>": vectors}
        return next(iter(tensors.values()))
    if {"clip_l", "clip_g"} <= set(tensors):
        raise _err(f"'{p}' is an SDXL embedding (clip_l/clip_g); it needs an SDXL model")
    shown = ", ".join(list(tensors)[:5]) or "none"
    raise _err(f"'{p}' is not a textual-inversion embedding (tensors: {shown}); expected string_to_param, "
               "emb_params or a single {token: vectors} entry")


def read_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """One embedding file; ``name`` defaults to the file's stem."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(FIELD, f"'{p}' is not a file")
    info = _pick(p, _tensors(p))
    if not info.dtype.is_floating_point or len(info.shape) not in (1, 2) or info.numel == 0:
        raise _err(f"'{p}': the embedding {info.name!r} has dtype {info.dtype} and shape {list(info.shape)}; "
                   "a floating (vectors, width) tensor is required")
    fd = os.open(p, os.O_RDONLY)
    try:
        vec = read_tensor(fd, info).to(torch.float32)
    finally:
        os.close(fd)
    vec = vec.reshape(1, -1) if vec.dim() == 1 else vec
    if not bool(torch.isfinite(vec).all()):
        raise _err(f"'{p}': the embedding holds NaN or infinite values")
    if vec.shape[0] > MAX_VECTORS:
        raise _err(f"'{p}' has {vec.shape[0]} vectors; at most {MAX_VECTORS} fit in a prompt chunk")
    return Embedding(name or p.stem, vec, str(p))


def _files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if f.lower().endswith(SUFFIXES) and not f.startswith(".")]
    return out


def load_embeddings(paths: Sequence[str | os.PathLike], hidden_size: int) -> EmbeddingSet:
    """Embeddings from files and folders; a name given twice keeps the first and warns."""
    found: dict[str, Embedding] = {}
    warnings: list[str] = []
    for entry in paths or ():
        p = Path(entry).expanduser()
        if p.is_dir():
            for f in _files(p):
                try:
                    emb = read_embedding(f)
                except CheckpointError as e:
                    warnings.append(f"skipped {e.message}")
                    continue
                if emb.vectors.shape[1] != hidden_size:
                    warnings.append(f"skipped '{f}': its vectors are {emb.vectors.shape[1]} wide, the model's "
                                    f"text encoder {hidden_size}")
                    continue
                _add(found, emb, warnings)
        elif p.is_file():
            emb = read_embedding(p)
            if emb.vectors.shape[1] != hidden_size:
                raise _err(f"'{p}': its vectors are {emb.vectors.shape[1]} wide, the model's text encoder "
                           f"{hidden_size}; it was trained for another model family")
            _add(found, emb, warnings)
        else:
            raise InvalidInput(FIELD, f"'{p}' is neither an embedding file nor a folder")
    return EmbeddingSet(found, tuple(warnings))


def _add(found: dict[str, Embedding], emb: Embedding, warnings: list[str]) -> None:
    if emb.name in found:
        warnings.append(f"embedding name {emb.name!r} of '{emb.path}' is taken by '{found[emb.name].path}'; kept the first")
        return
    found[emb.name] = emb


def place_vectors(embeds: torch.Tensor, token_vectors) -> torch.Tensor:
    """``embeds`` (B, T, hidden) with ``(row, position, vectors)`` written in place; returned."""
    b, t, hidden = embeds.shape
    for row, pos, vec in token_vectors:
        n = vec.shape[0]
        if not (0 <= row < b and 0 <= pos and pos + n <= t) or vec.shape[-1] != hidden:
            raise InvalidInput("token_vectors", f"{n} vectors of width {vec.shape[-1]} at row {row}, position {pos} "
                                                f"do not fit embeddings of shape {(b, t, hidden)}")
        embeds[row, pos : pos + n] = vec.to(device=embeds.device, dtype=embeds.dtype)
    return embeds
