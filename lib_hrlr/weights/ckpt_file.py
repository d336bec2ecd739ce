"""Safe reading of PyTorch ``.ckpt`` / ``.pt`` / ``.bin`` files, without running their code.

A ``torch.save`` file is a zip archive: ``<archive>/data.pkl`` is a pickle describing the
saved object, and every tensor storage is a separate, uncompressed zip entry
``<archive>/data/<key>``.  Unpickling ``data.pkl`` with the standard machinery can import
and call any global the file names, which is how malicious checkpoints run code.

Here the pickle is read by :class:`RestrictedUnpickler`, which resolves every global the
file names through a fixed table and never imports anything:

* **functional globals** are replaced by our own data-only functions or harmless builtins:
  ``torch._utils._rebuild_tensor_v2/_v3``, ``_rebuild_parameter(_with_state)`` build a
  :class:`TensorRef` (no tensor is created, no tensor data is read), the torch storage
  types and dtypes become plain markers, ``collections.OrderedDict``, ``set``,
  ``frozenset``, ``slice``, ``complex``, ``torch.Size`` (as ``tuple``) and
  ``_codecs.encode`` (protocol-2 ``bytes``) are the real, side-effect-free builtins (none
  of which can be made to allocate more than the pickle's own size);
* **inert bookkeeping globals** — modules under which real Stable Diffusion checkpoints
  keep training state next to ``state_dict`` (``pytorch_lightning``/``lightning``
  callbacks such as ``ModelCheckpoint``, ``numpy`` scalars and arrays,
  ``torch.torch_version.TorchVersion``) — are replaced by a fresh :class:`Inert` class
  that only records its name and the arguments it was given.  Nothing of these modules is
  imported or called.  After unpickling, an ``Inert`` object found inside the selected
  tensor mapping is an error; elsewhere (``callbacks``, ``optimizer_states``...) it is
  ignored and listed in :attr:`CkptContents.ignored_globals`;
* **any other global** (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) aborts
  loading at once with a :class:`CheckpointError` naming it.

Because only the table's objects can ever be called, the design is safe by construction:
the inert tier decides only whether a file is *refused*, not what code runs.

Tensor storages are located, not read: each :class:`TensorRef` is resolved to a
:class:`~lib_hrlr.weights.safetensors_file.TensorInfo` giving the absolute file offset of
its bytes, so tensors are streamed later with ``pread`` exactly as for safetensors.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_file import TensorInfo

ALLOWED_DESCRIPTION = (
    "allowed in a checkpoint's pickle are torch tensor rebuild functions, torch storage types and dtypes, "
    "collections.OrderedDict and plain containers (training bookkeeping from pytorch_lightning/numpy is "
    "tolerated outside state_dict); convert the file to .safetensors if it needs more"
)

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}

TORCH_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool "
    "double float half long int short"
).split()

# Module prefixes whose globals stand for training bookkeeping in real SD checkpoints.
INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "numpy")
INERT_MODULE_PREFIXES = tuple(m + "." for m in INERT_MODULES)
INERT_GLOBALS = {("torch.torch_version", "TorchVersion")}


@dataclass(frozen=True)
class StorageMarker:
    """Stands for ``torch.<X>Storage`` in the pickle."""

    dtype: torch.dtype


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    storage_offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


class Inert:
    """Placeholder for an object of a tolerated but never-imported global; holds data only."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_state", None)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_state", state)

    def __repr__(self):
        return f"<inert {self.global_name}>"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only through the table described in the module doc.

    The functions it hands out are bound methods of this instance, so a pickle's BUILD
    opcode cannot alter anything that outlives the load.
    """

    def rebuild_tensor_v2(self, storage, storage_offset, size, stride, *_ignored):
        if not isinstance(storage, StorageRef):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        return TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride), storage.dtype)

    def rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_ignored):
        ref = self.rebuild_tensor_v2(storage, storage_offset, size, stride)
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("tensor rebuilt with a dtype that is not a torch dtype")
        return TensorRef(ref.storage, ref.storage_offset, ref.shape, ref.stride, dtype)

    def rebuild_parameter(self, data, *_ignored):
        return data

    def codecs_encode(self, obj, encoding="utf-8", errors="strict"):
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
            raise pickle.UnpicklingError("_codecs.encode is allowed only for str in latin1/utf-8/ascii")
        return obj.encode(encoding, errors)

    def find_class(self, module: str, name: str):
        if module == "torch._utils":
            if name == "_rebuild_tensor_v2":
                return self.rebuild_tensor_v2
            if name == "_rebuild_tensor_v3":
                return self.rebuild_tensor_v3
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return self.rebuild_parameter
        if module == "torch":
            if name in STORAGE_DTYPES:
                return StorageMarker(STORAGE_DTYPES[name])
            if name in TORCH_DTYPE_NAMES:
                return getattr(torch, name)
            if name == "Size":
                return tuple
        if module == "torch.storage" and name == "UntypedStorage":
            return StorageMarker(torch.uint8)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "slice", "complex"):
            return {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}[name]
        if module == "_codecs" and name == "encode":
            return self.codecs_encode
        if (module, name) in INERT_GLOBALS or module in INERT_MODULES or module.startswith(INERT_MODULE_PREFIXES):
            return type(name, (Inert,), {"global_name": f"{module}.{name}", "__module__": __name__})
        raise CheckpointError("model", f"refusing to load: the pickle references the global '{module}.{name}'; {ALLOWED_DESCRIPTION}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, marker, key, _location, numel = pid
        if not isinstance(marker, StorageMarker):
            raise pickle.UnpicklingError("persistent id does not name a storage type")
        return StorageRef(str(key), marker.dtype, int(numel))


@dataclass
class CkptContents:
    path: Path
    tensors: dict[str, TensorInfo]  # the selected state dict, in pickle order
    state_key: str | None  # "state_dict" (or the key it came from), None for a top-level mapping
    ignored_globals: list[str] = field(default_factory=list)
    other_keys: list[str] = field(default_factory=list)  # top-level keys besides the state dict


def _nodes(obj, seen: set[int] | None = None):
    """Every object reachable from ``obj`` through dicts, sequences, sets and inert objects'
    arguments and state, each once (a pickle can share one object from many places: a DAG of
    shared references walked as a tree doubles per level; this walk is linear in its size)."""
    seen = set() if seen is None else seen
    todo = [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        yield o
        if isinstance(o, dict):
            for k, v in o.items():
                todo.append(k)
                todo.append(v)
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo.extend(o)
        elif isinstance(o, Inert):
            todo.append(o._args)
            todo.append(o._state)


def _is_inert(o) -> bool:
    return isinstance(o, Inert) or (isinstance(o, type) and issubclass(o, Inert))


def _find_inert_in_state(state: dict):
    """``(key, inert)`` of the first state-dict entry that reaches an Inert object (``None``
    if none); one walk over the whole mapping, each shared object visited once."""
    seen: set[int] = {id(state)}
    for k, v in state.items():
        for part in (k, v):
            hit = next((o for o in _nodes(part, seen) if _is_inert(o)), None)
            if hit is not None:
                return k, hit
    return None


def _collect_inert(obj, out: set) -> None:
    out.update(o.global_name for o in _nodes(obj) if _is_inert(o))


# Opcodes that add to the object below them on the stack instead of making a new one.
_IN_PLACE_OPS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# the largest tree (objects counted once per reference) a pickle may describe: real checkpoints
# stay near one object per pickle byte; a DAG of shared tuples 40 deep would be 2^40, and
# hashing a tuple (a dict key, a set member) walks it as a tree inside the unpickler itself
MAX_EXPANDED_NODES_MIN = 1 << 22
EXPANDED_NODES_PER_BYTE = 16


class _Cell:
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


def check_expansion(pickled: bytes, limit: int | None = None) -> int:
    """Refuse a pickle whose objects, expanded as trees, exceed ``limit`` nodes (default:
    ``max(MAX_EXPANDED_NODES_MIN, EXPANDED_NODES_PER_BYTE * len(pickled))``).

    Walks the opcodes once (time linear in the pickle's size, nothing is built) keeping, for
    every stack and memo entry, the size of its tree.  Returns the largest size seen.
    Raises :class:`pickle.UnpicklingError` for a stream it cannot follow.
    """
    import pickletools

    limit = limit or max(MAX_EXPANDED_NODES_MIN, EXPANDED_NODES_PER_BYTE * len(pickled))
    mark = object()
    stack: list = []
    memo: dict = {}
    largest = 0
    try:
        for op, arg, _pos in pickletools.genops(pickled):
            name = op.name
            if name in _PUT_OPS:
                memo[arg] = stack[-1]
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
                continue
            if name in _GET_OPS:
                stack.append(memo[arg])
                continue
            if name == "MARK":
                stack.append(mark)
                continue
            if name == "DUP":
                stack.append(stack[-1])
                continue
            before = op.stack_before
            popped: list = []
            n_plain = len(before)
            if any(s.name == "mark" for s in before):
                n_plain = [s.name for s in before].index("mark")
                while (item := stack.pop()) is not mark:
                    popped.append(item)
            for _ in range(n_plain):
                item = stack.pop()
                if item is mark:
                    raise pickle.UnpicklingError(f"{name} found a MARK where it expected an object")
                popped.append(item)
            size = sum(c.n for c in popped)
            if name in _IN_PLACE_OPS:
                target = popped.pop()  # the object below the mark / the items
                target.n += sum(c.n for c in popped)  # grows by what it gains
                cells = [target]
            else:
                cells = [_Cell(1 + size) for _ in op.stack_after]
            for c in cells:
                largest = max(largest, c.n)
                if c.n > limit:
                    raise CheckpointError(
                        "model",
                        f"refusing to load: the pickle shares references so deeply that its objects expand to more "
                        f"than {limit} nodes (a crafted file: reading it would take time exponential in its size)",
                    )
            stack.extend(cells)
    except (IndexError, KeyError) as e:
        raise pickle.UnpicklingError(f"malformed pickle ({type(e).__name__}: {e})") from None
    return largest


def _entry_data_offset(raw: io.BufferedReader, info: zipfile.ZipInfo, path: Path) -> int:
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError("model", f"'{path}': zip entry {info.filename} has a corrupt local header; the file is damaged")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _select_state(obj, path: Path) -> tuple[dict, str | None]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            "model", f"'{path}' holds a {type(obj).__name__}, not a state dict; allowed are checkpoints saving a mapping of tensors"
        )
    sd = obj.get("state_dict")
    if isinstance(sd, dict):
        return sd, "state_dict"
    # diffusers/transformers .bin files and some converted checkpoints are a flat mapping
    if any(isinstance(v, TensorRef) for v in obj.values()):
        return obj, None
    for key in ("model", "module", "params"):
        if isinstance(obj.get(key), dict) and any(isinstance(v, TensorRef) for v in obj[key].values()):
            return obj[key], key
    raise CheckpointError(
        "model",
        f"'{path}' contains no tensors under 'state_dict' or at its top level (keys: {', '.join(map(str, list(obj)[:8]))}); "
        "allowed are Stable Diffusion checkpoints saved with torch.save",
    )


def read_ckpt(path: str | Path) -> CkptContents:
    """Locate every tensor of a ``torch.save`` zip checkpoint without running code or reading tensor data."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError("model", f"cannot open '{path}': {e.strerror}") from None
    with f:
        if not zipfile.is_zipfile(f):
            f.seek(0)
            head = f.read(2)
            if head == b"PK":
                raise CheckpointError(
                    "model", f"'{path}' starts like a zip archive but is damaged or truncated; download or copy it again"
                )
            hint = (
                " It looks like the legacy (pre-1.6) torch format, which cannot be read safely; re-save it as .safetensors."
                if head[:1] == b"\x80"
                else ""
            )
            raise CheckpointError(
                "model",
                f"'{path}' is not a PyTorch zip checkpoint.{hint} Allowed are .safetensors files, torch.save zip checkpoints "
                "(.ckpt/.pt/.bin) and diffusers folders",
            )
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError("model", f"'{path}' is a damaged zip archive ({e})") from None
        with zf:
            infos = {i.filename: i for i in zf.infolist()}
            pkl_names = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1] or (
                ["data.pkl"] if "data.pkl" in infos else []
            )
            if len(pkl_names) != 1:
                raise CheckpointError(
                    "model", f"'{path}' is a zip file but not a torch checkpoint (expected one <archive>/data.pkl entry)"
                )
            pkl_name = pkl_names[0]
            prefix = pkl_name[: -len("data.pkl")]
            bo = infos.get(prefix + "byteorder")
            if bo is not None and zf.read(bo).strip() not in (b"little", b""):
                raise CheckpointError("model", f"'{path}' was saved on a big-endian machine; only little-endian checkpoints are allowed")
            try:
                pickled = zf.read(pkl_name)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise CheckpointError("model", f"'{path}': cannot read {pkl_name} ({e}); the file is damaged") from None
            try:
                check_expansion(pickled)
                obj = RestrictedUnpickler(io.BytesIO(pickled)).load()
            except CheckpointError:
                raise
            except Exception as e:  # malformed pickles raise a wide variety of errors
                raise CheckpointError("model", f"'{path}': {pkl_name} is not a valid checkpoint pickle ({type(e).__name__}: {e})") from None

            state, state_key = _select_state(obj, path)
            found = _find_inert_in_state(state)
            if found is not None:
                k, hit = found
                raise CheckpointError(
                    "model",
                    f"refusing to load: the state dict of '{path}' holds an object of '{hit.global_name}' at {k!r}; {ALLOWED_DESCRIPTION}",
                )
            ignored: set[str] = set()
            _collect_inert(obj, ignored)

            storage_spans: dict[str, tuple[int, int]] = {}
            tensors: dict[str, TensorInfo] = {}
            for name, ref in state.items():
                if not isinstance(ref, TensorRef):
                    continue  # ints, strings and the like are not weights
                if not isinstance(name, str):
                    raise CheckpointError("model", f"'{path}': state dict key {name!r} is not a string")
                key = ref.storage.key
                if key not in storage_spans:
                    entry = infos.get(f"{prefix}data/{key}")
                    if entry is None:
                        raise CheckpointError("model", f"'{path}': storage {key} of tensor {name!r} is missing from the archive")
                    if entry.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(
                            "model",
                            f"'{path}': storage of {name!r} is compressed; allowed are checkpoints written by torch.save (stored, uncompressed)",
                        )
                    storage_spans[key] = (_entry_data_offset(f, entry, path), entry.file_size)
                start, size = storage_spans[key]
                tensors[name] = _tensor_info(name, ref, start, size, path)
            file_size = _file_size(f)
            for t in tensors.values():
                if t.offset + t.nbytes > file_size:
                    raise CheckpointError("model", f"'{path}': tensor {t.name!r} lies past the end of the file; it is truncated")
    other = [str(k) for k in obj if k != state_key] if state_key is not None else []
    return CkptContents(path, tensors, state_key, sorted(ignored), other)


def _file_size(f) -> int:
    f.seek(0, io.SEEK_END)
    return f.tell()


def _tensor_info(name: str, ref: TensorRef, start: int, size: int, path: Path) -> TensorInfo:
    shape, stride = ref.shape, ref.stride
    if any(d < 0 for d in shape) or len(stride) != len(shape):
        raise CheckpointError("model", f"'{path}': tensor {name!r} has an invalid shape {shape}/stride {stride}")
    numel = math.prod(shape)
    expected, acc = [], 1
    for d in reversed(shape):
        expected.append(acc)
        acc *= d
    expected.reverse()
    if numel > 1 and any(s != e for d, s, e in zip(shape, stride, expected) if d != 1):
        raise CheckpointError(
            "model",
            f"'{path}': tensor {name!r} is a non-contiguous view (shape {shape}, stride {stride}); "
            "allowed are contiguous tensors — re-save the checkpoint as .safetensors",
        )
    storage_isz = ref.storage.dtype.itemsize
    offset_bytes = ref.storage_offset * ref.dtype.itemsize
    nbytes = numel * ref.dtype.itemsize
    if offset_bytes < 0 or offset_bytes + nbytes > min(size, ref.storage.numel * storage_isz):
        raise CheckpointError(
            "model", f"'{path}': tensor {name!r} reaches past the end of its storage; the file is damaged"
        )
    return TensorInfo(name, ref.dtype, shape, start + offset_bytes, nbytes)
