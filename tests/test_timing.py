"""The in-run UNet timing: the first call's compute per sample, its weight loading excluded."""

import time
from types import SimpleNamespace

import torch

from lib_hrlr.pipeline.timing import FirstCallTimer, per_sample_seconds


class SlowEps:
    """An eps whose calls spend ``load`` seconds 'loading' (counted in its streamer's stats,
    as the weight streamer does) and ``compute`` seconds computing."""

    def __init__(self, load: float, compute: float):
        self.load, self.compute = load, compute
        self.streamer = SimpleNamespace(stats=SimpleNamespace(load_seconds=0.0, wait_seconds=0.0))
        self.calls = 0

    def __call__(self, x, t, ctx):
        self.calls += 1
        time.sleep(self.load)
        self.streamer.stats.load_seconds += self.load
        time.sleep(self.compute)
        return x


def test_first_call_is_timed_without_its_loads_and_later_calls_pass_through():
    totals = {}
    eps = SlowEps(load=0.3, compute=0.1)
    timer = FirstCallTimer(eps, torch.device("cpu"), totals)
    x = torch.zeros(4, 4, 8, 8)
    assert timer(x, None, None) is x
    timer(x, None, None)
    assert eps.calls == 2 and totals["samples"] == 4
    assert 0.1 <= totals["seconds"] < 0.2  # the 0.3 s of loading is not in it
    # a second stage's first call adds to the same totals: the mean per sample over both
    FirstCallTimer(SlowEps(load=0.0, compute=0.2), torch.device("cpu"), totals)(x[:2], None, None)
    assert totals["samples"] == 6
    assert 0.3 / 6 <= per_sample_seconds(totals) < 0.45 / 6
    assert per_sample_seconds({}) is None


def test_resident_models_without_a_streamer_are_timed_whole():
    totals = {}
    FirstCallTimer(lambda x, t, c: (time.sleep(0.1), x)[1], torch.device("cpu"), totals)(torch.zeros(2, 1), None, None)
    assert totals["samples"] == 2 and 0.1 <= totals["seconds"] < 0.2
