"""Prompts the way the AUTOMATIC1111 webui reads them, for SD 1.x.

Emphasis syntax (:func:`parse_emphasis`):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1,
  ``(text:1.3)`` multiplies it by 1.3; brackets nest (weights multiply) and a bracket
  left open runs to the end of the prompt;
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters; any other
  backslash is dropped; a ``)``, ``]`` or ``:1.3)`` that closes nothing is literal text;
* ``BREAK`` (upper case, as a whole word) ends the current 75-token chunk.

Two webui quirks are not reproduced: a ``BREAK`` inside brackets still breaks (the
webui would feed the word "BREAK" to CLIP with a negative weight), and two ``BREAK`` in a
row always give their chunks.

Chunking (:func:`tokenize_prompt`): the fragments are tokenized one by one with CLIP's
tokenizer and their tokens laid out in chunks of 75; each chunk becomes
``BOS + 75 tokens + EOS``, padded with EOS to 77, and carries one weight per token
(1.0 for BOS/EOS/padding).  Like the webui (setting "comma padding backtrack", 20 by
default), when a chunk is full and a comma lies within the last ``comma_backtrack``
tokens, the tokens after that comma move to the next chunk.

Encoding (:func:`encode_prompts`): every chunk goes through the text encoder, its hidden
states are multiplied by the token weights and rescaled so that their mean is the one
before weighting (the webui's "Original" emphasis), and the chunks of a prompt are
concatenated: ``(1, 77 * k, hidden)``, where ``k`` is the same for every prompt of the
call (shorter prompts are completed with empty-prompt chunks).

Extra-network tags (``<lora:name:0.8>``, any ``<word:args>``) are dropped before
tokenizing, as the webui does (:mod:`lib_hrlr.text.extra_networks`).

Textual-inversion embeddings (``embeddings={name: vectors (n, hidden)}``): wherever the
token ids of an embedding's name occur in a fragment (the longest name wins), they are
replaced by ``n`` placeholder tokens carrying the fragment's weight, and the chunk records
a fix ``(position, name)``; an embedding never straddles two chunks (it starts a new one if
it does not fit), and the token count counts its vectors — the webui's rules.  At encoding
the placeholders' token embeddings are replaced by the vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch

from lib_hrlr.errors import Interrupted, InvalidInput
from lib_hrlr.text.extra_networks import strip_network_tags

CHUNK_TOKENS = 75  # prompt tokens per chunk
CHUNK_LENGTH = CHUNK_TOKENS + 2  # with BOS and EOS
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
DEFAULT_COMMA_BACKTRACK = 20

_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"
EMBEDDING_PLACEHOLDER = 0  # the token id under an embedding's vectors (replaced before the encoder)


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    comma_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text with its emphasis weight, or a BREAK (``is_break``)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids (BOS, 75 tokens or EOS padding, EOS) and one weight per id."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()  # (position in the 77, embedding name)


@dataclass(frozen=True)
class EmbeddingSlot:
    """Where an embedding goes in a run of tokens: ``count`` vectors of ``name``."""

    name: str
    count: int


@dataclass(frozen=True)
class TokenizedPrompt:
    text: str
    chunks: tuple[PromptChunk, ...]
    token_count: int  # prompt tokens, BOS/EOS/padding excluded


def parse_emphasis(text: str) -> list[Fragment]:
    """Split a prompt into fragments of equal weight (see the module docstring).

    Adjacent fragments of equal weight are joined, so ``(a)(b)`` gives one fragment
    ``ab``: CLIP tokenizes each fragment on its own, and the webui joins them the same way.
    """
    if not isinstance(text, str):
        raise InvalidInput("prompt", f"must be a string, got {type(text).__name__}")
    texts: list[str] = []
    weights: list[float] = []
    breaks: list[bool] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def add_text(s: str) -> None:
        for k, part in enumerate(_BREAK.split(s)):
            if k:
                texts.append("BREAK")
                weights.append(1.0)
                breaks.append(True)
            texts.append(part)
            weights.append(1.0)
            breaks.append(False)

    def scale(start: int, factor: float) -> None:
        for p in range(start, len(weights)):
            weights[p] *= factor

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 < n and text[i + 1] in "()[]\\":
                texts.append(text[i + 1])
                weights.append(1.0)
                breaks.append(False)
                i += 2
            else:
                i += 1  # a lone backslash is dropped
        elif ch == "(":
            round_open.append(len(texts))
            i += 1
        elif ch == "[":
            square_open.append(len(texts))
            i += 1
        elif ch == ":":
            m = _WEIGHT.match(text, i)
            if m is not None and round_open:
                try:
                    factor = float(m.group(1))
                except ValueError:
                    raise InvalidInput("prompt", f"{m.group(0)!r} at character {i}: the weight must be a "
                                                 "number such as (word:1.3)") from None
                scale(round_open.pop(), factor)
                i = m.end()
            elif m is not None:
                add_text(m.group(0))
                i = m.end()
            else:
                add_text(":")
                i += 1
        elif ch == ")" and round_open:
            scale(round_open.pop(), ROUND_MULTIPLIER)
            i += 1
        elif ch == "]" and square_open:
            scale(square_open.pop(), SQUARE_MULTIPLIER)
            i += 1
        elif ch in ")]":
            add_text(ch)
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    for start in round_open:
        scale(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale(start, SQUARE_MULTIPLIER)

    out: list[Fragment] = []
    for t, w, b in zip(texts, weights, breaks):
        if b:
            out.append(Fragment("BREAK", 1.0, True))
        elif out and not out[-1].is_break and out[-1].weight == w:
            out[-1] = Fragment(out[-1].text + t, w)
        else:
            out.append(Fragment(t, w))
    return out or [Fragment("", 1.0)]


def _check_backtrack(comma_backtrack: int) -> None:
    if (isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int)
            or not 0 <= comma_backtrack <= CHUNK_TOKENS):
        raise InvalidInput("comma_backtrack", f"{comma_backtrack!r}; an integer from 0 to {CHUNK_TOKENS} is allowed")


def chunk_tokens(fragments: Sequence[tuple[Sequence[int | EmbeddingSlot], float] | None], bos: int, eos: int,
                 comma: int, comma_backtrack: int = DEFAULT_COMMA_BACKTRACK) -> list[PromptChunk]:
    """Lay out weighted token runs in chunks; ``None`` in ``fragments`` is a BREAK.

    A run may hold :class:`EmbeddingSlot` items: ``count`` placeholder tokens that stay in one chunk."""
    _check_backtrack(comma_backtrack)
    chunks: list[PromptChunk] = []
    toks: list[int] = []
    ws: list[float] = []
    fixes: list[tuple[int, str]] = []  # (index in toks, name)
    last_comma = -1

    def close() -> None:
        nonlocal toks, ws, fixes, last_comma
        pad = CHUNK_TOKENS - len(toks)
        chunks.append(PromptChunk(tuple([bos, *toks, *[eos] * pad, eos]), tuple([1.0, *ws, *[1.0] * pad, 1.0]),
                                  tuple((i + 1, name) for i, name in fixes)))
        toks, ws, fixes, last_comma = [], [], [], -1

    for frag in fragments:
        if frag is None:
            close()
            continue
        ids, weight = frag
        for t in ids:
            if t == comma:
                last_comma = len(toks)
            elif (comma_backtrack and len(toks) == CHUNK_TOKENS and last_comma != -1
                  and CHUNK_TOKENS - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_t, moved_w = toks[cut:], ws[cut:]
                moved_f = [(i - cut, name) for i, name in fixes if i >= cut]
                toks, ws, fixes = toks[:cut], ws[:cut], [f for f in fixes if f[0] < cut]
                close()
                toks, ws, fixes = moved_t, moved_w, moved_f
            if len(toks) == CHUNK_TOKENS:
                close()
            if isinstance(t, EmbeddingSlot):
                if t.count > CHUNK_TOKENS:
                    raise InvalidInput("embedding", f"{t.name!r} has {t.count} vectors; at most {CHUNK_TOKENS} fit in a chunk")
                if len(toks) + t.count > CHUNK_TOKENS:
                    close()
                fixes.append((len(toks), t.name))
                toks.extend([EMBEDDING_PLACEHOLDER] * t.count)
                ws.extend([weight] * t.count)
                continue
            toks.append(t)
            ws.append(weight)
    if toks or not chunks:
        close()
    return chunks


def empty_chunk(bos: int, eos: int) -> PromptChunk:
    """The chunk of an empty prompt: BOS then 76 EOS, all weights 1."""
    return PromptChunk(tuple([bos] + [eos] * (CHUNK_LENGTH - 1)), tuple([1.0] * CHUNK_LENGTH))


class EmbeddingLookup:
    """Finds embedding names in token ids: the names tokenized once, keyed by their first id."""

    def __init__(self, tokenizer: Tokenizer, counts: Mapping[str, int]):
        self.by_first: dict[int, list[tuple[tuple[int, ...], str, int]]] = {}
        for name, n in counts.items():
            ids = tuple(tokenizer.encode(name))
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name, int(n)))
        for entries in self.by_first.values():
            entries.sort(key=lambda e: -len(e[0]))

    def expand(self, ids: Sequence[int]) -> list[int | EmbeddingSlot]:
        out: list[int | EmbeddingSlot] = []
        i = 0
        while i < len(ids):
            hit = next((e for e in self.by_first.get(ids[i], ()) if tuple(ids[i:i + len(e[0])]) == e[0]), None)
            if hit is None:
                out.append(ids[i])
                i += 1
            else:
                out.append(EmbeddingSlot(hit[1], hit[2]))
                i += len(hit[0])
        return out


def _counts(embeddings: Mapping | None) -> dict[str, int]:
    return {n: (v if isinstance(v, int) else int(v.shape[0])) for n, v in (embeddings or {}).items()}


def tokenize_prompt(tokenizer: Tokenizer, text: str, comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
                    embeddings: Mapping | EmbeddingLookup | None = None) -> TokenizedPrompt:
    """One prompt to its chunks of token ids and weights.

    ``embeddings``: name -> vectors (or vector count), or a ready :class:`EmbeddingLookup`."""
    lookup = embeddings if isinstance(embeddings, EmbeddingLookup) or embeddings is None else \
        EmbeddingLookup(tokenizer, _counts(embeddings))
    runs: list[tuple[list, float] | None] = []
    count = 0
    for frag in parse_emphasis(strip_network_tags(text)):
        if frag.is_break:
            runs.append(None)
        else:
            ids = tokenizer.encode(frag.text)
            items = lookup.expand(ids) if lookup is not None and lookup.by_first else ids
            count += sum(t.count if isinstance(t, EmbeddingSlot) else 1 for t in items)
            runs.append((items, frag.weight))
    chunks = chunk_tokens(runs, tokenizer.bos_id, tokenizer.eos_id, tokenizer.comma_id, comma_backtrack)
    return TokenizedPrompt(text, tuple(chunks), count)


def tokenize_prompts(tokenizer: Tokenizer, prompts: Sequence[str],
                     comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
                     embeddings: Mapping | None = None) -> list[TokenizedPrompt]:
    """Several prompts, every one completed with empty chunks to the same chunk count."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise InvalidInput("prompts", "must be a non-empty list of strings")
    lookup = EmbeddingLookup(tokenizer, _counts(embeddings)) if embeddings else None
    done = [tokenize_prompt(tokenizer, p, comma_backtrack, lookup) for p in prompts]
    k = max(len(p.chunks) for p in done)
    pad = empty_chunk(tokenizer.bos_id, tokenizer.eos_id)
    return [TokenizedPrompt(p.text, p.chunks + (pad,) * (k - len(p.chunks)), p.token_count) for p in done]


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states (..., T, hidden) times per-token ``weights`` (T,), rescaled to the old mean.

    Computed in float32, returned in ``z``'s dtype; all-ones weights return ``z`` itself.
    """
    weights = torch.as_tensor(weights, dtype=torch.float32, device=z.device)
    if weights.shape != z.shape[-2:-1]:
        raise InvalidInput("weights", f"shape {tuple(weights.shape)}; one weight per token ({z.shape[-2]}) needed")
    if bool((weights == 1.0).all()):
        return z
    zf = z.float()
    original_mean = zf.mean()
    zf = zf * weights[:, None]
    zf *= original_mean / zf.mean()
    return zf.to(z.dtype)


def encode_prompts(encoder, prompts: Sequence[str], clip_skip: int = 1, *, tokenizer: Tokenizer | None = None,
                   comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
                   embeddings: Mapping[str, torch.Tensor] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[torch.Tensor]:
    """Condition tensors ``(1, 77 * k, hidden)``, one per prompt, same ``k`` for all.

    ``encoder(input_ids, clip_skip=...)`` is a :class:`~lib_hrlr.text.clip_text.ClipTextEncoder`
    (or anything with that call).  Each chunk index is one batched encoder call over the
    prompts; emphasis is applied per prompt and per chunk.  ``tokenizer`` defaults to
    CLIP's (:class:`~lib_hrlr.text.tokenizer.ClipTokenizer`, loaded for this call).
    ``embeddings`` (name -> vectors (n, hidden)): chunks that use one call
    ``encoder(ids, clip_skip=..., token_vectors=[(row, position, vectors), ...])``.
    ``should_stop()`` is polled before every chunk's encoder call; a true answer raises
    :class:`~lib_hrlr.errors.Interrupted` (a long prompt stops within one chunk).
    """
    if tokenizer is None:
        from lib_hrlr.text.tokenizer import ClipTokenizer

        tokenizer = ClipTokenizer()
    batch = tokenize_prompts(tokenizer, prompts, comma_backtrack, embeddings)
    device = torch.device("cpu")
    for p in encoder.parameters():
        if p.device.type != "meta":
            device = p.device
        break
    pieces: list[list[torch.Tensor]] = [[] for _ in batch]
    with torch.no_grad():
        for i in range(len(batch[0].chunks)):
            if should_stop is not None and should_stop():
                raise Interrupted(f"text encoding stopped by request after {i} of {len(batch[0].chunks)} chunks")
            ids = torch.tensor([p.chunks[i].tokens for p in batch], dtype=torch.long, device=device)
            fixes = [(j, pos, embeddings[name]) for j, p in enumerate(batch) for pos, name in p.chunks[i].fixes]
            z = encoder(ids, clip_skip=clip_skip, token_vectors=fixes) if fixes else encoder(ids, clip_skip=clip_skip)
            for j, p in enumerate(batch):
                pieces[j].append(apply_emphasis(z[j:j + 1], torch.tensor(p.chunks[i].weights)))
            del z
    return [torch.cat(parts, dim=1) for parts in pieces]
