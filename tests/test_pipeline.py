"""End to end: the CLI turns a prompt into a PNG with the tiny architecture; bad input exits 2
with a message naming the field and leaves no file behind."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from lib_hrlr.cli import main
from lib_hrlr.image.infotext import parse_infotext
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(cached_random_checkpoint("tiny"))


def run_cli(args, tmp_path, capsys):
    out = tmp_path / "out.png"
    # in-process runs share pytest's resident memory (diffusers, transformers...), so give the
    # planner room; the budget's own behaviour is tested in test_budget.py and in subprocesses
    code = main(["generate", "--quiet", "--budget-mb", "8000", "--out", str(out)] + args)
    err = capsys.readouterr().err
    return code, out, err


def test_generate_writes_png_with_infotext_and_report(tiny, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out, err = run_cli(["--model", tiny, "--prompt", "a red lighthouse", "--negative", "blurry",
                              "--width", "256", "--height", "192", "--steps", "3", "--seed", "7",
                              "--sampler", "Euler a", "--region", "0,0,128,96,1.5:a blue sky",
                              "--report", str(report)], tmp_path, capsys)
    assert code == 0, err
    img = Image.open(out)
    assert img.size == (256, 192) and img.mode == "RGB"
    prompt, negative, fields = parse_infotext(img.info["parameters"])
    assert (prompt, negative) == ("a red lighthouse", "blurry")
    assert fields["Seed"] == "7" and fields["Size"] == "256x192" and fields["Sampler"] == "Euler a"
    assert fields["HRLR tile"] == "16" and fields["HRLR overlap"] == "4"
    assert json.loads(fields["HRLR regions"])[0]["prompt"] == "a blue sky"
    rep = json.loads(report.read_text())
    names = {m["name"] for m in rep["memory"]["modules"]}
    assert {"text_encoder", "base_unet", "guide_encode", "tiled_unet", "vae_decode"} <= names
    assert rep["memory"]["peak_rss_mb"] > 100
    # 3 steps of 2 samples for the base, t_enc steps x (tiles + region tiles) x 2 samples for the canvas
    assert rep["stats"]["base_unet_evals"] == 6
    assert rep["stats"]["tiled_unet_evals"] % 2 == 0 and rep["stats"]["tiled_unet_evals"] > 0


def test_same_seed_same_image_and_batching_does_not_change_it(tiny, tmp_path, capsys):
    common = ["--model", tiny, "--prompt", "x", "--width", "192", "--height", "192", "--steps", "2", "--seed", "3"]
    imgs = []
    for batch in ("1", "3"):
        code, out, err = run_cli(common + ["--tile-batch", batch], tmp_path, capsys)
        assert code == 0, err
        imgs.append(Image.open(out).tobytes())
        os.remove(out)
    import numpy as np

    a, b = (np.frombuffer(x, dtype=np.uint8).astype(int) for x in imgs)
    assert np.abs(a - b).max() <= 1  # rounding to 8 bits of latents equal to ~1e-5


def test_taesd_decode(tiny, tmp_path, capsys, shared_weights):
    code, out, err = run_cli(["--model", tiny, "--prompt", "x", "--width", "256", "--height", "256", "--steps", "2",
                              "--vae", "taesd", "--taesd-dir", str(shared_weights / "taesd")], tmp_path, capsys)
    assert code == 0, err
    assert Image.open(out).size == (256, 256)


@pytest.mark.parametrize(
    "args, field",
    [
        (["--width", "250", "--height", "256"], "width: must be a multiple of 8"),
        (["--width", "64", "--height", "256"], "smaller than one tile"),
        (["--width", "256", "--height", "256", "--overlap", "16"], "overlap: must be smaller than the tile"),
        (["--width", "256", "--height", "256", "--sampler", "heun9"], "sampler: unknown sampler 'heun9'"),
        (["--width", "256", "--height", "256", "--region", "200,0,128,64:sky"], "region[0]"),
        (["--width", "256", "--height", "256", "--region", "0,0,64,64:sky", "--region-feather", "40"],
         "region_feather: 40 px is more than half the shorter side of region[0]"),
        (["--width", "256", "--height", "256", "--budget-mb", "50"], "budget_mb"),
        (["--width", "256", "--height", "256", "--vae", "taesd", "--taesd-dir", "/nonexistent"], "taesd_dir"),
        (["--width", "256", "--height", "256", "--strength", "0"], "strength"),
    ],
)
def test_bad_input_exits_2_naming_the_field_and_writes_nothing(tiny, tmp_path, capsys, args, field):
    code, out, err = run_cli(["--model", tiny, "--prompt", "x", "--steps", "2"] + args, tmp_path, capsys)
    assert code == 2
    assert field in err
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_are_refused(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    from safetensors.torch import save_file
    import torch

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.x": torch.zeros(2)}, str(sdxl))
    for path, words in ((missing, "does not exist"), (garbage, "model:"), (sdxl, "SDXL")):
        out = tmp_path / "o.png"
        code = main(["generate", "--quiet", "--model", str(path), "--prompt", "x", "--width", "512",
                     "--height", "512", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and words in err, err
        assert not out.exists()


def test_no_model_offline_fails_at_once(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "lib_hrlr", "generate", "--prompt", "x", "--width", "512",
                        "--height", "512", "--out", str(tmp_path / "o.png")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "pass --model PATH" in p.stderr
    assert not (tmp_path / "o.png").exists()


def test_interrupt_leaves_no_file(tiny, tmp_path):
    from lib_hrlr.errors import Interrupted
    from lib_hrlr.pipeline.generate import generate
    from lib_hrlr.pipeline.params import GenerationParams

    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    out = tmp_path / "o.png"
    with pytest.raises(Interrupted):
        generate(GenerationParams(prompt="x", width=256, height=256, model=tiny, steps=3, budget_mb=8000,
                                  out=str(out)),  # budget: this pytest process's RSS is the baseline
                 should_stop=stop)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["tiny", "tiny_xl"])
def test_bench_tiny_prints_the_figures(tmp_path, arch):
    j = tmp_path / "b.json"
    p = subprocess.run([sys.executable, "-m", "lib_hrlr", "bench", "--arch", arch, "--width", "256", "--height",
                        "256", "--steps", "2", "--json", str(j)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("peak_rss_mb=") and " overhead_ratio=" in last
    d = json.loads(j.read_text())
    for k in ("peak_rss_mb", "wall_s", "unet_evals", "unet_eval_s", "overhead_ratio", "modules"):
        assert k in d
    assert d["unet_evals"] == 4 + d["tiles"] * 2  # 2 base steps x 2 + 1 tiled step x tiles x 2
    # the per-sample time comes from the first call of each stage: 2 base rows + one tile batch
    assert d["unet_eval_timed_samples"] == 2 + 2 * d["tile_batch"] and d["unet_eval_s"] > 0
    assert 100 < d["peak_rss_mb"] < 800
    assert all({"name", "peak_rss_mb", "seconds"} <= set(m) for m in d["modules"])
    assert d["arch"] == arch
