"""The AUTOMATIC1111 webui "infotext": the generation parameters stored in a PNG.

Layout (what the webui writes and its "PNG Info" tab reads back)::

    <prompt, any number of lines>
    Negative prompt: <negative prompt, any number of lines>     (omitted when empty)
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 2048x2048, ...

The last line is ``key: value`` pairs joined by ", ".  A value containing a comma, a
colon, a newline or a double quote (or with spaces at either end) is written as a JSON
string (``"..."`` with backslash escapes, non-ASCII kept as is), which is how the webui
quotes; everything else is written bare.  Our own settings use keys prefixed ``HRLR ``
(``HRLR tile: 64, HRLR VAE: full, HRLR regions: "[...]"``); the webui keeps unknown
keys, so they survive a round trip through it.

:func:`format_infotext` takes the parameters as a mapping (in the order given) or as
:class:`InfotextFields`; :func:`parse_infotext` returns ``(prompt, negative, params)``
with every value as the string that was written (``Size`` stays ``"2048x2048"``).
Prompts round-trip exactly unless they begin or end with whitespace (stripped, as the
webui does) or contain a line starting with ``Negative prompt:``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import InvalidInput

NEGATIVE_PREFIX = "Negative prompt:"
HRLR_PREFIX = "HRLR "

# a key starts with a word character and continues with word characters, spaces, - or /
_KEY = r"\w[\w \-/]*"
_KEY_RE = re.compile(rf"{_KEY}\Z")
# one "key: value" pair: a JSON-quoted value or a run of anything but commas
_PAIR_RE = re.compile(rf'\s*({_KEY}):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|\Z)')


def format_value(value: Any) -> str:
    """A parameter value as text: integral floats without ``.0``, bools as True/False."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput("infotext", f"value {value!r} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def quote(text: str) -> str:
    """Bare if safe on a parameter line, else a JSON string (as the webui quotes)."""
    if text and not any(ch in text for ch in ',:\n"') and text == text.strip():
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, str):
            return value
    return text


@dataclass
class InfotextFields:
    """The usual webui parameters plus ours; ``None`` fields are left out.

    ``hrlr`` holds our settings without the prefix (``{"tile": 64}`` → ``HRLR tile: 64``);
    ``extra`` holds any other webui key verbatim (``{"Clip skip": 2}``).
    """

    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    schedule_type: str | None = None
    model_hash: str | None = None
    model: str | None = None
    denoising_strength: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    hrlr: dict[str, Any] = field(default_factory=dict)

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "Schedule type": self.schedule_type,
            "CFG scale": self.cfg_scale,
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model,
            "Denoising strength": self.denoising_strength,
        }
        params.update(self.extra)
        for k, v in self.hrlr.items():
            params[HRLR_PREFIX + k] = v
        return {k: v for k, v in params.items() if v is not None}


def format_params(params: Mapping[str, Any] | InfotextFields) -> str:
    """The parameter line: ``key: value`` pairs joined by ``", "``, ``None`` values skipped."""
    if isinstance(params, InfotextFields):
        params = params.to_params()
    elif dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    if not isinstance(params, Mapping):
        raise InvalidInput("infotext", f"parameters must be a mapping or InfotextFields, got {type(params).__name__}")
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        if not isinstance(key, str) or not _KEY_RE.match(key) or key != key.strip():
            raise InvalidInput(
                "infotext",
                f"parameter name {key!r} is not allowed: it must start with a letter or digit and contain only "
                "letters, digits, spaces, '-', '/' and '_' (no trailing space)",
            )
        parts.append(f"{key}: {quote(format_value(value))}")
    return ", ".join(parts)


def format_infotext(prompt: str, negative: str = "", params: Mapping[str, Any] | InfotextFields | None = None) -> str:
    """The webui infotext for a prompt, a negative prompt and the parameters."""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise InvalidInput("infotext", "prompt and negative prompt must be str")
    text = prompt
    if negative:
        text += f"\n{NEGATIVE_PREFIX} {negative}"
    line = format_params(params or {})
    if line:
        text += "\n" + line
    return text.strip()


def parse_params(line: str) -> dict[str, str] | None:
    """The pairs of a parameter line, or None if the line is not made only of pairs."""
    out: dict[str, str] = {}
    pos = 0
    line = line.rstrip()
    while pos < len(line):
        m = _PAIR_RE.match(line, pos)
        if m is None or m.end() == pos:
            return None
        out[m.group(1).strip()] = unquote(m.group(2).strip())
        pos = m.end()
    return out or None


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """``(prompt, negative prompt, parameters)`` from an infotext; the inverse of
    :func:`format_infotext` with every value as a string."""
    if not isinstance(text, str):
        raise InvalidInput("infotext", f"must be str, got {type(text).__name__}")
    lines = text.strip().split("\n")
    last = lines[-1]
    params = None if last.startswith(NEGATIVE_PREFIX) else parse_params(last)
    if params is not None:
        lines = lines[:-1]
    params = params or {}
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith(NEGATIVE_PREFIX):
            negative_lines = [line[len(NEGATIVE_PREFIX):]]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    prompt = "\n".join(prompt_lines).strip()
    negative = "\n".join(negative_lines).strip() if negative_lines is not None else ""
    return prompt, negative, params
