"""The txt2img/img2img accordion's pure parts: its arguments (by position or by name) and its tile
plan for every size the webui accepts (64..2048 px in steps of 8, both sides)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from hrlr_glue import request  # noqa: E402
from hrlr_glue.accordion_plan import AccordionArgs, accordion_args, plan_accordion_tiles  # noqa: E402
from lib_hrlr.config.architectures import ARCHITECTURES  # noqa: E402
from lib_hrlr.errors import InvalidInput  # noqa: E402
from lib_hrlr.tiling.wrap import TiledDenoiser  # noqa: E402


def covered(length: int, starts: set, tile: int) -> bool:
    """Tiles of ``tile`` at ``starts`` cover ``[0, length)`` exactly to its ends, without gaps."""
    s = sorted(starts)
    return s[0] == 0 and s[-1] + tile == length and all(b - a <= tile for a, b in zip(s, s[1:]))


def check_plan(h: int, w: int, tile: int, overlap: int) -> int:
    """Assert the accordion's plan for an ``h x w`` latent canvas: -1 untiled, 1 tile shrunk, else 0."""
    plan = plan_accordion_tiles(h, w, tile, overlap)
    if plan is None:
        assert h <= tile and w <= tile, (h, w)
        return -1
    t = plan.tile
    assert t % 8 == 0 and 8 <= t <= min(tile, h, w) and 0 <= plan.overlap < t, (h, w, t)
    assert (plan.height, plan.width) == (h, w)
    ys, xs = {tl.y for tl in plan.tiles}, {tl.x for tl in plan.tiles}
    # a grid of rows x columns of t x t tiles whose starts cover every latent row and column
    assert len(plan.tiles) == len(ys) * len(xs) and {(tl.h, tl.w) for tl in plan.tiles} == {(t, t)}
    assert covered(h, ys, t) and covered(w, xs, t), (h, w, t)
    return int(t < tile)


def test_every_webui_size_gets_a_valid_plan_or_an_untiled_pass():
    sizes = range(64, 2049, 8)  # what the webui's txt2img accepts
    outcome = [check_plan(H // 8, W // 8, 64, 16) for H in sizes for W in sizes]
    # canvases up to 512 px on both sides fit one tile (57 sizes each); a side under 512 px
    # (56 sizes) next to one over 512 px (192 sizes) shrinks the tile
    assert len(sizes) == 249 and outcome.count(-1) == 57 * 57 and outcome.count(1) == 2 * 56 * 192


@pytest.mark.parametrize("tile, overlap", [(16, 8), (128, 32), (8, 0)])
def test_other_tiles_walk_the_same_sizes(tile, overlap):
    sizes = range(64, 2049, 8)
    for H in sizes:  # every height against the narrowest, a middle and the widest width
        for W in (64, 72, 1000, 2048):
            check_plan(H // 8, W // 8, tile, overlap)
            check_plan(W // 8, H // 8, tile, overlap)


def test_the_reported_480x1024_case_rounds_the_tile():
    plan = plan_accordion_tiles(1024 // 8, 480 // 8, 64, 16)  # latent 128 x 60
    assert plan.tile == 56 and plan.overlap == 16
    plan = plan_accordion_tiles(9, 200, 64, 16)  # 72 x 1600 px
    assert plan.tile == 8 and plan.overlap == 4


@pytest.mark.parametrize("H, W", [(480, 1024), (1024, 480), (72, 1600), (520, 520), (256, 192), (64, 2048)])
def test_the_plan_drives_the_tiled_denoiser_to_the_exact_result_of_a_pixelwise_model(H, W):
    # a pixelwise denoiser gives the same result whatever the tiling: the blend's weights sum to 1
    def inner(x, sigma, **_):
        return torch.tanh(x) * 0.5 + sigma

    h, w = H // 8, W // 8
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.5, 1.5])
    plan = plan_accordion_tiles(h, w, 64, 16)
    expect = inner(x, sigma.view(-1, 1, 1, 1))

    def inner_b(xb, sb, **_):
        return inner(xb, sb.view(-1, 1, 1, 1))

    got = inner_b(x, sigma) if plan is None else TiledDenoiser(inner_b, plan, batch=3)(x, sigma)
    assert got.shape == x.shape
    assert torch.allclose(got, expect, atol=1e-6)


def test_args_by_position_and_by_name_agree():
    pos = accordion_args([True, 48, 8, 2, "Uniform", "TAESD"])
    named = accordion_args([{"enabled": True, "tile": 48, "overlap": 8, "tiles_per_call": 2,
                             "weighting": "uniform", "vae": "taesd"}])
    assert pos == named == AccordionArgs(True, 48, 8, 2, "Uniform", "TAESD")
    assert (pos.weighting_value, pos.vae_value) == ("uniform", "taesd")
    # names left out keep their defaults; "batch" is accepted for tiles_per_call
    assert accordion_args([{"enabled": True, "batch": 4}]) == AccordionArgs(enabled=True, tiles_per_call=4)
    # the webui passes the UI's defaults after a dict: they are ignored
    assert accordion_args([{"tile": 32}, 64, 16, 1, "Gaussian", "Tiled full VAE"]).tile == 32
    # defaults: off, and the loaded model's own tile and overlap (0 and -1 until a model is known)
    assert accordion_args([]) == AccordionArgs() and (AccordionArgs().tile, AccordionArgs().overlap) == (0, -1)
    # the API's JSON types
    assert accordion_args(["true", 64.0, 16, 1, "Gaussian", "Tiled full VAE"]).enabled is True


def test_default_tile_and_overlap_follow_the_loaded_model():
    """An SDXL checkpoint gets its 1024-px tiles (128 latent px, overlap 32), not SD 1.x's 512 px;
    an explicit value is kept, and an overlap that the model's tile cannot hold is refused by name."""
    sd15, sdxl = ARCHITECTURES["sd15"], ARCHITECTURES["sdxl"]
    d = accordion_args([True])
    assert (d.for_model(sd15).tile, d.for_model(sd15).overlap) == (sd15.latent_tile, sd15.latent_tile // 4) == (64, 16)
    assert (d.for_model(sdxl).tile, d.for_model(sdxl).overlap) == (sdxl.latent_tile, sdxl.latent_tile // 4) == (128, 32)
    assert accordion_args([True, 0, 40]).for_model(sdxl).overlap == 40  # the model's tile, the user's overlap
    quarter = accordion_args([True, 96, -1]).for_model(sd15)  # the user's tile, a quarter of it
    assert (quarter.tile, quarter.overlap) == (96, 24)
    assert accordion_args([True, 48, 8]).for_model(sdxl) == accordion_args([True, 48, 8])  # explicit: unchanged
    with pytest.raises(InvalidInput) as e:
        accordion_args([True, 0, 80]).for_model(sd15)
    assert e.value.field == "overlap" and "64" in str(e.value)
    # the slider positions become the request's "model's own" (None), other values pass
    assert request.slider_tiles(0, -1) == (None, None) and request.slider_tiles(96, 0) == (96, 0)


@pytest.mark.parametrize("args, field", [
    ([{"tiles": 4}], "tiles"),
    ([True, -8, 16, 1, "Gaussian", "Tiled full VAE"], "tile"),
    ([True, 0, -2, 1, "Gaussian", "Tiled full VAE"], "overlap"),
    ([True, 60, 16, 1, "Gaussian", "Tiled full VAE"], "tile"),
    ([True, 64, 64, 1, "Gaussian", "Tiled full VAE"], "overlap"),
    ([True, 64, 16, 0, "Gaussian", "Tiled full VAE"], "tiles_per_call"),
    ([True, 64, 16, 1, "Cosine", "Tiled full VAE"], "weighting"),
    ([{"vae": "fast"}], "vae"),
    ([{"tile": "big"}], "tile"),
])
def test_bad_args_name_the_argument(args, field):
    with pytest.raises(InvalidInput) as e:
        accordion_args(args)
    assert e.value.field == field
