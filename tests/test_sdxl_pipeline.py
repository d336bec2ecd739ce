"""End to end with the tiny SDXL architecture: the CLI turns a prompt into a PNG through the
SDXL path (two text encoders, ADM vector, per-tile micro-conditioning, TAESDXL chosen by
itself), and an SDXL-specific bad input names its field."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from lib_hrlr.cli import main
from lib_hrlr.image.infotext import parse_infotext
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint


@pytest.fixture(scope="module")
def tiny_xl():
    return str(cached_random_checkpoint("tiny_xl"))


def run_cli(args, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "--quiet", "--budget-mb", "8000", "--out", str(out)] + args)
    return code, out, capsys.readouterr().err


def test_tiny_xl_generates_with_taesdxl_and_states_its_micro_conditioning(tiny_xl, tmp_path, capsys, shared_weights):
    report = tmp_path / "r.json"
    code, out, err = run_cli(["--model", tiny_xl, "--prompt", "a (red:1.2) lighthouse", "--width", "256",
                              "--height", "192", "--steps", "2", "--seed", "5", "--vae", "taesd",
                              "--taesd-dir", str(shared_weights / "taesd"), "--report", str(report)], tmp_path, capsys)
    assert code == 0, err
    img = Image.open(out)
    assert img.size == (256, 192)
    _, negative, fields = parse_infotext(img.info["parameters"])
    assert negative == "" and fields["HRLR micro-conditioning"] == "offset"
    assert fields["HRLR tile"] == "16" and fields["HRLR overlap"] == "4"  # tiny_xl's 16-latent tile, a quarter
    stats = json.loads(report.read_text())["stats"]
    assert stats["base_size"] == "144x112"  # SDXL's 1152x896 bucket (closest to 4:3) at tiny_xl's 128² native area
    assert stats["base_unet_evals"] == 4 and stats["tiled_unet_evals"] > 0


def test_taesd_dir_without_taesdxl_files_is_refused_for_sdxl(tiny_xl, tmp_path, capsys, shared_weights):
    only_sd1 = tmp_path / "taesd_sd1"
    only_sd1.mkdir()
    for name in ("taesd_encoder.safetensors", "taesd_decoder.safetensors"):
        shutil.copy(shared_weights / "taesd" / name, only_sd1 / name)
    code, out, err = run_cli(["--model", tiny_xl, "--prompt", "x", "--width", "128", "--height", "128", "--steps", "1",
                              "--vae", "taesd", "--taesd-dir", str(only_sd1)], tmp_path, capsys)
    assert code == 2 and "taesd_dir" in err and "taesdxl_decoder.safetensors" in err, err
    assert not out.exists()


def test_base_image_is_the_sdxl_bucket_closest_to_the_aspect_ratio():
    from lib_hrlr.pipeline.sdxl import sdxl_base_size

    assert sdxl_base_size(2048, 2048) == (1024, 1024)
    assert sdxl_base_size(4096, 4096) == (1024, 1024)
    assert sdxl_base_size(2560, 1440) == (1344, 768)  # 16:9 -> 1.75
    assert sdxl_base_size(1024, 2048) == (768, 1344)  # 1:2 -> 0.571 (closer than 640x1536's 0.417)
    assert sdxl_base_size(3072, 2048) == (1216, 832)  # 3:2 -> 1.46


def test_micro_conditioning_policy_is_chosen_on_the_command_line(tiny_xl, tmp_path, capsys):
    code, out, err = run_cli(["--model", tiny_xl, "--prompt", "x", "--width", "128", "--height", "128", "--steps", "1",
                              "--micro-conditioning", "zero"], tmp_path, capsys)
    assert code == 0, err
    assert parse_infotext(Image.open(out).info["parameters"])[2]["HRLR micro-conditioning"] == "zero"
    code, out, err = run_cli(["--model", tiny_xl, "--prompt", "x", "--width", "128", "--height", "128", "--steps", "1",
                              "--micro-conditioning", "centre"], tmp_path, capsys)
    assert code == 2 and "micro_conditioning" in err and "offset, zero, canvas" in err


def test_sdxl_full_vae_never_runs_in_float16():
    import torch

    from lib_hrlr.config.architectures import SD15, SDXL
    from lib_hrlr.pipeline.sdxl import vae_dtype

    assert vae_dtype(SDXL, "full", torch.float16) == torch.float32
    assert vae_dtype(SDXL, "full", torch.bfloat16) == torch.bfloat16
    assert vae_dtype(SDXL, "taesd", torch.float16) == torch.float16
    assert vae_dtype(SD15, "full", torch.float16) == torch.float16
