"""WeightStreamer: streamed weights give exactly the results of resident weights, in bounded memory."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lib_hrlr.errors import CheckpointError
from lib_hrlr.weights.safetensors_file import TensorSource, read_header
from lib_hrlr.weights.streaming import WeightStreamer


class Block(nn.Module):
    def __init__(self, c: int, ctx: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.attn_norm = nn.LayerNorm(c)
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(ctx, c, bias=False)
        self.v = nn.Linear(ctx, c, bias=False)
        self.out = nn.Linear(c, c)
        self.proj = nn.Conv2d(c, c, 1)  # stored as a Linear (c, c) in the file

    def forward(self, x, ctx):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
        x = x + h
        b, c, hh, ww = x.shape
        t = self.attn_norm(x.flatten(2).transpose(1, 2))
        a = torch.nn.functional.scaled_dot_product_attention(self.q(t), self.k(ctx), self.v(ctx))
        a = self.out(a).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj(a)


class TinyNet(nn.Module):
    """UNet-like: conv in, a few blocks (one called twice), an embedding, conv out."""

    def __init__(self, c: int = 32, ctx: int = 16):
        super().__init__()
        self.emb = nn.Embedding(10, c)
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.blocks = nn.ModuleList(Block(c, ctx) for _ in range(3))
        self.up = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.mid = Block(2 * c, ctx)
        self.out = nn.Conv2d(2 * c, 4, 3, padding=1)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x, ctx, label):
        h = self.conv_in(x) + self.emb(label)[:, :, None, None]
        for blk in self.blocks:
            h = blk(h, ctx)
        h = self.blocks[0](h, ctx)  # called a second time in the same pass
        h = self.mid(self.up(h), ctx)
        return self.out(h) * self.scale


def random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        out[name] = (torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5).to(t.dtype) if t.dim() else torch.tensor(1.5)
    return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A safetensors file of TinyNet weights in fp16 with ``proj`` stored Linear-shaped."""
    ref = TinyNet()
    sd = {k: v.half() for k, v in random_state(ref, 0).items()}
    for k in list(sd):
        if k.endswith("proj.weight"):
            sd[k] = sd[k].reshape(sd[k].shape[0], sd[k].shape[1])
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file(sd, str(path))
    return path


def sources_of(path) -> dict[str, TensorSource]:
    h = read_header(path)
    return {n: TensorSource(str(path), i) for n, i in h.tensors.items()}


def resident_model(path, dtype) -> TinyNet:
    """The reference: every weight read with the safetensors library and converted with .to()."""
    from safetensors.torch import load_file

    m = TinyNet()
    sd = load_file(str(path))
    own = m.state_dict()
    m.load_state_dict({k: sd[k].to(dtype).reshape(own[k].shape) for k in own})
    return m.to(dtype).eval().requires_grad_(False)


def meta_model() -> TinyNet:
    with torch.device("meta"):
        return TinyNet().eval()


def inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.randn(2, 5, 16, generator=g).to(dtype), torch.tensor([3, 7])


def all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cache_frac", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("prefetch, arena", [(False, False), (True, True)])
def test_streamed_equals_resident(weights_file, dtype, cache_frac, prefetch, arena):
    x, ctx, label = inputs(dtype)
    with torch.no_grad():
        expected = resident_model(weights_file, dtype)(x, ctx, label)
        model = meta_model()
        total = None
        with WeightStreamer(model, sources_of(weights_file), dtype=dtype, cache_bytes=0, prefetch=False) as probe:
            total = probe.stats.total_bytes
        cache = int(total * cache_frac)
        with WeightStreamer(
            model, sources_of(weights_file), dtype=dtype, cache_bytes=cache, prefetch=prefetch, arena=arena
        ) as ws:
            outs = [model(x, ctx, label) for _ in range(3)]
            st = ws.stats
            # the root owns the ``scale`` buffer, so it is a unit too (resident for the whole pass)
            assert ws.unit_names[:2] == ["", "emb"] and "blocks.0.proj" in ws.unit_names
            assert ws.execution_order[:3] == ["", "conv_in", "emb"]
            assert all(o.dtype == dtype for o in outs)
            for o in outs:
                assert torch.equal(o, expected)
            assert st.pinned_bytes <= cache
            if cache_frac == 1.0:
                assert st.pinned_units == st.units
                assert st.bytes_read == total // dtype.itemsize * 2  # read once, fp16 in the file
            if cache_frac == 0.0:
                # every unit is read at every call; blocks.0 runs twice per pass
                assert st.pinned_bytes == 0
                assert st.bytes_read > 3 * total // dtype.itemsize * 2
            if prefetch and cache_frac < 1.0:
                assert st.prefetch_hits > 0
            if arena and cache_frac < 1.0:  # passes 2 and 3 placed every unit in the arena
                assert st.arena_bytes > 0 and st.arena_fallbacks == 0
            else:
                assert st.arena_bytes == 0
        assert all_meta(model)
        assert st.inflight_bytes == 0


def test_fp16_file_to_fp32_is_exact_float(weights_file):
    from safetensors.torch import load_file

    ref = load_file(str(weights_file))
    model = meta_model()
    with WeightStreamer(model, sources_of(weights_file), dtype=torch.float32) as ws:
        ws.materialize_all()
        for name, t in model.state_dict().items():
            assert t.dtype == torch.float32
            assert torch.equal(t, ref[name].float().reshape(t.shape)), name
        assert ws.stats.pinned_units == ws.stats.units
    assert all_meta(model)


def test_conversion_crosses_chunk_boundaries(tmp_path):
    """A tensor larger than the conversion chunk is converted piecewise, still exactly."""
    w = torch.randn(7, 300).to(torch.bfloat16)
    b = torch.randn(7).to(torch.bfloat16)
    save_file({"weight": w, "bias": b}, str(tmp_path / "l.safetensors"))
    with torch.device("meta"):
        lin = nn.Linear(300, 7)
    # 64-byte chunks: 32 bf16 values each, 66 chunks for the weight
    with WeightStreamer(lin, sources_of(tmp_path / "l.safetensors"), dtype=torch.float32, chunk_bytes=64) as ws:
        ws.materialize_all()
        assert torch.equal(lin.weight, w.float()) and torch.equal(lin.bias, b.float())
        assert ws.stats.scratch_bytes == 64


def test_peak_inflight_bounded_by_two_largest_units(weights_file):
    x, ctx, label = inputs(torch.float32)
    model = meta_model()
    events = []
    with torch.no_grad(), WeightStreamer(
        model, sources_of(weights_file), cache_bytes=0, on_event=lambda *e: events.append(e)
    ) as ws:
        for _ in range(3):
            model(x, ctx, label)
        sizes = sorted(ws.unit_bytes.values(), reverse=True)
        root = ws.unit_bytes[""]  # the root's own buffer stays in for the whole pass
        st = ws.stats
    assert st.peak_inflight_bytes <= sizes[0] + sizes[1] + root
    assert st.peak_inflight_bytes >= sizes[0]  # the largest unit was resident at some point
    # the arena holds a unit and its successor: at most the two largest (+ alignment, slack)
    assert sizes[0] < st.arena_bytes <= sizes[0] + sizes[1] + (1 << 20) + 64 * 8
    assert st.arena_fallbacks == 0
    assert st.scratch_bytes <= 2 * 4 * 1024 * 1024
    kinds = {e[0] for e in events}
    assert {"load", "prefetch", "release"} <= kinds and "pin" not in kinds
    # every load/prefetch is matched by a release or a discard
    n_in = sum(1 for e in events if e[0] in ("load", "prefetch"))
    assert n_in == sum(1 for e in events if e[0] == "release")
    print(
        f"\ntiny streaming: {st.units} units, {st.total_bytes / 1e6:.2f} MB, peak in flight {st.peak_inflight_bytes / 1e3:.0f} kB "
        f"(two largest units {(sizes[0] + sizes[1]) / 1e3:.0f} kB), prefetch hits {st.prefetch_hits}, "
        f"discards {st.prefetch_discards}, waited {st.wait_seconds * 1e3:.1f} ms, arena {st.arena_bytes / 1e3:.0f} kB"
    )


def test_arena_alternates_ends_and_coalesces():
    from lib_hrlr.weights.streaming import _Arena

    a = _Arena(1024)
    x = a.alloc(100)  # bottom, rounded up to 128
    y = a.alloc(300)  # top: 320 bytes at 704
    assert (x, y) == (0, 704)
    assert a.alloc(700) is None  # 576 free in the middle (a bottom attempt)
    a.release(x)
    z = a.alloc(500)  # a top attempt: the top of the free region [0, 704), now that x is gone
    assert z == 704 - 512
    a.release(y)
    a.release(z)
    assert a.free == [(0, 1024)] and not a.used


def test_cache_pins_in_execution_order(weights_file):
    x, ctx, label = inputs(torch.float32)
    model = meta_model()
    pins = []
    with torch.no_grad():
        with WeightStreamer(model, sources_of(weights_file), cache_bytes=0) as probe:
            sizes = probe.unit_bytes
        budget = sizes["conv_in"] + sizes["emb"] + sizes["blocks.0.norm1"]
        with WeightStreamer(
            model, sources_of(weights_file), cache_bytes=budget, prefetch=False,
            on_event=lambda k, n, b, s: pins.append(n) if k == "pin" else None,
        ) as ws:
            model(x, ctx, label)
            first = ws.stats.bytes_read
            model(x, ctx, label)
            second = ws.stats.bytes_read - first
            pinned = ws.stats.pinned_bytes
            assert budget - sizes["blocks.0.norm2"] < pinned <= budget
    # first fit in execution order: the first three units, then small ones that still fit
    assert pins[:3] == ["conv_in", "emb", "blocks.0.norm1"]
    # pinned units were read once (fp16 in the file: half their fp32 size), then never again
    assert first - second == pinned // 2


def test_missing_and_mismatched_weights_are_refused(tmp_path, weights_file):
    src = sources_of(weights_file)
    del src["mid.conv1.bias"]
    with pytest.raises(CheckpointError, match="lacks 1 weight.*mid.conv1.bias"):
        WeightStreamer(meta_model(), src)
    save_file({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, str(tmp_path / "l.safetensors"))
    with torch.device("meta"):
        lin = nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match=r"'weight' has shape \[3, 3\].*needs \[3, 4\]"):
        WeightStreamer(lin, sources_of(tmp_path / "l.safetensors"))


def test_close_removes_hooks_threads_and_fds(weights_file):
    x, ctx, label = inputs(torch.float32)
    model = meta_model()
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = {t.ident for t in threading.enumerate()}
    ws = WeightStreamer(model, sources_of(weights_file), cache_bytes=10_000)
    with torch.no_grad():
        model(x, ctx, label)
        model(x, ctx, label)
    assert ws.stats.pinned_units > 0
    ws.close()
    assert all_meta(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert len(os.listdir("/proc/self/fd")) == fds_before
    time.sleep(0.05)
    assert {t.ident for t in threading.enumerate()} <= threads_before
    with pytest.raises(RuntimeError, match="meta"):
        with torch.no_grad():
            model(x, ctx, label)


def test_error_in_forward_leaves_nothing_behind(weights_file):
    model = meta_model()
    x, ctx, label = inputs(torch.float32)
    with WeightStreamer(model, sources_of(weights_file)) as ws:
        with pytest.raises(RuntimeError):
            with torch.no_grad():
                model(x[:, :3], ctx, label)  # wrong channel count: conv_in fails
        assert ws.stats.inflight_bytes <= max(ws.unit_bytes.values()) * 2
        with torch.no_grad():
            model(x, ctx, label)
    assert all_meta(model)
    gc.collect()


class Chunked(nn.Module):
    """Calls its linears once per chunk of tokens, like a token-chunked feed-forward."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x):
        return torch.cat([self.inner(c) for c in x.split(3, dim=1)], dim=1)


class ChunkedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.ff = Chunked()

    def forward(self, x):
        return self.ff(self.norm(x))


@pytest.mark.parametrize("unit_types", [(), (Chunked,)])
def test_unit_types_stream_a_subtree_once_per_call(tmp_path, unit_types):
    ref = ChunkedNet()
    state = random_state(ref, 5)
    save_file(state, str(tmp_path / "c.safetensors"))
    ref.load_state_dict(state)
    # like the streamed weights, no grad: F.linear on 3-d input takes another kernel when weights require grad
    ref.requires_grad_(False)
    x = torch.randn(2, 12, 16)  # 4 chunks of 3 tokens
    with torch.device("meta"):
        model = ChunkedNet()
    with torch.inference_mode():
        expected = ref(x)
        with WeightStreamer(model, sources_of(tmp_path / "c.safetensors"), unit_types=unit_types) as ws:
            for _ in range(3):
                assert torch.equal(model(x), expected)
            ff_bytes = sum(v.numel() * 4 for k, v in state.items() if k.startswith("ff."))
            norm_bytes = 2 * 16 * 4
            names = ws.unit_names
            st = ws.stats
    if unit_types:
        assert names == ["norm", "ff"]
        assert st.bytes_read == 3 * (norm_bytes + ff_bytes)  # the whole feed-forward once per call
    else:
        assert names == ["norm", "ff.inner.0", "ff.inner.2"]
        assert st.bytes_read == 3 * (norm_bytes + 4 * ff_bytes)  # its linears once per chunk
    assert all_meta(model)


def test_inference_mode_with_prefetch_and_arena(weights_file):
    x, ctx, label = inputs(torch.float32)
    with torch.inference_mode():
        expected = resident_model(weights_file, torch.float32)(x, ctx, label)
        model = meta_model()
        with WeightStreamer(model, sources_of(weights_file)) as ws:
            for _ in range(3):
                assert torch.equal(model(x, ctx, label), expected)
            assert ws.stats.prefetch_hits > 0 and ws.stats.arena_bytes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_to_cuda_equals_resident(weights_file):
    x, ctx, label = (t.cuda() for t in inputs(torch.float32))
    with torch.no_grad():
        expected = resident_model(weights_file, torch.float32).cuda()(x, ctx, label)
        model = meta_model()
        with WeightStreamer(model, sources_of(weights_file), device="cuda") as ws:
            for _ in range(2):
                out = model(x, ctx, label)
                assert out.device.type == "cuda" and torch.equal(out, expected)
            assert ws.stats.arena_bytes == 0  # the CUDA caching allocator already reuses memory
    assert all_meta(model)
