"""The sha256 of a model file, computed once and remembered by (path, size, mtime).

Hashing a checkpoint reads all of it (2-7 GB); the webui keeps the result in its cache keyed
by the file's modification time, and so do we: ``<cache dir>/hashes.json`` (``$HRLR_CACHE``,
default ``~/.cache/hrlr``, never the repository) maps the file's real path to
``{"size", "mtime_ns", "sha256"}``.  An entry counts only while the file's size and
modification time are unchanged; a file that changes while it is being hashed is not
cached.  The cache is an optimisation: a missing, damaged or read-only cache file only
means the hash is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from ..runtime import cache_dir

CACHE_NAME = "hashes.json"
BLOCK = 1 << 20


def default_cache_file() -> str:
    return os.path.join(cache_dir(), CACHE_NAME)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of the whole file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def _load(cache_file: str) -> dict:
    try:
        with open(cache_file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(cache_file: str, key: str, entry: dict) -> None:
    """Merge one entry into the cache file, atomically (a temporary file renamed over it)."""
    folder = os.path.dirname(cache_file) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        data = _load(cache_file)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, cache_file)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only cache only costs the next run a re-hash


def cached_sha256(path: str | os.PathLike, cache_file: str | None = None) -> str:
    """sha256 of ``path``, from the cache when its size and mtime match the cached entry."""
    cache_file = cache_file or default_cache_file()
    key = os.path.realpath(path)
    st = os.stat(key)
    entry = _load(cache_file).get(key)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
        return entry["sha256"]
    digest = sha256_file(key)
    after = os.stat(key)
    if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        _store(cache_file, key, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return digest
