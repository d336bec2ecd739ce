"""Per-tile blending weights.

* :func:`gaussian_weights` — Mixture of Diffusers (Jiménez 2023): the outer product of two 1-D
  Gaussians over the tile's pixel index, centred on the tile, with variance 0.01 in units of
  the tile size: ``g(i) = exp(-((i - c)/n)² / (2·0.01)) / sqrt(2π·0.01)``, ``c = (n-1)/2``.
  Weights fall to about 4e-6 of the centre at the edges, so overlapping tiles blend smoothly.
  (The reference code centres the vertical axis on ``n/2``, half a pixel off; we use the
  symmetric ``(n-1)/2`` on both axes.)
* :func:`uniform_weights` — MultiDiffusion (Bar-Tal et al. 2023): plain averaging.

Both return float32 ``(h, w)`` tensors of strictly positive values.
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
