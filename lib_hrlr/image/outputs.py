"""Where images go without ``--out``: the webui's layout, never overwriting.

``<root>/<kind>-images/YYYY-MM-DD/NNNNN-SEED.png`` with ``kind`` one of ``txt2img``,
``img2img`` (generate with an init image) and ``upscale``; ``NNNNN`` is one more than the
largest number any file of that day's folder starts with (the webui's
``get_next_sequence_number``), so a number is never reused, even after files are deleted
in between, and an existing file is never overwritten.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

from ..errors import InvalidInput

KINDS = ("txt2img", "img2img", "upscale")
DEFAULT_ROOT = "outputs"
_NUMBERED = re.compile(r"^(\d+)-")


def day_folder(root: str | os.PathLike, kind: str, today: _dt.date | None = None) -> Path:
    if kind not in KINDS:
        raise InvalidInput("kind", f"'{kind}' is not one of: {', '.join(KINDS)}")
    return Path(root) / f"{kind}-images" / (today or _dt.date.today()).isoformat()


def next_number(folder: Path) -> int:
    """One more than the largest leading number of the files in ``folder`` (0 when none)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    nums = [int(m.group(1)) for n in names if (m := _NUMBERED.match(n))]
    return max(nums) + 1 if nums else 0


def next_output_path(root: str | os.PathLike, kind: str, seed: int, today: _dt.date | None = None) -> Path:
    """The path of the next image of ``kind`` with ``seed`` (the folder is not created here)."""
    folder = day_folder(root, kind, today)
    n = next_number(folder)
    while True:
        path = folder / f"{n:05d}-{seed}.png"
        if not path.exists():
            return path
        n += 1


def batch_path(out: str, seed: int, count: int) -> str:
    """An explicit ``--out`` of a batch: ``name.png`` for one image, ``name-SEED.png`` for each of several."""
    if count == 1:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}-{seed}{ext}"
