"""Memory meter: who used how much memory, and for how long.

The meter samples the process's resident set (VmRSS) and its kernel-kept peak (VmHWM)
from ``/proc/self/status`` on a background thread every 5 ms (about 1 % of one core), and on
CUDA ``torch.cuda.max_memory_allocated``.  The highest sample also keeps what the kernel says
the resident set was made of then (``RssAnon``: heap and anonymous mappings; ``RssFile``:
mapped files such as the checkpoint and the shared libraries; ``RssShmem``) and the labels that
were open: the report's ``peak_sample``.  Code marks what it is doing with nested
labels (``with meter.stage("tiled_unet"):`` / ``with meter.module("unet.output_blocks"):``);
every sample is credited to all open labels, and when VmHWM rises the new peak is
credited to the labels open at that moment, so the process peak is always attributed
to a stage even if it lasted less than one sampling interval.

Usage::

    with MemoryMeter() as meter:
        with meter.stage("text_encoder"):
            ...
    print(meter.report().table())
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field

MB = 1024 * 1024


def read_status_kb(keys: tuple[str, ...] = ("VmRSS", "VmHWM"), pid: int | str = "self") -> dict[str, int]:
    """Selected fields of /proc/<pid>/status in kB (empty dict off Linux)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                k, _, v = line.partition(b":")
                ks = k.decode()
                if ks in keys:
                    out[ks] = int(v.split()[0])
    except OSError:
        pass
    return out


STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


class _StatusReader:
    """VmRSS, VmHWM and the parts of VmRSS of this process in kB, read through one open descriptor.

    The sampler reads them hundreds of times a second: one ``pread`` and a ``find`` per field
    cost ~20 µs (five fields), against ~70 µs for opening and parsing the file line by line."""

    def __init__(self):
        try:
            self.fd = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:
            self.fd = -1

    def read(self) -> dict[str, int]:
        if self.fd < 0:
            return {}
        try:
            text = os.pread(self.fd, 16384, 0)
        except OSError:
            return {}
        out = {}
        for name in STATUS_KEYS:
            key = name.encode() + b":"
            i = text.find(key)
            if i >= 0:
                out[name] = int(text[i + len(key):text.index(b"kB", i)])
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5), so that the peak
    of a run inside a long-lived process (the webui) is not its load-time peak.  False where
    the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    return read_status_kb(("VmRSS",)).get("VmRSS", 0) / 1024


def hwm_mb() -> float:
    return read_status_kb(("VmHWM",)).get("VmHWM", 0) / 1024


@dataclass
class Entry:
    name: str
    kind: str  # "stage" | "module" | "note"
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    calls: int = 0
    peak_vram_mb: float | None = None
    start_rss_mb: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class PeakSample:
    """The highest resident set the sampler saw, what it was made of, and the open labels.

    A peak shorter than the sampling interval is in ``MemoryReport.peak_rss_mb`` (VmHWM) but
    not here: ``rss_mb`` is then a little below it."""

    rss_mb: float = 0.0
    anon_mb: float | None = None  # RssAnon: heap, anonymous mmaps (tensors)
    file_mb: float | None = None  # RssFile: mapped files (checkpoint pages, libraries)
    shmem_mb: float | None = None  # RssShmem
    seconds: float = 0.0  # since the meter started
    labels: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        r = (lambda v: None if v is None else round(v, 1))
        return {"rss_mb": round(self.rss_mb, 1), "anon_mb": r(self.anon_mb), "file_mb": r(self.file_mb),
                "shmem_mb": r(self.shmem_mb), "seconds": round(self.seconds, 3), "labels": list(self.labels)}


@dataclass
class MemoryReport:
    peak_rss_mb: float
    baseline_rss_mb: float
    peak_vram_mb: float | None
    wall_s: float
    entries: list[Entry]
    run_peak_rss_mb: float = 0.0  # highest RSS seen while the meter ran (VmHWM rises included)
    spill_mb: float | None = None  # the run's spill files at their peak (on disk, not in the RSS)
    spill_dir: str | None = None
    peak_sample: PeakSample | None = None

    def as_dict(self) -> dict:
        return {
            "spill_mb": None if self.spill_mb is None else round(self.spill_mb, 1),
            "spill_dir": self.spill_dir,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "baseline_rss_mb": round(self.baseline_rss_mb, 1),
            "peak_vram_mb": None if self.peak_vram_mb is None else round(self.peak_vram_mb, 1),
            "run_peak_rss_mb": round(self.run_peak_rss_mb, 1),
            "peak_sample": None if self.peak_sample is None else self.peak_sample.as_dict(),
            "wall_s": round(self.wall_s, 3),
            "modules": [
                {
                    "name": e.name,
                    "kind": e.kind,
                    "peak_rss_mb": round(e.peak_rss_mb, 1),
                    "seconds": round(e.seconds, 3),
                    "calls": e.calls,
                    "peak_vram_mb": None if e.peak_vram_mb is None else round(e.peak_vram_mb, 1),
                    **({"extra": e.extra} if e.extra else {}),
                }
                for e in self.entries
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def table(self) -> str:
        vram = self.peak_vram_mb is not None
        head = f"{'stage / module':<34}{'peak RSS MB':>12}{'seconds':>10}{'calls':>7}" + (f"{'peak VRAM MB':>14}" if vram else "")
        lines = [head, "-" * len(head)]
        for e in self.entries:
            indent = "  " if e.kind == "module" else ""
            row = f"{indent + e.name:<34}{e.peak_rss_mb:>12.1f}{e.seconds:>10.2f}{e.calls:>7}"
            if vram:
                row += f"{(e.peak_vram_mb or 0):>14.1f}"
            lines.append(row)
        lines.append("-" * len(head))
        tail = f"{'process peak (VmHWM)':<34}{self.peak_rss_mb:>12.1f}{self.wall_s:>10.2f}"
        if vram:
            tail += f"{'':>7}{self.peak_vram_mb:>14.1f}"
        lines.append(tail)
        ps = self.peak_sample
        if ps is not None and ps.anon_mb is not None:
            where = " > ".join(ps.labels) or "no label"
            lines.append(f"{'highest sample: anon + file':<34}{ps.rss_mb:>12.1f}  = {ps.anon_mb:.1f} + "
                         f"{ps.file_mb or 0:.1f} (+ shmem {ps.shmem_mb or 0:.1f}) MB at {ps.seconds:.1f} s in {where}")
        if self.spill_mb is not None:
            lines.append(f"{'spill files on disk (not RSS)':<34}{self.spill_mb:>12.1f}  in {self.spill_dir}")
        return "\n".join(lines)


class MemoryMeter:
    """Samples RSS (and CUDA peak allocation) and attributes peaks to nested labels."""

    def __init__(self, interval_s: float = 0.005, cuda_device=None):
        self.interval_s = interval_s
        self.cuda_device = cuda_device
        # set by the run once it has chosen its spill folder: (peak spill bytes, folder)
        self.spill: tuple[int, str] | None = None
        self._entries: dict[str, Entry] = {}
        self._open: list[Entry] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_hwm_kb = 0
        self._t0 = 0.0
        self._baseline = 0.0
        self._wall = 0.0
        self._run_peak = 0.0
        self._peak_sample: PeakSample | None = None
        self._status: _StatusReader | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "MemoryMeter":
        st = read_status_kb(STATUS_KEYS)
        self._baseline = st.get("VmRSS", 0) / 1024
        self._last_hwm_kb = st.get("VmHWM", 0)
        self._run_peak = self._baseline
        self._t0 = time.perf_counter()
        self._peak_sample = self._breakdown(st, self._baseline)
        self._stop.clear()
        self._status = _StatusReader()
        self._thread = threading.Thread(target=self._run, name="hrlr-memory-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
            self._wall = time.perf_counter() - self._t0
            self._status.close()
            self._status = None

    def __enter__(self) -> "MemoryMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- sampling --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _breakdown(self, st: dict[str, int], rss: float) -> PeakSample:
        part = (lambda k: st[k] / 1024 if k in st else None)
        return PeakSample(rss, part("RssAnon"), part("RssFile"), part("RssShmem"),
                          time.perf_counter() - self._t0, tuple(e.name for e in self._open))

    def _sample(self) -> None:
        reader = self._status
        st = reader.read() if reader is not None else read_status_kb(STATUS_KEYS)
        if not st:
            return
        rss = st.get("VmRSS", 0) / 1024
        hwm_kb = st.get("VmHWM", 0)
        with self._lock:
            peak = rss
            if hwm_kb > self._last_hwm_kb:
                # the process reached a new peak since the last sample, while these labels were open
                peak = max(peak, hwm_kb / 1024)
                self._last_hwm_kb = hwm_kb
            self._run_peak = max(self._run_peak, peak)
            if self._peak_sample is None or rss > self._peak_sample.rss_mb:
                self._peak_sample = self._breakdown(st, rss)
            for e in self._open:
                if peak > e.peak_rss_mb:
                    e.peak_rss_mb = peak

    def _cuda(self):
        if self.cuda_device is None:
            return None
        import torch

        return torch.cuda

    # -- labels ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _label(self, name: str, kind: str):
        cuda = self._cuda()
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                e = self._entries[name] = Entry(name=name, kind=kind)
            e.calls += 1
            self._open.append(e)
        self._sample()
        if cuda is not None:
            cuda.synchronize(self.cuda_device)
            outer = cuda.max_memory_allocated(self.cuda_device)
            cuda.reset_peak_memory_stats(self.cuda_device)
        t = time.perf_counter()
        try:
            yield e
        finally:
            self._sample()
            e.seconds += time.perf_counter() - t
            if cuda is not None:
                cuda.synchronize(self.cuda_device)
                inner = cuda.max_memory_allocated(self.cuda_device) / MB
                e.peak_vram_mb = max(e.peak_vram_mb or 0.0, inner)
                # keep enclosing labels' peaks right: they saw at least this much
                for o in self._open[:-1]:
                    o.peak_vram_mb = max(o.peak_vram_mb or 0.0, inner, outer / MB)
            with self._lock:
                self._open.remove(e)

    def stage(self, name: str):
        """A pipeline stage (text encoder, base UNet, guide encode, tiled UNet, VAE decode...)."""
        return self._label(name, "stage")

    def module(self, name: str):
        """A model part inside a stage (e.g. ``unet.output_blocks``); may be entered many times."""
        return self._label(name, "module")

    def note(self, name: str, peak_mb: float, seconds: float = 0.0, **extra) -> None:
        """Record a figure measured elsewhere (e.g. the streaming cache's resident bytes)."""
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                e = self._entries[name] = Entry(name=name, kind="note")
            e.calls += 1
            e.peak_rss_mb = max(e.peak_rss_mb, peak_mb)
            e.seconds += seconds
            e.extra.update(extra)

    # -- results ---------------------------------------------------------------------------
    def report(self) -> MemoryReport:
        self._sample()
        cuda = self._cuda()
        vram = None
        if cuda is not None:
            vram = max([e.peak_vram_mb or 0.0 for e in self._entries.values()] + [cuda.max_memory_allocated(self.cuda_device) / MB])
        wall = self._wall if self._thread is None and self._wall else time.perf_counter() - self._t0
        with self._lock:
            entries = [Entry(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in asdict(e).items()}) for e in self._entries.values()]
        return MemoryReport(
            peak_rss_mb=self._last_hwm_kb / 1024,
            baseline_rss_mb=self._baseline,
            peak_vram_mb=vram,
            wall_s=wall,
            entries=entries,
            run_peak_rss_mb=self._run_peak,
            spill_mb=None if self.spill is None else self.spill[0] / MB,
            spill_dir=None if self.spill is None else self.spill[1],
            peak_sample=self._peak_sample,
        )


def attach_module_labels(meter: MemoryMeter, named_modules: dict[str, object]):
    """Label forward passes of the given modules in ``meter`` (a name may cover a list of
    modules); returns a context manager that removes the hooks."""
    stack = contextlib.ExitStack()
    handles = []
    active: dict[int, object] = {}
    pairs = [(name, m) for name, mods in named_modules.items()
             for m in (mods if isinstance(mods, (list, tuple)) else [mods])]

    for name, mod in pairs:
        def pre(m, args, _name=name):
            cm = meter.module(_name)
            cm.__enter__()
            active[id(m)] = cm

        def post(m, args, out):
            cm = active.pop(id(m), None)
            if cm is not None:
                cm.__exit__(None, None, None)

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))

    def remove():
        for h in handles:
            h.remove()
        for cm in list(active.values()):
            cm.__exit__(None, None, None)
        active.clear()

    stack.callback(remove)
    return stack
