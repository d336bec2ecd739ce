import pytest
import torch

from lib_hrlr.config.architectures import TINY
from lib_hrlr.errors import InvalidInput
from lib_hrlr.text.clip_text import ClipTextEncoder
from lib_hrlr.text.prompts import (
    CHUNK_LENGTH,
    Fragment,
    empty_chunk,
    encode_prompts,
    parse_emphasis,
    tokenize_prompt,
    tokenize_prompts,
)
from lib_hrlr.text.tokenizer import BOS_ID, EOS_ID, ClipTokenizer

BREAK = Fragment("BREAK", 1.0, True)


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = ClipTextEncoder(TINY.text).eval()
    with torch.no_grad():  # a final LayerNorm with zero bias gives hidden states of mean ~0,
        enc.text_model.final_layer_norm.bias.uniform_(0.1, 0.5)  # where "keep the mean" means little
    return enc


def pairs(text):
    return [(f.text, f.weight) if not f.is_break else "BREAK" for f in parse_emphasis(text)]


def test_parse_emphasis_like_the_webui():
    assert pairs("normal text") == [("normal text", 1.0)]
    assert pairs("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert pairs("(unbalanced") == [("unbalanced", 1.1)]
    assert pairs("\\(literal\\]") == [("(literal]", 1.0)]
    assert pairs("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]
    assert pairs("[[faded]]") == [("faded", 1 / 1.1 / 1.1)]
    assert pairs("(a : 1.5 ) (b:-0.25)") == [("a ", 1.5), (" ", 1.0), ("b", -0.25)]
    assert pairs("x:1.3) y ) ] : z") == [("x:1.3) y ) ] : z", 1.0)]  # closes nothing: literal
    assert pairs("back\\slash \\\\ kept") == [("backslash \\ kept", 1.0)]
    assert pairs("") == [("", 1.0)]


def test_parse_break():
    assert pairs("a cat BREAK a dog") == [("a cat", 1.0), "BREAK", ("a dog", 1.0)]
    assert pairs("BREAKING news,BREAK,x") == [("BREAKING news,", 1.0), "BREAK", (",x", 1.0)]
    assert pairs("(a BREAK b)") == [("a", 1.1), "BREAK", ("b", 1.1)]
    assert parse_emphasis("BREAK")[1] == BREAK


def test_bad_weight_is_refused():
    with pytest.raises(InvalidInput) as err:
        parse_emphasis("(cat:1.2.3)")
    assert err.value.field == "prompt" and "1.2.3" in err.value.message


def real_tokens(chunk):
    """The prompt tokens of a chunk: between BOS and the first EOS."""
    assert chunk.tokens[0] == BOS_ID and chunk.tokens[-1] == EOS_ID and len(chunk.tokens) == CHUNK_LENGTH
    body = list(chunk.tokens[1:-1])
    return body[: body.index(EOS_ID)] if EOS_ID in body else body


def test_chunk_boundaries(tok):
    cat = tok.encode("cat")[0]
    exact = tokenize_prompt(tok, "cat " * 75)
    assert len(exact.chunks) == 1 and real_tokens(exact.chunks[0]) == [cat] * 75 and exact.token_count == 75
    over = tokenize_prompt(tok, "cat " * 76)
    assert [len(real_tokens(c)) for c in over.chunks] == [75, 1]
    assert over.chunks[1].tokens[:3] == (BOS_ID, cat, EOS_ID) and over.token_count == 76
    empty = tokenize_prompt(tok, "")
    assert empty.chunks == (empty_chunk(BOS_ID, EOS_ID),) and empty.token_count == 0
    assert empty.chunks[0].tokens == (BOS_ID,) + (EOS_ID,) * 76


def test_break_chunks(tok):
    assert [real_tokens(c) for c in tokenize_prompt(tok, "a BREAK b").chunks] == [[320], [321]]
    assert [real_tokens(c) for c in tokenize_prompt(tok, "BREAK a").chunks] == [[], [320]]
    assert [real_tokens(c) for c in tokenize_prompt(tok, "a BREAK").chunks] == [[320]]
    assert [real_tokens(c) for c in tokenize_prompt(tok, "a BREAK BREAK b").chunks] == [[320], [], [321]]


def test_comma_backtrack(tok):
    text = "word " * 70 + ", " + "w " * 10
    moved = tokenize_prompt(tok, text)
    assert [len(real_tokens(c)) for c in moved.chunks] == [71, 10]
    assert real_tokens(moved.chunks[0])[-1] == tok.comma_id
    plain = tokenize_prompt(tok, text, comma_backtrack=0)
    assert [len(real_tokens(c)) for c in plain.chunks] == [75, 6]
    far = tokenize_prompt(tok, "word " * 50 + ", " + "w " * 30, comma_backtrack=20)  # comma 24 back
    assert [len(real_tokens(c)) for c in far.chunks] == [75, 6]


def test_weights_follow_their_tokens(tok):
    p = tokenize_prompt(tok, "a (red:1.5) [cat] on a mat")
    chunk = p.chunks[0]
    ids = real_tokens(chunk)
    assert ids == tok.encode("a red cat on a mat")
    weights = chunk.weights[1:1 + len(ids)]
    assert weights == (1.0, 1.5, 1 / 1.1, 1.0, 1.0, 1.0)
    assert chunk.weights[0] == 1.0 and set(chunk.weights[1 + len(ids):]) == {1.0}


def test_prompts_are_padded_to_the_same_chunk_count(tok):
    batch = tokenize_prompts(tok, ["a cat", "cat " * 80, "x BREAK y BREAK z"])
    assert [len(p.chunks) for p in batch] == [3, 3, 3]
    assert batch[0].chunks[1] == batch[0].chunks[2] == empty_chunk(BOS_ID, EOS_ID)
    assert batch[1].chunks[2] == empty_chunk(BOS_ID, EOS_ID)
    assert [p.token_count for p in batch] == [2, 80, 3]


def test_encode_prompts_applies_emphasis_keeping_the_mean(tok, encoder):
    prompts = ["a (red:1.5) [cat] BREAK sitting on a mat", "a red cat"]
    out = encode_prompts(encoder, prompts, tokenizer=tok)
    assert [tuple(o.shape) for o in out] == [(1, 154, 32), (1, 154, 32)]
    batch = tokenize_prompts(tok, prompts)
    with torch.no_grad():
        raw = [encoder(torch.tensor([p.chunks[i].tokens]))[0] for p in batch for i in range(2)]
    weighted, second, plain, pad = out[0][0, :77], out[0][0, 77:], out[1][0, :77], out[1][0, 77:]
    # the mean over the chunk is what it was before weighting
    assert raw[0].mean().item() > 0.1
    assert weighted.mean().item() == pytest.approx(raw[0].mean().item(), rel=1e-5)
    # every token is scaled by weight * (one common factor)
    ratio = (weighted / raw[0]).median(dim=1).values
    factor = ratio[0].item()
    assert abs(factor - 1.0) > 1e-4  # the rescaling did something
    assert ratio[2].item() == pytest.approx(1.5 * factor, rel=1e-5)
    assert ratio[3].item() == pytest.approx(factor / 1.1, rel=1e-5)
    assert torch.allclose(ratio[[0, 1, 4, 10, 76]], torch.full((5,), factor), rtol=1e-5)
    # unweighted chunks are the encoder's output itself
    assert torch.equal(second, raw[1]) and torch.equal(plain, raw[2]) and torch.equal(pad, raw[3])
    # padding chunk == empty prompt; a prompt alone equals itself in a batch
    alone = encode_prompts(encoder, ["a red cat"], tokenizer=tok)[0]
    assert torch.equal(alone[0], plain)


def test_clip_skip_reaches_the_encoder(tok, encoder):
    out = encode_prompts(encoder, ["a cat"], clip_skip=2, tokenizer=tok)[0]
    ids = torch.tensor([tokenize_prompt(tok, "a cat").chunks[0].tokens])
    with torch.no_grad():
        assert torch.equal(out, encoder(ids, clip_skip=2))
        assert not torch.equal(out, encoder(ids))


def test_bad_arguments_name_the_field(tok, encoder):
    for call, field in [
        (lambda: tokenize_prompts(tok, []), "prompts"),
        (lambda: tokenize_prompts(tok, "a cat"), "prompts"),
        (lambda: tokenize_prompt(tok, "a", comma_backtrack=-1), "comma_backtrack"),
        (lambda: tokenize_prompt(tok, 3), "prompt"),
        (lambda: encode_prompts(encoder, ["a"], clip_skip=5, tokenizer=tok), "clip_skip"),
    ]:
        with pytest.raises(InvalidInput) as err:
            call()
        assert err.value.field == field
