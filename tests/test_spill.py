import torch

from lib_hrlr.image.spill import SpillArray


def test_regions_round_trip_bit_exact_for_each_dtype():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        full = (torch.rand(5, 37, 41, generator=g) * 200).to(dtype)
        with SpillArray(37, 41, 5, dtype) as arr:
            for y0 in range(0, 37, 16):
                for x0 in range(0, 41, 16):
                    arr.write(y0, x0, full[:, y0:y0 + 16, x0:x0 + 16])
            assert torch.equal(arr.to_tensor()[0], full)
            assert torch.equal(arr.read(3, 30, 7, 40), full[:, 3:30, 7:40])
            assert arr.read_rows(2, 4).shape == (2, 41, 5)


def test_out_of_bounds_region_is_refused():
    with SpillArray(8, 8, 1) as arr:
        try:
            arr.read(0, 9, 0, 8)
        except IndexError as e:
            assert "outside 8x8" in str(e)
        else:
            raise AssertionError("no error")
