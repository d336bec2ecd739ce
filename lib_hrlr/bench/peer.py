"""``python -m lib_hrlr bench --peer diffusers``: our ``generate`` and the same job in diffusers, side by side.

Both sides run in child processes of this one, one after the other, on the same seeded
random weights (the bench checkpoint, and that checkpoint exported once to a diffusers
folder beside it, :mod:`.diffusers_export`), in the same compute dtype and with the same
number of threads (``OMP_NUM_THREADS`` for both, and ``torch.set_num_threads`` in the peer).
Peak memory of each side is its kernel-measured VmHWM (``wait4``).  The peer's job is
described in :mod:`.peer_diffusers`; it runs the same stages with the same UNet evaluation
count: text encoder, base pass at native size, upscaled guide encode, tiled img2img pass
over our very tiles, full VAE decode (diffusers' tiled decode against our exact one), PNG.

JSON keys (``--json``; stable, schema ``hrlr-peer-bench/1``):

* ``schema``, ``job`` {arch, width, height, steps, tiled_steps, strength, tile, overlap, tiles,
  dtype, threads, vae, budget_mb, native, peer_view_batch_size, cpus, loadavg_start, loadavg_end};
* ``ours`` / ``peer``: {``wall_s`` (child wall time, start to exit), ``peak_rss_mb`` (kernel
  VmHWM), ``stages`` {name: seconds} with names ``load`` (peer only), ``text_encoder``,
  ``base_unet``, ``base_decode``, ``guide_encode``, ``tiled_unet``, ``vae_decode``,
  ``png_write``}, plus ``unet_evals``; ours adds ``tile_batch``, ``overhead_ratio``; the peer
  adds ``run_peak_rss_mb`` (its peak after loading), ``diffusers`` version;
* ``speed_ratio`` {``tiled_unet``, ``vae_decode``, ``end_to_end``, and every other common
  stage}: peer seconds ÷ our seconds (> 1: we are faster);
* ``memory_ratio``: peer peak RSS ÷ our peak RSS;
* ``cgroup`` (with ``--cgroup-limit-mb``): per side {limit_mb, peak_mb, oom_kills, cold}.

``job.peer_kind`` says which job the peer ran: ``"sd15-panorama"`` (the SD 1.x job above) or
``"sdxl-pipeline"``.  For SDXL (``--arch sdxl`` / ``tiny_xl``) the peer is what a diffusers
user runs, :mod:`.peer_diffusers_xl`: one ``StableDiffusionXLPipeline`` at the output size
(no base pass, no tiles), VAE tiling, the CPU offloads diffusers offers tried and recorded,
on the same weights exported with ``text_encoder_2/``.  Ours is the same ``generate`` as
always (base pass, tiled img2img, full VAE).  What differs from the SD 1.x keys:

* ``job``: ``peer_view_batch_size`` is None; ``tile``, ``overlap``, ``tiles``, ``tiled_steps``,
  ``strength``, ``native`` describe our run only;
* ``peer.stages``: ``load``, ``text_encoder``, ``unet`` (the whole denoising loop at the
  output size), ``vae_decode``, ``png_write``;
* ``peer`` adds ``finished``, ``exit_status``, ``oom_killed``, ``reached`` (the last stage it
  finished), ``died_in`` (the stage it had started when it died, else None), ``error_tail``
  (its last stderr lines when it failed; ``exit_status`` -9 without a cgroup: SIGKILL, e.g. the
  kernel's OOM killer), ``kernel_peak_rss_mb`` (the kernel's VmHWM at
  exit), ``load_peak_rss_mb`` (its VmHWM at the end of loading, which its peak reset after
  loading hides from the kernel's figure), ``offload``, ``vae_tiling``, ``tokenizers``,
  ``accelerate`` (its version, or None: then diffusers loads without ``low_cpu_mem_usage``);
  ``peer.peak_rss_mb`` is the larger of the kernel's figure and ``load_peak_rss_mb``;
* ``speed_ratio``: the stages both sides have (``text_encoder``, ``vae_decode``,
  ``png_write``), ``unet`` = peer ``unet`` ÷ (our ``base_unet`` + ``tiled_unet``), and
  ``end_to_end`` (None when the peer did not finish).

A peer that dies (killed for memory, or an error) does not fail the bench: the result says
``finished: false`` with how long it ran, its peak and where it was.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from . import child_env, write_json

SCHEMA = "hrlr-peer-bench/1"
STAGES = ("text_encoder", "base_unet", "base_decode", "guide_encode", "tiled_unet", "vae_decode", "png_write")


def tokenizer_dir() -> str:
    """The CLIP tokenizer files the peer needs (the tests' shared copy, or $HRLR_CLIP_TOKENIZER)."""
    env = os.environ.get("HRLR_CLIP_TOKENIZER")
    if env:
        return env
    from pathlib import Path

    cand = Path(__file__).resolve().parents[2].parent / "shared" / "weights" / "clip-vit-large-patch14-tokenizer"
    if cand.is_dir():
        return str(cand)
    from ..errors import InvalidInput

    raise InvalidInput("peer", "the diffusers peer needs a CLIP tokenizer folder (vocab.json, merges.txt): "
                               "set HRLR_CLIP_TOKENIZER")


def tiled_steps(steps: int, strength: float) -> int:
    """How many steps our tiled img2img pass takes (generate's rule)."""
    import torch

    from ..sampling.schedule import img2img_tail

    return len(img2img_tail(torch.zeros(steps + 1), steps, strength)) - 1


def peer_command(a, folder: str, out_png: str, job: dict) -> list[str]:
    return [sys.executable, "-m", "lib_hrlr.bench.peer_diffusers", "--folder", folder, "--tokenizer", tokenizer_dir(),
            "--width", str(a.width), "--height", str(a.height), "--native", str(job["native"]),
            "--steps", str(a.steps), "--tiled-steps", str(job["tiled_steps"]), "--tile", str(job["tile"]),
            "--overlap", str(job["overlap"]), "--view-batch-size", str(job["peer_view_batch_size"]),
            "--dtype", job["dtype"], "--threads", str(job["threads"]),
            "--prompt", _prompt()[0], "--negative", _prompt()[1], "--out", out_png]


def peer_xl_command(a, folder: str, out_png: str, job: dict) -> list[str]:
    return [sys.executable, "-m", "lib_hrlr.bench.peer_diffusers_xl", "--folder", folder, "--tokenizer", tokenizer_dir(),
            "--width", str(a.width), "--height", str(a.height), "--steps", str(a.steps), "--dtype", job["dtype"],
            "--threads", str(job["threads"]), "--prompt", _prompt()[0], "--negative", _prompt()[1], "--out", out_png]


def peer_xl_result(r_peer, lines: list[str], stderr_text: str) -> dict:
    """The ``peer`` entry of an SDXL run from its exit and its stdout's JSON lines (see the module doc)."""
    events, final = [], {}
    for ln in lines:
        try:
            obj = json.loads(ln)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "stages" in obj:
            final = obj
        else:
            events.append(obj)
    done = {e["stage"]: e for e in events if "stage" in e}
    started = [e["starting"] for e in events if "starting" in e]
    finished = r_peer.returncode == 0 and bool(final)
    load_peak = final.get("load_peak_rss_mb", done.get("load", {}).get("vm_hwm_mb"))
    kernel = round(r_peer.peak_rss_mb, 1)
    return {
        "wall_s": round(r_peer.wall_s, 2), "peak_rss_mb": max(kernel, load_peak or 0.0),
        "kernel_peak_rss_mb": kernel, "load_peak_rss_mb": load_peak, "run_peak_rss_mb": final.get("run_peak_rss_mb"),
        "stages": final.get("stages") or {k: e["seconds"] for k, e in done.items()},
        "unet_evals": final.get("unet_evals"), "finished": finished, "exit_status": r_peer.returncode,
        "oom_killed": r_peer.oom_killed, "reached": list(done)[-1] if done else None,
        "died_in": None if finished or not started or started[-1] in done else started[-1],
        "error_tail": None if finished else stderr_text.strip().splitlines()[-5:],
        "offload": final.get("offload"), "vae_tiling": final.get("vae_tiling"), "tokenizers": final.get("tokenizers"),
        "accelerate": final.get("accelerate"), "diffusers": final.get("diffusers"),
    }


def _prompt() -> tuple[str, str]:
    from .run import NEGATIVE, PROMPT

    return PROMPT, NEGATIVE


def ratio(peer: float | None, ours: float | None) -> float | None:
    if not peer or not ours:
        return None
    return round(peer / ours, 4)


def run_peer_bench(a) -> int:
    from ..config.architectures import ARCHITECTURES
    from ..errors import InvalidInput
    from ..pipeline.params import base_size
    from ..runtime import DTYPE_NAMES, resolve_device, resolve_dtype
    from ..tiling.plan import plan_tiles
    from ..weights.random_checkpoint import cached_random_checkpoint
    from .child import CgroupUnavailable, run_child
    from .diffusers_export import export_diffusers_folder
    from .run import child_command, prepare_weight_cache

    if a.peer != "diffusers":
        raise InvalidInput("peer", f"'{a.peer}' is not a known peer; allowed: diffusers")
    if a.vae != "full":
        raise InvalidInput("vae", "--peer diffusers compares the full VAE with diffusers' tiled decode; use --vae full")
    tokenizer_dir()  # the peer's prerequisite, checked before our side's long run
    cfg = ARCHITECTURES[a.arch]
    xl = cfg.text2 is not None
    dtype = DTYPE_NAMES[resolve_dtype(a.dtype, resolve_device("cpu"))]
    a.dtype = dtype  # both sides the same, explicitly
    threads = a.threads or os.cpu_count() or 1
    tile = getattr(a, "tile", None) or cfg.latent_tile
    overlap = tile // 4 if a.overlap is None else a.overlap
    plan = plan_tiles(a.height // 8, a.width // 8, tile, overlap)
    native = base_size(a.width, a.height, cfg.native_size)
    if native[0] != native[1] and not xl:
        raise InvalidInput("width", "--peer diffusers runs square images (the base pass is native x native)")
    t0 = time.perf_counter()
    ckpt = str(cached_random_checkpoint(a.arch))
    folder = str(export_diffusers_folder(ckpt))
    print(f"weights: {ckpt} and {folder} (ready in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    prepare_weight_cache(a, ckpt)  # our prepared UNet file exists before the timed run, as after a first run
    env = child_env(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    job = {"arch": a.arch, "width": a.width, "height": a.height, "steps": a.steps,
           "tiled_steps": tiled_steps(a.steps, a.strength), "strength": a.strength, "tile": tile, "overlap": overlap,
           "tiles": len(plan.tiles), "dtype": dtype, "threads": threads, "vae": a.vae, "budget_mb": a.budget_mb,
           "native": native[0], "peer_view_batch_size": None, "peer_kind": "sdxl-pipeline" if xl else "sd15-panorama",
           "loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    limit = getattr(a, "cgroup_limit_mb", None)
    cold = bool(getattr(a, "cold", False))
    with tempfile.TemporaryDirectory(prefix="hrlr-peer-") as tmp:
        # ours first: its plan's tiles per call sizes the peer's view batch unless given
        report = os.path.join(tmp, "report.json")
        cmd = child_command(a, ckpt, os.path.join(tmp, "ours.png"), report, None)
        print("ours: generate ...", file=sys.stderr)
        try:
            r_ours = run_child(cmd, env, limit_mb=limit, cold=cold)
        except CgroupUnavailable as e:
            raise InvalidInput("cgroup_limit_mb", f"no memory cgroup can be made here ({e}); run without it") from None
        if r_ours.returncode != 0:
            print(f"bench: our generate failed with exit status {r_ours.returncode}", file=sys.stderr)
            return 1
        with open(report) as fh:
            rep = json.load(fh)
        st = rep["stats"]
        if not xl:
            job["peer_view_batch_size"] = a.peer_view_batch or st.get("tile_batch") or 1
        ours_stages = {m["name"]: m["seconds"] for m in rep["memory"]["modules"] if m.get("kind") == "stage"}
        evals, eval_s = st.get("unet_evals"), st.get("unet_eval_s")
        ours = {"wall_s": round(r_ours.wall_s, 2), "peak_rss_mb": round(r_ours.peak_rss_mb, 1),
                "stages": {k: ours_stages[k] for k in STAGES if k in ours_stages}, "unet_evals": evals,
                "tile_batch": st.get("tile_batch"),
                "overhead_ratio": round(r_ours.wall_s / (evals * eval_s), 4) if evals and eval_s else None}
        if xl:
            return _finish_xl(a, job, ours, r_ours, folder, tmp, env, limit, cold)

        peer_out = os.path.join(tmp, "peer.json")
        print(f"peer: diffusers, {job['peer_view_batch_size']} views per UNet call ...", file=sys.stderr)
        with open(peer_out, "w") as fh:
            r_peer = run_child(peer_command(a, folder, os.path.join(tmp, "peer.png"), job), env, limit_mb=limit,
                               cold=cold, stdout=fh)
        if r_peer.returncode != 0 and not r_peer.oom_killed:
            print(f"bench: the diffusers peer failed with exit status {r_peer.returncode}", file=sys.stderr)
            return 1
        peer_rep = {}
        if r_peer.returncode == 0:
            with open(peer_out) as fh:
                peer_rep = json.loads(fh.read().strip().splitlines()[-1])
    peer = {"wall_s": round(r_peer.wall_s, 2), "peak_rss_mb": round(r_peer.peak_rss_mb, 1),
            "stages": peer_rep.get("stages", {}), "unet_evals": peer_rep.get("unet_evals"),
            "run_peak_rss_mb": peer_rep.get("run_peak_rss_mb"), "diffusers": peer_rep.get("diffusers"),
            "finished": r_peer.returncode == 0}
    speed = {k: ratio(peer["stages"].get(k), ours["stages"].get(k)) for k in STAGES}
    speed["end_to_end"] = ratio(peer["wall_s"], ours["wall_s"]) if peer["finished"] else None
    job["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]  # others' work on the machine skews both sides
    result = {"schema": SCHEMA, "job": job, "ours": ours, "peer": peer, "speed_ratio": speed,
              "memory_ratio": ratio(peer["peak_rss_mb"], ours["peak_rss_mb"])}
    if limit is not None:
        result["cgroup"] = {"ours": r_ours.cgroup, "peer": r_peer.cgroup}
    print(f"{'stage':<14}{'ours s':>10}{'diffusers s':>13}{'speed_ratio':>13}")
    for k in STAGES + ("end_to_end",):
        o = ours["wall_s"] if k == "end_to_end" else ours["stages"].get(k)
        p = peer["wall_s"] if k == "end_to_end" else peer["stages"].get(k)
        print(f"{k:<14}{o if o is not None else '-':>10}{p if p is not None else '-':>13}"
              f"{speed[k] if speed[k] is not None else '-':>13}")
    return _report(a, result, limit, r_ours, r_peer)


def _report(a, result: dict, limit, r_ours, r_peer) -> int:
    """The lines every peer bench ends with, and its JSON."""
    ours, peer = result["ours"], result["peer"]
    print(f"peak_rss_mb ours={ours['peak_rss_mb']} peer={peer['peak_rss_mb']} memory_ratio={result['memory_ratio']}")
    if limit is not None:
        print(f"cgroup {limit} MB: ours {r_ours.cgroup}, peer {r_peer.cgroup}")
    if a.json:
        write_json(a.json, result)
    return 0


def _finish_xl(a, job: dict, ours: dict, r_ours, folder: str, tmp: str, env: dict, limit, cold: bool) -> int:
    """The SDXL peer (:mod:`.peer_diffusers_xl`) after our run, and the result."""
    from .child import run_child

    peer_out, peer_err = os.path.join(tmp, "peer.jsonl"), os.path.join(tmp, "peer.stderr")
    print(f"peer: diffusers StableDiffusionXLPipeline at {a.width}x{a.height} ...", file=sys.stderr)
    with open(peer_out, "w") as fh, open(peer_err, "w") as eh:
        r_peer = run_child(peer_xl_command(a, folder, os.path.join(tmp, "peer.png"), job), env, limit_mb=limit,
                           cold=cold, stdout=fh, stderr=eh)
    with open(peer_out) as fh:
        lines = fh.read().splitlines()
    with open(peer_err, errors="replace") as fh:
        err = fh.read()
    sys.stderr.write(err[-4000:])
    peer = peer_xl_result(r_peer, lines, err)
    # ours: only the stages a stage of the peer corresponds to, plus its UNet passes together
    ours_unet = sum(ours["stages"].get(k) or 0.0 for k in ("base_unet", "tiled_unet")) or None
    speed = {k: ratio(peer["stages"].get(k), ours["stages"].get(k)) for k in ("text_encoder", "vae_decode", "png_write")}
    speed["unet"] = ratio(peer["stages"].get("unet"), ours_unet)
    speed["end_to_end"] = ratio(peer["wall_s"], ours["wall_s"]) if peer["finished"] else None
    job["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"schema": SCHEMA, "job": job, "ours": ours, "peer": peer, "speed_ratio": speed,
              "memory_ratio": ratio(peer["peak_rss_mb"], ours["peak_rss_mb"])}
    if limit is not None:
        result["cgroup"] = {"ours": r_ours.cgroup, "peer": r_peer.cgroup}
    print(f"{'stage':<14}{'ours s':>10}{'diffusers s':>13}{'speed_ratio':>13}")
    os_, ps = ours["stages"], peer["stages"]
    rows = [("load", None, ps.get("load")), ("text_encoder", os_.get("text_encoder"), ps.get("text_encoder"))]
    rows += [(k, os_.get(k), None) for k in ("base_unet", "base_decode", "guide_encode", "tiled_unet")]
    rows += [("unet", ours_unet, ps.get("unet"))] + [(k, os_.get(k), ps.get(k)) for k in ("vae_decode", "png_write")]
    rows.append(("end_to_end", ours["wall_s"], peer["wall_s"]))
    for k, o, p in rows:
        sr = speed.get(k)
        print(f"{k:<14}{o if o is not None else '-':>10}{p if p is not None else '-':>13}{sr if sr is not None else '-':>13}")
    state = "finished" if peer["finished"] else (f"did NOT finish (exit {peer['exit_status']}, "
                                                  f"reached {peer['reached']}, died in {peer['died_in']})")
    print(f"peer {state}; offload: {peer['offload']}")
    return _report(a, result, limit, r_ours, r_peer)
