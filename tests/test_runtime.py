"""Compute dtype choice and process tuning (allocator, oneDNN's primitive cache)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lib_hrlr.errors import InvalidInput
from lib_hrlr.runtime import ONEDNN_CACHE_ENV, resolve_dtype
from tests.conftest import ROOT

AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_only_where_the_cpu_computes_it_fast():
    assert resolve_dtype("auto", CPU, AVX2 | {"avx512f", "avx512_bf16"}) == torch.bfloat16
    assert resolve_dtype("auto", CPU, AVX2 | {"amx_bf16"}) == torch.bfloat16
    assert resolve_dtype("auto", CPU, AVX2 | {"avx512f"}) == torch.float32
    assert resolve_dtype("auto", CUDA, AVX2) == torch.float16
    assert resolve_dtype("fp32", CPU, AVX2 | {"avx512_bf16"}) == torch.float32


def test_unknown_dtype_names_the_field():
    with pytest.raises(InvalidInput) as e:
        resolve_dtype("int8", CPU)
    assert e.value.field == "dtype" and "auto, fp32, bf16 or fp16" in str(e.value)


# 200 convolutions of distinct shapes: each makes oneDNN compile a primitive, which its cache
# keeps (default capacity 1024) unless tune_allocator() turned the cache off first
CONVS = r"""
import json, os, sys, torch, torch.nn.functional as F
from lib_hrlr.runtime import trim_allocator, tune_allocator
from lib_hrlr.memory.meter import read_status_kb
if sys.argv[1] == "tuned":
    tune_allocator()
torch.set_num_threads(1)
w = torch.randn(64, 64, 3, 3)
with torch.inference_mode():
    F.conv2d(torch.randn(1, 64, 8, 8), w, padding=1)
    trim_allocator()
    before = read_status_kb()["VmRSS"]
    for s in range(9, 209):
        F.conv2d(torch.randn(1, 64, s, 9), w, padding=1)
trim_allocator()
print(json.dumps({"grew_mb": (read_status_kb()["VmRSS"] - before) / 1024, "env": os.environ.get(sys.argv[2])}))
"""


def _convs(mode: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CONVS, mode, ONEDNN_CACHE_ENV], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_does_not_keep_compiled_convolutions():
    env = {k: v for k, v in os.environ.items() if k not in (ONEDNN_CACHE_ENV, "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    default, tuned = _convs("plain", env), _convs("tuned", env)
    print(f"200 conv shapes: RSS +{default['grew_mb']:.1f} MB with oneDNN's cache, +{tuned['grew_mb']:.1f} MB tuned")
    assert tuned["env"] == "0"
    assert tuned["grew_mb"] + 5 < default["grew_mb"]


def test_a_cache_size_the_user_set_is_kept():
    env = dict(os.environ, **{ONEDNN_CACHE_ENV: "64"})
    assert _convs("tuned", env)["env"] == "64"


# 2000 tensors of 100 KB (under the tuned mmap threshold: glibc's heap), every other one freed:
# the freed chunks sit between live ones, so glibc cannot shrink its heap by itself
HOLES = r"""
import json, torch
from lib_hrlr.runtime import trim_allocator, tune_allocator
from lib_hrlr.memory.meter import read_status_kb
tune_allocator()
live, dead = [], []
for i in range(2000):
    (live if i % 2 else dead).append(torch.ones(25_000))
rss = lambda: read_status_kb()["VmRSS"] / 1024
full = rss()
del dead
freed = rss()
trim_allocator()
trimmed = rss()
trim_allocator()  # again: the lookup is cached, the call stays cheap and harmless
print(json.dumps({"full": full, "freed": freed, "trimmed": trimmed, "live": len(live)}))
"""


def test_trim_hands_freed_heap_memory_between_live_tensors_back():
    """What the streamed UNet relies on after every call (``DeviceModel(trim=True)``): ~100 MB
    freed in holes between live tensors stays resident until the trim, then leaves."""
    out = subprocess.run([sys.executable, "-c", HOLES], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"RSS {r['full']:.1f} MB with 2000 x 100 KB, {r['freed']:.1f} MB after freeing half, "
          f"{r['trimmed']:.1f} MB after trim_allocator()")
    assert r["full"] - r["freed"] < 20  # the holes stayed resident
    assert r["freed"] - r["trimmed"] > 70  # ~95 MB of holes returned


# the same 8 MB tensor made and freed 50 times, as a tile loop does: with the tuned 1 MB mmap
# threshold each one is a fresh mapping (a page fault and zero fill per 4 KB page, ~2048 per
# tensor); within reused_heap() glibc's heap serves it again, and leaving hands it back
REUSE = r"""
import json, resource, torch
from lib_hrlr.runtime import reused_heap, tune_allocator
from lib_hrlr.memory.meter import read_status_kb
tune_allocator()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rss = lambda: read_status_kb()["VmRSS"] / 1024

def loop(elements=2 << 20):
    f0 = faults()
    for _ in range(50):
        torch.ones(elements).add_(1)
    return faults() - f0

out = {"before": loop()}
base = rss()
with reused_heap():
    loop()  # the first pass maps the heap's pages
    out["inside"] = loop()
    out["held_mb"] = rss() - base
out["left_mb"] = rss() - base
# larger than any free chunk the heap kept (glibc serves a request from a free chunk below the
# top before it considers mmap, so 8 MB tensors may reuse one after leaving: a 4095-fault run)
out["after"] = loop(8 << 20)
print(json.dumps(out))
"""


def test_reused_heap_serves_repeated_tensors_without_page_faults_and_returns_them():
    out = subprocess.run([sys.executable, "-c", REUSE], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"50 x 8 MB tensors: {r['before']} page faults tuned, {r['inside']} within reused_heap() "
          f"(heap held {r['held_mb']:.1f} MB, {r['left_mb']:.1f} MB after leaving), {r['after']} after (32 MB tensors)")
    pages = 50 * (8 << 20) // 4096
    assert r["before"] > 0.9 * pages  # every tensor faults in all its pages
    assert r["inside"] < 0.02 * pages  # one mapping, reused
    assert r["held_mb"] > 7  # the freed tensor stays in the heap for the next one...
    assert r["left_mb"] < 2  # ...and leaves with the context
    assert r["after"] > 0.9 * 4 * pages  # the tuned threshold is back: 32 MB tensors are fresh mmaps


# the command's entry point, then 64 MB tensors made and freed as a UNet call does: the kernel's
# counters (page faults, AnonHugePages while one is alive) say how they were mapped
ENTRY_THP = r"""
import json, os, resource, sys
import lib_hrlr.cli as cli
seen = {}
def main():
    seen["env"] = os.environ.get(cli.THP_ENV)
    seen["torch_before"] = "torch" in sys.modules
    import torch
    from lib_hrlr.runtime import tune_allocator
    tune_allocator()
    def thp():  # the kernel's huge-page faults: given, and asked for but not available
        with open("/proc/vmstat") as f:
            v = dict(l.split() for l in f)
        return int(v.get("thp_fault_alloc", 0)), int(v.get("thp_fault_fallback", 0))
    (a0, b0), f0 = thp(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        t = torch.ones(16 << 20)
        with open("/proc/self/smaps_rollup") as f:
            seen["huge_kb"] = [int(l.split()[1]) for l in f if l.startswith("AnonHugePages")][0]
        del t
    seen["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    (a1, b1) = thp()
    seen["thp_given"], seen["thp_fallback"] = a1 - a0, b1 - b0
    return 0
cli.main = main
cli.entry()
print(json.dumps(seen))
"""


def transparent_huge_pages() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.find("[") + 1:text.find("]")] if "[" in text else None


@pytest.mark.parametrize("setting", [None, "0"])
def test_the_command_maps_large_tensors_in_huge_pages_unless_told_not_to(setting):
    mode = transparent_huge_pages()
    if mode not in ("always", "madvise"):
        pytest.skip(f"the kernel's transparent huge pages are {mode!r} here")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    out = subprocess.run([sys.executable, "-c", ENTRY_THP], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"THP {mode}, THP_MEM_ALLOC_ENABLE={r['env']}: 10 x 64 MB tensors, {r['faults']} page faults, "
          f"{r['huge_kb']} kB AnonHugePages; machine-wide huge-page faults {r['thp_given']} given, "
          f"{r['thp_fallback']} fell back to 4 KB")
    assert r["torch_before"] is False  # torch reads the variable once, when it starts
    pages = 10 * (64 << 20) // 4096
    if setting is None:
        assert r["env"] == "1"
        assert r["thp_given"] + r["thp_fallback"] >= 10 * 16  # the tensors (32 huge pages each) were advised
        if r["thp_fallback"] == 0:  # and where the kernel had huge pages free, they were used
            assert r["faults"] < 0.1 * pages  # one fault per 2 MB
            assert r["huge_kb"] >= 32 * 1024
    else:
        assert r["env"] == "0"  # the user's choice stands
        if mode == "madvise":
            assert r["faults"] > 0.9 * pages and r["huge_kb"] == 0
