"""The standalone tool: the ``hrlr`` command, the Python API, upscaling the user's own image,
a separate VAE file, TAESD lookup, webui-style output names and batches (tiny models)."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_hrlr.cli import main
from lib_hrlr.config.architectures import ARCHITECTURES, VAE_PREFIX
from lib_hrlr.image.infotext import parse_infotext
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint, write_random_checkpoint
from tests.conftest import ROOT

TINY = ARCHITECTURES["tiny"]
FAST = ["--quiet", "--budget-mb", "8000", "--steps", "2", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def tiny():
    return str(cached_random_checkpoint("tiny"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photo (skimage's astronaut), cropped small: 96x80."""
    skd = pytest.importorskip("skimage.data")
    p = tmp_path_factory.mktemp("img") / "astro.png"
    Image.fromarray(skd.astronaut()[100:180, 200:296]).save(p)
    return p


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def files_under(p: Path) -> list[Path]:
    return sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else []


# --------------------------------------------------------------------------- the command


def hrlr_script() -> str:
    from importlib import metadata

    try:
        eps = [e for e in metadata.entry_points(group="console_scripts") if e.name == "hrlr"]
    except Exception:  # pragma: no cover
        eps = []
    if not eps:
        pytest.skip("the hrlr package is not installed (pip install -e . / -r requirements-dev.txt)")
    script = Path(sys.executable).with_name("hrlr")
    assert script.is_file(), f"console script missing next to {sys.executable}"
    return str(script)


def test_console_script_runs_in_a_subprocess(tmp_path):
    import lib_hrlr

    exe = hrlr_script()
    v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert v.returncode == 0 and v.stdout.strip() == f"hrlr {lib_hrlr.__version__}"
    for cmd in ("generate", "upscale", "bench"):
        h = subprocess.run([exe, cmd, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert h.returncode == 0 and f"usage: hrlr {cmd}" in h.stdout
    up = subprocess.run([exe, "upscale", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--scale" in up and "0.3" in up  # the upscaler's lower default strength is stated
    bad = subprocess.run([exe, "upscale", str(tmp_path / "none.png"), "--model", "x.safetensors"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "init_image:" in bad.stderr
    assert list(tmp_path.iterdir()) == []


def test_api_imports_without_loading_torch():
    code = ("import sys, lib_hrlr; assert 'torch' not in sys.modules; "
            "from lib_hrlr import generate, upscale, GenerationParams; print(GenerationParams.__name__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "GenerationParams", p.stderr


# ----------------------------------------------------------------------------- --vae FILE


def _vae_state(ckpt_path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(ckpt_path)
    return {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}


@pytest.fixture(scope="module")
def vae_files(tiny, tmp_path_factory):
    """The tiny checkpoint's own VAE weights as separate files in every accepted format, and a
    second model (other seed) whose own VAE differs."""
    from safetensors.torch import save_file

    from lib_hrlr.weights.random_checkpoint import write_random_diffusers_folder

    d = tmp_path_factory.mktemp("vae")
    state = _vae_state(tiny)
    ldm = d / "vae-ldm.safetensors"
    # training leftovers that real VAE files carry are ignored
    save_file({**state, "loss.logvar": torch.zeros(())}, str(ldm))
    ckpt = d / "vae-ldm.ckpt"
    torch.save({"state_dict": {**state, "model_ema.decay": torch.tensor(0.999)}}, str(ckpt))
    folder = write_random_diffusers_folder(d / "diffusers", TINY, dtype=torch.float16, seed=0)
    other = write_random_checkpoint(d / "other.safetensors", TINY, seed=1)
    return {"whole-checkpoint": Path(tiny), "ldm-safetensors": ldm, "ldm-ckpt": ckpt, "diffusers-file": folder / "vae" / "diffusion_pytorch_model.safetensors",
            "diffusers-folder": folder / "vae", "other": other}


@pytest.mark.parametrize("fmt", ["ldm-safetensors", "ldm-ckpt", "diffusers-file", "diffusers-folder", "whole-checkpoint"])
def test_vae_file_decodes_bit_identically_to_the_same_weights_in_a_checkpoint(tiny, vae_files, fmt):
    from lib_hrlr.pipeline import components
    from lib_hrlr.weights.checkpoint import open_checkpoint
    from lib_hrlr.weights.vae_file import open_vae_file, with_vae_file

    own = open_checkpoint(tiny)  # holds the weights written to the VAE files
    other = open_checkpoint(vae_files["other"])
    vae = open_vae_file(vae_files[fmt], other.config.vae)
    swapped = with_vae_file(other, vae)
    latent = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(0))
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), tile=8, output="float", spill_dir=None)

    def decode(ck):
        arr = components.decode_latent(ck, "full", None, latent, **kw)
        try:
            return arr.to_tensor()
        finally:
            arr.close()

    ref, got, theirs = decode(own), decode(swapped), decode(other)
    assert torch.equal(got, ref)  # bit for bit
    assert (theirs - ref).abs().max() > 0.01  # the other model's own VAE really is different
    # encode too: the swapped VAE encodes like the checkpoint that holds those weights
    from lib_hrlr.vae.tiled_vae import TensorImageSource

    img = TensorImageSource(torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    enc = dict(dtype=torch.float32, device=torch.device("cpu"), px_tile=64, spill_dir=None)
    assert torch.equal(components.encode_image(swapped, "full", None, img, **enc),
                       components.encode_image(own, "full", None, img, **enc))


def test_vae_file_in_the_cli_names_it_in_the_infotext(vae_files, tmp_path, capsys):
    out = tmp_path / "o.png"
    f = vae_files["ldm-safetensors"]
    code = main(["generate", "--model", str(vae_files["other"]), "--prompt", "x", "--width", "128", "--height", "128",
                 "--vae", str(f), "--out", str(out)] + FAST)
    assert code == 0, capsys.readouterr().err
    _, _, fields = parse_infotext(Image.open(out).info["parameters"])
    assert fields["VAE"] == f.name
    assert fields["VAE hash"] == hashlib.sha256(f.read_bytes()).hexdigest()[:10]


@pytest.mark.parametrize("bad, words", [("missing.safetensors", "does not exist"), ("incomplete", "lacks"),
                                        ("garbage", "cannot be read"), ("unet", "whole model checkpoint")])
def test_bad_vae_file_exits_2(tiny, tmp_path, capsys, bad, words):
    from safetensors.torch import save_file

    path = {"missing.safetensors": tmp_path / "missing.safetensors", "incomplete": tmp_path / "half.safetensors",
            "garbage": tmp_path / "garbage.safetensors", "unet": tmp_path / "unet.safetensors"}[bad]
    if bad == "garbage":
        path.write_bytes(os.urandom(1000))
    if bad == "incomplete":
        save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    if bad == "unet":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    out = tmp_path / "o.png"
    code = main(["generate", "--model", tiny, "--prompt", "x", "--width", "128", "--height", "128", "--vae", str(path),
                 "--out", str(out)] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "vae_file:" in err and words in err, err
    assert not out.exists()


def test_decoder_option_and_the_old_vae_spelling():
    from lib_hrlr.cli import decoder_and_vae_file
    from lib_hrlr.errors import InvalidInput

    assert decoder_and_vae_file(None, None) == ("full", None)
    assert decoder_and_vae_file("taesd", None) == ("taesd", None)
    assert decoder_and_vae_file(None, "taesd") == ("taesd", None)  # --vae taesd: the old spelling
    assert decoder_and_vae_file(None, "full") == ("full", None)
    assert decoder_and_vae_file("taesd", "my-vae.safetensors") == ("taesd", "my-vae.safetensors")
    with pytest.raises(InvalidInput, match="decoder"):
        decoder_and_vae_file("full", "taesd")


# ------------------------------------------------------------------------------- upscale


def test_upscale_strength_0_is_the_vae_round_trip_of_the_resized_image(tiny, photo, tmp_path):
    """Against diffusers' AutoencoderKL holding the same weights, untiled, on Pillow's resize."""
    import diffusers

    from lib_hrlr import upscale
    from lib_hrlr.weights.random_checkpoint import write_random_diffusers_folder

    r = upscale(photo, scale=2, strength=0, model=tiny, dtype="fp32", budget_mb=8000, out=str(tmp_path / "u.png"))
    got = np.asarray(Image.open(r.path))
    assert got.shape == (160, 192, 3)
    assert r.stats["unet_evals"] == 0

    folder = write_random_diffusers_folder(tmp_path / "ref", TINY, dtype=torch.float16, seed=0)
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    resized = np.asarray(Image.open(photo).convert("RGB").resize((192, 160), Image.LANCZOS))
    x = torch.from_numpy(resized.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    ref = y[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    p = psnr_u8(got, ref)
    print(f"PSNR of upscale(strength=0) vs diffusers' round trip: {p:.1f} dB; "
          f"max abs diff {np.abs(got.astype(int) - ref).max()}")
    assert p > 45.0
    # and it is not simply the input: a random VAE changes the picture
    assert psnr_u8(got, resized) < 30.0
    _, _, fields = parse_infotext(Image.open(r.path).info["parameters"])
    assert fields["HRLR source size"] == "96x80"
    assert fields["HRLR source hash"] == hashlib.sha256(photo.read_bytes()).hexdigest()[:10]


def test_upscale_cli_writes_under_outputs_upscale_images(tiny, photo, tmp_path, capsys):
    code = main(["upscale", str(photo), "--scale", "2", "--model", tiny, "--prompt", "an astronaut", "--seed", "12",
                 "--outdir", str(tmp_path / "outputs")] + FAST)
    assert code == 0, capsys.readouterr().err
    files = files_under(tmp_path / "outputs")
    assert len(files) == 1
    f = files[0]
    assert f.parent.parent.name == "upscale-images" and f.name == "00000-12.png"
    img = Image.open(f)
    assert img.size == (192, 160)
    prompt, _, fields = parse_infotext(img.info["parameters"])
    assert prompt == "an astronaut" and fields["HRLR guide strength"] == "0.3"


def test_target_size_rules():
    from lib_hrlr.errors import InvalidInput
    from lib_hrlr.image.init_image import target_size

    assert target_size(512, 512, scale=2) == (1024, 1024)
    assert target_size(333, 300, scale=2) == (672, 600)  # rounded up to multiples of 8
    assert target_size(500, 250, width=1000) == (1000, 504)
    assert target_size(500, 250, height=500) == (1000, 500)
    with pytest.raises(InvalidInput, match="scale"):
        target_size(10, 10, scale=2, width=20)
    with pytest.raises(InvalidInput, match="width"):
        target_size(512, 512, width=256, height=1024)


def test_init_image_resize_equals_pillows_lanczos(photo):
    from lib_hrlr.image.init_image import load_init_image

    with load_init_image(str(photo), 200, 152) as ii:
        got = ii.read_rows(0, 152)
        region = ii.read(10, 20, 30, 50)
    ref = np.asarray(Image.open(photo).convert("RGB").resize((200, 152), Image.LANCZOS))
    assert np.array_equal(got, ref)
    assert torch.allclose(region, torch.from_numpy(ref[10:20, 30:50].astype(np.float32) / 127.5 - 1).permute(2, 0, 1))


def _bad_images(tmp: Path, photo: Path) -> dict:
    arr = np.asarray(Image.open(photo))
    garbage = tmp / "garbage.png"
    garbage.write_bytes(os.urandom(3000))
    full = tmp / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(full)
    truncated = tmp / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    animated = tmp / "animated.webp"
    frames = [Image.fromarray(arr), Image.fromarray(arr[::-1].copy())]
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=100, loop=0)
    bmp = tmp / "photo.bmp"
    Image.fromarray(arr).save(bmp)
    return {"unreadable": garbage, "truncated": truncated, "animated": animated, "bmp": bmp}


@pytest.mark.parametrize("case, extra, words", [
    ("unreadable", [], "init_image: "),
    ("truncated", [], "truncated"),
    ("animated", [], "animated (2 frames)"),
    ("bmp", [], "allowed are PNG, JPEG and WebP"),
    ("smaller", ["--width", "64", "--height", "160"], "width: the target 64x160 is smaller than the source"),
    ("missing", [], "does not exist"),
    ("strength", ["--strength", "1.5"], "strength:"),
])
def test_bad_upscale_input_exits_2_naming_the_field_and_leaves_no_file(tiny, photo, tmp_path, capsys, case, extra, words):
    imgs = _bad_images(tmp_path / "in", photo) if (tmp_path / "in").mkdir() is None else None
    src = {"smaller": photo, "strength": photo, "missing": tmp_path / "in" / "nope.png"}.get(case) or imgs[case]
    before = set(files_under(tmp_path))
    outdir = tmp_path / "outputs"
    code = main(["upscale", str(src), "--model", tiny, "--outdir", str(outdir)] + extra + FAST)
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert set(files_under(tmp_path)) == before and not outdir.exists()
    # generate --init-image refuses the same way
    if case in ("unreadable", "truncated", "animated"):
        code = main(["generate", "--init-image", str(src), "--model", tiny, "--prompt", "x", "--width", "192",
                     "--height", "160", "--outdir", str(outdir)] + FAST)
        assert code == 2 and words in capsys.readouterr().err
        assert set(files_under(tmp_path)) == before and not outdir.exists()


def test_alpha_is_flattened_onto_white_with_a_warning(tiny, photo, tmp_path, capsys):
    rgba = np.zeros((80, 96, 4), dtype=np.uint8)
    rgba[..., :3] = np.asarray(Image.open(photo))
    rgba[..., 3] = 255
    rgba[:40, :, 3] = 0  # top half transparent
    src = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(src)
    from lib_hrlr.image.init_image import load_init_image

    with pytest.warns(UserWarning, match="flattened onto white"):
        ii = load_init_image(str(src), 96, 80)
    with ii:
        px = ii.read_rows(0, 80)
    assert (px[:40] == 255).all() and np.array_equal(px[40:], rgba[40:, :, :3])
    code = main(["upscale", str(src), "--model", tiny, "--strength", "0", "--out", str(tmp_path / "o.png")] + FAST)
    assert code == 0
    assert "alpha channel" in capsys.readouterr().err


# -------------------------------------------------------------------- outputs and batches


def test_batch_count_consecutive_seeds_webui_names_model_opened_once(tiny, tmp_path, capsys, monkeypatch):
    from lib_hrlr.pipeline import components

    opened = []
    real_open = components.open_model
    monkeypatch.setattr(components, "open_model", lambda p: opened.append(p) or real_open(p))
    outdir = tmp_path / "outputs"
    args = ["generate", "--model", tiny, "--prompt", "x", "--width", "128", "--height", "128", "--outdir",
            str(outdir)] + FAST
    assert main(args + ["--seed", "41", "--batch-count", "3"]) == 0
    assert len(opened) == 1  # one checkpoint open for three images
    assert main(args + ["--seed", "41"]) == 0  # same seed again: a new number, nothing overwritten
    files = files_under(outdir)
    import datetime

    assert {f.parent.name for f in files} == {datetime.date.today().isoformat()}
    assert files[0].parent.parent == outdir / "txt2img-images"
    assert [f.name for f in files] == ["00000-41.png", "00001-42.png", "00002-43.png", "00003-41.png"]
    seeds = [parse_infotext(Image.open(f).info["parameters"])[2]["Seed"] for f in files]
    assert seeds == ["41", "42", "43", "41"]
    # consecutive seeds give what separate runs with those seeds give
    assert np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(files[3])))
    out = capsys.readouterr().out
    assert out.count("wrote ") == 4


def test_batch_with_explicit_out_names_each_by_seed(tiny, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", tiny, "--prompt", "x", "--width", "128", "--height", "128", "--seed", "7",
                 "--batch-count", "2", "--out", str(out)] + FAST) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-7.png", "img-8.png"]


def test_next_output_number_follows_the_largest(tmp_path):
    import datetime

    from lib_hrlr.image.outputs import next_output_path

    day = datetime.date(2026, 1, 2)
    folder = tmp_path / "txt2img-images" / "2026-01-02"
    assert next_output_path(tmp_path, "txt2img", 5, day) == folder / "00000-5.png"
    folder.mkdir(parents=True)
    (folder / "00007-1.png").write_bytes(b"")
    (folder / "notes.txt").write_bytes(b"")
    assert next_output_path(tmp_path, "txt2img", 5, day) == folder / "00008-5.png"


def test_batch_eta_adds_the_images_still_to_come():
    from lib_hrlr.api import BatchProgress
    from lib_hrlr.pipeline.progress import ProgressEvent

    t = {"now": 0.0}
    seen = []
    bp = BatchProgress(seen.append, count=3, clock=lambda: t["now"])
    ev = lambda overall, eta: ProgressEvent("tiled", 1, 2, "", 0.0, None, overall, eta)  # noqa: E731
    t["now"] = 10.0
    bp(ev(0.5, 10.0))  # first image: 10 s done, 10 s left -> 20 s per image, two more to come
    assert seen[-1].overall_eta_s == pytest.approx(10.0 + 2 * 20.0)
    assert seen[-1].overall == pytest.approx(0.5 / 3) and "image 1/3" in seen[-1].detail
    t["now"] = 30.0
    bp.next_image()  # it took 30 s
    t["now"] = 35.0
    bp(ev(0.25, 15.0))
    assert seen[-1].overall_eta_s == pytest.approx(15.0 + 30.0)
    assert seen[-1].overall == pytest.approx(1.25 / 3) and "image 2/3" in seen[-1].detail
    bp(ev(None, None))
    assert seen[-1].overall is None and seen[-1].overall_eta_s is None
    one = []
    BatchProgress(one.append, count=1)(ev(0.5, 3.0))
    assert one[-1] == ev(0.5, 3.0)  # a single image passes through


# --------------------------------------------------------------------- TAESD and defaults


def test_taesd_found_in_the_user_cache(shared_weights, tmp_path, monkeypatch):
    from lib_hrlr.weights.taesd_files import find_taesd

    monkeypatch.delenv("HRLR_TAESD_DIR", raising=False)
    monkeypatch.delenv("HRLR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "hrlr" / "taesd"
    cache.mkdir(parents=True)
    for f in ("taesd_encoder.safetensors", "taesd_decoder.safetensors"):
        os.symlink(shared_weights / "taesd" / f, cache / f)
    assert find_taesd(None) == cache


def test_taesd_offline_fails_at_once_naming_the_folder_and_files(tmp_path, monkeypatch):
    from lib_hrlr.errors import InvalidInput
    from lib_hrlr.weights.taesd_files import find_taesd

    monkeypatch.delenv("HRLR_TAESD_DIR", raising=False)
    monkeypatch.setenv("HRLR_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidInput) as e:
        find_taesd(None)
    msg = str(e.value)
    assert msg.startswith("taesd_dir:") and str(tmp_path / "c" / "taesd") in msg
    assert "taesd_encoder.safetensors" in msg and "taesd_decoder.safetensors" in msg
    assert "huggingface.co/madebyollin/taesd" in msg
    assert not (tmp_path / "c").exists()  # nothing created offline


def test_no_model_offline_says_which_files_to_get_and_where(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "lib_hrlr", "generate", "--prompt", "x", "--width", "512",
                        "--height", "512", "--out", str(tmp_path / "o.png")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "model:" in p.stderr and "pass --model PATH" in p.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_upscale_mode_gives_the_bench_keys(tmp_path, photo):
    j = tmp_path / "b.json"
    p = subprocess.run([sys.executable, "-m", "lib_hrlr", "bench", "--mode", "upscale", "--arch", "tiny", "--image",
                        str(photo), "--width", "192", "--height", "160", "--steps", "4", "--json", str(j)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    d = json.loads(j.read_text())
    for k in ("peak_rss_mb", "wall_s", "unet_evals", "unet_eval_s", "overhead_ratio", "modules", "tiles", "tile_batch"):
        assert k in d
    assert d["mode"] == "upscale" and d["source_size"] == "96x80"
    assert d["unet_evals"] > 0 and "base_unet" not in {m["name"] for m in d["modules"]}
    assert 100 < d["peak_rss_mb"] < 800


def test_the_readme_python_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python API"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    first, second = p.stdout.strip().splitlines()
    assert first.startswith("lighthouse.png 1 ")
    assert second.startswith("(512, 512)") and "HRLR source size: 256x256" in second
    assert sorted(f.name for f in tmp_path.iterdir()) == ["lighthouse-2x.png", "lighthouse.png"]


def test_exif_orientation_is_applied_like_viewers_do(tmp_path):
    from PIL import ImageOps

    from lib_hrlr.image.init_image import load_init_image, probe

    rng = np.random.default_rng(3)
    stored = Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8))  # 64 wide, 40 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait photo from a phone
    src = tmp_path / "phone.jpg"
    stored.save(src, quality=95, exif=exif)
    pr = probe(str(src))
    assert (pr.width, pr.height, pr.orientation) == (40, 64, 6)
    shown = ImageOps.exif_transpose(Image.open(src)).convert("RGB")
    with load_init_image(str(src), 80, 128) as ii:
        got = ii.read_rows(0, 128)
    assert np.array_equal(got, np.asarray(shown.resize((80, 128), Image.LANCZOS)))


def test_a_failure_inside_the_run_leaves_no_output_folder(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HRLR_TAESD_DIR", raising=False)
    monkeypatch.setenv("HRLR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outdir = tmp_path / "outputs"
    code = main(["generate", "--model", tiny, "--prompt", "x", "--width", "128", "--height", "128", "--decoder", "taesd",
                 "--outdir", str(outdir)] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and "taesd_dir:" in err and "taesd_decoder.safetensors" in err
    assert not outdir.exists() and not (tmp_path / "cache").exists()
    (tmp_path / "outputs").mkdir()  # a folder the user made stays
    assert main(["generate", "--model", tiny, "--prompt", "x", "--width", "128", "--height", "128", "--decoder",
                 "taesd", "--outdir", str(outdir)] + FAST) == 2
    assert outdir.is_dir() and list(outdir.iterdir()) == []


def test_requirements_txt_is_the_one_dependency_list_pyproject_reads():
    import tomllib

    from packaging.requirements import Requirement

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = py["tool"]["setuptools"]
    assert st["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert set(py["project"]["dynamic"]) == {"version", "dependencies"}
    assert st["dynamic"]["version"] == {"attr": "lib_hrlr.__version__"}
    # setuptools reads plain requirement lines only: no -r/-e/--index options may creep in
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    assert any(r.name == "torch" and str(r.specifier) == "==2.13.0" for r in reqs)
    # the wheel: the engine and its data, nothing of the webui's checkout
    assert st["packages"]["find"]["include"] == ["lib_hrlr", "lib_hrlr.*"]
    assert st["package-data"]["lib_hrlr.text"] == ["assets/*"]
    assert (ROOT / "lib_hrlr" / "text" / "assets" / "clip_merges.txt.gz").is_file()
    assert py["project"]["scripts"] == {"hrlr": "lib_hrlr.cli:entry"}
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev and "-e ." in dev  # the README's test command installs `hrlr`
