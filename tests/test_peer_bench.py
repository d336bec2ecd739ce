"""bench --peer diffusers: the peer runs on the very same weights, does the same UNet work as our
run, and the JSON carries the documented keys; --cgroup-limit-mb really limits the child."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def test_exported_diffusers_folder_holds_our_weights(tmp_path, monkeypatch):
    import diffusers

    from lib_hrlr.bench.diffusers_export import export_diffusers_folder
    from lib_hrlr.bench.unet_speed import resident_unet
    from lib_hrlr.weights.checkpoint import open_checkpoint
    from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

    ckpt_path = cached_random_checkpoint("tiny")
    folder = export_diffusers_folder(ckpt_path, tmp_path / "tiny-diffusers")
    assert export_diffusers_folder(ckpt_path, folder) == folder  # reused, not rewritten
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    ck = open_checkpoint(ckpt_path)
    ours, streamer = resident_unet(ck, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    c = torch.randn(2, 77, ck.config.unet.context_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        a = ours(x, t, c)
        b = theirs(x, t, encoder_hidden_states=c).sample
    streamer.close()
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


def test_peer_job_runs_end_to_end_on_tiny_weights(tmp_path, shared_weights):
    out = tmp_path / "peer.json"
    env = dict(os.environ, HRLR_CLIP_TOKENIZER=str(shared_weights / "clip-vit-large-patch14-tokenizer"))
    # 160 px = 20 latent px: four 16 px tiles (overlap 4, the last row/column moved back to the edge)
    cmd = [sys.executable, "-m", "lib_hrlr", "bench", "--arch", "tiny", "--peer", "diffusers", "--width", "160",
           "--height", "160", "--steps", "1", "--threads", "1", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["schema"] == "hrlr-peer-bench/1"
    assert set(rep) >= {"schema", "job", "ours", "peer", "speed_ratio", "memory_ratio"}
    stages = {"text_encoder", "base_unet", "base_decode", "guide_encode", "tiled_unet", "vae_decode", "png_write"}
    for side in ("ours", "peer"):
        assert set(rep[side]["stages"]) >= stages, (side, rep[side]["stages"])
        assert rep[side]["wall_s"] > 0 and rep[side]["peak_rss_mb"] > 0
    assert set(rep["speed_ratio"]) >= {"tiled_unet", "vae_decode", "end_to_end"}
    assert rep["speed_ratio"]["end_to_end"] == pytest.approx(rep["peer"]["wall_s"] / rep["ours"]["wall_s"], rel=1e-3)
    assert rep["memory_ratio"] == pytest.approx(rep["peer"]["peak_rss_mb"] / rep["ours"]["peak_rss_mb"], rel=1e-3)
    job = rep["job"]
    assert job["tiles"] == 4 and job["tiled_steps"] == 1
    # the same work: base pass and tiled pass, guidance doubling every call, counted in both processes
    assert rep["peer"]["unet_evals"] == rep["ours"]["unet_evals"] == 2 * (1 + job["tiled_steps"] * job["tiles"])


def test_cgroup_limit_is_enforced_and_counts_the_page_cache(tmp_path):
    from lib_hrlr.bench.child import cgroup_support, run_child

    why = cgroup_support()
    if why:
        pytest.skip(f"no memory cgroup here: {why}")
    py = sys.executable
    # a child that needs more than its limit is OOM-killed, and the run says so
    big = run_child([py, "-c", "b = bytearray(256 << 20); print(len(b))"], limit_mb=96)
    assert big.returncode == -9 and big.oom_killed, big
    assert big.cgroup["peak_mb"] <= 96.5
    # one that fits finishes; the page cache of a file it writes and reads back is charged to
    # its cgroup (peak far above its own RSS), reclaimed at the limit instead of killing it
    data = tmp_path / "blob"
    code = ("import os, sys; p = sys.argv[1]; f = open(p, 'wb'); [f.write(os.urandom(1 << 20)) for _ in range(160)]; "
            "f.close(); n = 0\nwith open(p, 'rb') as f:\n    while (c := f.read(1 << 20)):\n        n += len(c)\n"
            "print(n, [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])")
    with open(tmp_path / "out.txt", "w") as fh:
        small = run_child([py, "-c", code, str(data)], limit_mb=96, stdout=fh)
    assert small.returncode == 0 and not small.oom_killed, small
    nbytes, hwm_kb = map(int, (tmp_path / "out.txt").read_text().split())
    assert nbytes == 160 << 20
    assert small.cgroup["peak_mb"] <= 96.5
    assert small.cgroup["peak_mb"] > hwm_kb / 1024 + 30, (small, hwm_kb)
    # the peak RSS the bench reports is the child's own (not this torch-sized process's)
    assert abs(small.peak_rss_mb - hwm_kb / 1024) < 2, (small, hwm_kb)


def test_a_missing_tokenizer_is_refused_before_our_side_runs(tmp_path):
    """The peer's CLIP tokenizer is checked first: no 20-minute run of ours before the error.
    A copy of the package where no ``../shared`` folder exists, and no HRLR_CLIP_TOKENIZER."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "lib_hrlr", repo / "lib_hrlr", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "HRLR_CLIP_TOKENIZER"}
    env["HRLR_CACHE"] = str(tmp_path / "cache")  # nothing may be built either
    cmd = [sys.executable, "-m", "lib_hrlr", "bench", "--arch", "tiny", "--peer", "diffusers", "--width", "160",
           "--height", "160", "--steps", "1", "--vae", "full"]
    run = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "HRLR_CLIP_TOKENIZER" in run.stderr and "ours:" not in run.stderr
    assert not (tmp_path / "cache").exists()
