"""Benchmarks that measure the engine from outside (``python -m lib_hrlr bench``)."""

import json
import os


def write_json(path: str, data, indent: int = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=indent)
    os.replace(tmp, path)
