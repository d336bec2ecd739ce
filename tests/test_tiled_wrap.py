"""TiledDenoiser: Mixture-of-Diffusers tiling around a k-diffusion-style denoiser (what the
webui's AlwaysOn script wraps around the webui's own CFG denoiser)."""

import torch

from lib_hrlr.tiling.plan import plan_tiles
from lib_hrlr.tiling.wrap import TiledDenoiser


def _x(n=2, h=40, w=56):
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(1))


def test_pointwise_denoiser_is_unchanged_by_tiling_and_batching():
    x = _x()
    sigma = torch.tensor([3.0, 3.0])

    def inner(x, sigma, cond):
        return x * 0.5 + cond["c_concat"][0] - sigma.view(-1, 1, 1, 1)

    image_cond = torch.randn(2, 4, 40, 56)
    ref = inner(x, sigma, {"c_concat": [image_cond]})
    for batch in (1, 3, 8):
        wrap = TiledDenoiser(inner, plan_tiles(40, 56, 16, 4), batch=batch)
        out = wrap(x, sigma, cond={"c_concat": [image_cond], "c_crossattn": [torch.randn(2, 77, 8)]})
        assert (out - ref).abs().max().item() < 1e-5
        assert wrap.calls == -(-len(wrap.jobs) // batch)


def test_one_tile_canvas_calls_inner_once_on_the_whole_batch():
    x = _x(h=16, w=16)
    seen = []

    def inner(x, sigma, **kw):
        seen.append(tuple(x.shape))
        return x.flip(-1)

    out = TiledDenoiser(inner, plan_tiles(16, 16, 16, 4))(x, torch.tensor([1.0, 1.0]))
    assert seen == [(2, 4, 16, 16)] and torch.equal(out, x.flip(-1))


def test_each_crop_sees_only_its_window_and_cond_rows_repeat_per_crop():
    x = _x(n=2, h=32, w=32)
    ctx = torch.arange(2.0).view(2, 1, 1)
    shapes = []

    def inner(x, sigma, cond):
        c = cond["c_crossattn"][0]
        shapes.append((x.shape[0], c.shape[0], sigma.shape[0]))
        assert torch.equal(c[: x.shape[0]].flatten()[:2], torch.tensor([0.0, 1.0]))
        return torch.zeros_like(x) + x.mean(dim=(1, 2, 3), keepdim=True)

    TiledDenoiser(inner, plan_tiles(32, 32, 16, 8), batch=2)(x, torch.tensor([2.0, 2.0]),
                                                             cond={"c_crossattn": [ctx]})
    assert all(n == c == s for n, c, s in shapes) and shapes[0][0] == 4  # 2 crops x 2 rows


def test_latent_preview_is_a_small_rgb_image():
    from lib_hrlr.image.preview import latent_preview

    img = latent_preview(torch.zeros(1, 4, 256, 320), max_side=128)
    assert img.mode == "RGB" and img.size == (106, 85)  # 320x256 latent pooled by 3
    assert img.getpixel((0, 0)) == (127, 127, 127)
