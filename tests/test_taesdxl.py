"""TAESDXL (SDXL's tiny autoencoder, real weights): it decodes its own latents, the SD 1.x
pair does not (same shapes: the pipeline must pick the family), and the tiled passes equal
the untiled ones (>= 45 dB) on the astronaut photo."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

from lib_hrlr.config.architectures import SDXL
from lib_hrlr.image.guide import UpscaledImageSource
from lib_hrlr.models.taesd import load_taesd_decoder, load_taesd_encoder
from lib_hrlr.vae.tiled_taesd import decode_tiled, encode_tiled
from tests.conftest import psnr

SCALE = SDXL.vae.scaling_factor  # 0.13025


@pytest.fixture(scope="module")
def pairs(shared_weights):
    d = shared_weights / "taesd"
    return {k: (load_taesd_encoder(d / f"{k}_encoder.safetensors"), load_taesd_decoder(d / f"{k}_decoder.safetensors"))
            for k in ("taesd", "taesdxl")}


def photo(size=None):
    img = Image.fromarray(astronaut())
    return img.resize((size, size), Image.Resampling.LANCZOS) if size else img


def to01(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def run(model, x):
    with torch.inference_mode():
        return model(x.contiguous(memory_format=torch.channels_last)).contiguous()


def test_taesdxl_round_trip_and_the_wrong_family(pairs):
    enc, dec = pairs["taesdxl"]
    x = to01(photo())
    z = run(enc, x)
    own = psnr(run(dec, z).clamp(0, 1), x)
    wrong = psnr(run(pairs["taesd"][1], z).clamp(0, 1), x)
    print(f"\nTAESDXL 512² astronaut round trip: {own:.2f} dB; decoded by SD 1.x's TAESD: {wrong:.2f} dB")
    assert own >= 24.0 and wrong < own - 3.0


def test_tiled_taesdxl_equals_untiled(pairs):
    enc, dec = pairs["taesdxl"]
    size, tile = 512, 16  # tile borders every 128 px
    x = to01(photo(size))
    z_ref = run(enc, x) / SCALE  # unscaled latent, as the pipeline hands it to the tiled passes
    z_tiled = encode_tiled(enc, UpscaledImageSource(photo(), size, size), tile=8 * tile, scaling_factor=SCALE)
    enc_diff = (z_tiled - z_ref).abs().max().item()
    ref = run(dec, z_ref * SCALE)[0].mul(2).sub(1)
    out = decode_tiled(dec, z_ref, tile=tile, output="float", scaling_factor=SCALE)
    tiled = out.to_tensor()[0]
    out.close()
    dec_psnr = psnr(tiled, ref, peak=2.0)
    print(f"\nTAESDXL {size}²: tiled vs untiled decode {dec_psnr:.1f} dB, encode max abs diff {enc_diff:.2e} "
          f"(latent max {z_ref.abs().max().item():.1f})")
    assert dec_psnr >= 45.0
    assert enc_diff < 1e-3 * max(1.0, z_ref.abs().max().item())
