"""``python -m lib_hrlr bench --sweep``: the budget under test, over the settings users change.

Each configuration runs ``generate`` in a child process (as ``bench`` does) and is measured by
the kernel (``wait4``'s ``ru_maxrss``); the table shows the planner's estimate, the measured peak
and the margin to the budget.  A configuration the planner refuses is a valid outcome (it never
started); one whose measured peak exceeds its budget is a failure, and the command exits 1.

The configurations are chosen so that every value of every axis appears (not the full product,
which would take days here); most run at 1024² because the peak is set by the tiled UNet stage,
whose memory does not grow with the canvas, while the larger sizes check exactly that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from . import write_json

AXES = {
    "size": ((1024, 1024), (2048, 2048), (2560, 1440)),
    "tile": (48, 64, 96),
    "overlap": (8, 16, 32),
    "dtype": ("fp32", "bf16"),
    "decoder": ("taesd", "full"),
    "regions": (0, 3),
    "budget_mb": (600.0, 800.0, 1200.0),
}


@dataclass(frozen=True)
class SweepConfig:
    width: int
    height: int
    tile: int
    overlap: int
    dtype: str
    decoder: str
    regions: int
    budget_mb: float

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def label(self) -> str:
        return (f"{self.width}x{self.height} t{self.tile}/o{self.overlap} {self.dtype} {self.decoder} "
                f"r{self.regions} b{self.budget_mb:.0f}")


def _rows(text: str) -> tuple[SweepConfig, ...]:
    out = []
    for line in text.strip().splitlines():
        w, h, t, o, d, v, r, b = line.split()
        out.append(SweepConfig(int(w), int(h), int(t), int(o), d, v, int(r), float(b)))
    return tuple(out)


# the base pass runs both steps, the tiled pass one: every stage runs, and no stage's peak depends
# on the number of steps
SWEEP_STEPS = 2

# width height tile overlap dtype decoder regions budget
SWEEP = _rows("""
1024 1024 48 8  bf16 taesd 0 600
1024 1024 48 16 fp32 taesd 3 800
1024 1024 48 32 bf16 full  0 1200
1024 1024 64 8  fp32 full  3 600
1024 1024 64 16 bf16 taesd 3 1200
1024 1024 64 32 fp32 taesd 0 800
1024 1024 96 8  bf16 full  3 800
1024 1024 96 16 fp32 full  0 1200
1024 1024 96 32 bf16 taesd 0 600
1024 1024 48 8  fp32 full  0 800
1024 1024 64 16 bf16 full  0 600
1024 1024 96 16 bf16 taesd 3 800
1024 1024 48 16 bf16 taesd 0 1200
1024 1024 64 32 bf16 full  3 600
1024 1024 96 32 fp32 taesd 3 1200
1024 1024 48 32 fp32 taesd 3 600
1024 1024 64 8  bf16 taesd 0 800
1024 1024 96 8  fp32 taesd 0 600
1024 1024 64 16 fp32 taesd 0 1200
1024 1024 48 16 bf16 full  3 800
2048 2048 64 16 bf16 taesd 0 800
2048 2048 64 16 bf16 taesd 0 600
2048 2048 48 8  fp32 taesd 3 800
2048 2048 96 32 bf16 full  3 1200
2048 2048 64 32 bf16 taesd 3 600
2560 1440 64 16 bf16 taesd 0 800
2560 1440 96 16 fp32 taesd 0 600
2560 1440 48 32 bf16 taesd 3 1200
2560 1440 64 8  bf16 full  0 800
2560 1440 96 8  bf16 taesd 3 600
""")


def region_args(width: int, height: int, n: int) -> list[str]:
    """``n`` (0 or up to 3) region rectangles that tile the canvas's corners: a sky band across
    the top quarter, then the bottom-left and bottom-right quarters. Multiples of 8 px."""
    q = lambda v: v // 8 * 8  # noqa: E731
    rects = [((0, 0, width, q(height // 4)), "a stormy sky"),
             ((0, q(height // 2), q(width // 2), height - q(height // 2)), "a red lighthouse"),
             ((q(width // 2), q(height // 2), width - q(width // 2), height - q(height // 2)), "dark rocks")]
    args = []
    for (x, y, w, h), prompt in rects[:n]:
        args += ["--region", f"{x},{y},{w},{h}:{prompt}"]
    return args


def child_command(cfg: SweepConfig, ckpt: str, out_png: str, report: str, *, steps: int,
                  taesd_dir: str | None) -> list[str]:
    from .run import NEGATIVE, PROMPT

    cmd = [sys.executable, "-m", "lib_hrlr", "generate", "--model", ckpt, "--prompt", PROMPT,
           "--negative", NEGATIVE, "--width", str(cfg.width), "--height", str(cfg.height),
           "--steps", str(steps), "--seed", "1", "--tile", str(cfg.tile), "--overlap", str(cfg.overlap),
           "--dtype", cfg.dtype, "--decoder", cfg.decoder, "--budget-mb", str(cfg.budget_mb),
           "--out", out_png, "--report", report, "--quiet", *region_args(cfg.width, cfg.height, cfg.regions)]
    if cfg.decoder == "taesd" and taesd_dir:
        cmd += ["--taesd-dir", taesd_dir]
    return cmd


def measure(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run ``cmd`` (through :func:`lib_hrlr.bench.child.run_child`, so the peak is the child's
    own and not this process's); its exit code, wall seconds, peak RSS in MB and stderr's tail."""
    from .child import run_child

    with tempfile.TemporaryFile() as err:
        res = run_child(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    return res.returncode, res.wall_s, res.peak_rss_mb, " | ".join(tail)


def run_config(cfg: SweepConfig, ckpt: str, *, steps: int = 2, taesd_dir: str | None = None) -> dict:
    """One configuration measured: ``status`` is ``ok``, ``refused`` (the planner said no before
    starting: exit 2) or ``failed``; ``margin_mb`` = budget − measured peak."""
    with tempfile.TemporaryDirectory(prefix="hrlr-sweep-") as tmp:
        report = os.path.join(tmp, "report.json")
        code, wall, peak, tail = measure(child_command(cfg, ckpt, os.path.join(tmp, "out.png"), report,
                                                       steps=steps, taesd_dir=taesd_dir))
        row = {**asdict(cfg), "status": "ok" if code == 0 else ("refused" if code == 2 else "failed"),
               "wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1)}
        if code == 0:
            with open(report) as fh:
                rep = json.load(fh)
            row["estimate_mb"] = round(max(s["mb"] for s in rep["plan"]["stages"]), 1)
            row["tile_batch"] = rep["plan"]["tile_batch"]
            row["tiles"] = rep["stats"].get("tiles")  # of the tiled pass (0: the base image was the output)
            row["margin_mb"] = round(cfg.budget_mb - peak, 1)
        else:
            row["message"] = tail
    return row


def format_row(r: dict) -> str:
    cfg = SweepConfig(**{k: r[k] for k in SweepConfig.__dataclass_fields__})
    if r["status"] != "ok":
        return f"{cfg.label():<44} {r['status']:>8}  {r.get('message', '')}"
    return (f"{cfg.label():<44} {r['estimate_mb']:>8.1f} {r['peak_rss_mb']:>8.1f} {r['margin_mb']:>8.1f} "
            f"{r['tile_batch']:>5} {r['wall_s']:>7.1f}")


# why a bf16 row is not run on a CPU without AVX512-BF16 or AMX: torch's fallback kernels there
# are two orders of magnitude slower than fp32 (a 320-channel 3x3 convolution on a 64x64 latent,
# 2 samples, 2 threads, AMD EPYC with AVX2: fp32 0.25 s, bf16 52.6 s): hours per row, days for all
SLOW_BF16 = "bf16 needs AVX512-BF16 or AMX (hours per row on this CPU); --sweep-bf16 runs it anyway"


def skipped_row(cfg: SweepConfig, reason: str) -> dict:
    return {**asdict(cfg), "status": "skipped", "message": reason}


def run_sweep(configs, ckpt: str, *, steps: int = 2, taesd_dir: str | None = None, json_path: str | None = None,
              out=None, skip_bf16: bool = False) -> list[dict]:
    """Run ``configs`` in order, printing a row each (and rewriting ``json_path`` after each).
    ``skip_bf16``: report bf16 rows as ``skipped`` (:data:`SLOW_BF16`) without running them."""
    out = out or sys.stdout
    print(f"{'configuration':<44} {'est MB':>8} {'peak MB':>8} {'margin':>8} {'tb':>5} {'wall s':>7}", file=out)
    rows = []
    for cfg in configs:
        if skip_bf16 and cfg.dtype == "bf16":
            rows.append(skipped_row(cfg, SLOW_BF16))
        else:
            rows.append(run_config(cfg, ckpt, steps=steps, taesd_dir=taesd_dir))
        print(format_row(rows[-1]), file=out, flush=True)
        if json_path:  # after every row: a long sweep that is stopped keeps what it measured
            write_json(json_path, rows, indent=1)
    over = [r for r in rows if r["status"] == "ok" and r["margin_mb"] < 0]
    print(f"sweep: {len(rows)} configurations, {sum(r['status'] == 'ok' for r in rows)} ran, "
          f"{sum(r['status'] == 'refused' for r in rows)} refused, {len(over)} over budget, "
          f"{sum(r['status'] == 'failed' for r in rows)} failed, {sum(r['status'] == 'skipped' for r in rows)} skipped",
          file=out)
    return rows


def main_sweep(a) -> int:
    from ..runtime import cpu_has_fast_bf16
    from ..weights.random_checkpoint import cached_random_checkpoint
    from .run import default_taesd_dir

    ckpt = str(cached_random_checkpoint(a.arch))
    configs = SWEEP if not a.sweep_only else tuple(SWEEP[int(i)] for i in a.sweep_only.split(","))
    rows = run_sweep(configs, ckpt, steps=SWEEP_STEPS, taesd_dir=a.taesd_dir or default_taesd_dir(), json_path=a.json,
                     skip_bf16=not (a.sweep_bf16 or cpu_has_fast_bf16()))
    bad = [r for r in rows if r["status"] == "failed" or (r["status"] == "ok" and r["margin_mb"] < 0)]
    return 1 if bad else 0
