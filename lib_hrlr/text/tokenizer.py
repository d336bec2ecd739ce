"""The CLIP byte-level BPE tokenizer, without ``transformers`` (which costs ~100 MB RSS).

Behaviour matches ``transformers.CLIPTokenizer`` (the ``tokenizers``-backed one of
transformers 5) id for id:

0. the literal (case-sensitive) strings ``<|startoftext|>`` and ``<|endoftext|>`` are cut
   out of the raw text and become their ids; every text segment between them goes on
   alone;
1. text is normalised: Unicode NFC, every run of whitespace becomes one space, then
   lower case (character by character: no final-sigma rule);
2. it is split into pieces: the contractions ``'s 't 're
   've 'm 'll 'd``, runs of letters (Unicode category L*), single digits (category N*),
   and runs of anything else that is neither whitespace, letter nor digit; whitespace is
   dropped (a special-token string left in the text, such as a lower-cased
   ``<|ENDOFTEXT|>``, is ordinary text: ``<|``, ``endoftext``, ``|>``, as
   ``tokenizers`` splits it);
3. each piece is turned into its UTF-8 bytes, each byte into one printable unicode
   character (the GPT-2 byte-to-unicode table), the last character gets ``</w>``, and the
   pairs are merged by rank of the merges list until no listed pair is left.

The vocabulary is derived from the merges as CLIP does: the 256 byte characters, the
same with ``</w>``, one entry per merge, then ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407).  No regular-expression module with ``\\p{L}`` is needed: the
splitter walks the text with :func:`unicodedata.category`.

Checked against it on every code point (each between letters, doubled, upper-cased, next
to digits and apostrophes): the only differences are the code points that Python 3.11's
Unicode 14 database does not assign yet (newer ones that ``tokenizers`` knows as
letters); they split differently.
"""

from __future__ import annotations

import gzip
import pathlib
import unicodedata
from typing import Iterable

from lib_hrlr.errors import InvalidInput

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
END_OF_WORD = "</w>"
DEFAULT_MERGES = pathlib.Path(__file__).resolve().parent / "assets" / "clip_merges.txt.gz"
# the first 49152 - 256 - 2 merges of the file are CLIP's vocabulary
NUM_MERGES = 49152 - 256 - 2
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
# Unicode White_Space, which is what the normaliser's and the splitter's ``\s`` match
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_CACHE_LIMIT = 20_000


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: every byte to a printable, non-whitespace unicode character.

    Bytes that are already printable latin-1 characters map to themselves; the others
    (control characters, space, soft hyphen...) map to U+0100 onwards in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}  # insertion order is the vocabulary order
    others = [b for b in range(256) if b not in table]
    for n, b in enumerate(others):
        table[b] = chr(256 + n)
    return table


def read_merges(path: str | pathlib.Path = DEFAULT_MERGES) -> list[tuple[str, str]]:
    """The merge pairs of a CLIP merges file (gzipped or plain), header line skipped."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    pairs = []
    for line in lines[:NUM_MERGES]:
        if not line:
            continue
        a, _, b = line.partition(" ")
        pairs.append((a, b))
    return pairs


def build_vocab(merges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary from its merges (see the module docstring for the order)."""
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(p) for p in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def normalize(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, lower case."""
    text = unicodedata.normalize("NFC", text)
    out = []
    in_space = False
    for ch in text:
        if ch in _WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch)
            in_space = False
    text = "".join(out)
    # per character: Python's str.lower() alone would apply the final-sigma rule
    return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


def _kind(ch: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'o' anything else."""
    if ch in _WHITESPACE:
        return "s"
    cat = unicodedata.category(ch)[0]
    return cat if cat in ("L", "N") else "o"


def split_special(text: str) -> list[tuple[str, bool]]:
    """Cut the raw text at the exact (case-sensitive) special-token strings.

    Returns ``(segment, is_special)`` pairs.  Only the literal strings are special: a
    ``<|ENDOFTEXT|>`` that becomes ``<|endoftext|>`` by lower-casing is ordinary text.
    """
    out: list[tuple[str, bool]] = []
    start = i = 0
    while True:
        hits = [(text.find(t, i), t) for t in (BOS_TOKEN, EOS_TOKEN)]
        hits = [h for h in hits if h[0] >= 0]
        if not hits:
            break
        pos, tok = min(hits)
        if pos > start:
            out.append((text[start:pos], False))
        out.append((tok, True))
        start = i = pos + len(tok)
    if start < len(text):
        out.append((text[start:], False))
    return out


def split_pieces(text: str) -> list[str]:
    """Split normalised text into pre-tokens (the pattern of the module docstring, step 2)."""
    pieces = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "'":
            found = next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None)
            if found is not None:
                pieces.append(text[i:i + 1 + len(found)])
                i += 1 + len(found)
                continue
        kind = _kind(ch)
        if kind == "s":
            i += 1
        elif kind == "N":
            pieces.append(ch)
            i += 1
        else:  # a run of letters, or a run of "other" characters
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            pieces.append(text[i:j])
            i = j
    return pieces


class ClipTokenizer:
    """CLIP's tokenizer; ``encode(text)`` gives ids without BOS/EOS, like the webui uses it.

    Holds an instance-level cache of BPE results per piece (bounded in size).
    """

    def __init__(self, merges_path: str | pathlib.Path = DEFAULT_MERGES):
        try:
            merges = read_merges(merges_path)
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise InvalidInput("merges_path", f"cannot read CLIP merges from {merges_path}: {e}") from None
        self.ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.vocab: dict[str, int] = build_vocab(merges)
        self.byte_chars: tuple[str, ...] = tuple(byte_to_unicode()[b] for b in range(256))
        self._cache: dict[str, tuple[int, ...]] = {}
        if len(self.vocab) != 49408:
            raise InvalidInput("merges_path",
                               f"{merges_path} gives a vocabulary of {len(self.vocab)} tokens, CLIP's has 49408")

    @property
    def bos_id(self) -> int:
        return self.vocab[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS_TOKEN]

    @property
    def comma_id(self) -> int:
        return self.vocab["," + END_OF_WORD]

    def bpe(self, symbols: list[str]) -> list[str]:
        """Merge adjacent symbols by merge rank (lowest first, every occurrence, left to right)."""
        ranks = self.ranks
        while len(symbols) > 1:
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            first, second = best
            merged = first + second
            out = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def piece_ids(self, piece: str) -> tuple[int, ...]:
        """Token ids of one pre-token (cached)."""
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        chars = [self.byte_chars[b] for b in piece.encode("utf-8")]
        chars[-1] += END_OF_WORD
        ids = tuple(self.vocab[s] for s in self.bpe(chars))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise InvalidInput("prompt", f"must be a string, got {type(text).__name__}")
        ids: list[int] = []
        for segment, special in split_special(text):
            if special:
                ids.append(self.vocab[segment])
                continue
            for piece in split_pieces(normalize(segment)):
                ids.extend(self.piece_ids(piece))
        return ids

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text back from ids (lower-cased, spaces where words ended); for display only."""
        inverse = {i: t for t, i in self.vocab.items()}
        byte_of = {c: b for b, c in enumerate(self.byte_chars)}
        text = "".join(inverse[i] for i in ids if i not in (self.bos_id, self.eos_id))
        out = bytearray()
        for part in text.replace(END_OF_WORD, " "):
            out.extend(part.encode("utf-8") if part == " " else bytes([byte_of[part]]))
        return out.decode("utf-8", errors="replace").strip()
