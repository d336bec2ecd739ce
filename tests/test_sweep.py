"""The budget sweep: its design covers every value of every axis with valid settings, and each
configuration's peak is measured by the kernel in a child process against its budget."""

import pytest

from lib_hrlr.bench.sweep import AXES, SWEEP, SweepConfig, region_args, run_config, run_sweep
from lib_hrlr.config.architectures import SD15
from lib_hrlr.pipeline.params import GenerationParams, validate
from lib_hrlr.tiling.regions import parse_regions
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint


def test_design_has_30_configurations_and_every_value_of_every_axis():
    assert len(SWEEP) >= 30 and len(set(SWEEP)) == len(SWEEP)
    for axis, values in AXES.items():
        seen = {getattr(c, axis) for c in SWEEP}
        assert seen == set(values), (axis, seen)


@pytest.mark.parametrize("cfg", SWEEP, ids=lambda c: c.label().replace(" ", "_"))
def test_every_configuration_is_valid_for_sd15(cfg):
    regions = tuple(parse_regions(region_args(cfg.width, cfg.height, cfg.regions)[1::2]))
    assert len(regions) == cfg.regions
    p = GenerationParams(prompt="x", width=cfg.width, height=cfg.height, tile=cfg.tile, overlap=cfg.overlap,
                         regions=regions, budget_mb=cfg.budget_mb, vae=cfg.decoder)
    validate(p, SD15)  # raises InvalidInput naming the field otherwise


@pytest.fixture(scope="module")
def tiny():
    return str(cached_random_checkpoint("tiny"))


def test_tiny_sweep_measures_each_peak_against_its_budget(tiny, shared_weights, capsys):
    configs = [SweepConfig(256, 256, 16, 4, "fp32", "full", 3, 800.0),
               SweepConfig(256, 192, 16, 8, "fp32", "taesd", 0, 600.0)]
    rows = run_sweep(configs, tiny, taesd_dir=str(shared_weights / "taesd"))
    out = capsys.readouterr().out
    assert "2 configurations, 2 ran, 0 refused, 0 over budget, 0 failed, 0 skipped" in out
    for cfg, row in zip(configs, rows):
        assert row["status"] == "ok", row
        # import torch alone is ~200 MB: the kernel's figure, not a placeholder
        assert 150 < row["peak_rss_mb"] <= cfg.budget_mb
        assert row["margin_mb"] == pytest.approx(cfg.budget_mb - row["peak_rss_mb"], abs=0.11)
        assert row["estimate_mb"] > 150 and row["tile_batch"] >= 1


def test_bf16_rows_are_skipped_with_the_reason_where_bf16_is_slow(tiny, capsys):
    """On a CPU without AVX512-BF16/AMX a bf16 row would take hours: it is reported, not run
    (no child starts, so no peak), and the fp32 row beside it runs as usual."""
    from lib_hrlr.bench.sweep import SLOW_BF16

    configs = [SweepConfig(256, 256, 16, 4, "bf16", "taesd", 0, 800.0),
               SweepConfig(256, 256, 16, 4, "fp32", "full", 0, 60.0)]
    rows = run_sweep(configs, tiny, skip_bf16=True)
    assert rows[0]["status"] == "skipped" and rows[0]["message"] == SLOW_BF16 and "peak_rss_mb" not in rows[0]
    assert rows[1]["status"] == "refused"  # it ran: the planner refused its 60 MB budget
    out = capsys.readouterr().out
    assert "2 configurations, 0 ran, 1 refused, 0 over budget, 0 failed, 1 skipped" in out
    assert "AVX512-BF16" in out.splitlines()[1]


def test_a_budget_the_planner_cannot_meet_is_refused_before_it_starts(tiny):
    row = run_config(SweepConfig(256, 256, 16, 4, "fp32", "full", 0, 60.0), tiny)
    assert row["status"] == "refused" and "budget" in row["message"]
    assert "margin_mb" not in row



def test_the_measured_peak_is_the_childs_own_not_the_parents():
    """A child forked from a large process starts with the parent's high-water mark; the sweep's
    figure must be the child's alone (a bare interpreter: ~10 MB)."""
    import sys

    from lib_hrlr.bench.sweep import measure

    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # touch every page: resident
    code, wall, peak, _ = measure([sys.executable, "-c", "pass"])
    del ballast
    assert code == 0 and 0 < peak < 100, peak
