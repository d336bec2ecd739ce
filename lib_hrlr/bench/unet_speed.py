"""``python -m lib_hrlr bench --unet-only``: one UNet evaluation, side by side, in one process.

Four ways to run the same UNet on the same inputs (seeded random weights of the exact
architecture, the cached checkpoint ``bench`` uses):

* ``diffusers``: diffusers' ``UNet2DConditionModel`` holding the same weights (it shares
  the resident model's tensors, so it costs no extra memory);
* ``resident``: our UNet, all weights in memory, nothing chunked;
* ``chunked``: the same resident UNet with the chunking a streamed run uses
  (:data:`lib_hrlr.models.unet.STREAM_CHUNKING`);
* ``streamed``: what ``generate`` runs under a budget: :func:`unet_streamer` (weights read
  per layer, prefetched on a second thread, chunked), cache 0 unless ``--cache-mb`` says
  otherwise, from the prepared weight file of ``--weight-cache`` (default: the user cache,
  written before timing; :mod:`lib_hrlr.weights.prepared`) so no read converts;
* ``streamed_convert``: the same, reading the fp16 checkpoint itself and converting every
  tensor on every read (what ``--weight-cache off`` runs);
* ``streamed_pool`` (only when asked for): the same, except that the prefetch thread converts
  fp16 -> compute dtype with torch's intra-op threads (what the streamer did before
  ``serial_prefetch``), to measure what that competition costs.

Absolute timings move with whatever else the machine runs, so the variants are called in
an interleaved order (one call of each per round, the order rotated every round) and every
ratio is taken within a round, then summarised as median and spread over the rounds.  Each
call is timed twice: wall seconds, and the process's CPU seconds (all its threads, the
prefetch thread included), which is the steadier figure on a machine that others load too
(use ``--threads 1`` there: with more threads, OpenMP's spin-waiting counts as CPU time).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import write_json

VARIANTS = ("diffusers", "resident", "chunked", "streamed", "streamed_convert", "streamed_pool")


@dataclass(frozen=True)
class VariantResult:
    name: str
    batch: int
    per_sample_s: list[float]  # wall, one per round
    ratio_to_resident: list[float]  # per round, this call / the resident call of the same round (wall)
    cpu_per_sample_s: list[float]  # process CPU seconds (all threads), one per round
    cpu_ratio_to_resident: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_sample_s)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratio_to_resident) if self.ratio_to_resident else float("nan")

    def summary(self) -> dict:
        d = asdict(self)
        d.update(median_s=round(self.median_s, 4), min_s=round(min(self.per_sample_s), 4),
                 max_s=round(max(self.per_sample_s), 4), median_ratio_to_resident=round(self.median_ratio, 4),
                 cpu_median_s=round(statistics.median(self.cpu_per_sample_s), 4),
                 cpu_median_ratio_to_resident=round(self.cpu_median_ratio, 4))
        return d

    @property
    def cpu_median_ratio(self) -> float:
        return statistics.median(self.cpu_ratio_to_resident) if self.cpu_ratio_to_resident else float("nan")


def resident_unet(ckpt, dtype: torch.dtype):
    """Our UNet with every weight loaded (a streamer that pins everything); returns (unet, streamer)."""
    from ..models.unet import UNet
    from ..weights.streaming import WeightStreamer

    with torch.device("meta"):
        unet = UNet(ckpt.config.unet)
    streamer = WeightStreamer(unet, ckpt.component("unet"), dtype=dtype, prefetch=False, arena=False)
    streamer.materialize_all()
    return unet, streamer


def diffusers_twin(unet, cfg, dtype: torch.dtype):
    """diffusers' UNet2DConditionModel of ``cfg`` (a ModelConfig) holding ``unet``'s tensors (shared, not copied)."""
    import diffusers

    from ..models.unet import diffusers_key_map
    from ..weights.random_checkpoint import diffusers_configs

    ucfg, _, _ = diffusers_configs(cfg)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**ucfg)
    assign_shared(theirs, unet, diffusers_key_map(cfg.unet))
    theirs.eval().requires_grad_(False)
    return theirs.to(dtype)


def assign_shared(theirs, ours, key_map: dict[str, str], prefixes: tuple[str, ...] | None = None) -> None:
    """Give the meta-built diffusers model ``theirs`` the tensors of our ``ours`` (shared, not
    copied; ``key_map``: their name -> ours), all of them, or only the names under ``prefixes``
    (each of those must be set)."""
    mine = ours.state_dict()
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    wanted = [k for k in shapes if prefixes is None or k.startswith(prefixes)]
    missing = theirs.load_state_dict({k: mine[key_map[k]].reshape(shapes[k]) for k in wanted},
                                     strict=prefixes is None, assign=True).missing_keys
    unset = [k for k in missing if prefixes is not None and k.startswith(prefixes)]
    if unset:
        raise RuntimeError(f"diffusers keys left unset: {unset[:5]}")


@contextlib.contextmanager
def _pool_streamed(ckpt, dtype: torch.dtype, cache_bytes: int):
    """A streamed UNet as unet_streamer builds it, but converting on the intra-op pool in the prefetch thread."""
    from ..models.unet import STREAM_CHUNKING, FeedForward, UNet
    from ..weights.streaming import WeightStreamer

    with torch.device("meta"):
        unet = UNet(ckpt.config.unet)
    unet.set_chunking(**STREAM_CHUNKING)
    with WeightStreamer(unet, ckpt.component("unet"), dtype=dtype, cache_bytes=cache_bytes, unit_types=(FeedForward,),
                        serial_prefetch=False) as streamer:
        unet.streamer = streamer
        yield unet


def time_call(fn, x, t, c) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn(x, t, c)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(fns: dict, inputs: tuple, repeats: int, log=None) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per call of each fn, ``repeats`` rounds, one call of each per round,
    the order rotated each round (so no variant always runs first or after the same neighbour)."""
    names = list(fns)
    out: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(time_call(fns[n], *inputs))
        if log:
            log(f"  round {r + 1}/{repeats}: " + "  ".join(f"{n} {out[n][-1][0]:.2f}s (cpu {out[n][-1][1]:.2f}s)"
                                                           for n in names))
    return out


def summarize(times: dict[str, list[tuple[float, float]]], batch: int) -> list[VariantResult]:
    base = times.get("resident")
    res = []
    for n, ts in times.items():
        wall = [w for w, _ in ts]
        cpu = [c for _, c in ts]
        ratios = [a[0] / b[0] for a, b in zip(ts, base)] if base else []
        cpu_ratios = [a[1] / b[1] for a, b in zip(ts, base)] if base else []
        res.append(VariantResult(n, batch, [t / batch for t in wall], ratios, [t / batch for t in cpu], cpu_ratios))
    return res


def inputs_for(cfg, batch: int, size: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.unet.in_channels, size, size, generator=g).to(dtype)
    t = torch.full((batch,), 500.0)
    c = torch.randn(batch, 77, cfg.unet.context_dim, generator=g).to(dtype)
    return x, t, c


def run_unet_bench(a, log=lambda s: print(s, file=sys.stderr)) -> dict:
    from ..models.unet import STREAM_CHUNKING
    from ..pipeline.components import unet_streamer
    from ..runtime import DTYPES, tune_allocator
    from ..weights.checkpoint import open_checkpoint
    from ..weights.prepared import cache_folder, prepared_sources
    from ..weights.random_checkpoint import cached_random_checkpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    tuning = tune_allocator() if a.allocator == "tuned" else None
    load_start = [round(x, 2) for x in os.getloadavg()]  # 1/5/15-min load: how busy the machine was
    dtype = DTYPES[a.unet_dtype]
    ckpt = open_checkpoint(str(cached_random_checkpoint(a.arch)))
    cfg = ckpt.config
    size = a.latent or cfg.latent_tile
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        from ..errors import InvalidInput

        raise InvalidInput("variants", f"{', '.join(bad)}; allowed are {', '.join(VARIANTS)}")
    results: list[VariantResult] = []
    with torch.inference_mode(), contextlib.ExitStack() as stack:  # the stack (streamers) closes first
        unet, res_streamer = resident_unet(ckpt, dtype)
        stack.callback(res_streamer.close)
        fns = {}
        if "diffusers" in variants:
            twin = diffusers_twin(unet, cfg, dtype)
            fns["diffusers"] = lambda x, t, c: twin(x, t, encoder_hidden_states=c).sample
        if "resident" in variants or "diffusers" in variants or "chunked" in variants:
            def resident(x, t, c):
                unet.set_chunking(None, None, None)
                return unet(x, t, c)
            fns["resident"] = resident
        if "chunked" in variants:
            def chunked(x, t, c):
                unet.set_chunking(**STREAM_CHUNKING)
                return unet(x, t, c)
            fns["chunked"] = chunked
        for name in ("streamed", "streamed_convert"):
            if name not in variants:
                continue
            folder = cache_folder(getattr(a, "weight_cache", "auto")) if name == "streamed" else None
            prepared = prepared_sources(ckpt.component("unet"), "unet", dtype, folder)
            log(f"{name}: weights from {prepared.path or ckpt.path} ({prepared.status})")
            fns[name] = stack.enter_context(unet_streamer(ckpt, dtype, torch.device("cpu"),
                                                          cache_bytes=int(a.cache_mb * 2**20),
                                                          prefetch=not a.no_prefetch, sources=prepared.sources))
        if "streamed_pool" in variants:
            fns["streamed_pool"] = stack.enter_context(_pool_streamed(ckpt, dtype, int(a.cache_mb * 2**20)))
        for batch in [int(b) for b in a.batches.split(",")]:
            inputs = inputs_for(cfg, batch, size, dtype)
            log(f"batch {batch}, {size}x{size} latent, {a.unet_dtype}, {torch.get_num_threads()} threads: warm-up")
            for n, fn in fns.items():  # the streamed UNet's first two calls learn the order and build the arena
                for _ in range(2 if n.startswith("streamed") else 1):
                    fn(*inputs)
            times = interleaved(fns, inputs, a.repeats, log)
            results += summarize(times, batch)
        stream_stats = {n: fns[n].streamer.stats.as_dict() for n in ("streamed", "streamed_convert", "streamed_pool")
                        if n in fns}
    out = {
        "arch": a.arch, "dtype": a.unet_dtype, "latent": size, "threads": torch.get_num_threads(),
        "allocator": a.allocator if tuning is None else f"tuned ({tuning.detail})",
        "repeats": a.repeats, "cache_mb": a.cache_mb, "prefetch": not a.no_prefetch,
        "results": [r.summary() for r in results], "stream_stats": stream_stats,
        "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'variant':<14}{'batch':>6}{'wall s/sample':>15}{'min':>8}{'max':>8}{'÷ resident':>12}"
          f"{'cpu s/sample':>14}{'÷ resident':>12}  (per-round wall; cpu ratios)")
    for r in results:
        rr = " ".join(f"{x:.3f}" for x in r.ratio_to_resident)
        cr = " ".join(f"{x:.3f}" for x in r.cpu_ratio_to_resident)
        print(f"{r.name:<14}{r.batch:>6}{r.median_s:>15.3f}{min(r.per_sample_s):>8.3f}{max(r.per_sample_s):>8.3f}"
              f"{r.median_ratio:>12.3f}{statistics.median(r.cpu_per_sample_s):>14.3f}{r.cpu_median_ratio:>12.3f}"
              f"  ({rr}; {cr})")
    print(f"load average (1/5/15 min) at start {load_start}, at end {out['loadavg_end']} on {os.cpu_count()} CPUs")
    if a.json:
        write_json(a.json, out)
    return out
