"""Warnings for prompt features a run cannot honour (pure).

A ``<lora:name:w>`` tag changes the weights of the whole UNet (and text encoder), so it belongs
in the prompt: in the negative prompt the webui leaves it as text, and a region's prompt only
conditions its rectangle, so a tag there cannot be applied to that rectangle alone.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

_LORA = re.compile(r"<(lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)


def strip_lora(text: str) -> str:
    """``text`` without its ``<lora:...>`` tags (and the spaces they leave at either end)."""
    return _LORA.sub("", text or "").strip() if _LORA.search(text or "") else text


def lora_names(text: str) -> list[str]:
    return [m.group(2).strip() for m in _LORA.finditer(text or "")]


def lora_warnings(prompt: str, negative: str, region_prompts: Sequence[str],
                  known: Optional[Iterable[str]] = None) -> list[str]:
    """Human-readable warnings; ``known``: the LoRA names the webui can load (None: unknown)."""
    out = []
    if known is not None:
        known = set(known)
        missing = [n for n in lora_names(prompt) if n not in known]
        if missing:
            out.append(f"Lora not found: {', '.join(dict.fromkeys(missing))}")
    neg = lora_names(negative)
    if neg:
        out.append(f"LoRA tags in the negative prompt are not applied: {', '.join(dict.fromkeys(neg))} "
                   "(put them in the prompt)")
    for i, text in enumerate(region_prompts):
        names = lora_names(text)
        if names:
            out.append(f"LoRA tags in regions[{i}] are not applied to the region alone: "
                       f"{', '.join(dict.fromkeys(names))} (a LoRA changes the whole model; put it in the prompt)")
    return out
