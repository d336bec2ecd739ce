"""``python -m lib_hrlr bench``: the same ``generate`` a user runs, in a child process, measured from outside.

The child's peak resident set comes from the kernel (``wait4``'s ``ru_maxrss``, the same
number as the child's VmHWM), so nothing the child does can hide memory from it.  Weights
are seeded random values in the exact architecture (memory and speed do not depend on
their values), written once to ``$HRLR_CACHE`` (default ``~/.cache/hrlr``).

``overhead_ratio`` = wall time ÷ (UNet evaluations × one evaluation's compute time), where
one evaluation is one sample's share of the first UNet call of each stage, whose loads are
synchronous and excluded (:mod:`lib_hrlr.pipeline.timing`): 1.0 would mean the run did
nothing but UNet math.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

from ..cli import THP_ENV
from . import child_env, write_json

PROMPT = "a lighthouse on a cliff above a stormy sea at sunset, dramatic clouds, highly detailed"
NEGATIVE = "blurry, low quality"


def default_taesd_dir() -> str | None:
    env = os.environ.get("HRLR_TAESD_DIR")
    if env:
        return env
    repo = pathlib.Path(__file__).resolve().parents[2]
    cand = repo.parent / "shared" / "weights" / "taesd"
    return str(cand) if cand.is_dir() else None


def bench_image(a, folder: str) -> str:
    """The upscale mode's input: ``--image``, else skimage's astronaut photo (512², a real
    photo; scikit-image is a test dependency) written as a PNG into ``folder``."""
    from ..errors import InvalidInput

    if getattr(a, "image", None):
        return a.image
    try:
        from skimage.data import astronaut
    except ImportError:
        raise InvalidInput("image", "--mode upscale needs --image PATH (or scikit-image for its astronaut photo)") from None
    from PIL import Image

    path = os.path.join(folder, "astronaut.png")
    Image.fromarray(astronaut()).save(path)
    return path


def child_command(a, ckpt: str, out_png: str, report: str, image: str | None = None) -> list[str]:
    mode = ["upscale", image] if image else ["generate"]
    cmd = [
        sys.executable, "-m", "lib_hrlr", *mode,
        "--model", ckpt, "--prompt", PROMPT, "--negative", NEGATIVE,
        "--width", str(a.width), "--height", str(a.height),
        "--steps", str(a.steps), "--strength", str(a.strength), "--sampler", a.sampler,
        "--seed", "1", "--vae", a.vae, "--dtype", a.dtype, "--budget-mb", str(a.budget_mb),
        "--out", out_png, "--report", report, "--quiet", "--weight-cache", getattr(a, "weight_cache", "auto"),
    ]
    if a.tile_batch:
        cmd += ["--tile-batch", str(a.tile_batch)]
    if getattr(a, "tile", None):
        cmd += ["--tile", str(a.tile)]
    if a.overlap is not None:
        cmd += ["--overlap", str(a.overlap)]
    if a.vae == "taesd":
        d = a.taesd_dir or default_taesd_dir()
        if d:
            cmd += ["--taesd-dir", d]
    return cmd


def prepare_weight_cache(a, ckpt: str) -> float | None:
    """Write the run's prepared UNet weights (``--weight-cache``) before the timed child, as a
    user's first run would: the bench measures the runs after it.  Returns the seconds it
    took (about 0 when the file exists), None when the cache is off."""
    from ..runtime import resolve_device, resolve_dtype
    from ..weights.checkpoint import open_checkpoint
    from ..weights.prepared import cache_folder, prepared_sources

    folder = cache_folder(getattr(a, "weight_cache", "auto"))
    if folder is None:
        return None
    t0 = time.perf_counter()
    dtype = resolve_dtype(a.dtype, resolve_device("cpu"))
    got = prepared_sources(open_checkpoint(ckpt).component("unet"), "unet", dtype, folder)
    seconds = round(time.perf_counter() - t0, 2)
    print(f"weight cache: {got.status} {got.path or ''} {got.reason} ({seconds} s)", file=sys.stderr)
    return seconds


def run_bench(a) -> int:
    from ..errors import InvalidInput
    from ..weights.random_checkpoint import cached_random_checkpoint

    from ..config.architectures import ARCHITECTURES

    if a.arch not in ARCHITECTURES:
        raise InvalidInput("arch", f"'{a.arch}' is not one of: {', '.join(ARCHITECTURES)}")
    if ARCHITECTURES[a.arch].family != "sd1x" and getattr(a, "unet_only", False):
        raise InvalidInput("arch", f"--unet-only compares SD 1.x architectures (sd15, tiny), not '{a.arch}'")
    mode = getattr(a, "mode", "txt2img")
    if mode not in ("txt2img", "upscale"):
        raise InvalidInput("mode", f"'{mode}' is not one of: txt2img, upscale")
    if a.strength is None:
        from ..api import UPSCALE_STRENGTH

        a.strength = UPSCALE_STRENGTH if mode == "upscale" else 0.45
    if getattr(a, "unet_only", False):
        from .unet_speed import run_unet_bench

        run_unet_bench(a)
        return 0
    if getattr(a, "peer", None):
        from .peer import run_peer_bench

        return run_peer_bench(a)
    t0 = time.perf_counter()
    ckpt = str(cached_random_checkpoint(a.arch))
    print(f"checkpoint: {ckpt} ({os.path.getsize(ckpt) / 2**30:.2f} GiB, ready in {time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
    prepared = prepare_weight_cache(a, ckpt)
    with tempfile.TemporaryDirectory(prefix="hrlr-bench-") as tmp:
        out_png = os.path.join(tmp, "bench.png")
        report = os.path.join(tmp, "report.json")
        cmd = child_command(a, ckpt, out_png, report, bench_image(a, tmp) if mode == "upscale" else None)
        env = child_env()
        from .child import CgroupUnavailable, run_child

        try:
            child = run_child(cmd, env, limit_mb=getattr(a, "cgroup_limit_mb", None), cold=getattr(a, "cold", False))
        except CgroupUnavailable as e:
            raise InvalidInput("cgroup_limit_mb", f"no memory cgroup can be made here ({e}); run without it") from None
        wall = child.wall_s
        if child.returncode != 0:
            oom = " (OOM-killed in its memory cgroup)" if child.oom_killed else ""
            print(f"bench: generate failed with exit status {child.returncode}{oom}; cgroup: {child.cgroup}",
                  file=sys.stderr)
            return child.returncode if child.returncode > 0 else 1
        with open(report) as fh:
            rep = json.load(fh)
        if a.keep_image:
            os.replace(out_png, a.keep_image)
    peak_mb = child.peak_rss_mb  # the kernel's ru_maxrss (VmHWM)
    st = rep["stats"]
    evals = st["unet_evals"]
    eval_s = st["unet_eval_s"]
    ratio = wall / (evals * eval_s) if evals and eval_s else float("nan")
    modules = [
        {"name": m["name"], "peak_rss_mb": m["peak_rss_mb"], "seconds": m["seconds"]}
        for m in rep["memory"]["modules"]
    ]
    result = {
        "mode": mode, "source_size": st.get("source_size"),
        "arch": a.arch, "width": a.width, "height": a.height, "steps": a.steps, "strength": a.strength,
        "sampler": a.sampler, "vae": a.vae, "overlap": a.overlap, "dtype": st.get("dtype"), "budget_mb": a.budget_mb,
        "tiles": st.get("tiles"), "tile_batch": st.get("tile_batch"), "unet_cache_mb": st.get("unet_cache_mb"),
        "peak_rss_mb": round(peak_mb, 1),
        "child_reported_peak_rss_mb": rep["memory"]["peak_rss_mb"],
        # the child's highest sampled RSS split into RssAnon / RssFile / RssShmem, with its stage
        "peak_sample": rep["memory"].get("peak_sample"),
        "wall_s": round(wall, 2),
        "unet_evals": evals,
        "unet_eval_s": round(eval_s, 4) if eval_s else None,  # None: no UNet ran (upscale at strength 0)
        "unet_eval_timed_samples": st.get("unet_eval_timed_samples"),
        "overhead_ratio": round(ratio, 4),
        "modules": modules,
        "plan": rep["plan"],
        "threads": __import__("torch").get_num_threads(),
        "weight_cache": st.get("weight_cache"), "weight_cache_prepare_s": prepared,
        # torch's huge pages for large tensors in the child (cli.THP_ENV: "1" on, "0" off)
        "thp_mem_alloc": env[THP_ENV],
    }
    if child.cgroup:
        result["cgroup"] = child.cgroup  # limit_mb, peak_mb (page cache included), oom_kills, cold
        print(f"cgroup: {child.cgroup}", file=sys.stderr)
    for m in modules:
        print(f"  {m['name']:<30} {m['peak_rss_mb']:>9.1f} MB {m['seconds']:>9.2f} s", file=sys.stderr)
    if a.json:
        write_json(a.json, result)
    print(f"wall_s={result['wall_s']} unet_evals={evals} unet_eval_s={result['unet_eval_s']}")
    print(f"peak_rss_mb={result['peak_rss_mb']} overhead_ratio={result['overhead_ratio']}")
    return 0
