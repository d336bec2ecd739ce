"""SDXL sampling with tiles: the micro-conditioning each tile receives, a one-tile canvas
equal to plain SDXL sampling, and the streamed model equal to the resident one (bit-exact)."""

from __future__ import annotations

import pytest
import torch

from lib_hrlr.config.architectures import TINY_XL
from lib_hrlr.models.unet import UNet, adm_vector
from lib_hrlr.pipeline.sdxl_text import encode_text_sdxl
from lib_hrlr.sampling.denoiser import EpsDenoiser
from lib_hrlr.sampling.micro_conditioning import AddedConditioning, base_micro, tile_micro
from lib_hrlr.sampling.samplers import euler
from lib_hrlr.sampling.schedule import sd_schedule
from lib_hrlr.text.clip_text import ClipTextEncoder
from lib_hrlr.text.sdxl_conditioning import encode_prompts_sdxl
from lib_hrlr.tiling.mixture import MixtureDenoiser
from lib_hrlr.tiling.plan import plan_tiles
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.random_checkpoint import write_random_checkpoint
from lib_hrlr.weights.streaming import WeightStreamer
from tests.conftest import read_source

BOTH = ("sd1x", "sdxl")


def test_each_policy_gives_a_tile_the_values_the_readme_states():
    plan = plan_tiles(256, 256, 128, 32)  # 2048² px, SDXL's 128-latent tiles, default overlap 32
    assert sorted({t.y for t in plan.tiles}) == [0, 96, 128] and len(plan.tiles) == 9
    tile = next(t for t in plan.tiles if (t.y, t.x) == (96, 128))
    offset = tile_micro("offset", 2048, 2048, tile.y, tile.x, tile.h, tile.w)
    assert offset.time_ids() == (2048, 2048, 768, 1024, 1024, 1024)
    assert tile_micro("zero", 2048, 2048, tile.y, tile.x, tile.h, tile.w).time_ids() == (1024, 1024, 0, 0, 1024, 1024)
    assert tile_micro("canvas", 2048, 2048, tile.y, tile.x, tile.h, tile.w).time_ids() == (2048, 2048, 0, 0, 2048, 2048)
    assert base_micro(1024, 1024).time_ids() == (1024, 1024, 0, 0, 1024, 1024)
    pooled, neg = torch.randn(1, 1280), torch.zeros(1, 1280)
    added = AddedConditioning([pooled], neg, 256, "offset", 2048, 2048)
    row = added(tile, 0)
    assert torch.equal(row, adm_vector(pooled, torch.tensor([[2048.0, 2048, 768, 1024, 1024, 1024]]), 256))
    assert torch.equal(added(tile, None)[:, 1280:], row[:, 1280:]) and not added(tile, None)[:, :1280].any()
    with pytest.raises(Exception, match="micro_conditioning"):
        AddedConditioning([pooled], neg, 256, "centre", 2048, 2048)


def random_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet(TINY_XL.unet).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 / p[0].numel() ** 0.5)
            else:
                p.uniform_(-0.1, 0.1) if name.endswith("bias") else p.uniform_(0.8, 1.2)
    return unet


def conditioning(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 77, 80, generator=g), torch.randn(1, 77, 80, generator=g),
            torch.randn(1, 40, generator=g), torch.randn(1, 40, generator=g))


def test_one_tile_canvas_equals_plain_sdxl_sampling():
    unet = random_unet()
    cond, uncond, pooled, neg_pooled = conditioning()
    schedule = sd_schedule()
    sigmas = schedule.sigmas_for("karras", 3)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    ids = torch.tensor([base_micro(128, 128).time_ids()], dtype=torch.float32)
    with torch.inference_mode():
        plain = EpsDenoiser(unet, schedule, cond, uncond, 5.0, added=adm_vector(pooled, ids, 8),
                            added_uncond=adm_vector(neg_pooled, ids, 8))
        expected = euler(plain, x0.clone(), sigmas)
        added = AddedConditioning([pooled], neg_pooled, 8, "offset", 128, 128)
        mix = MixtureDenoiser(EpsDenoiser(unet, schedule, cfg_scale=5.0), plan_tiles(16, 16, 16, 4), [cond], uncond,
                              added=added, batch_size=2)  # cond and uncond in one call, as the plain pass
        got = euler(mix, x0.clone(), sigmas)
    assert expected.abs().max() > 0.1
    assert torch.equal(got, expected)
    # and the micro-conditioning reaches the result: the same tile told it is a crop elsewhere
    with torch.inference_mode():
        moved = AddedConditioning([pooled], neg_pooled, 8, "offset", 256, 256)  # a 1-tile view of a larger canvas
        other = MixtureDenoiser(EpsDenoiser(unet, schedule, cfg_scale=5.0), plan_tiles(16, 16, 16, 4), [cond], uncond,
                                added=moved)(x0.clone(), sigmas[0])
        first = mix(x0.clone(), sigmas[0])
    assert (other - first).abs().max() > 1e-4


@pytest.fixture(scope="module")
def tiny_xl_ckpt(tmp_path_factory):
    p = write_random_checkpoint(tmp_path_factory.mktemp("xls") / "tiny_xl.safetensors", TINY_XL, torch.float32, seed=11)
    return open_checkpoint(p, families=BOTH)


def resident(model, ck, comp):
    state = {n: read_source(s) for n, s in ck.component(comp).items()}
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    model.load_state_dict({n: t.reshape(shapes[n]) for n, t in state.items()}, strict=True)
    if comp == "text2":
        model.text_projection.transposed = "text2.text_projection.weight" in ck.transposed
    return model.eval()


def test_streamed_equals_resident_bit_exact(tiny_xl_ckpt):
    ck = tiny_xl_ckpt
    prompts = ["a lighthouse at (dawn:1.2), waves", ""]
    streamed_text = encode_text_sdxl(ck, prompts, [False, True], torch.float32, torch.device("cpu"))
    enc_l = resident(ClipTextEncoder(TINY_XL.text), ck, "text")
    enc_g = resident(ClipTextEncoder(TINY_XL.text2), ck, "text2")
    with torch.inference_mode():
        resident_text = encode_prompts_sdxl(enc_l.encode_sdxl, enc_g.encode_sdxl, prompts, zero_if_empty=[False, True])
    for a, b in zip(streamed_text, resident_text):
        assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    pos, neg = streamed_text
    schedule = sd_schedule()
    sigmas = schedule.sigmas_for("karras", 2)
    x0 = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    plan = plan_tiles(24, 24, 16, 8)  # 2 x 2 tiles, each with its own micro-conditioning
    added = AddedConditioning([pos.pooled], neg.pooled, 8, "offset", 192, 192)

    def run(unet):
        mix = MixtureDenoiser(EpsDenoiser(unet, schedule, cfg_scale=4.0), plan, [pos.context], neg.context, added=added,
                              batch_size=3)
        return euler(mix, x0.clone(), sigmas)

    unet_r = resident(UNet(TINY_XL.unet), ck, "unet")
    with torch.inference_mode():
        expected = run(unet_r)
    with torch.device("meta"):
        unet_s = UNet(TINY_XL.unet).eval()
    with torch.inference_mode(), WeightStreamer(unet_s, ck.component("unet"), dtype=torch.float32) as streamer:
        got = run(unet_s)
        assert streamer.stats.units > 100
    assert expected.abs().max() > 0.1 and torch.equal(got, expected)
