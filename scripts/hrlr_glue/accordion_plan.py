"""The txt2img/img2img accordion without the webui: its arguments and its tile plan.

Arguments come positionally in the UI's order (``[true, 64, 16, 1, "Gaussian", "Tiled full VAE"]``)
or by name as one dict (``[{"enabled": true, "tile": 48}]`` in the API's ``alwayson_scripts``
``args``; names missing from the dict keep their defaults).  Tile 0 and overlap -1 (the
defaults) mean the loaded model's own: :meth:`AccordionArgs.for_model` makes them concrete
(SD 1.x 64/16, SDXL 128/32 latent px), and the infotext records the concrete values.

Any size the webui accepts works: a latent side smaller than the tile gets the tile rounded
down to a multiple of 8 latent px that fits, and a canvas that fits in one tile gets an
untiled pass (``None``), which is what tiling it would compute anyway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from lib_hrlr.errors import InvalidInput
from lib_hrlr.tiling.plan import TILE_MULTIPLE, TilePlan, plan_tiles

from .request import (DEFAULTS, MODEL_TILE, QUARTER_OVERLAP, VAE_CHOICES, WEIGHTING_CHOICES, label_of,
                      resolve_tiles)


@dataclass(frozen=True)
class AccordionArgs:
    enabled: bool = False
    tile: int = MODEL_TILE  # latent px; 0: the model's own
    overlap: int = QUARTER_OVERLAP  # latent px; -1: a quarter of the tile
    tiles_per_call: int = 1
    weighting: str = label_of(WEIGHTING_CHOICES, DEFAULTS["weighting"])
    vae: str = label_of(VAE_CHOICES, DEFAULTS["vae"])

    def for_model(self, model) -> "AccordionArgs":
        """A copy with the concrete tile and overlap for ``model`` (a ``ModelConfig``)."""
        tile, overlap = resolve_tiles(self.tile, self.overlap, model)
        if overlap >= tile:
            raise InvalidInput("overlap", f"must be smaller than the tile ({tile} for this model), got {overlap}")
        return dataclasses.replace(self, tile=tile, overlap=overlap)

    @property
    def weighting_value(self) -> str:
        return WEIGHTING_CHOICES.get(self.weighting, self.weighting)

    @property
    def vae_value(self) -> str:
        return VAE_CHOICES.get(self.vae, self.vae)


ARG_NAMES = tuple(f.name for f in dataclasses.fields(AccordionArgs))
ALIASES = {"batch": "tiles_per_call", "tile_batch": "tiles_per_call"}


def _label(value, choices: dict, field: str) -> str:
    """A UI label from a label or an engine value (``"uniform"`` -> ``"Uniform"``)."""
    if value in choices:
        return value
    back = {v: k for k, v in choices.items()}
    if isinstance(value, str) and value.lower() in back:
        return back[value.lower()]
    raise InvalidInput(field, f"{value!r} is not one of: {', '.join(list(choices) + list(back))}")


def _int(field: str, value) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(field, f"must be an integer, got {value!r}") from None
    if not f.is_integer():
        raise InvalidInput(field, f"must be an integer, got {value!r}")
    return int(f)


def accordion_args(args: Sequence) -> AccordionArgs:
    """The accordion's settings from the script's ``args`` (positional, or one dict by name)."""
    args = list(args)
    if args and isinstance(args[0], dict):
        named = {ALIASES.get(k, k): v for k, v in args[0].items()}
        unknown = sorted(set(named) - set(ARG_NAMES))
        if unknown:
            raise InvalidInput(unknown[0], f"unknown argument; the accordion takes: {', '.join(ARG_NAMES)}")
    else:
        named = dict(zip(ARG_NAMES, args))
    a = dataclasses.replace(AccordionArgs(), **named)
    enabled = a.enabled if isinstance(a.enabled, bool) else str(a.enabled).lower() in ("true", "1", "yes", "on")
    tile, overlap, per_call = _int("tile", a.tile), _int("overlap", a.overlap), _int("tiles_per_call", a.tiles_per_call)
    if tile != MODEL_TILE and (tile < 0 or tile % TILE_MULTIPLE):
        raise InvalidInput("tile", f"must be {MODEL_TILE} (the model's own) or a positive multiple of "
                                   f"{TILE_MULTIPLE} latent px, got {tile}")
    if overlap != QUARTER_OVERLAP and (overlap < 0 or (tile != MODEL_TILE and overlap >= tile)):
        raise InvalidInput("overlap", f"must be {QUARTER_OVERLAP} (a quarter of the tile), or at least 0 and smaller "
                                      f"than the tile ({tile or 'the model’s own'}), got {overlap}")
    if per_call < 1:
        raise InvalidInput("tiles_per_call", f"must be at least 1, got {per_call}")
    return AccordionArgs(enabled=enabled, tile=tile, overlap=overlap, tiles_per_call=per_call,
                         weighting=_label(a.weighting, WEIGHTING_CHOICES, "weighting"),
                         vae=_label(a.vae, VAE_CHOICES, "vae"))


def encode_first_stage_divisor(cfg) -> float:
    """What the accordion's ``encode_first_stage`` divides the engine's *scaled* latent by, so that
    it returns what the webui's own returns: an LDM (SD 1.x) model's is unscaled (its
    ``get_first_stage_encoding`` multiplies by ``scale_factor`` afterwards), an sgm (SDXL)
    model's is already scaled (``get_first_stage_encoding`` is the identity there)."""
    return 1.0 if cfg.family == "sdxl" else cfg.vae.scaling_factor


def plan_accordion_tiles(height: int, width: int, tile: int, overlap: int) -> Optional[TilePlan]:
    """Tiles for a ``height x width`` latent canvas, or None for an untiled pass.

    The tile shrinks (to a multiple of 8 latent px) to the canvas's shorter side when that side
    is smaller; the overlap shrinks with it to at most half the tile.
    """
    if height <= tile and width <= tile:
        return None
    t = min(tile, (min(height, width) // TILE_MULTIPLE) * TILE_MULTIPLE)
    if t < TILE_MULTIPLE:
        return None
    ov = overlap if t == tile else min(overlap, t // 2)
    return plan_tiles(height, width, t, ov)
