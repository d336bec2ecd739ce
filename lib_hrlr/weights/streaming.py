"""Weight streaming: a model built on ``meta`` gets each submodule's weights just in time.

A *unit* is a module that directly owns parameters or buffers still on ``meta`` (in
practice the leaves: Conv2d, Linear, GroupNorm, LayerNorm, Embedding).  A forward
pre-hook on a unit materialises its tensors — ``pread`` from the checkpoint into a tensor
of the compute dtype (same dtype: straight into the parameter's memory; otherwise through
a small reused chunk buffer of the file dtype, converted chunk by chunk, so no full-size
scratch copy ever exists) — and a forward hook puts them back on ``meta`` unless the unit
is pinned.  Tensors are attached with ``setattr`` (``nn.Module.__setattr__``), the public
way to replace a registered parameter or buffer; when the file's shape differs from the
module's but the element count matches (a diffusers Linear stored for an LDM 1x1 conv), the
bytes are read into the module's shape, which is the same row-major layout.

Memory for streamed units: the first pass allocates each unit apart; once it is over (its
first unit is called again) one *arena* is allocated, sized for the largest group of units
in flight together in the recorded order (a unit plus the next ``prefetch_depth``), and
every later load is placed in it, so weights are not faulted into fresh pages at every
forward (which costs as much as reading them).  The arena stays resident until close, so
the process holds ``arena_bytes`` steadily instead of in bursts; ``arena=False`` turns it
off.  Callers must not keep references to a unit's tensors after its forward: the arena
space is reused.

Cache: during the first pass each unit, when released for the first time, is pinned if it
still fits in ``cache_bytes`` (so pinning follows execution order, first fit).  Pinned
units stay resident until :meth:`WeightStreamer.close`.

Prefetch: the order in which units are first called is recorded; while unit *i* computes,
one background thread loads the next not-pinned unit(s) of that order (``prefetch_depth``,
1 by default, so at most the current unit plus one prefetched unit are in flight).  A
prefetched unit that turns out not to be next is discarded.  All bookkeeping, attaching
and ``on_event`` callbacks happen on the calling thread; the worker only reads and
converts into tensors it owns, in pieces below torch's grain size (``serial_prefetch``), so
it uses one core at most and starts no OpenMP team of its own beside the model's.

Use as a context manager: on exit every hook is removed, pending loads are cancelled or
awaited, every materialised tensor goes back to ``meta``, the worker stops and the file
descriptors are closed.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError
from .safetensors_file import TensorSource, pread_into, read_into, tensor_memoryview

CHUNK_BYTES = 4 * 1024 * 1024  # default conversion scratch per thread
# The prefetch thread converts at most this many elements per tensor op: torch runs an
# element-wise op below its grain size (at::internal::GRAIN_SIZE, 32768) on the calling thread
# alone, so the loader never starts a second OpenMP team beside the one computing the model
# (on 2 cores that made 4 busy threads).  torch.set_num_threads(1) in the loader is no way out:
# it also sets the count every thread started later begins with (a webui's next request).
SERIAL_ELEMENTS = 32768
ARENA_ALIGN = 64
ARENA_SLACK = 1 << 20

EventCallback = Callable[[str, str, int, float], None]
# transform(name, tensor): change a freshly read floating tensor in place (e.g. merge a LoRA delta)
WeightTransform = Callable[[str, torch.Tensor], None]


@dataclass
class StreamStats:
    bytes_read: int = 0  # from the files, in the file dtype
    load_seconds: float = 0.0  # reading + converting, both threads
    wait_seconds: float = 0.0  # calling thread blocked on a prefetch
    sync_loads: int = 0  # units loaded on the calling thread
    prefetch_hits: int = 0  # units that were ready (or in progress) when called
    prefetch_discards: int = 0  # prefetched units that were not needed after all
    inflight_bytes: int = 0  # materialised, not pinned (now)
    peak_inflight_bytes: int = 0
    pinned_bytes: int = 0
    pinned_units: int = 0
    units: int = 0
    total_bytes: int = 0  # all units, in the compute dtype
    scratch_bytes: int = 0  # conversion chunk buffers allocated
    arena_bytes: int = 0  # size of the reusable block streamed units are placed in (0: none)
    arena_fallbacks: int = 0  # units that did not fit in the arena and were allocated apart

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Slot:
    owner: nn.Module  # the module the tensor is registered on (the unit or, for unit_types, a descendant)
    local: str  # attribute name on ``owner``
    full: str  # name in ``sources`` / the model's state dict
    is_param: bool
    shape: tuple[int, ...]
    dtype: torch.dtype  # materialised dtype
    source: TensorSource


@dataclass
class _Unit:
    index: int
    name: str
    module: nn.Module
    slots: list[_Slot]
    nbytes: int
    resident: bool = False
    pinned: bool = False
    decided: bool = False
    order_pos: int = -1
    block: int | None = None  # arena offset while resident from the arena


@dataclass
class _Loaded:
    tensors: dict[str, torch.Tensor]
    seconds: float
    bytes_read: int
    block: int | None  # arena offset of the tensors, None when allocated apart
    fell_back: bool = False  # an arena was offered but had no room


class _Arena:
    """One CPU buffer that streamed units are carved from.

    Freshly allocated memory is faulted in page by page, which costs about as much as
    reading the weights from the page cache; one reused buffer pays that once.  It is sized
    for the largest set of units in flight together (a unit and the next ``prefetch_depth``
    ones of the recorded order), and successive blocks are taken alternately from its
    bottom (first fit) and its top (last fit), so a big unit and its successor never
    fragment each other.  Blocks are taken on either thread, so every operation locks.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.buf = torch.empty(nbytes, dtype=torch.uint8)  # pages are faulted on first use only
        self.free: list[tuple[int, int]] = [(0, nbytes)]  # (start, size), sorted, coalesced
        self.used: dict[int, int] = {}
        self.from_top = False
        self.lock = threading.Lock()

    def alloc(self, n: int) -> int | None:
        n = -(-n // ARENA_ALIGN) * ARENA_ALIGN
        with self.lock:
            top, self.from_top = self.from_top, not self.from_top
            order = range(len(self.free) - 1, -1, -1) if top else range(len(self.free))
            for i in order:
                start, size = self.free[i]
                if size < n:
                    continue
                at = start + size - n if top else start
                rest = [(start, size - n)] if top else [(start + n, size - n)]
                self.free[i : i + 1] = rest if size > n else []
                self.used[at] = n
                return at
        return None

    def release(self, start: int) -> None:
        with self.lock:
            self.free.append((start, self.used.pop(start)))
            self.free.sort()
            merged: list[tuple[int, int]] = []
            for s, z in self.free:
                if merged and merged[-1][0] + merged[-1][1] == s:
                    merged[-1] = (merged[-1][0], merged[-1][1] + z)
                else:
                    merged.append((s, z))
            self.free = merged


@dataclass
class _Scratch:
    """Per-thread chunk buffer for dtype conversion (and non-CPU devices)."""

    buf: torch.Tensor | None = None
    allocated: int = 0
    serial: bool = False  # convert in pieces of SERIAL_ELEMENTS (no intra-op threads)


class WeightStreamer:
    """Stream ``model``'s meta tensors from ``sources`` per unit; see the module docstring.

    ``sources`` maps the model's state-dict names to :class:`TensorSource`; extra entries
    are ignored, a missing one or an element-count mismatch raises CheckpointError.
    Modules of ``unit_types`` are streamed whole, as one unit (for modules that call their
    children several times per forward, e.g. a feed-forward chunked over tokens).
    Floating tensors are materialised in ``dtype``, others in their own dtype.
    ``transform(name, tensor)``, when given, is called on every floating tensor of a unit as
    the unit is attached (in the compute dtype, on the calling thread — never the prefetch
    thread, which must not start a second OpenMP team — before it can be pinned), so every use
    of the weight, streamed, prefetched or pinned, sees the transformed values, and a discarded
    prefetch costs no transform; it must change the tensor in place.
    ``on_event(kind, unit_name, nbytes, seconds)`` is called on the calling thread with
    kind in load (synchronous), prefetch (a prefetched unit was used; seconds = its
    background load time), wait (seconds blocked on it), release, pin, discard.
    """

    def __init__(
        self,
        model: nn.Module,
        sources: dict[str, TensorSource],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cache_bytes: int = 0,
        prefetch: bool = True,
        on_event: EventCallback | None = None,
        prefetch_depth: int = 1,
        chunk_bytes: int = CHUNK_BYTES,
        arena: bool = True,
        unit_types: tuple[type, ...] = (),
        transform: WeightTransform | None = None,
        serial_prefetch: bool = True,
    ):
        if prefetch_depth < 0:
            raise ValueError("prefetch_depth must be >= 0")
        if chunk_bytes < 16:
            raise ValueError("chunk_bytes must be >= 16")
        self.chunk_bytes = int(chunk_bytes)
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.cache_bytes = max(0, int(cache_bytes))
        self.prefetch_depth = prefetch_depth if prefetch else 0
        self.on_event = on_event
        self.transform = transform
        self.stats = StreamStats()
        self._units = self._plan_units(model, sources, tuple(unit_types))
        self._order: list[_Unit] = []
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._fds: dict[str, int] = {}
        self.serial_prefetch = serial_prefetch
        self._main_scratch = _Scratch()
        self._worker_scratch = _Scratch(serial=serial_prefetch)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._arena: _Arena | None = None  # created once the first pass has recorded the order
        self._order_known = False
        self._use_arena = arena and self.device.type == "cpu"
        self._hooks: list = []
        self._closed = False
        self.stats.units = len(self._units)
        self.stats.total_bytes = sum(u.nbytes for u in self._units)
        try:
            for path in sorted({s.source.path for u in self._units for s in u.slots}):
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError("model", f"cannot open weights file '{path}': {e.strerror}") from None
            model.requires_grad_(False)
            for u in self._units:
                self._hooks.append(u.module.register_forward_pre_hook(self._make_pre_hook(u)))
                self._hooks.append(u.module.register_forward_hook(self._make_post_hook(u), always_call=True))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ planning
    def _plan_units(self, model: nn.Module, sources: dict[str, TensorSource], unit_types: tuple[type, ...]) -> list[_Unit]:
        """Units in registration order: each module owning meta tensors directly, except that
        a module of ``unit_types`` owns every tensor of its subtree (one load per call)."""
        units: list[_Unit] = []
        missing: list[str] = []
        claimed: set[int] = set()
        for mod_name, module in model.named_modules():
            if id(module) in claimed:
                continue
            whole = bool(unit_types) and isinstance(module, unit_types)
            if whole:
                members = list(module.named_modules())
                claimed.update(id(m) for _, m in members)
            else:
                members = [("", module)]
            slots = []
            for sub_name, owner in members:
                own = [(n, t, True) for n, t in owner.named_parameters(recurse=False)]
                own += [(n, t, False) for n, t in owner.named_buffers(recurse=False)]
                for local, t, is_param in own:
                    if t is None or not t.is_meta:
                        continue
                    full = ".".join(x for x in (mod_name, sub_name, local) if x)
                    src = sources.get(full)
                    if src is None:
                        missing.append(full)
                        continue
                    slots.append(self._slot(owner, local, full, t, is_param, src))
            if slots:
                nbytes = sum(_numel(s.shape) * s.dtype.itemsize for s in slots)
                units.append(_Unit(len(units), mod_name, module, slots, nbytes))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError("model", f"the checkpoint lacks {len(missing)} weight(s) the model needs: {shown}")
        return units

    def _slot(self, owner: nn.Module, local: str, full: str, t: torch.Tensor, is_param: bool, src: TensorSource) -> _Slot:
        info = src.info
        if info.numel != t.numel():
            raise CheckpointError(
                "model",
                f"weight {full!r} has shape {list(info.shape)} in {src.path} but the model needs {list(t.shape)}; "
                "allowed are checkpoints of the detected architecture",
            )
        if t.is_floating_point():
            if not info.dtype.is_floating_point:
                raise CheckpointError("model", f"weight {full!r} is {info.dtype} in {src.path}; a floating dtype is required")
            target = self.dtype
        else:
            if info.dtype.is_floating_point:
                raise CheckpointError("model", f"buffer {full!r} is {info.dtype} in {src.path}; the model keeps it as {t.dtype}")
            target = t.dtype
        return _Slot(owner, local, full, is_param, tuple(t.shape), target, src)

    # ------------------------------------------------------------------ loading
    def _scratch(self, holder: _Scratch) -> torch.Tensor:
        if holder.buf is None:
            holder.buf = torch.empty(self.chunk_bytes, dtype=torch.uint8)
            holder.allocated = self.chunk_bytes
        return holder.buf

    def _load(self, unit: _Unit, scratch: _Scratch, arena: _Arena | None) -> _Loaded:
        """Read and convert a unit's tensors (runs on either thread; touches no shared state
        except the read-only fds and this thread's scratch)."""
        t0 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        block = arena.alloc(unit.nbytes + ARENA_ALIGN * len(unit.slots)) if arena is not None else None
        try:
            self._fill(unit, scratch, arena, block, out)
        except BaseException:
            out.clear()
            if block is not None:
                arena.release(block)
            raise
        nread = sum(slot.source.info.nbytes for slot in unit.slots)
        return _Loaded(out, time.perf_counter() - t0, nread, block, arena is not None and block is None)

    def _fill(self, unit: _Unit, scratch: _Scratch, arena: _Arena | None, block: int | None, out: dict[str, torch.Tensor]) -> None:
        pos = block
        for slot in unit.slots:
            info = slot.source.info
            fd = self._fds[slot.source.path]
            if pos is not None:
                n = _numel(slot.shape) * slot.dtype.itemsize
                t = arena.buf[pos : pos + n].view(slot.dtype).view(slot.shape)
                pos += -(-n // ARENA_ALIGN) * ARENA_ALIGN
            else:
                t = torch.empty(slot.shape, dtype=slot.dtype, device=self.device)
            if info.nbytes:
                if info.dtype == slot.dtype and self.device.type == "cpu":
                    read_into(fd, info, t)
                else:
                    buf = self._scratch(scratch)
                    isz = info.dtype.itemsize
                    per = self.chunk_bytes // isz
                    flat = t.view(-1)
                    for start in range(0, info.numel, per):
                        n = min(per, info.numel - start)
                        chunk = buf[: n * isz]
                        pread_into(fd, info.offset + start * isz, tensor_memoryview(chunk))
                        src = chunk.view(info.dtype)
                        if not scratch.serial or n <= SERIAL_ELEMENTS:
                            flat[start : start + n].copy_(src)
                            continue
                        dst = flat[start : start + n]
                        for i in range(0, n, SERIAL_ELEMENTS):
                            dst[i : i + SERIAL_ELEMENTS].copy_(src[i : i + SERIAL_ELEMENTS])
            out[slot.full] = t

    def _attach(self, unit: _Unit, loaded: _Loaded) -> None:
        for slot in unit.slots:
            t = loaded.tensors[slot.full]
            if self.transform is not None and t.is_floating_point():
                self.transform(slot.full, t)  # on the calling thread: its GEMMs use the model's OpenMP team
            setattr(slot.owner, slot.local, nn.Parameter(t, requires_grad=False) if slot.is_param else t)
        unit.resident = True
        unit.block = loaded.block

    def _detach(self, unit: _Unit) -> None:
        for slot in unit.slots:
            t = torch.empty(slot.shape, dtype=slot.dtype, device="meta")
            setattr(slot.owner, slot.local, nn.Parameter(t, requires_grad=False) if slot.is_param else t)
        unit.resident = False
        if unit.block is not None:
            self._arena.release(unit.block)
            unit.block = None

    def _move_out_of_arena(self, unit: _Unit) -> None:
        """Give a unit that stays resident its own memory, so the arena keeps serving streaming."""
        if unit.block is None:
            return
        for slot in unit.slots:
            t = getattr(slot.owner, slot.local).detach().clone()
            setattr(slot.owner, slot.local, nn.Parameter(t, requires_grad=False) if slot.is_param else t)
        self._arena.release(unit.block)
        unit.block = None

    def _count_in(self, nbytes: int) -> None:
        s = self.stats
        s.inflight_bytes += nbytes
        s.peak_inflight_bytes = max(s.peak_inflight_bytes, s.inflight_bytes)

    def _emit(self, kind: str, unit: _Unit, nbytes: int, seconds: float) -> None:
        if self.on_event is not None:
            self.on_event(kind, unit.name, nbytes, seconds)

    def _account_load(self, loaded: _Loaded) -> None:
        self.stats.bytes_read += loaded.bytes_read
        self.stats.load_seconds += loaded.seconds
        self.stats.arena_fallbacks += loaded.fell_back
        self.stats.scratch_bytes = max(self.stats.scratch_bytes, self._main_scratch.allocated + self._worker_scratch.allocated)

    def _order_complete(self) -> None:
        """The first pass is over (its first unit is called again): size and create the arena."""
        self._order_known = True
        if not self._use_arena:
            return
        streamed = [u for u in self._order if not u.pinned]

        def need(u: _Unit) -> int:
            return -(-(u.nbytes + ARENA_ALIGN * len(u.slots)) // ARENA_ALIGN) * ARENA_ALIGN

        window = self.prefetch_depth + 1
        size = max((sum(need(u) for u in streamed[i : i + window]) for i in range(len(streamed))), default=0)
        if size:
            self._arena = _Arena(size + ARENA_SLACK)
            self.stats.arena_bytes = self._arena.nbytes

    def _bring_in(self, unit: _Unit) -> None:
        """Make ``unit`` resident on the calling thread (from a prefetch or synchronously)."""
        fut = self._pending.pop(unit.index, None)
        if fut is not None:
            t0 = time.perf_counter()
            done = fut.done()
            try:
                loaded = fut.result()
            except BaseException:
                self.stats.inflight_bytes -= unit.nbytes
                raise
            waited = 0.0 if done else time.perf_counter() - t0
            self.stats.wait_seconds += waited
            self.stats.prefetch_hits += 1
            self._account_load(loaded)
            self._attach(unit, loaded)
            self._emit("prefetch", unit, unit.nbytes, loaded.seconds)
            if waited:
                self._emit("wait", unit, unit.nbytes, waited)
            return
        self._count_in(unit.nbytes)
        try:
            loaded = self._load(unit, self._main_scratch, self._arena)
        except BaseException:
            self.stats.inflight_bytes -= unit.nbytes
            raise
        self.stats.sync_loads += 1
        self._account_load(loaded)
        self._attach(unit, loaded)
        self._emit("load", unit, unit.nbytes, loaded.seconds)

    # ------------------------------------------------------------------ prefetch
    def _window(self, unit: _Unit) -> list[_Unit]:
        out: list[_Unit] = []
        if self.prefetch_depth == 0 or unit.order_pos < 0:
            return out
        for nxt in self._order[unit.order_pos + 1 :]:
            if len(out) >= self.prefetch_depth:
                break
            if nxt.pinned or nxt.resident or nxt is unit:
                continue
            out.append(nxt)
        return out

    def _discard(self, index: int) -> None:
        fut = self._pending.pop(index)
        unit = self._units[index]
        if not fut.cancel():
            try:  # already running: let it finish, then drop it
                loaded = fut.result()
            except Exception:
                loaded = None  # the load would have been retried (and the error raised) if the unit were needed
            if loaded is not None:
                self._account_load(loaded)
                loaded.tensors.clear()
                if loaded.block is not None:
                    self._arena.release(loaded.block)
        self.stats.inflight_bytes -= unit.nbytes
        self.stats.prefetch_discards += 1
        self._emit("discard", unit, unit.nbytes, 0.0)

    def _schedule(self, unit: _Unit) -> None:
        window = self._window(unit)
        wanted = {u.index for u in window}
        for index in [i for i in self._pending if i not in wanted]:
            self._discard(index)
        for nxt in window:
            if nxt.index in self._pending:
                continue
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hrlr-prefetch")
            self._count_in(nxt.nbytes)
            self._pending[nxt.index] = self._executor.submit(self._load, nxt, self._worker_scratch, self._arena)

    # ------------------------------------------------------------------ hooks
    def _make_pre_hook(self, unit: _Unit):
        def pre_hook(module, args):
            if unit.order_pos < 0:
                unit.order_pos = len(self._order)
                self._order.append(unit)
            elif unit.order_pos == 0 and not self._order_known:
                self._order_complete()
            if not unit.resident:
                self._bring_in(unit)
            self._schedule(unit)
            return None

        return pre_hook

    def _make_post_hook(self, unit: _Unit):
        def post_hook(module, args, output):
            if unit.pinned or not unit.resident:
                return None
            self.stats.inflight_bytes -= unit.nbytes
            if not unit.decided:
                unit.decided = True
                if self.stats.pinned_bytes + unit.nbytes <= self.cache_bytes:
                    self._pin(unit)
                    return None
            self._detach(unit)
            self._emit("release", unit, unit.nbytes, 0.0)
            return None

        return post_hook

    def _pin(self, unit: _Unit) -> None:
        self._move_out_of_arena(unit)
        unit.pinned = unit.decided = True
        self.stats.pinned_bytes += unit.nbytes
        self.stats.pinned_units += 1
        self._emit("pin", unit, unit.nbytes, 0.0)

    # ------------------------------------------------------------------ public
    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self._units]

    @property
    def unit_bytes(self) -> dict[str, int]:
        return {u.name: u.nbytes for u in self._units}

    @property
    def execution_order(self) -> list[str]:
        return [u.name for u in self._order]

    def materialize_all(self) -> None:
        """Load every unit now and keep all of them resident (pinned) until close()."""
        self._check_open()
        for index in list(self._pending):
            self._discard(index)
        for unit in self._units:
            if not unit.resident:
                self._count_in(unit.nbytes)
                loaded = self._load(unit, self._main_scratch, None)  # resident for good: not in the arena
                self.stats.sync_loads += 1
                self._account_load(loaded)
                self._attach(unit, loaded)
                self._emit("load", unit, unit.nbytes, loaded.seconds)
            if not unit.pinned:
                self.stats.inflight_bytes -= unit.nbytes
                self._pin(unit)

    def close(self) -> None:
        """Remove every hook, stop the worker, put every tensor back on meta, close the files."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for index in list(self._pending):
            self._discard(index)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for unit in self._units:
            if unit.resident:
                if not unit.pinned:
                    self.stats.inflight_bytes -= unit.nbytes
                self._detach(unit)
            unit.pinned = False
        self.stats.pinned_bytes = 0
        self.stats.pinned_units = 0
        self._main_scratch = _Scratch()
        self._worker_scratch = _Scratch(serial=self.serial_prefetch)
        self._arena = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._order.clear()

    detach = close

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this WeightStreamer is closed")

    def __enter__(self) -> "WeightStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
