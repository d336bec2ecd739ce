"""Covering a latent canvas with overlapping tiles of the model's native size.

All sizes here are latent pixels.  Tiles step by ``tile - overlap`` from the top-left
corner; the last row and column are moved back to end exactly at the far edge, so every
tile has the full ``tile`` size and the canvas is covered (the last overlap can be larger
than asked, never smaller).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInput

TILE_MULTIPLE = 8


@dataclass(frozen=True)
class Tile:
    """A rectangle of the latent canvas: rows ``y:y+h``, columns ``x:x+w``."""

    y: int
    x: int
    h: int
    w: int

    @property
    def y1(self) -> int:
        return self.y + self.h

    @property
    def x1(self) -> int:
        return self.x + self.w

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y1), slice(self.x, self.x1)


@dataclass(frozen=True)
class TilePlan:
    height: int
    width: int
    tile: int
    overlap: int
    tiles: tuple[Tile, ...]

    @property
    def rows(self) -> int:
        return len({t.y for t in self.tiles})

    @property
    def cols(self) -> int:
        return len({t.x for t in self.tiles})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with the given stride,
    the last one aligned to the far edge.  ``tile <= length`` and ``stride >= 1``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    """Tiles of exactly ``tile x tile`` covering a ``height x width`` latent canvas, row-major."""
    for name, value in (("height", height), ("width", width), ("tile", tile), ("overlap", overlap)):
        if not _is_int(value):
            raise InvalidInput(name, f"must be an integer, got {value!r}")
    if tile <= 0 or tile % TILE_MULTIPLE:
        raise InvalidInput("tile", f"must be a positive multiple of {TILE_MULTIPLE} latent px, got {tile}")
    if overlap < 0:
        raise InvalidInput("overlap", f"must be >= 0, got {overlap}")
    if overlap >= tile:
        raise InvalidInput("overlap", f"must be smaller than the tile ({tile}), got {overlap}")
    if height < tile:
        raise InvalidInput("height", f"canvas height {height} is smaller than one tile ({tile})")
    if width < tile:
        raise InvalidInput("width", f"canvas width {width} is smaller than one tile ({tile})")
    stride = tile - overlap
    tiles = tuple(
        Tile(y, x, tile, tile) for y in axis_starts(height, tile, stride) for x in axis_starts(width, tile, stride)
    )
    return TilePlan(height=height, width=width, tile=tile, overlap=overlap, tiles=tiles)
