"""What a pasted infotext (the webui's parsed ``{key: value}``) puts into the tab (pure).

The webui casts a pasted value to the type of the component's value unless the paste function
returns an update (a dict); the regions table's value is a dict, so the rows are returned as an
update (``{"value": rows, "__type__": "update"}``, what ``gr.update(value=rows)`` builds).
"""

from __future__ import annotations

import json
from typing import Optional

from .request import LOWRAM_DTYPE_CHOICES, REGION_TEMPLATE, VAE_CHOICES, WEIGHTING_CHOICES

GUIDE_STRENGTH_KEY = "HRLR guide strength"
OLD_GUIDE_STRENGTH_KEY = "Denoising strength"  # what images made before the own key carry


def update(**kw) -> dict:
    """The same dict as gradio 3's ``gr.update(**kw)``."""
    return {"__type__": "update", **kw}


def is_hrlr(params: dict) -> bool:
    return any(k.startswith("HRLR ") for k in params)


def guide_strength(params: dict) -> Optional[str]:
    """The guide strength: its own key, or ``Denoising strength`` in images of older versions."""
    if GUIDE_STRENGTH_KEY in params:
        return params[GUIDE_STRENGTH_KEY]
    if is_hrlr(params):
        return params.get(OLD_GUIDE_STRENGTH_KEY)
    return None


def regions_rows(params: dict) -> Optional[dict]:
    """An update for the regions table: the image's regions, the template row for one of ours
    without regions, nothing for an infotext that is not ours."""
    text = params.get("HRLR regions")
    if not text:
        return update(value=[list(REGION_TEMPLATE)]) if is_hrlr(params) else None
    regions = json.loads(text) if isinstance(text, str) else text
    return update(value=[[r["x"], r["y"], r["w"], r["h"], r.get("weight", 1.0), r["prompt"]] for r in regions])


def label_for(params: dict, key: str, choices: dict) -> Optional[str]:
    back = {v: k for k, v in choices.items()}
    return back.get(params.get(key))


def weighting_label(params: dict) -> Optional[str]:
    return label_for(params, "HRLR weighting", WEIGHTING_CHOICES)


def vae_label(params: dict) -> Optional[str]:
    return label_for(params, "HRLR VAE", VAE_CHOICES)


def lowram_dtype_label(params: dict) -> Optional[str]:
    """The dtype a LowRAM run used, as the tab's choice (fp16 came from following the webui)."""
    if params.get("HRLR mode") != "LowRAM":
        return None
    dt = params.get("HRLR dtype")
    back = {v: k for k, v in LOWRAM_DTYPE_CHOICES.items()}
    return back.get(dt, back["webui"]) if dt else None
