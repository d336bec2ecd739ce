"""SDXL's micro-conditioning, per tile of a large canvas.

SDXL adds to its time embedding the embedded ``original_size``, ``crops_coords_top_left``
and ``target_size`` (pixels, (height, width) / (top, left)); in training they said how big the
source photo was, where the training crop was cut from it, and the size of that crop.  A
tile of a big canvas *is* a crop of a bigger image, so what each tile receives is a choice
(:data:`MICRO_POLICIES`, default :data:`DEFAULT_MICRO_POLICY`); for a tile with latent box
``(y, x, h, w)`` of a canvas ``H x W`` px, with ``f`` = 8 px per latent px:

``offset`` (default)
    original ``(H, W)``, crop ``(y f, x f)``, target ``(h f, w f)``: the truth — a tile-sized
    crop at its offset in an image of the canvas size.  The model is told that its view is a
    part of a larger picture whose borders lie elsewhere, which is what it should draw; a
    crop of (0, 0) instead asks for a composed, centred picture in every tile (the
    "repeated subject" failure of tiled diffusion).
``zero``
    original and target ``(h f, w f)``, crop ``(0, 0)``: every tile as a whole picture of
    its own size (what a plain SDXL pipeline passes at the tile's size).
``canvas``
    original and target ``(H, W)``, crop ``(0, 0)`` for every tile: what the webui passes to
    its SDXL conditioner for a canvas of that size (and so what the Tiled Diffusion
    extension gives all its tiles).

The native-size base pass is a plain SDXL generation: original = target = its size, crop
(0, 0) (:func:`base_micro`), as diffusers and the webui default to.  Negative prompts get
the same values as the prompt they guide (the webui does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InvalidInput
from ..models.unet import adm_vector

MICRO_POLICIES = ("offset", "zero", "canvas")
DEFAULT_MICRO_POLICY = "offset"


@dataclass(frozen=True)
class MicroConditioning:
    original_size: tuple[int, int]  # (height, width) px
    crop_top_left: tuple[int, int]  # (top, left) px
    target_size: tuple[int, int]  # (height, width) px

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """The six values in SDXL's order (diffusers' ``add_time_ids``)."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def check_policy(policy: str) -> None:
    if policy not in MICRO_POLICIES:
        raise InvalidInput("micro_conditioning", f"'{policy}' is not one of: {', '.join(MICRO_POLICIES)}")


def base_micro(height: int, width: int) -> MicroConditioning:
    """A plain SDXL generation of ``height x width`` px."""
    return MicroConditioning((height, width), (0, 0), (height, width))


def tile_micro(policy: str, canvas_height: int, canvas_width: int, y: int, x: int, h: int, w: int,
               downscale: int = 8) -> MicroConditioning:
    """What the tile with latent box ``(y, x, h, w)`` of a ``canvas_height x canvas_width`` px
    canvas receives under ``policy`` (module docstring)."""
    check_policy(policy)
    th, tw = h * downscale, w * downscale
    if policy == "offset":
        return MicroConditioning((canvas_height, canvas_width), (y * downscale, x * downscale), (th, tw))
    if policy == "zero":
        return MicroConditioning((th, tw), (0, 0), (th, tw))
    return MicroConditioning((canvas_height, canvas_width), (0, 0), (canvas_height, canvas_width))


class AddedConditioning:
    """The UNet's ``y`` rows of a tiled SDXL pass: ``self(crop, prompt) -> (1, adm)`` float32.

    ``pooled``: ``(1, proj)`` pooled text embeddings, the global prompt's first then one per
    region (the order of the mixture's contexts); ``negative``: the negative prompt's
    (``prompt=None`` asks for it).  ``crop`` is a latent box with ``y, x, h, w``.
    """

    def __init__(self, pooled: Sequence[torch.Tensor], negative: torch.Tensor | None, time_dim: int,
                 policy: str, canvas_height: int, canvas_width: int, downscale: int = 8):
        check_policy(policy)
        self.pooled = [p.float().reshape(1, -1) for p in pooled]
        self.negative = None if negative is None else negative.float().reshape(1, -1)
        self.time_dim, self.policy = time_dim, policy
        self.canvas = (canvas_height, canvas_width)
        self.downscale = downscale
        self._cache: dict[tuple, torch.Tensor] = {}

    def micro(self, crop) -> MicroConditioning:
        return tile_micro(self.policy, *self.canvas, crop.y, crop.x, crop.h, crop.w, self.downscale)

    def __call__(self, crop, prompt: int | None) -> torch.Tensor:
        key = (crop.y, crop.x, crop.h, crop.w, prompt)
        if key not in self._cache:
            if prompt is None:
                if self.negative is None:
                    raise InvalidInput("negative_prompt", "classifier-free guidance needs the negative conditioning")
                pooled = self.negative
            else:
                pooled = self.pooled[prompt]
            ids = torch.tensor([self.micro(crop).time_ids()], dtype=torch.float32)
            self._cache[key] = adm_vector(pooled, ids, self.time_dim)
        return self._cache[key]
