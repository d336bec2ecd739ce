"""Per-tile blending weights.

* :func:`gaussian_weights` — Mixture of Diffusers (Jiménez 2023): the outer product of two 1-D
  Gaussians over the tile's pixel index, centred on the tile, with variance 0.01 in units of
  the tile size: ``g(i) = exp(-((i - c)/n)² / (2·0.01)) / sqrt(2π·0.01)``, ``c = (n-1)/2``.
  Weights fall to about 4e-6 of the centre at the edges, so overlapping tiles blend smoothly.
  (The reference code centres the vertical axis on ``n/2``, half a pixel off; we use the
  symmetric ``(n-1)/2`` on both axes.)
* :func:`uniform_weights` — MultiDiffusion (Bar-Tal et al. 2023): plain averaging.

Both return float32 ``(h, w)`` tensors of strictly positive values.

* :func:`region_mask` — how much of its rectangle a regional prompt claims: 1 in the core,
  falling to 0 across a feather band along the rectangle's edges (float64, see below).
"""

from __future__ import annotations

import math

import torch

GAUSSIAN_VAR = 0.01


def _gaussian_1d(n: int, var: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    c = (n - 1) / 2
    return torch.exp(-(((i - c) / n) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def _check(h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"tile must be at least 1x1, got {h}x{w}")


def gaussian_weights(h: int, w: int, var: float = GAUSSIAN_VAR) -> torch.Tensor:
    _check(h, w)
    return torch.outer(_gaussian_1d(h, var), _gaussian_1d(w, var)).to(torch.float32)


def uniform_weights(h: int, w: int) -> torch.Tensor:
    _check(h, w)
    return torch.ones(h, w, dtype=torch.float32)


WEIGHTINGS = {"gaussian": gaussian_weights, "uniform": uniform_weights}


def feather_ramp(n: int, band: float, start: bool = True, end: bool = True) -> torch.Tensor:
    """1-D float64 ramp over ``n`` pixels: ``smoothstep(d / band)`` where ``d`` is the distance
    of the pixel's centre from the nearer feathered end (0.5 for an end pixel), so pixels whose
    centre lies ``band`` or more inside are exactly 1 and the ramp rises smoothly (zero slope at
    both ends of the band, no seam) from near 0 at the edge.  ``start``/``end``: whether that
    end is feathered (an end on the canvas border is not: nothing lies beyond it to blend with).
    ``band <= 0``: all ones (a hard edge)."""
    if n < 1:
        raise ValueError(f"ramp must be at least 1 pixel long, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    inf = torch.full((n,), float("inf"), dtype=torch.float64)
    d = torch.minimum(i + 0.5 if start else inf, n - 0.5 - i if end else inf)
    if band <= 0 or not (start or end):
        return torch.ones(n, dtype=torch.float64)
    t = (d / band).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def region_mask(h: int, w: int, band: float, edges: tuple[bool, bool, bool, bool] = (True,) * 4) -> torch.Tensor:
    """``(h, w)`` float64 mask of a region's rectangle: the outer product of two
    :func:`feather_ramp` s, so it is 1 everywhere more than ``band`` pixels inside the feathered
    edges.  ``edges``: which of (top, bottom, left, right) are feathered."""
    top, bottom, left, right = edges
    return torch.outer(feather_ramp(h, band, top, bottom), feather_ramp(w, band, left, right))
