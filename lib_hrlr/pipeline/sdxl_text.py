"""SDXL's text stage: both text encoders streamed from the checkpoint, layer by layer.

Each encoder is built on ``meta`` and streamed by a :class:`WeightStreamer` like SD 1.x's
(one layer's weights resident at a time, plus the cache the budget allows); the token
embedding tables are never loaded: the rows the prompts use are read from the file
(:func:`~lib_hrlr.text.token_rows.read_token_rows`; bigG's table is 126 MB in fp16).  The
ViT-L encoder runs first and is released before bigG starts.  Conditioning is assembled as
the webui does (:mod:`lib_hrlr.text.sdxl_conditioning`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import Interrupted, InvalidInput
from ..text.sdxl_conditioning import SdxlCondition, encode_prompts_sdxl
from ..weights.checkpoint import Checkpoint
from ..weights.streaming import WeightStreamer

TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"


def _run_streamed(ckpt: Checkpoint, comp: str, calls: list[torch.Tensor], dtype: torch.dtype, device: torch.device,
                  cache_bytes: int, should_stop=None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    from ..text.clip_text import ClipTextEncoder
    from ..text.token_rows import read_token_rows

    cfg = ckpt.config.text if comp == "text" else ckpt.config.text2
    with torch.device("meta"):
        enc = ClipTextEncoder(cfg).eval()
    if enc.text_projection is not None:
        enc.text_projection.transposed = f"{comp}.text_projection.weight" in ckpt.transposed
    sources = ckpt.component(comp)
    out = []
    with torch.inference_mode(), WeightStreamer(enc, sources, dtype=dtype, device=device, cache_bytes=cache_bytes):
        for i, ids in enumerate(calls):
            if should_stop is not None and should_stop():
                raise Interrupted(f"text encoding stopped by request after {i} of {len(calls)} chunks ({comp})")
            rows = read_token_rows(sources[TOKEN_EMBEDDING], ids, dtype).to(device)
            hidden, pooled = enc.encode_sdxl(ids.to(device), token_embeds=rows)
            out.append((hidden.float().cpu(), None if pooled is None else pooled.float().cpu()))
    return out


def encode_text_sdxl(ckpt: Checkpoint, prompts: Sequence[str], zero_if_empty: Sequence[bool] | None, dtype: torch.dtype,
                     device: torch.device, cache_bytes: int = 0, should_stop=None) -> list[SdxlCondition]:
    """One :class:`SdxlCondition` (context (1, 77 k, 2048), pooled (1, 1280); float32, CPU) per prompt.

    ``should_stop()``: polled before every chunk's call of either encoder (Interrupted)."""
    if ckpt.config.text2 is None:
        raise InvalidInput("model", f"'{ckpt.name}' is not an SDXL model: it has one text encoder")
    from ..text.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer()
    # first pass: which ids each encoder is called with (tokenizing is cheap; the encoders are not built)
    rec_l, rec_g = _Replay(), _Replay()
    encode_prompts_sdxl(rec_l, rec_g, prompts, zero_if_empty=zero_if_empty, tokenizer=tokenizer)
    rec_l.answers = _run_streamed(ckpt, "text", rec_l.calls, dtype, device, cache_bytes, should_stop)
    rec_g.answers = _run_streamed(ckpt, "text2", rec_g.calls, dtype, device, cache_bytes, should_stop)
    return encode_prompts_sdxl(rec_l, rec_g, prompts, zero_if_empty=zero_if_empty, tokenizer=tokenizer)


class _Replay:
    """Records the ids it is called with (while ``answers`` is None), then answers the same
    calls in the same order with ``answers``."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []
        self.answers: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._next = 0

    def __call__(self, ids: torch.Tensor):
        if self.answers is None:
            self.calls.append(ids.clone())
            return torch.ones(ids.shape[0], ids.shape[1], 1), torch.ones(ids.shape[0], 1)  # placeholders
        expected = self.calls[self._next]
        if not torch.equal(expected, ids):
            raise RuntimeError("SDXL text encoding replayed different token ids")
        answer = self.answers[self._next]
        self._next += 1
        return answer
