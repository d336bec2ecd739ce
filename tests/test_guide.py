import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

from lib_hrlr.errors import InvalidInput
from lib_hrlr.image.guide import UpscaledImageSource


def _base(w, h):
    return Image.fromarray(astronaut()).resize((w, h), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("base,size,step", [
    ((128, 96), (512, 384), (97, 131)),   # 4x, regions of odd size and position
    ((160, 128), (1000, 777), (61, 200)),  # non-integer scale, different per axis
    ((96, 150), (96, 401), (50, 33)),      # one axis kept (Pillow skips that pass)
    ((300, 200), (120, 70), (16, 9)),      # downscale
])
def test_regions_equal_the_crop_of_a_whole_pillow_resize(base, size, step):
    im = _base(*base)
    W, H = size
    whole = np.asarray(im.resize((W, H), Image.Resampling.LANCZOS)).astype(np.float32) / 127.5 - 1
    whole = whole.transpose(2, 0, 1)
    src = UpscaledImageSource(im, W, H)
    worst = 0.0
    for y0 in range(0, H, step[0]):
        for x0 in range(0, W, step[1]):
            y1, x1 = min(H, y0 + step[0]), min(W, x0 + step[1])
            r = src.read(y0, y1, x0, x1)
            assert r.dtype == torch.float32 and r.shape == (3, y1 - y0, x1 - x0)
            worst = max(worst, float(np.abs(r.numpy() - whole[:, y0:y1, x0:x1]).max()))
    # float [-1, 1]: one 8-bit level is 2/255; we are exact (up to the float conversion)
    assert worst <= 1e-6, worst


def test_reading_a_corner_of_a_huge_target_is_cheap():
    src = UpscaledImageSource(_base(256, 256), 8192, 8192)
    tracemalloc.start()
    try:
        r = src.read(4000, 4064, 100, 164)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.shape == (3, 64, 64)
    # a whole 8192^2 RGB image would be 200 MB; a region costs a few rows of the base
    assert peak < 2 * 1024 * 1024, peak


def test_non_rgb_base_is_converted_and_bad_input_refused():
    gray = _base(64, 48).convert("L")
    src = UpscaledImageSource(gray, 128, 96)
    ref = np.asarray(gray.convert("RGB").resize((128, 96), Image.Resampling.LANCZOS))
    assert np.array_equal(src.read_uint8(0, 96, 0, 128), ref)
    with pytest.raises(InvalidInput) as e:
        UpscaledImageSource(gray, 0, 96)
    assert e.value.field == "width"
    with pytest.raises(InvalidInput) as e:
        UpscaledImageSource(np.zeros((4, 4, 3)), 8, 8)
    assert e.value.field == "image"
    with pytest.raises(IndexError):
        src.read(0, 97, 0, 10)
