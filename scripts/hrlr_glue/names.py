"""Errors in the API's and the tab's own words.

The engine names its fields as ``GenerationParams`` does (``cfg``, ``strength``...) and its
messages suggest command-line flags (``raise --budget-mb``).  A webui user sees neither: this
table maps both to the request's field names (``cfg_scale``, ``budget_mb``), in one place.
"""

from __future__ import annotations

import re

from lib_hrlr.errors import HrlrError

# engine field -> request field; an engine field missing here has the same name in the request
API_FIELDS = {
    "negative": "negative_prompt",
    "cfg": "cfg_scale",
    "strength": "denoising_strength",
    "sampler": "sampler_name",
    "dtype": "lowram_dtype",
    "taesd_dir": "vae",  # the TAESD files are looked up for vae "taesd"; the request has no folder field
    "taesd": "vae",  # a TAESD weight file that cannot be read
    "vae_tile": "budget_mb",  # chosen from the budget in the webui
    "region": "regions",
}

# CLI wording in engine messages -> the request's wording (applied in this order)
_PHRASES = (
    (r"pass --taesd-dir DIR \(or set HRLR_TAESD_DIR\) to a folder with",
     "put in models/VAE-approx (or in the folder $HRLR_TAESD_DIR names)"),
    (r"pass --taesd-dir DIR", "put them in the webui's models/VAE-approx folder"),
    (r"--taesd-dir( DIR)?", "models/VAE-approx"),
    (r"lower --vae-tile, ", ""),
    (r"--vae taesd", "vae 'taesd'"),
    (r"--dtype", "lowram_dtype"),
)
_FLAG = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
_INDEXED = re.compile(r"\b(region)(\[\d+\])")


def api_field(field: str) -> str:
    """``cfg`` -> ``cfg_scale``, ``region[2]`` -> ``regions[2]``, ``region[2].prompt`` -> ``regions[2].prompt``."""
    head, sep, rest = field.partition("[")
    head_dot, dot, tail = head.partition(".")
    mapped = API_FIELDS.get(head_dot, head_dot)
    return mapped + dot + tail + sep + rest


def api_message(message: str) -> str:
    """The message with CLI flags and engine field names replaced by the request's."""
    for pattern, repl in _PHRASES:
        message = re.sub(pattern, repl, message)

    def flag(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        return API_FIELDS.get(name, name)

    message = _FLAG.sub(flag, message)
    return _INDEXED.sub(lambda m: "regions" + m.group(2), message)


def api_error(e: HrlrError) -> HrlrError:
    """The same error (same class) named as the API and the tab name things."""
    out = type(e).__new__(type(e))
    HrlrError.__init__(out, api_field(e.field), api_message(e.message))
    return out
