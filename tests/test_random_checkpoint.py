"""Random checkpoints: valid, deterministic, self-describing, cached."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from safetensors import safe_open

from lib_hrlr.config.architectures import SD15, TINY, UNET_PREFIX, VAE_PREFIX
from lib_hrlr.errors import InvalidInput
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.random_checkpoint import (
    cached_random_checkpoint,
    random_chunks,
    tensor_plan,
    write_random_checkpoint,
)
from lib_hrlr.weights.safetensors_file import read_header


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_tiny_written_reopened_and_readable_by_the_library(tmp_path):
    p = write_random_checkpoint(tmp_path / "t.safetensors", TINY, torch.float16, seed=7)
    assert not (tmp_path / "t.safetensors.tmp").exists()
    ck = open_checkpoint(p)
    assert ck.config == TINY and ck.config_source == "metadata"
    assert ck.metadata["hrlr_random_seed"] == "7" and ck.metadata["hrlr_random_dtype"] == "fp16"
    plan = tensor_plan(TINY)
    h = read_header(p)
    assert h.data_start + sum(math.prod(s) * 2 for *_, s, _ in plan) == p.stat().st_size  # no gaps, no trailer
    with safe_open(str(p), "pt") as f:
        assert set(f.keys()) == set(h.tensors)
        for name in (UNET_PREFIX + "out.2.weight", VAE_PREFIX + "decoder.mid.attn_1.q.weight"):
            t = f.get_tensor(name)
            assert t.dtype == torch.float16 and tuple(t.shape) == h.tensors[name].shape


def test_deterministic_per_seed_and_dtype(tmp_path):
    a = write_random_checkpoint(tmp_path / "a.safetensors", TINY, torch.float16, seed=1)
    b = write_random_checkpoint(tmp_path / "b.safetensors", TINY, torch.float16, seed=1)
    c = write_random_checkpoint(tmp_path / "c.safetensors", TINY, torch.float16, seed=2)
    d = write_random_checkpoint(tmp_path / "d.safetensors", TINY, torch.float32, seed=1)
    assert sha(a) == sha(b) != sha(c)
    assert open_checkpoint(a).sha256_short == open_checkpoint(b).sha256_short
    # the fp32 file holds the values the fp16 file rounds
    fa, fd = safe_open(str(a), "pt"), safe_open(str(d), "pt")
    name = UNET_PREFIX + "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(fd.get_tensor(name).half(), fa.get_tensor(name))


def test_value_scales(tmp_path):
    p = write_random_checkpoint(tmp_path / "t.safetensors", TINY, torch.float32, seed=0)
    with safe_open(str(p), "pt") as f:
        w = f.get_tensor(UNET_PREFIX + "output_blocks.0.0.in_layers.2.weight")  # (64, 128, 3, 3)
        fan_in = w[0].numel()
        assert abs(w.std().item() * math.sqrt(fan_in) - 1) < 0.03
        assert abs(w.mean().item()) < 0.01
        norm = f.get_tensor(UNET_PREFIX + "out.0.weight")
        assert abs(norm.mean().item() - 1) < 0.02 and 0.005 < norm.std().item() < 0.05
        bias = f.get_tensor(VAE_PREFIX + "decoder.conv_in.bias")
        assert bias.abs().max().item() < 0.2 and bias.std().item() > 0.005
    # chunking does not change the distribution's statistics across the chunk boundary
    chunks = list(random_chunks("x", "weight", (3, 1 << 20), seed=0))
    assert len(chunks) == 3 and all(abs(c.std().item() * math.sqrt(1 << 20) - 1) < 0.01 for c in chunks)


def test_cached_checkpoint_reused_and_repaired(tmp_path, monkeypatch):
    monkeypatch.setenv("HRLR_CACHE", str(tmp_path))
    p = cached_random_checkpoint("tiny", torch.float16, seed=0)
    assert p.parent == tmp_path / "random" and p.name == "tiny-fp16-seed0.safetensors"
    stamp = p.stat().st_mtime_ns
    digest = sha(p)
    assert cached_random_checkpoint("tiny", torch.float16, seed=0) == p
    assert p.stat().st_mtime_ns == stamp  # reused, not rewritten
    with open(p, "r+b") as f:  # damage it: truncated
        f.truncate(p.stat().st_size - 1)
    assert cached_random_checkpoint("tiny", torch.float16, seed=0) == p
    assert sha(p) == digest  # rewritten identically
    assert cached_random_checkpoint("tiny", torch.float16, seed=1).name == "tiny-fp16-seed1.safetensors"
    with pytest.raises(InvalidInput, match="allowed are sd15, tiny, sdxl, tiny_xl"):
        cached_random_checkpoint("sd3")


def test_sd15_plan_matches_the_real_model_size():
    plan = tensor_plan(SD15)
    sizes = {c: sum(math.prod(s) for cc, _, _, s, _ in plan if cc == c) for c in ("unet", "vae", "text")}
    assert sizes == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480}
    assert sum(sizes.values()) * 2 / 2**30 == pytest.approx(1.987, abs=0.01)  # GiB of the fp16 file
