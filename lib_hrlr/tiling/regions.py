"""Regional prompts: a rectangle of the image (in image pixels) denoised with its own prompt.

Text form: ``"x,y,w,h:prompt"`` or ``"x,y,w,h,weight:prompt"``.  Only the first ``:``
separates the geometry from the prompt, so the prompt may itself contain ``:`` and ``,``.

What a region gets (see :func:`lib_hrlr.tiling.mixture.prompt_shares`): at every pixel the
blended estimate is ``Σ_p share_p · estimate_p`` over the global prompt and the regions, with

    m_i      = region i's mask: 1 inside its rectangle, falling smoothly to 0 across a feather
               band along the rectangle's edges (``region_feather`` px wide; default 1/8 of the
               region's shorter side; none along an edge on the canvas border), 0 outside it
    share_i  = weight_i · m_i / max(1, Σ_j weight_j · m_j)
    share_0  = 1 - Σ_i share_i            (the global prompt)

So with weight 1 a region's prompt holds the whole blend (share 1) inside its rectangle except
the feather band; weight < 1 keeps that fraction (0.5: half region, half global prompt);
weight > 1 reaches full share sooner across the band (the band looks narrower); where regions
overlap they split the blend in proportion to their weights.  Outside every rectangle the
result is exactly what the global prompt alone gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import InvalidInput

PIXEL_MULTIPLE = 8
FEATHER_FRACTION = 1 / 8  # default feather band: this fraction of the region's shorter side

WEIGHT_HELP = (
    "weight: the region prompt's share of the blend inside its rectangle. 1 = the region's prompt alone "
    "(the global prompt is kept only in the feather band at the edges); 0.5 = half region, half global; "
    "above 1 the region takes over sooner across the feather band; overlapping regions split by weight"
)


@dataclass(frozen=True)
class Region:
    """``x, y`` top-left corner and ``w, h`` size in image pixels; ``weight`` scales the
    region prompt's share of the blend (module docstring)."""

    x: int
    y: int
    w: int
    h: int
    prompt: str
    weight: float = 1.0

    def latent_box(self, downscale: int = PIXEL_MULTIPLE) -> tuple[int, int, int, int]:
        """``(y, x, h, w)`` in latent pixels."""
        return self.y // downscale, self.x // downscale, self.h // downscale, self.w // downscale


def feather_px(region: Region, feather: float | None = None) -> float:
    """The feather band width of ``region`` in image pixels: ``feather``, or by default
    :data:`FEATHER_FRACTION` of its shorter side."""
    return min(region.w, region.h) * FEATHER_FRACTION if feather is None else float(feather)


def validate_feather(feather, regions: Sequence[Region]) -> None:
    """``feather``: None (the default) or a number of pixels >= 0 and at most half of every
    region's shorter side (wider, the band would leave no core the region holds alone)."""
    if feather is None:
        return
    if isinstance(feather, bool) or not isinstance(feather, (int, float)) or not math.isfinite(feather) or feather < 0:
        raise InvalidInput("region_feather", f"must be a number of pixels >= 0 (or unset for 1/8 of each region's "
                                             f"shorter side), got {feather!r}")
    for i, r in enumerate(regions):
        if feather > min(r.w, r.h) / 2:
            raise InvalidInput("region_feather", f"{feather:g} px is more than half the shorter side of region[{i}] "
                                                 f"({r.w}x{r.h} px); allowed up to {min(r.w, r.h) / 2:g} px")


def _field(index: int | None) -> str:
    return "region" if index is None else f"region[{index}]"


def parse_region(text: str, index: int | None = None) -> Region:
    """Parse ``"x,y,w,h[,weight]:prompt"``; errors name ``region`` (or ``region[index]``)."""
    field = _field(index)
    if not isinstance(text, str) or ":" not in text:
        raise InvalidInput(field, f"expected 'x,y,w,h:prompt' or 'x,y,w,h,weight:prompt', got {text!r}")
    head, prompt = text.split(":", 1)
    prompt = prompt.strip()
    parts = [p.strip() for p in head.split(",")]
    if len(parts) not in (4, 5):
        raise InvalidInput(field, f"expected 4 numbers (x,y,w,h) or 5 (x,y,w,h,weight) before ':', got {head!r}")
    coords = []
    for name, p in zip("xywh", parts[:4]):
        try:
            coords.append(int(p))
        except ValueError:
            raise InvalidInput(field, f"{name} must be an integer number of pixels, got {p!r}") from None
    weight = 1.0
    if len(parts) == 5:
        try:
            weight = float(parts[4])
        except ValueError:
            raise InvalidInput(field, f"weight must be a number, got {parts[4]!r}") from None
    if not prompt:
        raise InvalidInput(field, "the prompt after ':' is empty")
    region = Region(coords[0], coords[1], coords[2], coords[3], prompt, weight)
    _check_shape(region, field)
    return region


def parse_regions(texts: Iterable[str]) -> list[Region]:
    return [parse_region(t, i) for i, t in enumerate(texts)]


def _check_shape(r: Region, field: str) -> None:
    for name in ("x", "y", "w", "h"):
        v = getattr(r, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise InvalidInput(field, f"{name} must be an integer, got {v!r}")
    if r.x < 0 or r.y < 0:
        raise InvalidInput(field, f"x and y must be >= 0, got x={r.x}, y={r.y}")
    if r.w <= 0 or r.h <= 0:
        raise InvalidInput(field, f"w and h must be positive, got w={r.w}, h={r.h}")
    for name in ("x", "y", "w", "h"):
        v = getattr(r, name)
        if v % PIXEL_MULTIPLE:
            raise InvalidInput(field, f"{name}={v} must be a multiple of {PIXEL_MULTIPLE} pixels")
    if not isinstance(r.weight, (int, float)) or isinstance(r.weight, bool) or not math.isfinite(r.weight) or r.weight <= 0:
        raise InvalidInput(field, f"weight must be a positive number, got {r.weight!r}")
    if not isinstance(r.prompt, str) or not r.prompt.strip():
        raise InvalidInput(field, "prompt must not be empty")


def validate_regions(regions: Sequence[Region], width: int, height: int) -> None:
    """Check every region against a ``width x height`` image (pixels): positive size,
    multiples of 8, entirely inside the image, positive weight, non-empty prompt."""
    for i, r in enumerate(regions):
        field = _field(i)
        _check_shape(r, field)
        if r.x + r.w > width or r.y + r.h > height:
            raise InvalidInput(
                field,
                f"must lie inside the {width}x{height} image; it spans x {r.x}..{r.x + r.w}, y {r.y}..{r.y + r.h}",
            )
