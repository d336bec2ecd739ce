"""The webui's extra-network prompt tags (``<lora:name:weight>``) and the LoRA requests they name.

Plain data and text only (no torch): :class:`LoraSpec` is what a run asks for — a LoRA file
and its multipliers — and is what ``GenerationParams.loras`` holds; the weights themselves
are read by :mod:`lib_hrlr.weights.lora`.

Tag syntax, as the AUTOMATIC1111 webui reads it: any ``<kind:args>`` (``kind`` a word,
``args`` without ``>``) is an extra-network tag and never reaches the tokenizer
(:func:`strip_network_tags`, applied by :func:`lib_hrlr.text.prompts.tokenize_prompt`).
For ``kind`` ``lora`` (or ``lyco``) the args are ``name[:te[:unet]]`` with optional named
``te=``/``unet=`` items: ``<lora:name>`` is weight 1 for both networks, ``<lora:name:0.8>``
0.8 for both, ``<lora:name:0.5:1.0>`` 0.5 for the text encoder and 1.0 for the UNet.

For the webui glue (LowRAM mode), one call turns a request's prompts into LoRA specs::

    found = loras_from_prompts([prompt, *region_prompts], resolver)
    params = replace(params, loras=params.loras + found.loras)
    for w in found.warnings: ...  # e.g. show them in the tab / API response

``resolver(name) -> path | None`` maps a tag's name to its file (the webui's Lora registry:
``networks.available_network_aliases[name].filename``); ``None`` means unknown, which becomes
a warning, not an error (the webui also just warns).  The prompt text itself may keep its
tags (the infotext shows them, as the webui's does); the engine drops them before tokenizing.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..errors import InvalidInput

# the webui's pattern for extra-network tags (modules/extra_networks.py: re_extra_net)
TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")

Resolver = Callable[[str], "str | os.PathLike | None"]


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file and multipliers (``te_weight`` None = ``weight``)."""

    path: str
    weight: float = 1.0  # UNet multiplier
    te_weight: float | None = None  # text-encoder multiplier
    name: str | None = None  # display name (infotext); None = the file's stem

    @property
    def text_weight(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        base = os.path.basename(str(self.path))
        return base.rsplit(".", 1)[0] if "." in base else base


@dataclass(frozen=True)
class PromptNetworks:
    loras: tuple[LoraSpec, ...]
    warnings: tuple[str, ...]


def _number(text: str, what: str, field: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InvalidInput(field, f"{what} {text!r} is not a number") from None
    if not math.isfinite(v):
        raise InvalidInput(field, f"{what} {text!r} must be finite")
    return v


def parse_lora_option(text: str, field: str = "lora") -> LoraSpec:
    """``FILE[:WEIGHT]`` (the CLI's ``--lora``) to a spec; a ``:`` that is part of the path
    (``C:\\x.safetensors``) stays in the path when what follows is not a number."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(field, "expected FILE[:WEIGHT], e.g. style.safetensors:0.8")
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            return LoraSpec(text)
        if not math.isfinite(weight):
            raise InvalidInput(field, f"weight {tail!r} in {text!r} must be finite")
        return LoraSpec(path, weight)
    return LoraSpec(text)


def strip_network_tags(text: str) -> str:
    """``text`` without any ``<kind:args>`` extra-network tag (what the webui tokenizes)."""
    return TAG.sub("", text) if isinstance(text, str) and "<" in text else text


def parse_lora_tag(args: str) -> tuple[str, float, float]:
    """``name[:te[:unet]]`` (named ``te=``/``unet=`` accepted) to ``(name, te, unet)``."""
    items = args.split(":")
    positional = [i for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    if not positional or not positional[0].strip():
        raise InvalidInput("prompt", f"<lora:{args}>: the tag needs a LoRA name")
    name = positional[0].strip()
    te = _number(positional[1], "te weight", "prompt") if len(positional) > 1 else 1.0
    te = _number(named["te"], "te weight", "prompt") if "te" in named else te
    unet = _number(positional[2], "unet weight", "prompt") if len(positional) > 2 else te
    unet = _number(named["unet"], "unet weight", "prompt") if "unet" in named else unet
    return name, te, unet


def loras_from_prompts(texts: Sequence[str], resolver: Resolver | None) -> PromptNetworks:
    """The LoRA tags of ``texts`` as specs (first occurrence of a name wins), and warnings for
    names the resolver does not know, repeated names and malformed weights."""
    loras: list[LoraSpec] = []
    warnings: list[str] = []
    seen: dict[str, LoraSpec] = {}
    for text in texts:
        for m in TAG.finditer(text or ""):
            kind, args = m.group(1), m.group(2)
            if kind not in LORA_KINDS:
                continue
            try:
                name, te, unet = parse_lora_tag(args)
            except InvalidInput as e:
                warnings.append(f"{m.group(0)} ignored: {e.message}")
                continue
            if name in seen:
                if (seen[name].weight, seen[name].text_weight) != (unet, te):
                    warnings.append(f"{m.group(0)} ignored: LoRA {name!r} is already applied with another weight")
                continue
            path = resolver(name) if resolver is not None else None
            if path is None:
                warnings.append(f"{m.group(0)}: no LoRA named {name!r} is known; the tag was ignored")
                continue
            spec = LoraSpec(os.fspath(path), unet, None if te == unet else te, name)
            seen[name] = spec
            loras.append(spec)
    return PromptNetworks(tuple(loras), tuple(warnings))


def with_prompt_loras(params, resolver: Resolver | None, include_negative: bool = False):
    """``(params with the LoRAs its prompts name appended to params.loras, warnings)``.

    Scans the prompt and the region prompts (and the negative prompt if
    ``include_negative``); the prompts keep their tags (they are dropped at tokenizing).
    """
    texts = [params.prompt, *(r.prompt for r in params.regions)]
    if include_negative:
        texts.append(params.negative)
    found = loras_from_prompts(texts, resolver)
    return replace(params, loras=tuple(params.loras) + found.loras), list(found.warnings)
