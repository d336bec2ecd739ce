"""The headline promise under test: a 2048² image from the exact SD 1.5 architecture (random
weights) with TAESD, in a child process whose peak resident set the kernel measures, stays
within the budget: the default 800 MB and a tighter 600 MB. ~4 min each on 2 cores."""

import pytest

from lib_hrlr.bench.sweep import SweepConfig, run_config
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("budget_mb", [800.0, 600.0])
def test_2048_sd15_taesd_peak_stays_within_the_budget(budget_mb, shared_weights):
    ckpt = str(cached_random_checkpoint("sd15"))
    row = run_config(SweepConfig(2048, 2048, 64, 16, "auto", "taesd", 0, budget_mb), ckpt,
                     taesd_dir=str(shared_weights / "taesd"))
    print(f"\n2048² SD 1.5 TAESD, budget {budget_mb:.0f} MB: {row}")
    assert row["status"] == "ok", row
    assert row["peak_rss_mb"] <= budget_mb
    # the plan it ran on was within the budget too (the planner adapts before refusing)
    assert row["estimate_mb"] <= budget_mb
