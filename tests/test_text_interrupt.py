"""Interrupt inside the text stage: a long prompt stops within one 75-token chunk.

Each test first encodes the long prompt to the end (the encoder's call count is the number of
chunks, many), then again with a ``should_stop`` that turns true once the encoder has been
called once: the run raises Interrupted and the encoder has run exactly once more than zero.
The encoders are the real streamed ones on the tiny random checkpoints; a spy wraps their
forward only to count calls."""

from __future__ import annotations

import pytest
import torch

from lib_hrlr.errors import Interrupted
from lib_hrlr.text.clip_text import ClipTextEncoder
from lib_hrlr.weights.checkpoint import FAMILIES, open_checkpoint
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

LONG_PROMPT = ", ".join(f"word{i % 50}" for i in range(300))  # ~900 tokens: a dozen chunks


@pytest.fixture(scope="module")
def tiny():
    return str(cached_random_checkpoint("tiny"))


@pytest.fixture(scope="module")
def tiny_xl():
    return str(cached_random_checkpoint("tiny_xl"))


def _count_calls(monkeypatch, method: str) -> list:
    calls = []
    real = getattr(ClipTextEncoder, method)

    def spy(self, ids, *args, **kwargs):
        calls.append(tuple(ids.shape))
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(ClipTextEncoder, method, spy)
    return calls


def test_sd1_text_stage_stops_after_the_first_chunk(tiny, monkeypatch):
    from lib_hrlr.pipeline.components import encode_text

    ckpt = open_checkpoint(tiny)
    calls = _count_calls(monkeypatch, "forward")
    full = encode_text(ckpt, [LONG_PROMPT, ""], 1, torch.float32, torch.device("cpu"), 0)
    chunks = full[0].shape[1] // 77
    assert chunks >= 10 and len(calls) == chunks  # one batched call per chunk index
    calls.clear()
    polls = []

    def stop():
        polls.append(len(calls))
        return len(calls) >= 1

    with pytest.raises(Interrupted, match=f"after 1 of {chunks} chunks"):
        encode_text(ckpt, [LONG_PROMPT, ""], 1, torch.float32, torch.device("cpu"), 0, should_stop=stop)
    assert len(calls) == 1 and polls == [0, 1]


def test_generate_passes_should_stop_to_the_text_stage(tiny, tmp_path, monkeypatch):
    from lib_hrlr.pipeline.generate import generate
    from lib_hrlr.pipeline.params import GenerationParams

    calls = _count_calls(monkeypatch, "forward")
    out = tmp_path / "o.png"
    with pytest.raises(Interrupted, match="text encoding"):
        generate(GenerationParams(prompt=LONG_PROMPT, width=256, height=256, model=tiny, steps=2, out=str(out),
                                  budget_mb=8000),
                 should_stop=lambda: len(calls) >= 1)
    assert len(calls) == 1
    assert list(tmp_path.iterdir()) == []


def test_sdxl_text_stage_stops_after_the_first_chunk(tiny_xl, monkeypatch):
    from lib_hrlr.pipeline.sdxl_text import encode_text_sdxl

    ckpt = open_checkpoint(tiny_xl, families=FAMILIES)
    calls = _count_calls(monkeypatch, "encode_sdxl")
    full = encode_text_sdxl(ckpt, [LONG_PROMPT, ""], [False, True], torch.float32, torch.device("cpu"))
    chunks = full[0].context.shape[1] // 77
    assert chunks >= 10 and len(calls) == 2 * chunks  # each chunk through both encoders
    calls.clear()
    with pytest.raises(Interrupted, match=f"after 1 of {chunks} chunks"):
        encode_text_sdxl(ckpt, [LONG_PROMPT, ""], [False, True], torch.float32, torch.device("cpu"),
                         should_stop=lambda: len(calls) >= 1)
    assert len(calls) == 1  # the second encoder never started
