"""Benchmarks that measure the engine from outside (``python -m lib_hrlr bench``)."""

import json
import os

from ..cli import THP_ENV


def write_json(path: str, data, indent: int = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=indent)
    os.replace(tmp, path)


def child_env(**overrides: str) -> dict[str, str]:
    """The environment of a bench child (ours, and a peer's): this process's, unbuffered, with
    torch's huge pages for large tensors as the command's entry point sets them
    (:data:`~lib_hrlr.cli.THP_ENV`, unless set), so both sides of a side-by-side run get the same
    even when the bench itself was started in-process."""
    env = dict(os.environ, **overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault(THP_ENV, "1")
    return env
