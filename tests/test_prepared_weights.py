"""The prepared weight cache: the UNet's weights converted once into the compute dtype.

References: safetensors' own loader and torch's dtype conversion for the file's contents,
the streamer with per-call conversion for the UNet's output, the file system for what is
left on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_hrlr.config.architectures import TINY
from lib_hrlr.errors import Interrupted
from lib_hrlr.pipeline.components import unet_streamer
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.prepared import FORMAT, cache_folder, prepared_sources
from lib_hrlr.weights.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-fp16.safetensors"
    write_random_checkpoint(path, TINY, dtype=torch.float16, seed=3)
    return open_checkpoint(path)


def test_the_file_holds_every_unet_tensor_converted_once_and_is_reused(tiny_ckpt, tmp_path):
    sources = tiny_ckpt.component("unet")
    first = prepared_sources(sources, "unet", torch.bfloat16, tmp_path)
    assert first.status == "written" and os.path.dirname(first.path) == str(tmp_path)
    theirs = load_file(first.path)
    original = load_file(str(tiny_ckpt.path))
    prefix = "model.diffusion_model."
    assert set(theirs) == set(sources)
    for name, src in sources.items():
        assert theirs[name].dtype == torch.bfloat16
        ref = original[src.info.name].to(torch.bfloat16).reshape(theirs[name].shape)
        assert torch.equal(theirs[name], ref), name
        assert src.info.name.startswith(prefix)
    want = sum(t.numel() * 2 for t in theirs.values())
    assert first.nbytes == want and os.path.getsize(first.path) > want  # plus the header
    # the streamer needs no conversion: every tensor's file dtype is its compute dtype
    assert all(s.info.dtype == torch.bfloat16 for s in first.sources.values())
    again = prepared_sources(tiny_ckpt.component("unet"), "unet", torch.bfloat16, tmp_path)
    assert again.status == "hit" and again.path == first.path
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [os.path.basename(first.path)]


def test_streaming_from_the_prepared_file_is_bit_identical_to_converting_on_every_read(tiny_ckpt, tmp_path):
    prepared = prepared_sources(tiny_ckpt.component("unet"), "unet", torch.bfloat16, tmp_path)
    g = torch.Generator().manual_seed(0)
    cfg = tiny_ckpt.config.unet
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g).to(torch.bfloat16)
    t = torch.tensor([999.0, 10.0])
    c = torch.randn(2, 77, cfg.context_dim, generator=g).to(torch.bfloat16)
    outs, reads = [], []
    for sources in (None, prepared.sources):
        with unet_streamer(tiny_ckpt, torch.bfloat16, torch.device("cpu"), 0, sources=sources) as eps:
            outs.append(torch.cat([eps(x, t, c) for _ in range(3)]))
            reads.append(eps.streamer.stats.bytes_read)
    assert torch.equal(outs[0], outs[1])
    # fp16 and bf16 are both 2 bytes: the same bytes are read, without the conversion
    assert reads[0] == reads[1] > 0


def test_an_edited_checkpoint_gets_a_new_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_random_checkpoint(path, TINY, dtype=torch.float16, seed=1)
    a = prepared_sources(open_checkpoint(path).component("unet"), "unet", torch.bfloat16, tmp_path / "cache")
    write_random_checkpoint(path, TINY, dtype=torch.float16, seed=2)
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    b = prepared_sources(open_checkpoint(path).component("unet"), "unet", torch.bfloat16, tmp_path / "cache")
    assert a.status == b.status == "written" and a.path != b.path
    name = "output_blocks.0.0.in_layers.2.weight"
    assert not torch.equal(load_file(a.path)[name], load_file(b.path)[name])


def test_fp32_files_are_halved_and_wider_or_same_dtypes_are_streamed_as_they_are(tiny_ckpt, tmp_path):
    path = tmp_path / "m32.safetensors"
    write_random_checkpoint(path, TINY, dtype=torch.float32, seed=4)
    ckpt = open_checkpoint(path)
    got = prepared_sources(ckpt.component("unet"), "unet", torch.bfloat16, tmp_path / "cache")
    assert got.status == "written"
    assert got.nbytes * 2 == ckpt.component_bytes("unet")
    same = prepared_sources(ckpt.component("unet"), "unet", torch.float32, tmp_path / "cache")
    assert same.status == "same-dtype" and same.path is None
    # fp16 -> fp32 would double every step's reads: the checkpoint streams as it is
    wider = prepared_sources(tiny_ckpt.component("unet"), "unet", torch.float32, tmp_path / "cache")
    assert wider.status == "wider" and wider.sources == tiny_ckpt.component("unet")
    assert prepared_sources(ckpt.component("unet"), "unet", torch.bfloat16, None).status == "off"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [Path(got.path).name]


def test_no_room_or_no_folder_falls_back_to_the_checkpoint_with_the_reason(tiny_ckpt, tmp_path):
    sources = tiny_ckpt.component("unet")
    full = prepared_sources(sources, "unet", torch.bfloat16, tmp_path / "c", margin_bytes=1 << 60)
    assert full.status == "skipped" and full.sources == sources
    assert str(tmp_path / "c") in full.reason and "GiB free" in full.reason
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = prepared_sources(sources, "unet", torch.bfloat16, blocker / "cache")
    assert bad.status == "skipped" and "cannot write" in bad.reason and bad.sources == sources


def test_an_interrupted_write_leaves_nothing_behind(tiny_ckpt, tmp_path):
    calls = []

    def stop_after_ten():
        calls.append(1)
        return len(calls) > 10

    with pytest.raises(Interrupted):
        prepared_sources(tiny_ckpt.component("unet"), "unet", torch.bfloat16, tmp_path, should_stop=stop_after_ten)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".lock"] == []
    assert prepared_sources(tiny_ckpt.component("unet"), "unet", torch.bfloat16, tmp_path).status == "written"


def test_a_damaged_file_is_not_used_but_rewritten(tiny_ckpt, tmp_path):
    first = prepared_sources(tiny_ckpt.component("unet"), "unet", torch.bfloat16, tmp_path)
    with open(first.path, "r+b") as f:
        f.truncate(os.path.getsize(first.path) - 64)
    again = prepared_sources(tiny_ckpt.component("unet"), "unet", torch.bfloat16, tmp_path)
    assert again.status == "written"
    assert load_file(again.path).keys() == load_file(first.path).keys()
    with open(first.path, "rb") as f:
        assert FORMAT.encode() in f.read(4096)


def test_the_setting_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HRLR_CACHE", str(tmp_path))
    assert cache_folder("auto") == str(tmp_path / "prepared")
    assert cache_folder("off") is None
    assert cache_folder("/some/dir") == "/some/dir"


def test_unet_bench_compares_prepared_and_converting_streams(monkeypatch, tmp_path):
    """``bench --unet-only`` times the streamed UNet from the prepared file next to the one
    converting on every read; both read the same bytes, only the second converts."""
    import json

    from lib_hrlr.cli import main

    monkeypatch.setenv("HRLR_CACHE", str(tmp_path))
    out = tmp_path / "u.json"
    assert main(["bench", "--unet-only", "--arch", "tiny", "--unet-dtype", "bf16", "--batches", "1", "--repeats", "1",
                 "--variants", "resident,streamed,streamed_convert", "--latent", "16", "--json", str(out)]) == 0
    # the bench leaves the process's autograd state as it found it
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["results"]] == ["resident", "streamed", "streamed_convert"]
    stats = res["stream_stats"]
    # bf16 compute from an fp16 file: the same bytes, read from the prepared file without conversion
    assert stats["streamed"]["bytes_read"] == stats["streamed_convert"]["bytes_read"] > 0
    assert len(list((tmp_path / "prepared").glob("*-unet-bfloat16-*.safetensors"))) == 1


def test_generate_uses_the_prepared_file_and_makes_the_same_image(tmp_path, capsys):
    """The CLI's runs: the first writes the file, the next reads it, and the image is the one
    ``--weight-cache off`` makes (bf16 from an fp16 checkpoint: the same values either way)."""
    import json

    from PIL import Image

    from lib_hrlr.cli import main
    from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

    model = str(cached_random_checkpoint("tiny"))
    cache = tmp_path / "prepared"
    pixels, statuses = [], []
    for i, setting in enumerate((str(cache), str(cache), "off")):
        out, report = tmp_path / f"{i}.png", tmp_path / f"{i}.json"
        code = main(["generate", "--quiet", "--budget-mb", "8000", "--model", model, "--prompt", "x", "--width", "128",
                     "--height", "128", "--steps", "1", "--seed", "5", "--dtype", "bf16", "--weight-cache", setting,
                     "--out", str(out), "--report", str(report)])
        assert code == 0, capsys.readouterr().err
        statuses.append(json.loads(report.read_text())["stats"]["weight_cache"]["status"])
        pixels.append(Image.open(out).tobytes())
    assert statuses == ["written", "hit", "off"]
    assert pixels[0] == pixels[1] == pixels[2]
    assert len(list(cache.glob("*.safetensors"))) == 1
