"""bench --arch sdxl --peer diffusers: the SDXL checkpoint exported to a diffusers folder holds our
very weights (diffusers' UNet and transformers' two text encoders loaded from it give our
models' outputs), and the SDXL peer (StableDiffusionXLPipeline) runs end to end, reports every
stage, and, when it dies, where it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

STAGES = ("load", "text_encoder", "unet", "vae_decode", "png_write")


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    from lib_hrlr.bench.diffusers_export import export_diffusers_folder
    from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

    ckpt_path = cached_random_checkpoint("tiny_xl")
    folder = export_diffusers_folder(ckpt_path, tmp_path_factory.mktemp("export") / "tiny_xl-diffusers")
    return ckpt_path, folder


def test_exported_sdxl_folder_gives_our_unet_and_text_encoders(tiny_xl):
    from lib_hrlr.bench.diffusers_export import export_diffusers_folder
    from lib_hrlr.bench.unet_speed import resident_unet
    from lib_hrlr.models.unet import adm_vector
    from lib_hrlr.pipeline.sdxl_text import _run_streamed
    from lib_hrlr.weights.checkpoint import FAMILIES, open_checkpoint
    from tests.test_openclip_text import ids_batch

    ckpt_path, folder = tiny_xl
    assert export_diffusers_folder(ckpt_path, folder) == folder  # reused, not rewritten
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    ck = open_checkpoint(ckpt_path, families=FAMILIES)
    assert ck.transposed == {"text2.text_projection.weight"}  # the one tensor the export transposes

    # UNet: diffusers' from the folder against ours streamed from the single file
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    ours, streamer = resident_unet(ck, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 24, generator=g)
    ctx = torch.randn(2, 154, ck.config.unet.context_dim, generator=g)
    pooled = torch.randn(2, ck.config.text2.projection_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 128.0, 2048.0, 1536.0], [512.0, 512.0, 64.0, 0.0, 512.0, 512.0]])
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        a = ours(x, t, ctx, adm_vector(pooled, time_ids, ck.config.unet.added_time_dim))
        b = theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    streamer.close()
    du = (a - b).abs().max().item()

    # text encoders: ours as generate runs them (streamed, OpenCLIP names, transposed projection)
    ids = ids_batch()
    (hid_l, pool_l), = _run_streamed(ck, "text", [ids], torch.float32, torch.device("cpu"), 0)
    (hid_g, pool_g), = _run_streamed(ck, "text2", [ids], torch.float32, torch.device("cpu"), 0)
    te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    te2 = transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=torch.float32).eval()
    with torch.no_grad():
        ref_l = te(ids, output_hidden_states=True).hidden_states[-2]  # what StableDiffusionXLPipeline takes
        out_g = te2(ids, output_hidden_states=True)
    dl = (hid_l - ref_l).abs().max().item()
    dg = (hid_g - out_g.hidden_states[-2]).abs().max().item()
    dp = (pool_g - out_g.text_embeds).abs().max().item()
    print(f"tiny_xl export: max |ours - diffusers| UNet {du:.2e} (|eps| max {a.abs().max().item():.2f}); "
          f"CLIP-L hidden {dl:.2e}; bigG hidden {dg:.2e}, pooled {dp:.2e} (|pooled| max {pool_g.abs().max().item():.2f})")
    assert pool_l is None and a.std() > 0.05 and out_g.text_embeds.abs().max() > 0.1
    assert du <= 1e-5 * max(1.0, a.abs().max().item())
    assert dl <= 1e-5 and dg <= 1e-5 and dp <= 1e-5


def _peer(folder, out, size: int, shared_weights, tmp_path, dtype: str = "fp32"):
    """The SDXL peer child on ``folder`` (fp32 here: CPUs without bf16 kernels take ~10x longer
    in bf16; the slow bench test below runs bf16, the dtype of the real comparison)."""
    from lib_hrlr.bench.child import run_child
    from lib_hrlr.bench.peer import peer_xl_result

    cmd = [sys.executable, "-m", "lib_hrlr.bench.peer_diffusers_xl", "--folder", str(folder), "--tokenizer",
           str(shared_weights / "clip-vit-large-patch14-tokenizer"), "--width", str(size), "--height", str(size),
           "--steps", "1", "--dtype", dtype, "--threads", "1", "--prompt", "a lighthouse on a cliff",
           "--negative", "blurry", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "out.jsonl", "w") as fh, open(tmp_path / "err.txt", "w") as eh:
        r = run_child(cmd, env, stdout=fh, stderr=eh)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    return r, lines, peer_xl_result(r, lines, (tmp_path / "err.txt").read_text())


def test_sdxl_peer_runs_end_to_end_and_reports_every_stage(tiny_xl, shared_weights, tmp_path):
    from PIL import Image

    _, folder = tiny_xl
    out = tmp_path / "peer.png"
    # 160 px = 20 latent px, above the tiny VAE's 16 px tile: the decode really is tiled
    r, lines, peer = _peer(folder, out, 160, shared_weights, tmp_path)
    assert r.returncode == 0, (tmp_path / "err.txt").read_text()[-3000:]
    final = json.loads(lines[-1])
    print(f"tiny_xl peer 160²: {final['stages']}, peak {peer['peak_rss_mb']} MB, offload {final['offload']}")
    assert tuple(final["stages"]) == STAGES and all(v >= 0 for v in final["stages"].values())
    assert [json.loads(ln).get("stage") for ln in lines[:-1] if "stage" in json.loads(ln)] == list(STAGES)
    assert final["unet_evals"] == 2  # one step, guidance doubling the batch
    assert final["size"] == [160, 160] and Image.open(out).size == (160, 160)
    assert "enable_tiling" in final["vae_tiling"]
    if not torch.cuda.is_available():  # diffusers refuses both CPU offloads without an accelerator, saying why
        for m in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
            assert final["offload"][m]["used"] is False and final["offload"][m]["error"], final["offload"]
    assert peer["finished"] and peer["reached"] == "png_write" and peer["died_in"] is None
    assert peer["peak_rss_mb"] >= peer["load_peak_rss_mb"] > 0 and peer["wall_s"] > sum(final["stages"].values())


def test_sdxl_peer_that_dies_reports_where_and_what_it_used(tiny_xl, shared_weights, tmp_path):
    _, folder = tiny_xl
    # 164 px is not a multiple of 8: StableDiffusionXLPipeline refuses it when the denoising starts
    r, lines, peer = _peer(folder, tmp_path / "peer.png", 164, shared_weights, tmp_path)
    print(f"dead peer: {peer}")
    assert r.returncode == 1
    assert not peer["finished"] and peer["exit_status"] == 1
    assert peer["reached"] == "text_encoder" and peer["died_in"] == "unet"
    assert set(peer["stages"]) == {"load", "text_encoder"}
    assert any("divisible by 8" in ln for ln in peer["error_tail"]), peer["error_tail"]
    assert peer["wall_s"] > 0 and peer["peak_rss_mb"] > 100


@pytest.mark.slow
def test_bench_sdxl_peer_end_to_end_on_tiny_xl(tmp_path, shared_weights):
    out = tmp_path / "peer.json"
    env = dict(os.environ, HRLR_CLIP_TOKENIZER=str(shared_weights / "clip-vit-large-patch14-tokenizer"))
    cmd = [sys.executable, "-m", "lib_hrlr", "bench", "--arch", "tiny_xl", "--peer", "diffusers", "--width", "160",
           "--height", "160", "--steps", "1", "--dtype", "fp32", "--threads", "1", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["schema"] == "hrlr-peer-bench/1" and rep["job"]["peer_kind"] == "sdxl-pipeline"
    assert rep["job"]["dtype"] == "fp32" and rep["job"]["peer_view_batch_size"] is None
    assert tuple(rep["peer"]["stages"]) == STAGES and rep["peer"]["finished"]
    assert set(rep["ours"]["stages"]) >= {"text_encoder", "base_unet", "tiled_unet", "vae_decode", "png_write"}
    assert set(rep["speed_ratio"]) == {"text_encoder", "unet", "vae_decode", "png_write", "end_to_end"}
    ours_unet = rep["ours"]["stages"]["base_unet"] + rep["ours"]["stages"]["tiled_unet"]
    assert rep["speed_ratio"]["unet"] == pytest.approx(rep["peer"]["stages"]["unet"] / ours_unet, rel=1e-3)
    assert rep["speed_ratio"]["end_to_end"] == pytest.approx(rep["peer"]["wall_s"] / rep["ours"]["wall_s"], rel=1e-3)
    assert rep["memory_ratio"] == pytest.approx(rep["peer"]["peak_rss_mb"] / rep["ours"]["peak_rss_mb"], rel=1e-3)
    assert rep["peer"]["unet_evals"] == 2 and rep["ours"]["unet_evals"] == 2 * (1 + rep["job"]["tiled_steps"] * rep["job"]["tiles"])
