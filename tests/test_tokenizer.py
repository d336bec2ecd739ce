import json
import sys
import unicodedata

import pytest

from lib_hrlr.errors import InvalidInput
from lib_hrlr.text.tokenizer import BOS_ID, EOS_ID, ClipTokenizer, normalize, split_pieces

TOKENIZER_DIR = "clip-vit-large-patch14-tokenizer"

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, (ultra-detailed:1.2), 8k uhd, dslr, soft lighting, film grain",
    "Hello, world!!! What's up? I'm fine; you're great -- isn't it? they'll've done it'd",
    "numbers 1234567890 3.14159 1,000,000 -42 +7 1e-5 0x1F 2nd 3rd 21st",
    "multiple     spaces\tand\ttabs\nand\r\nnewlines   ",
    "   leading and trailing   ",
    "",
    "    ",
    "café naïve résumé façade coöperate Ångström Øresund straße ß ẞ",
    "e\u0301 versus \u00e9 (combining accent is composed by NFC)",
    "Ελληνικά ΣΟΦΙΑ σοφία, русский текст, עברית, العربية",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎨🖌️👩‍🎨 🇫🇷 ❤️ ✨✨ 🔥",
    "punctuation ... ?! ;; :: -- __ ** ## @@ $$ %% ^^ && || ~~ `` '' \"\" <<>> {} [] ()",
    "<|startoftext|>inside<|endoftext|> and <|ENDOFTEXT|> and x!<|endoftext|>",
    "snake_case camelCase kebab-case dot.separated path/to/file.png C:\\windows\\path",
    "superscripts x² ½ ¾ Ⅻ ٣ ① and fullwidth ＡＢＣ １２３",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE ''s rock'n'roll",
    "zero\u200bwidth no\u00a0break ideographic\u3000space line\u2028separator",
    "İstanbul ΣΑΣ ǅungla ﬁne ﬀ",
    "control \x00\x01\x1c\x1f\x7f chars",
    "url https://example.com/a?b=c&d=e#f and email me@example.org",
    ("a very long prompt, " * 60) + "end",
    "portrait of a beautiful woman, intricate, elegant, highly detailed, digital painting, artstation, "
    "concept art, smooth, sharp focus, illustration, art by artgerm and greg rutkowski and alphonse mucha",
]


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def hf(shared_weights):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(shared_weights / TOKENIZER_DIR))


def test_known_ids_without_transformers(ours):
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert ours.encode("A <|endoftext|> b") == [320, EOS_ID, 321]
    assert (ours.bos_id, ours.eos_id, ours.comma_id) == (BOS_ID, EOS_ID, 267)
    assert len(ours.vocab) == 49408 and len(ours.ranks) == 48894
    assert ours.encode("") == [] and ours.encode(" \t\n ") == []


def test_tokenizer_imports_neither_transformers_nor_torch():
    import subprocess

    code = ("import sys; from lib_hrlr.text.tokenizer import ClipTokenizer; ClipTokenizer().encode('hi'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'tokenizers', 'regex', 'torch'}))")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "[]"


def test_vocab_equals_the_reference_vocab_json(ours, shared_weights):
    ref = json.loads((shared_weights / TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert ref == ours.vocab


def test_same_ids_as_transformers_on_corpus(ours, hf):
    for text in CORPUS:
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == expected, text
    long = ours.encode(CORPUS[-2])
    assert len(long) > 300  # no truncation


def test_same_ids_as_transformers_on_sampled_code_points(ours, hf):
    """Every 53rd assigned code point, between letters, doubled, upper-cased and after a digit."""
    chars = [chr(c) for c in range(1, 0x30000, 53)
             if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    texts = [f"a{c}b {c}{c.upper()}1'S{c}" for c in chars]
    expected = hf(texts, add_special_tokens=False)["input_ids"]
    mismatches = [(hex(ord(c)), e, ours.encode(t)) for c, t, e in zip(chars, texts, expected) if ours.encode(t) != e]
    assert len(chars) > 2000
    assert mismatches == []


def test_normalize_and_split():
    assert normalize("  A\t\tB\u3000C ΣΑΣ ") == " a b c σασ "
    assert split_pieces("it's 42 x²!? héllo") == ["it", "'s", "4", "2", "x", "²", "!?", "héllo"]


def test_bpe_cache_and_decode(ours):
    first = ours.piece_ids("lighthouse")
    assert ours.piece_ids("lighthouse") is first
    text = "a lighthouse at dusk, 8k"
    assert ours.decode(ours.encode(text)) == "a lighthouse at dusk , 8 k"


def test_non_string_prompt_is_refused(ours):
    with pytest.raises(InvalidInput) as err:
        ours.encode(None)
    assert err.value.field == "prompt"
