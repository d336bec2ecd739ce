"""Benchmark: LowRAM mode inside a real webui holding a full-size (random) SD 1.5 checkpoint.

    python -m tests.webui_lowram_bench [--width 2048 --height 2048 --steps 2 --vae taesd]

Starts the webui (API only) with the exact SD 1.5 architecture, lets it load the model, then asks
the extension for a LowRAM generation: the webui's copy of the model is released, the UNet is
streamed from the checkpoint file, and the extension's memory meter reports the process RSS
with no model loaded (``rss_idle_mb``), the peak during the run and their difference
(``added_mb``, the figure that must stay <= 800 MB).  Prints one JSON object and a last line
``idle_rss_mb=<n> peak_rss_mb=<n> added_mb=<n>``.  Needs a prepared webui (webui_support.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from tests.webui_support import Webui, missing_reason


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--height", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--vae", default="taesd", choices=("full", "taesd"))
    ap.add_argument("--budget-mb", type=float, default=800)
    ap.add_argument("--lowram-dtype", default="bf16", choices=("webui", "bf16", "fp32"),
                    help="LowRAM precision (the figures in the README are bf16; the tab's default, webui, "
                         "follows --no-half: fp32)")
    ap.add_argument("--keep", help="keep the data dir here (default: a temporary one)")
    args = ap.parse_args(argv)
    why = missing_reason()
    if why:
        print(f"blocked: {why}", file=sys.stderr)
        return 2
    data = args.keep or tempfile.mkdtemp(prefix="hrlr-webui-bench-")
    w = Webui(data, api_only=True, arch="sd15")
    t0 = time.time()
    try:
        w.start(timeout=900)
        loaded_rss = w.rss_mb()
        code, res = w.post("/hrlr/v1/txt2img", {
            "prompt": "a lighthouse on a cliff above a stormy sea at sunset", "negative_prompt": "blurry",
            "width": args.width, "height": args.height, "steps": args.steps, "seed": 1,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "vae": args.vae, "budget_mb": args.budget_mb,
            "lowram": True, "lowram_dtype": args.lowram_dtype, "restore_model": False, "send_images": False},
            timeout=7200)
        if code != 200:
            print(json.dumps(res, indent=2))
            return 1
        m = res["memory"]["webui"]
        out = {
            "size": f"{args.width}x{args.height}", "steps": args.steps, "vae": args.vae,
            "rss_with_model_loaded_mb": round(loaded_rss, 1),
            "rss_idle_without_model_mb": m["rss_idle_mb"],
            "peak_rss_during_run_mb": m["peak_rss_mb"],
            "added_mb": m["added_mb"],
            "run_wall_s": m["wall_s"],
            "total_wall_s": round(time.time() - t0, 1),
            "stages": [(s["name"], s["peak_rss_mb"], round(s["seconds"], 1))
                       for s in res["memory"]["modules"] if s["kind"] == "stage"],
            "stats": res["stats"],
        }
        print(json.dumps(out, indent=2))
        print(f"idle_rss_mb={m['rss_idle_mb']} peak_rss_mb={m['peak_rss_mb']} added_mb={m['added_mb']}")
        return 0
    finally:
        w.stop()


if __name__ == "__main__":
    sys.exit(main())
