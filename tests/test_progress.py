"""Progress that tells the truth: stage work counted from the architecture (checked against
torch's FLOP counter on the models), the run's ETA from rates measured on earlier stages of the
same kind, and on the tiny model the ETA when the tiled pass ends against the real time left."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lib_hrlr.config.architectures import ARCHITECTURES
from lib_hrlr.models.taesd import TAESDDecoder, TAESDEncoder
from lib_hrlr.models.unet import UNet
from lib_hrlr.models.vae import AutoencoderKL
from lib_hrlr.pipeline import work
from lib_hrlr.pipeline.generate import generate
from lib_hrlr.pipeline.params import GenerationParams, with_model_defaults
from lib_hrlr.pipeline.progress import Progress, WorkTracker
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

TINY = ARCHITECTURES["tiny"]


def macs(fn) -> float:
    with FlopCounterMode(display=False) as m, torch.no_grad():
        fn()
    return m.get_total_flops() / 2


@pytest.mark.parametrize("h, w", [(16, 16), (24, 40)])
def test_unet_count_matches_torchs_flop_counter(monkeypatch, h, w):
    # the counter does not see the fused CPU attention kernel: count it as the two matmuls it is
    def sdpa(q, k, v, *a, **kw):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    unet = UNet(TINY.unet).eval()
    x, ctx = torch.randn(1, 4, h, w), torch.randn(1, work.CONTEXT_TOKENS, TINY.unet.context_dim)
    assert work.unet_macs(TINY.unet, h, w) == pytest.approx(macs(lambda: unet(x, torch.tensor([500]), ctx)),
                                                            rel=0.01)


@pytest.mark.parametrize("h, w", [(8, 8), (16, 24)])
def test_vae_and_taesd_counts_match_torchs_flop_counter(h, w):
    vae = AutoencoderKL(TINY.vae).eval()
    f = TINY.vae.downscale
    z, img = torch.randn(1, 4, h, w), torch.randn(1, 3, h * f, w * f)
    assert work.vae_decoder_macs(TINY.vae, h, w) == macs(lambda: vae.decode(z))
    assert work.vae_encoder_macs(TINY.vae, h, w) == macs(lambda: vae.encode(img))
    z8, img8 = torch.randn(1, 4, h, w), torch.randn(1, 3, h * 8, w * 8)
    assert work.taesd_decoder_macs(h, w) == macs(lambda: TAESDDecoder().eval()(z8))
    assert work.taesd_encoder_macs(h, w) == macs(lambda: TAESDEncoder().eval()(img8))


def test_sd15_stage_work_weighs_the_tiled_pass_and_the_full_vae():
    cfg = ARCHITECTURES["sd15"]
    p = with_model_defaults(GenerationParams(prompt="x", width=2048, height=2048), cfg)
    w = {s.name: s.units for s in work.stage_work(cfg, p, n_jobs=25)}
    # 9 tail steps x 25 tiles x 2 samples of the base pass's per-sample work, over its 20 steps
    assert w["tiled"] / w["base"] == pytest.approx(9 * 25 / 20)
    # the full decoder at 2048² (its mid attention over 65536 latent px) outweighs the base pass
    assert w["decode"] > w["base"] and w["decode"] / w["base decode"] > 16
    taesd = {s.name: s.units for s in work.stage_work(cfg, replace_vae(p), n_jobs=25)}
    assert taesd["decode"] < w["decode"] / 10


def replace_vae(p):
    import dataclasses

    return dataclasses.replace(p, vae="taesd")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_tracker_eta_uses_the_rate_of_the_same_kind():
    S = work.StageWork
    clock = Clock()
    tr = WorkTracker([S("text", "text", 10), S("base", "unet", 100, per_unit=10), S("base decode", "decoder", 50),
                      S("tiled", "unet", 1000, per_unit=10), S("decode", "decoder", 500)], clock=clock)
    tr.start("text", 1)
    assert tr.remaining(0.0) is None  # nothing measured yet
    clock.t = 1.0
    tr.start("base", 10)  # text: 0.1 s/unit, not a rate for the rest
    assert tr.remaining(0.0) is None
    clock.t = 3.0  # 2 s for 20 % of the base pass: 0.1 s/unit for every kind until measured
    assert tr.remaining(0.2) == pytest.approx(8 + (50 + 1000 + 500) * 0.1)
    clock.t = 11.0
    tr.start("base decode", 1)  # unet: 10 s / 100 units
    clock.t = 36.0
    tr.start("tiled", 120)  # decoder: 25 s / 50 units; the tiled pass is 120 x 10 units, not 1000
    # tiled 1200 units x 0.1 + decode 500 x 0.5
    assert tr.remaining(0.0) == pytest.approx(120 + 250)
    clock.t = 66.0  # a quarter of the tiled pass in 30 s: its own rate takes over
    assert tr.remaining(0.25) == pytest.approx(90 + 250)
    assert tr.fraction(0.25, tr.remaining(0.25)) == pytest.approx(66 / (66 + 340))
    clock.t = 156.0
    tr.start("decode", 1)
    assert tr.remaining(0.0) == pytest.approx(250)


def test_tiny_model_eta_when_the_tiled_pass_ends(tmp_path):
    """The stated factor: the run's ETA at the start of the final decode is within 2.5x of the
    time the decode and PNG really take (full VAE; its rate comes from the base decode)."""
    ckpt = str(cached_random_checkpoint("tiny"))
    seen = []

    def sink(ev):
        seen.append((time.perf_counter(), ev))

    # budget_mb: the planner counts this pytest process's RSS (whatever earlier tests left resident) as the
    # run's baseline; this test is about the ETA, not the budget
    params = GenerationParams(prompt="a lighthouse", width=512, height=512, model=ckpt, steps=4, seed=1,
                              budget_mb=8000, out=str(tmp_path / "o.png"))
    generate(params, progress=sink)
    t_end = time.perf_counter()
    t_dec, ev = next((t, e) for t, e in seen if e.stage == "decode")
    assert ev.overall_eta_s is not None
    real = t_end - t_dec
    ratio = ev.overall_eta_s / real
    print(f"ETA at decode start {ev.overall_eta_s:.2f} s, real {real:.2f} s, ratio {ratio:.2f}")
    assert 1 / 2.5 <= ratio <= 2.5
    # no ETA from the text encoder's rate alone; the run's share ends at 1
    assert all(e.overall_eta_s is None for _, e in seen if e.stage == "text")
    assert seen[-1][1].overall == pytest.approx(1.0)
