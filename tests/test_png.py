import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lib_hrlr.errors import InvalidInput
from lib_hrlr.image.infotext import format_infotext
from lib_hrlr.image.png import filter_band, write_png
from lib_hrlr.image.spill import SpillArray

INFOTEXT = format_infotext(
    'a "lighthouse" on a cliff,\nstormy sea: dramatic',
    "blurry, low quality",
    {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "96x77",
     "HRLR regions": '[{"prompt": "sky, clouds", "box": [0, 0, 1, 0.5]}]'},
)


def _image(h, w, seed=0):
    """Smooth gradients plus noise and flat patches: every PNG filter gets picked somewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], axis=-1)
    img = img.astype(np.int32) + rng.integers(-20, 21, size=(h, w, 3))
    img[h // 3: h // 2, w // 4: w // 2] = 128
    return np.clip(img, 0, 255).astype(np.uint8)


def _spill(img):
    arr = SpillArray(img.shape[0], img.shape[1], 3, torch.uint8)
    arr.write(0, 0, torch.from_numpy(img).permute(2, 0, 1))
    return arr


def _chunk_types(path):
    data = open(path, "rb").read()
    pos, kinds = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kinds.append(data[pos + 4:pos + 8].decode())
        pos += 12 + n
    return kinds


@pytest.mark.parametrize("band_rows", [None, 1, 7])
def test_round_trip_through_pillow_is_bit_exact(tmp_path, band_rows):
    img = _image(77, 96)
    p = tmp_path / "out.png"
    with _spill(img) as arr:
        write_png(p, arr, {"parameters": INFOTEXT}, band_rows=band_rows)
    with Image.open(p) as im:
        im.verify()  # CRCs and structure
    with Image.open(p) as im:
        assert im.mode == "RGB" and im.size == (96, 77)
        assert np.array_equal(np.asarray(im), img)
        assert im.info["parameters"] == INFOTEXT
    kinds = _chunk_types(p)
    assert kinds[0] == "IHDR" and kinds[-1] == "IEND" and "tEXt" in kinds and "iTXt" not in kinds
    assert kinds.index("tEXt") < kinds.index("IDAT")


def test_large_image_streams_in_many_idat_chunks(tmp_path):
    img = _image(600, 1000, seed=3)
    p = tmp_path / "big.png"
    with _spill(img) as arr:
        write_png(p, arr, {})
    with Image.open(p) as im:
        assert np.array_equal(np.asarray(im), img)
    assert _chunk_types(p).count("IDAT") > 1
    # the filters earn their keep: well below the raw size of this noisy image
    assert os.path.getsize(p) < 0.8 * img.nbytes


def test_every_filter_type_decodes(tmp_path):
    """The per-row heuristic picks several filter types, and each one round-trips."""
    img = _image(64, 50, seed=1)
    flat = img.reshape(64, 150)
    raw = filter_band(flat, None)
    types = {raw[i * 151] for i in range(64)}
    assert len(types) >= 3, types
    p = tmp_path / "f.png"
    with _spill(img) as arr:
        write_png(p, arr, None, band_rows=5)
    with Image.open(p) as im:
        assert np.array_equal(np.asarray(im), img)


@pytest.mark.parametrize("text,chunk", [
    ("café, crème brûlée: 7", "tEXt"),  # Latin-1, not ASCII
    ("猫の絵, «quoted» \"x\"\nNegative prompt: 🎨 emoji\nSteps: 20", "iTXt"),
])
def test_non_ascii_parameters_read_back(tmp_path, text, chunk):
    img = _image(9, 11)
    p = tmp_path / "t.png"
    with _spill(img) as arr:
        write_png(p, arr, {"parameters": text})
    with Image.open(p) as im:
        assert im.info["parameters"] == text
        assert np.array_equal(np.asarray(im), img)
    assert chunk in _chunk_types(p)


class FailingRows:
    """Real rows from a SpillArray until ``fail_at``, then the given exception."""

    def __init__(self, arr, fail_at, exc):
        self.arr, self.fail_at, self.exc = arr, fail_at, exc
        self.height, self.width, self.channels = arr.height, arr.width, arr.channels
        self.calls = 0

    def read_rows(self, y0, y1):
        self.calls += 1
        if y0 >= self.fail_at:
            raise self.exc
        return self.arr.read_rows(y0, y1)


@pytest.mark.parametrize("exc", [RuntimeError("disk gone"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, exc):
    img = _image(40, 30)
    with _spill(img) as arr:
        rows = FailingRows(arr, fail_at=20, exc=exc)
        with pytest.raises(type(exc)):
            write_png(tmp_path / "x.png", rows, {"parameters": "p"}, band_rows=4)
    assert rows.calls == 6  # five bands went out before the failure
    assert os.listdir(tmp_path) == []


def test_failure_keeps_the_previous_file(tmp_path):
    p = tmp_path / "keep.png"
    old = _image(8, 8, seed=5)
    with _spill(old) as arr:
        write_png(p, arr, {"parameters": "old"})
    before = p.read_bytes()
    with _spill(_image(40, 30)) as arr, pytest.raises(RuntimeError):
        write_png(p, FailingRows(arr, 8, RuntimeError("boom")), {"parameters": "new"}, band_rows=4)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.png"]


def test_bad_inputs_name_the_field(tmp_path):
    with SpillArray(4, 4, 4, torch.uint8) as arr, pytest.raises(InvalidInput) as e:
        write_png(tmp_path / "a.png", arr, {})
    assert e.value.field == "rows" and "3 channels" in e.value.message
    with SpillArray(4, 4, 3, torch.float32) as arr, pytest.raises(InvalidInput) as e:
        write_png(tmp_path / "a.png", arr, {})
    assert e.value.field == "rows" and "uint8" in e.value.message
    with _spill(_image(4, 4)) as arr:
        with pytest.raises(InvalidInput) as e:
            write_png(tmp_path / "a.png", arr, {" bad key": "x"})
        assert e.value.field == "text"
        with pytest.raises(InvalidInput) as e:
            write_png(tmp_path / "no" / "such" / "a.png", arr, {})
        assert e.value.field == "path"
    assert os.listdir(tmp_path) == []


def test_chunks_are_well_formed(tmp_path):
    """Independent check of the byte layout: CRCs, IHDR fields, one zlib stream over IDATs."""
    img = _image(33, 21)
    p = tmp_path / "c.png"
    with _spill(img) as arr:
        write_png(p, arr, {"parameters": "x"}, band_rows=3)
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body)
        if kind == b"IHDR":
            assert struct.unpack(">IIBBBBB", body) == (21, 33, 8, 2, 0, 0, 0)
        if kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    assert len(raw) == 33 * (1 + 21 * 3)
