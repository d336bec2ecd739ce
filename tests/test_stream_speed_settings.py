"""The settings that keep a streamed UNet as fast as a resident one: byte-sized convolution groups
(only large weights are split, and bf16 splits fewer of them than fp32), and a prefetch thread
that converts without starting a second OpenMP team."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from lib_hrlr.models.unet import STREAM_CONV_BYTES, GroupedConv2d
from tests.conftest import ROOT


def _groups(conv: GroupedConv2d, x: torch.Tensor, monkeypatch) -> list[int]:
    seen: list[int] = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda inp, w, *a: seen.append(w.shape[0]) or real(inp, w, *a))
    with torch.no_grad():
        conv(x)
    monkeypatch.undo()
    return seen


def test_byte_limit_splits_by_the_weight_bytes_of_its_dtype(monkeypatch):
    torch.manual_seed(0)
    conv = GroupedConv2d(64, 90, 3, padding=1).eval()  # 51840 weights: 207 kB fp32, 104 kB bf16
    x = torch.randn(1, 64, 6, 7)
    with torch.no_grad():
        whole = conv(x)
    conv.byte_limit = 64 * 9 * 4 * 30  # 30 output channels in fp32, 60 in bf16
    fp32 = _groups(conv, x, monkeypatch)
    with torch.no_grad():
        grouped = conv(x)
    assert fp32 == [30, 30, 30]
    assert torch.allclose(grouped, whole, atol=1e-5, rtol=0)
    conv.to(torch.bfloat16)
    assert _groups(conv, x.bfloat16(), monkeypatch) == [45, 45]
    conv.weight_limit = 64 * 9 * 35  # 35 channels: the element cap is the smaller one here, it wins
    assert _groups(conv, x.bfloat16(), monkeypatch) == [30, 30, 30]


def test_stream_chunking_splits_only_sd15s_largest_convolutions_in_bf16():
    """bf16: the six >16 M-weight decoder convolutions (2560->1280 five times, 1920->1280 once); fp32: every 3x3 convolution above 8 M weights, as before the limit was in bytes."""
    from lib_hrlr.config.architectures import SD15
    from lib_hrlr.models.unet import UNet

    with torch.device("meta"):
        unet = UNet(SD15.unet)
    convs = [m for m in unet.modules() if isinstance(m, GroupedConv2d)]

    def split(itemsize: int) -> list[int]:
        return sorted(m.weight.numel() for m in convs if m.weight.numel() * itemsize > STREAM_CONV_BYTES)

    assert split(2) == [1920 * 1280 * 9] + [2560 * 1280 * 9] * 5
    assert len(split(4)) > 20 and min(split(4)) > 8 * 2**20


PROBE = r"""
import json, os, sys, tempfile, threading, torch
from safetensors.torch import save_file
from torch import nn
from lib_hrlr.weights.safetensors_file import TensorSource, read_header
from lib_hrlr.weights.streaming import WeightStreamer
torch.set_num_threads(2)
serial = sys.argv[1] == "serial"
net = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])  # 262144 weights per layer (> the grain size)
path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
save_file({k: v.half() for k, v in net.state_dict().items()}, path)
src = {n: TensorSource(path, i) for n, i in read_header(path).tensors.items()}
x = torch.randn(64, 512)
x @ x.T  # the main thread's OpenMP team exists from here on
def tasks(): return len(os.listdir("/proc/self/task"))
with torch.device("meta"):
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
before = tasks()
with torch.inference_mode(), WeightStreamer(model, src, dtype=torch.float32, serial_prefetch=serial) as ws:
    for _ in range(3):
        model(x)
    during = tasks()
    hits = ws.stats.prefetch_hits
print(json.dumps({"new_threads": during - before, "prefetch_hits": hits}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serial_prefetch_converts_without_a_second_openmp_team():
    serial, pool = _probe("serial"), _probe("pool")
    assert serial["prefetch_hits"] > 0 and pool["prefetch_hits"] > 0
    # the prefetch thread itself, and nothing more; converting on the intra-op pool from that
    # thread starts its own OpenMP team (one more thread at 2 threads), which competes with the
    # main thread's team for the cores
    assert serial["new_threads"] == 1, serial
    assert pool["new_threads"] > serial["new_threads"], pool


def test_a_streamed_chunked_unet_reads_each_weight_once_per_call():
    """The feed-forward chunks over tokens inside its own module, which the pipeline streams as
    one unit: its weights are read once per UNet call, not once per chunk."""
    from lib_hrlr.config.architectures import TINY
    from lib_hrlr.models.unet import FeedForward, UNet
    from lib_hrlr.weights.checkpoint import open_checkpoint
    from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint
    from lib_hrlr.weights.streaming import WeightStreamer

    ck = open_checkpoint(cached_random_checkpoint("tiny"))
    with torch.device("meta"):
        unet = UNet(TINY.unet)
    unet.set_chunking(ff_tokens=40, attn_queries=None)  # 16x16 latent: 256 tokens, 7 chunks at level 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    c = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    file_bytes = sum(src.info.nbytes for src in ck.component("unet").values())
    with torch.inference_mode(), WeightStreamer(unet, ck.component("unet"), unit_types=(FeedForward,)) as ws:
        unet(x, torch.tensor([500.0]), c)
        before = ws.stats.bytes_read
        unet(x, torch.tensor([500.0]), c)
        assert ws.stats.bytes_read - before == file_bytes
