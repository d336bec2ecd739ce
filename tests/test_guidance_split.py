"""Guidance split: when one tile's two samples (prompt and negative) do not fit the budget, the
planner runs them in separate UNet calls, and the denoiser gives the same result either way."""

import pytest
import torch

from lib_hrlr.config.architectures import SD15, SDXL, TINY
from lib_hrlr.errors import BudgetError, InvalidInput
from lib_hrlr.memory.budget import MB, SAFETY, plan_budget, unet_call_bytes
from lib_hrlr.models.unet import UNet
from lib_hrlr.pipeline.generate import base_latent_pixels
from lib_hrlr.sampling.denoiser import EpsDenoiser
from lib_hrlr.sampling.schedule import sd_schedule


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(TINY.unet).eval().double()  # float64: batching cannot change a result beyond float32 rounding


def test_split_calls_give_the_batched_result_and_count_the_calls(tiny_unet):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 16, generator=g)
    conds = torch.randn(3, 77, TINY.unet.context_dim, generator=g)
    uncond = torch.randn(1, 77, TINY.unet.context_dim, generator=g)
    out, calls, samples = [], [], []
    for cap in (None, 1, 4):
        den = EpsDenoiser(tiny_unet, sd_schedule(), cfg_scale=7.0, dtype=torch.float64, max_samples=cap)
        with torch.inference_mode():
            out.append(den.denoise_batch(x, torch.tensor(3.0), conds, uncond))
        calls.append(den.unet_calls)
        samples.append(den.samples)
    assert calls == [1, 6, 2] and samples == [6, 6, 6]
    for o in out[1:]:
        torch.testing.assert_close(o, out[0], rtol=0, atol=1e-6)  # per-row math; only GEMM blocking differs
    assert (out[0] - x).abs().max() > 1.0  # the guidance did something


def test_max_samples_is_checked():
    with pytest.raises(InvalidInput, match="max_samples"):
        EpsDenoiser(lambda *a: a[0], sd_schedule(), max_samples=0)


def plan(model, tile, dtype_bytes, budget=800.0, width=2048):
    f = model.vae.downscale
    return plan_budget(model, budget_mb=budget, baseline_mb=238.0, tile=tile, n_tiles=9, dtype_bytes=dtype_bytes,
                       taesd=True, canvas_pixels=(width // f) ** 2, base_pixels=base_latent_pixels(model, width, width))


def test_fp32_sdxl_fits_800_mb_only_with_the_guidance_split():
    # bf16: one tile's two samples fit; fp32: they do not, one sample at a time does at tile 120
    assert plan(SDXL, 128, 2).samples_per_call is None
    p = plan(SDXL, 120, 4)
    assert p.samples_per_call == 1 and p.tile_batch == 1 and p.peak_mb <= 800
    assert "guidance split" in p.table()
    room = 800 / SAFETY - 238.0
    two = unet_call_bytes(SDXL, 120, 2, 4) / MB
    one = unet_call_bytes(SDXL, 120, 1, 4) / MB
    assert two > room > one  # the split is what makes it fit
    # SD 1.5 keeps its tiles whole at 800 MB in either dtype
    assert plan(SD15, 64, 4).samples_per_call is None and plan(SD15, 64, 2).samples_per_call is None


def test_a_tile_that_fits_no_way_names_the_largest_that_does():
    with pytest.raises(BudgetError, match=r"separate UNet calls; --tile 120 fits") as e:
        plan(SDXL, 128, 4)
    assert e.value.field == "budget_mb"


def test_a_budget_too_small_for_the_base_pass_names_no_tile():
    # 700 MB in fp32: tile 96 would fit the tiled pass, but the 1024² base pass (128² latent, one
    # sample per call) needs about 791 MB whatever the tile, so naming a tile would only lead to a
    # second refusal
    with pytest.raises(BudgetError) as e:
        plan(SDXL, 120, 4, budget=700)
    assert e.value.field == "budget_mb" and "--tile" not in str(e.value)
    assert "no tile helps: the native-size base pass (16384 latent px) alone needs about 791 MB" in str(e.value)
    # with the tiled pass's tile that the hint used to name, the base pass is what is refused
    with pytest.raises(BudgetError, match=r"native-size base pass \(16384 latent px\) needs about 791 MB"):
        plan(SDXL, 96, 4, budget=700)


def test_the_base_pass_is_planned_at_its_own_size():
    # SD 1.5 at --tile 32: the tiled pass is cheap, the 64x64 base latent is what must fit
    p = plan(SD15, 32, 4, budget=2000)
    base = next(s for s in p.stages if s.name == "base_unet")
    want = 238.0 + unet_call_bytes(SD15, 32, 2, 4, area=64 * 64) / MB + p.unet_cache_mb
    assert base.mb == pytest.approx(want)
    assert unet_call_bytes(SD15, 32, 2, 4, area=64 * 64) == unet_call_bytes(SD15, 64, 2, 4)
    with pytest.raises(BudgetError, match="base pass"):
        plan_budget(SD15, budget_mb=(238.0 + unet_call_bytes(SD15, 32, 2, 4) / MB + 1) * SAFETY, baseline_mb=238.0,
                    tile=32, n_tiles=1, dtype_bytes=4, taesd=True, vae_tile=16, base_pixels=64 * 64)
