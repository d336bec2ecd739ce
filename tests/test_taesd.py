"""TAESD: the real weights, exact tiling, and memory that does not grow with the image."""

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

from tests.conftest import ROOT, psnr
from lib_hrlr.errors import CheckpointError, Interrupted, InvalidInput
from lib_hrlr.image.guide import UpscaledImageSource
from lib_hrlr.models.taesd import TAESDDecoder, TAESDEncoder, load_taesd_decoder, load_taesd_encoder
from lib_hrlr.vae.tiled_taesd import SD_SCALING_FACTOR, decode_tiled, encode_tiled, receptive_halo

TILE = 32  # latent px per tile core in these tests: borders every 256 image px


@pytest.fixture(scope="module")
def taesd(shared_weights):
    d = shared_weights / "taesd"
    return (load_taesd_encoder(d / "taesd_encoder.safetensors"),
            load_taesd_decoder(d / "taesd_decoder.safetensors"))


def _photo(size=None):
    img = Image.fromarray(astronaut())
    if size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img


def _to01(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def _run(model, x):
    with torch.inference_mode():
        return model(x.contiguous(memory_format=torch.channels_last)).contiguous()


def test_real_weights_round_trip_a_photo(taesd):
    enc, dec = taesd
    x = _to01(_photo())  # 512 x 512
    z = _run(enc, x)
    assert z.shape == (1, 4, 64, 64)
    good = psnr(_run(dec, z).clamp(0, 1), x)
    torch.manual_seed(0)
    bad = psnr(_run(TAESDDecoder().eval(), z).clamp(0, 1), x)
    print(f"\nTAESD 512^2 astronaut round trip: {good:.2f} dB (random decoder: {bad:.2f} dB)")
    assert good >= 24.0
    assert bad < 12.0


def test_loader_refuses_wrong_files(shared_weights, tmp_path):
    d = shared_weights / "taesd"
    with pytest.raises(CheckpointError, match="not a TAESD decoder"):
        load_taesd_decoder(d / "taesd_encoder.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_taesd_encoder(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_taesd_encoder(junk)


def _column_dependence(model, x, core):
    """How much output columns ``core[0]:core[1]`` depend on each input column: the absolute
    input gradient of a random projection of those outputs, summed over rows and channels, in
    float64 (exact zeros come from the network's wiring, not from rounding)."""
    x = x.double().requires_grad_(True)
    y = model(x)[..., core[0]:core[1]]
    g = torch.Generator().manual_seed(1)
    (y * torch.rand(y.shape, generator=g, dtype=torch.float64)).sum().backward()
    return x.grad.abs().sum(dim=(0, 1, 2))


def _positive_copy(model):
    """The same wiring with every weight positive and no bias: with a positive input every
    activation is positive, no ReLU is inactive and no sum can cancel, so an input column
    reaches an output column exactly when the convolutions connect them."""
    net = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(p.abs() + 1e-3 if name.endswith("weight") else torch.zeros_like(p))
    return net


def _dependence_span(dep):
    nz = torch.nonzero(dep).flatten()
    return nz.min().item(), nz.max().item()


@pytest.mark.parametrize("which, shape, core, halo", [
    # decoder: the output of latent columns 40..43 (image columns 320..351) depends on latent
    # columns 21..62, only
    ("decoder", (1, 4, 2, 84), (8 * 40, 8 * 44), (19, 19)),
    # encoder: latent columns 40..43 (image columns 320..351) depend on image columns 175..489, only
    ("encoder", (1, 3, 16, 672), (40, 44), (145, 138)),
])
def test_receptive_halo_is_exactly_what_the_networks_depend_on(taesd, which, shape, core, halo):
    enc, dec = taesd
    model = dec if which == "decoder" else enc
    assert receptive_halo(model) == halo
    first, last = (core[0] // 8, core[1] // 8 - 1) if which == "decoder" else (8 * core[0], 8 * core[1] - 1)
    lo, hi = first - halo[0], last + halo[1]
    # the wiring: a positive copy depends on every column in [lo, hi] and on none outside
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64) + 0.1
    assert _dependence_span(_column_dependence(_positive_copy(model), x, core)) == (lo, hi)
    # the real weights: nothing outside [lo, hi] matters for any input, and each edge column
    # matters for some input (a single input can leave an edge path behind inactive ReLUs)
    model, edge_seen = copy.deepcopy(model).double(), [False, False]
    for seed in range(8):
        torch.manual_seed(seed)
        x = torch.randn(shape) * 0.5 if which == "decoder" else torch.rand(shape)
        dep = _column_dependence(model, x, core)
        a, b = _dependence_span(dep)
        assert lo <= a and b <= hi, f"seed {seed}: depends on columns {a}..{b}, outside {lo}..{hi}"
        edge_seen = [edge_seen[0] or dep[lo] > 0, edge_seen[1] or dep[hi] > 0]
    assert edge_seen == [True, True]


class TensorSource:
    """An image_source over a whole tensor in [-1, 1] (the reference side of the comparison)."""

    def __init__(self, chw):
        self.chw = chw
        self.channels, self.height, self.width = chw.shape

    def read(self, y0, y1, x0, x1):
        return self.chw[:, y0:y1, x0:x1].clone()


def test_small_tiles_are_exact_and_hooks_work():
    torch.manual_seed(1)
    dec = TAESDDecoder(channels=16).eval()
    enc = TAESDEncoder(channels=16).eval()
    z = torch.randn(1, 4, 23, 37)
    ref = _run(dec, z * SD_SCALING_FACTOR)[0].mul(2).sub(1)
    calls = []
    out = decode_tiled(dec, z, tile=9, output="float", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i + 1, 15) for i in range(15)]
    assert (out.to_tensor()[0] - ref).abs().max() < 1e-5
    u8 = decode_tiled(dec, z, tile=9, output="uint8").to_tensor()[0]
    ref8 = ((ref + 1) / 2 * 255).clamp(0, 255).round()
    assert u8.dtype == torch.uint8 and (u8.float() - ref8).abs().max() <= 1
    img = torch.rand(3, 8 * 23, 8 * 37) * 2 - 1
    lat = encode_tiled(enc, TensorSource(img), tile=96)
    ref_lat = _run(enc, (img[None] + 1) / 2) / SD_SCALING_FACTOR
    assert lat.shape == (1, 4, 23, 37) and (lat - ref_lat).abs().max() < 1e-4
    asked = []
    with pytest.raises(Interrupted):
        decode_tiled(dec, z, tile=9, should_stop=lambda: asked.append(1) or len(asked) > 3)
    assert len(asked) == 4
    with pytest.raises(Interrupted):
        encode_tiled(enc, TensorSource(img), tile=96, should_stop=lambda: True)


def test_bad_arguments_name_the_field():
    dec, enc = TAESDDecoder(channels=8).eval(), TAESDEncoder(channels=8).eval()
    for kwargs, field in [({"tile": 0}, "tile"), ({"output": "png"}, "output"), ({"progress": 3}, "progress")]:
        with pytest.raises(InvalidInput) as e:
            decode_tiled(dec, torch.zeros(1, 4, 8, 8), **kwargs)
        assert e.value.field == field
    with pytest.raises(InvalidInput) as e:
        decode_tiled(dec, torch.zeros(4, 8, 8))
    assert e.value.field == "latent"
    with pytest.raises(InvalidInput) as e:
        encode_tiled(enc, TensorSource(torch.zeros(3, 20, 16)))
    assert e.value.field == "image" and "multiples of 8" in e.value.message
    with pytest.raises(InvalidInput) as e:
        encode_tiled(enc, TensorSource(torch.zeros(3, 16, 16)), tile=12)
    assert e.value.field == "tile"


def _border_jumps(img, step):
    """Per axis: (mean |jump| across tile borders, mean |jump| between all other neighbours)
    of a (C, H, W) image whose tiles are ``step`` px."""
    out = []
    for axis in (1, 2):
        d = np.abs(np.diff(img.astype(np.float64), axis=axis))
        j = d.mean(axis=(0, 2) if axis == 1 else (0, 1))  # j[i]: between i and i + 1
        border = (np.arange(len(j)) + 1) % step == 0
        out.append((j[border].mean(), j[~border].mean()))
    return out


def _seam_ratio(img, ref, step):
    """Jumps across tile borders in ``img`` relative to the same jumps in ``ref`` (the
    untiled decode): 1.0 = no seam.  (Border vs interior of one image alone measures the
    photo: the untiled decode of the astronaut has a strong edge on a border column.)"""
    return max(a[0] / b[0] for a, b in zip(_border_jumps(img, step), _border_jumps(ref, step)))


@pytest.mark.slow
def test_tiled_equals_untiled_on_an_upscaled_photo(taesd):
    enc, dec = taesd
    size = 1024
    big = _photo(size)  # astronaut, Lanczos-upscaled to 1024^2
    x = _to01(big)
    z_ref = _run(enc, x) / SD_SCALING_FACTOR  # unscaled SD latent, untiled
    # encode: tiled, from the on-demand upscaler (bit-equal to the whole resize)
    z_tiled = encode_tiled(enc, UpscaledImageSource(_photo(), size, size), tile=8 * TILE)
    enc_diff = (z_tiled - z_ref).abs().max().item()
    # decode: tiled into a float canvas vs the untiled decoder
    ref = _run(dec, z_ref * SD_SCALING_FACTOR)[0].mul(2).sub(1)
    out = decode_tiled(dec, z_ref, tile=TILE, output="float")
    tiled = out.to_tensor()[0]
    out.close()
    dec_psnr = psnr(tiled, ref, peak=2.0)
    photo_psnr = psnr(((tiled + 1) / 2).clamp(0, 1), x[0])
    seam = _seam_ratio(tiled.numpy(), ref.numpy(), TILE * 8)
    inside = [round(a / b, 3) for a, b in _border_jumps(tiled.numpy(), TILE * 8)]
    inside_ref = [round(a / b, 3) for a, b in _border_jumps(ref.numpy(), TILE * 8)]
    # the check can fail: tiles decoded on their own, with no halo, leave visible seams
    naive = torch.cat([torch.cat([_run(dec, z_ref[..., y:y + TILE, x0:x0 + TILE] * SD_SCALING_FACTOR)[0]
                                  for x0 in range(0, size // 8, TILE)], dim=2)
                       for y in range(0, size // 8, TILE)], dim=1).mul(2).sub(1)
    seam_naive = _seam_ratio(naive.numpy(), ref.numpy(), TILE * 8)
    print(json.dumps({"encode_max_abs_diff_unscaled": enc_diff, "latent_abs_max": z_ref.abs().max().item(),
                      "decode_psnr_tiled_vs_untiled_db": dec_psnr, "decode_psnr_vs_photo_db": photo_psnr,
                      "seam_ratio_vs_untiled": seam, "seam_ratio_no_halo_vs_untiled": seam_naive,
                      "border_vs_interior_rows_cols_tiled": inside, "border_vs_interior_rows_cols_untiled": inside_ref}))
    assert enc_diff < 1e-3
    assert dec_psnr >= 45.0
    assert seam <= 1.05
    assert seam_naive > 1.05


CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    from lib_hrlr.runtime import tune_allocator
    tune_allocator()
    from lib_hrlr.memory.meter import hwm_mb, rss_mb
    from lib_hrlr.models.taesd import TAESDDecoder, TAESDEncoder
    from lib_hrlr.pipeline.components import TAESD_ENCODE_TILE
    from lib_hrlr.vae.tiled_taesd import decode_tiled, encode_tiled
    kind, size, tile = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    if kind == "decode":
        dec = TAESDDecoder().eval().requires_grad_(False)  # random weights: same memory and speed
        z = torch.randn(1, 4, size // 8, size // 8)
        before = rss_mb()
        t = time.perf_counter()
        out = decode_tiled(dec, z, tile=tile, output="uint8")
        assert (out.height, out.width) == (size, size)
    else:
        class Noise:  # an image source that makes its pixels on demand, like the upscaler
            height = width = size
            def read(self, y0, y1, x0, x1):
                g = torch.Generator().manual_seed(y0 * 100003 + x0)
                return torch.rand(3, y1 - y0, x1 - x0, generator=g) * 2 - 1
        enc = TAESDEncoder().eval().requires_grad_(False)
        before = rss_mb()
        t = time.perf_counter()
        z = encode_tiled(enc, Noise(), tile=TAESD_ENCODE_TILE)
        assert z.shape == (1, 4, size // 8, size // 8)
    print(json.dumps({"size": size, "vmhwm_mb": hwm_mb(), "added_mb": hwm_mb() - before,
                      "seconds": time.perf_counter() - t}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_tiled_memory_does_not_grow_with_size(tmp_path, kind):
    from lib_hrlr.config.architectures import SD15
    from lib_hrlr.memory.budget import MB, vae_stage_bytes

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    res = {}
    for size in (512, 1536):  # 9x the pixels, every tile shape; 2048^2 is decoded in the headline test's
        # whole run (tests/test_headline_memory.py), 4096^2 takes ~10 min on 2 cores (bench covers it)
        proc = subprocess.run([sys.executable, str(script), str(ROOT), kind, str(size), str(TILE)],
                              capture_output=True, text=True, check=True)
        res[size] = json.loads(proc.stdout.strip().splitlines()[-1])
    estimate = vae_stage_bytes(SD15, TILE, 4, True, kind) / MB
    print(json.dumps({"kind": kind, "budget_estimate_mb": estimate, **res}))
    small, large = res[512]["vmhwm_mb"], res[1536]["vmhwm_mb"]
    assert large <= 1.10 * small, res
    assert large < 800, res
    assert res[1536]["added_mb"] <= estimate, (res, estimate)
