"""SDXL's text conditioning from two encoders, the way the AUTOMATIC1111 webui builds it.

Prompts are read and chunked exactly as for SD 1.x (:mod:`lib_hrlr.text.prompts`: emphasis
syntax, ``BREAK``, 75-token chunks with comma backtracking); then, chunk by chunk:

* CLIP ViT-L/14 gets ``BOS + 75 tokens + EOS`` padded with EOS, and gives its penultimate
  hidden states without the final LayerNorm (768 wide);
* OpenCLIP ViT-bigG/14 gets the same ids with every id after the first EOS replaced by 0,
  OpenCLIP's padding (the webui's ``id_pad = 0`` for this encoder), and gives its
  penultimate hidden states (1280 wide) and its pooled projection;
* each encoder's states get the prompt's emphasis on their own (weights per token, then the
  mean rescaled to the one before weighting), and are concatenated on the channel axis:
  ``context`` (1, 77 k, 2048);
* the pooled output is the first chunk's, without emphasis (the webui's ``zs[0].pooled``).

An empty *negative* prompt is all zeros, context and pooled alike, as the webui does for
SDXL (``force_zero_embeddings=['txt']`` when every negative prompt of the batch is ``""``);
only the pooled text part of the UNet's ADM vector is then zero, the size and crop
embeddings are not.  An empty positive prompt is encoded as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import InvalidInput
from .prompts import DEFAULT_COMMA_BACKTRACK, Tokenizer, apply_emphasis, tokenize_prompts

OPENCLIP_PAD = 0

# (input_ids (B, 77)) -> (hidden (B, 77, width), pooled (B, proj) or None)
SdxlEncoder = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class SdxlCondition:
    context: torch.Tensor  # (1, 77 k, clip-l width + bigG width), float32
    pooled: torch.Tensor  # (1, bigG projection width), float32


def pad_after_eos(tokens: Sequence[int], eos: int, pad: int = OPENCLIP_PAD) -> list[int]:
    """``tokens`` with every id after the first ``eos`` replaced by ``pad``."""
    out = list(tokens)
    if eos in out:
        i = out.index(eos)
        out[i + 1:] = [pad] * (len(out) - i - 1)
    return out


def encode_prompts_sdxl(encoder_l: SdxlEncoder, encoder_g: SdxlEncoder, prompts: Sequence[str], *,
                        zero_if_empty: Sequence[bool] | None = None, tokenizer: Tokenizer | None = None,
                        comma_backtrack: int = DEFAULT_COMMA_BACKTRACK) -> list[SdxlCondition]:
    """One :class:`SdxlCondition` per prompt, every context with the same chunk count ``k``.

    ``encoder_l`` / ``encoder_g``: ``ids -> (penultimate hidden, pooled)`` (e.g.
    :meth:`~lib_hrlr.text.clip_text.ClipTextEncoder.encode_sdxl`); each chunk index is one
    batched call of each.  ``zero_if_empty[i]``: prompt ``i`` is a negative prompt, so an
    empty one gives zeros (see the module docstring).
    """
    if tokenizer is None:
        from .tokenizer import ClipTokenizer

        tokenizer = ClipTokenizer()
    batch = tokenize_prompts(tokenizer, prompts, comma_backtrack)
    flags = [False] * len(batch) if zero_if_empty is None else list(zero_if_empty)
    if len(flags) != len(batch) or not all(isinstance(f, bool) for f in flags):
        raise InvalidInput("zero_if_empty", f"needs one bool per prompt ({len(batch)})")
    eos = tokenizer.eos_id
    pieces: list[list[torch.Tensor]] = [[] for _ in batch]
    pooled: torch.Tensor | None = None
    with torch.no_grad():
        for i in range(len(batch[0].chunks)):
            ids_l = torch.tensor([p.chunks[i].tokens for p in batch], dtype=torch.long)
            ids_g = torch.tensor([pad_after_eos(p.chunks[i].tokens, eos) for p in batch], dtype=torch.long)
            z_l, _ = encoder_l(ids_l)
            z_g, pooled_i = encoder_g(ids_g)
            if pooled_i is None:
                raise InvalidInput("encoder_g", "the second SDXL text encoder must return a pooled projection")
            if i == 0:
                pooled = pooled_i.float()
            for j, p in enumerate(batch):
                w = torch.tensor(p.chunks[i].weights)
                pieces[j].append(torch.cat([apply_emphasis(z_l[j:j + 1].float(), w),
                                            apply_emphasis(z_g[j:j + 1].float(), w)], dim=-1))
            del z_l, z_g
    out = []
    for j, p in enumerate(batch):
        context = torch.cat(pieces[j], dim=1)
        pool = pooled[j:j + 1]
        if flags[j] and p.text == "":
            context, pool = torch.zeros_like(context), torch.zeros_like(pool)
        out.append(SdxlCondition(context, pool))
    return out
