import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_WEIGHTS = pathlib.Path(os.environ.get("HRLR_SHARED_WEIGHTS", ROOT.parent / "shared" / "weights"))


@pytest.fixture(scope="session")
def shared_weights() -> pathlib.Path:
    if not SHARED_WEIGHTS.is_dir():
        pytest.skip(f"real weights folder not found at {SHARED_WEIGHTS} (set HRLR_SHARED_WEIGHTS)")
    return SHARED_WEIGHTS


def read_source(src):
    """The tensor a checkpoint TensorSource points at, read from its file."""
    from lib_hrlr.weights.safetensors_file import read_tensor

    fd = os.open(src.path, os.O_RDONLY)
    try:
        return read_tensor(fd, src.info)
    finally:
        os.close(fd)


def psnr(a, b, peak: float = 1.0) -> float:
    import torch

    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse == 0:
        return float("inf")
    return 10 * __import__("math").log10(peak * peak / mse)


@pytest.fixture(autouse=True)
def torch_threads(request):
    """Small tensors run fastest on one thread (OpenMP threads spinning on a shared core cost up
    to 10x); the full-size tests marked ``slow`` keep torch's default."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
