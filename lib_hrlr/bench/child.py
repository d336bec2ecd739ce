"""Run a bench child process and measure it from outside: wall time, the kernel's peak RSS,
and optionally inside a memory cgroup whose hard limit counts the page cache.

``run_child(cmd, env, limit_mb=N)`` creates a fresh cgroup below the one this process is in
(v1: under its directory in ``/sys/fs/cgroup/memory``, with ``memory.limit_in_bytes`` and no
swap; v2: in the unified hierarchy with ``memory.max``), moves the child into it before it runs anything
(a gate process forks it, adds it to the cgroup while it waits on a pipe, then lets it go), and reads
back what the kernel counted: the cgroup's peak (``memory.peak`` / ``memory.max_usage_in_bytes``,
which includes the page cache of what the child read), and whether the OOM killer fired
(``memory.events`` ``oom_kill`` / ``memory.oom_control``).  ``cold=True`` first drops the
page cache (``/proc/sys/vm/drop_caches``), so the weights are read from disk.

Where no cgroup can be made (no controller, not root, a read-only cgroupfs, a v2 parent whose
``cgroup.subtree_control`` lacks ``memory``) :func:`cgroup_support` says why, and the bench
refuses ``--cgroup-limit-mb`` with that reason instead of running unlimited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_MEMORY = Path("/sys/fs/cgroup/memory")


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_mb: float  # the child's VmHWM (wait4's ru_maxrss)
    cgroup: dict = field(default_factory=dict)  # limit_mb, peak_mb, oom_kills, version, path (when limited)

    @property
    def oom_killed(self) -> bool:
        return bool(self.cgroup.get("oom_kills"))


class CgroupUnavailable(RuntimeError):
    pass


def _own_v1_memory_dir() -> Path:
    """This process's memory cgroup in a v1 hierarchy (new groups nest below it, so the limits
    of whatever contains us still apply to the child)."""
    try:
        for ln in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, rel = ln.split(":", 2)
            if "memory" in ctrls.split(","):
                d = V1_MEMORY / rel.lstrip("/")
                if d.is_dir():
                    return d
    except (OSError, ValueError):
        pass
    return V1_MEMORY


def _own_v2_dir() -> Path | None:
    """This process's cgroup directory in a v2 (unified) hierarchy, or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for ln in lines:
        if ln.startswith("0::"):
            d = V2_ROOT / ln[3:].lstrip("/")
            return d if (d / "cgroup.controllers").exists() or d == V2_ROOT else None
    return None


class _Cgroup:
    """One fresh memory cgroup: ``add(pid)``, ``peak_bytes()``, ``oom_kills()``, ``remove()``."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        name = f"hrlr-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if (V1_MEMORY / "memory.limit_in_bytes").exists():
            self.version = 1
            self.path = _own_v1_memory_dir() / name
            self._make()
            self._write("memory.limit_in_bytes", str(limit_bytes))
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                self._write("memory.memsw.limit_in_bytes", str(limit_bytes))
            self._write("memory.swappiness", "0", required=False)
            return
        parent = _own_v2_dir()
        if parent is None or not (V2_ROOT / "cgroup.controllers").exists():
            raise CgroupUnavailable("no cgroup v1 memory controller at /sys/fs/cgroup/memory and no cgroup v2 hierarchy")
        self.version = 2
        # a v2 process may only sit in a leaf: make our group a sibling under the parent's parent
        # when the parent holds processes, else under the parent
        base = parent
        if "memory" not in (base / "cgroup.subtree_control").read_text().split():
            try:
                (base / "cgroup.subtree_control").write_text("+memory")
            except OSError as e:
                raise CgroupUnavailable(f"cannot enable the memory controller below {base}: {e.strerror}") from None
        self.path = base / name
        self._make()
        self._write("memory.max", str(limit_bytes))
        self._write("memory.swap.max", "0", required=False)

    def _make(self) -> None:
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create the cgroup {self.path}: {e.strerror}") from None

    def _write(self, name: str, value: str, required: bool = True) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as e:
            if required:
                self.remove()
                raise CgroupUnavailable(f"cannot write {value} to {self.path / name}: {e.strerror}") from None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def peak_bytes(self) -> int | None:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                return int((self.path / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return None

    def oom_kills(self) -> int:
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            try:
                for ln in (self.path / name).read_text().splitlines():
                    k, _, v = ln.partition(" ")
                    if k == key:
                        return int(v)
            except (OSError, ValueError):
                continue
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # the killed child's pages are still being uncharged


def cgroup_support() -> str | None:
    """None when a memory cgroup can be made here, else why not."""
    try:
        cg = _Cgroup(1 << 30)
    except CgroupUnavailable as e:
        return str(e)
    except OSError as e:
        return f"cgroups unusable: {e}"
    cg.remove()
    return None


def drop_page_cache() -> str | None:
    """Write back and drop the kernel's clean page cache; None on success, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        return f"cannot drop the page cache: {e.strerror}"
    return None


# The child is started by a small gate process: a fresh interpreter that forks the command,
# puts it in the cgroup while it waits on a pipe, lets it run and reports what wait4 measured.
# Measuring from the gate, not from this process, matters: a process's ru_maxrss starts from
# the RSS high-water mark of the address space it had before its exec, and a child spawned from
# this (torch-sized) process would carry this process's peak into its own.  The gate stays
# outside the cgroup.
GATE = r"""
import os, sys, time
out_fd, procs, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
r, w = os.pipe()
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(w)
    os.read(r, 1)
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
os.close(r)
try:
    if procs:
        with open(procs, "w") as f:
            f.write(str(pid))
except OSError as e:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.write(out_fd, ("error cannot move the child into the cgroup: " + str(e)).encode())
    os._exit(3)
os.write(w, b"x")
os.close(w)
_, status, ru = os.wait4(pid, 0)
os.write(out_fd, f"ok {ru.ru_maxrss} {status} {time.perf_counter() - t0}".encode())
os._exit(0)
"""


def run_child(cmd: list[str], env: dict | None = None, limit_mb: float | None = None, cold: bool = False,
              stdout=None, stderr=None) -> ChildResult:
    """Run ``cmd`` to completion; with ``limit_mb``, inside a fresh memory cgroup of that hard limit.

    ``wall_s`` runs from the fork to the child's exit; ``peak_rss_mb`` is the child's own
    VmHWM as the kernel reports it to ``wait4``.  Raises CgroupUnavailable (with the reason)
    when a limit is asked for and cannot be set up."""
    cg = None
    if limit_mb is not None:
        cg = _Cgroup(int(limit_mb * 1024 * 1024))
    info: dict = {}
    try:
        if cold:
            why = drop_page_cache()
            info["cold"] = why is None
            if why:
                print(f"bench: {why}; the page cache stays warm", file=sys.stderr)
        r, w = os.pipe()
        procs = str(cg.path / "cgroup.procs") if cg is not None else ""
        try:
            proc = subprocess.Popen([sys.executable, "-c", GATE, str(w), procs, *cmd], env=env, pass_fds=(w,),
                                    stdout=stdout, stderr=stderr)
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as fh:
            report = fh.read().decode()
        proc.wait()
        if not report.startswith("ok "):
            if cg is not None and "cgroup" in report:
                raise CgroupUnavailable(report.removeprefix("error "))
            raise RuntimeError(f"bench: the child could not be run ({report or 'gate exit ' + str(proc.returncode)})")
        _, maxrss_kb, status, wall = report.split()
        rc = os.waitstatus_to_exitcode(int(status))
        if cg is not None:
            peak = cg.peak_bytes()
            info.update(version=cg.version, limit_mb=limit_mb, path=str(cg.path), oom_kills=cg.oom_kills(),
                        peak_mb=None if peak is None else round(peak / 2**20, 1))
        return ChildResult(rc, float(wall), int(maxrss_kb) / 1024, info)
    finally:
        if cg is not None:
            cg.remove()
