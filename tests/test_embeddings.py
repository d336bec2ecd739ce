"""Textual-inversion embeddings: read safely in the webui's and diffusers' formats, expanded to
their vectors in prompts, and encoded exactly as transformers' CLIPTextModel encodes a prompt
whose new tokens were added to its token table."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from lib_hrlr.config.architectures import TINY
from lib_hrlr.errors import CheckpointError, InvalidInput
from lib_hrlr.pipeline import components
from lib_hrlr.text.clip_text import canonical_text_key
from lib_hrlr.text.embeddings import load_embeddings, read_embedding
from lib_hrlr.text.prompts import CHUNK_TOKENS, EMBEDDING_PLACEHOLDER, tokenize_prompt
from lib_hrlr.text.tokenizer import ClipTokenizer
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.random_checkpoint import write_random_checkpoint
from tests.conftest import read_source

transformers = pytest.importorskip("transformers")
HIDDEN = TINY.text.hidden_size


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return open_checkpoint(write_random_checkpoint(tmp_path_factory.mktemp("emb") / "tiny.safetensors", TINY,
                                                   torch.float32, seed=5))


def vectors(n: int, seed: int = 0, width: int = HIDDEN) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_webui_pt(path, vec):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
                "name": "ignored-inner-name", "step": 1500, "sd_checkpoint": "abcdef", "sd_checkpoint_name": "x"}, path)
    return path


# ------------------------------------------------------------------------------------ files
def test_every_format_reads_the_saved_vectors(tmp_path):
    vec = vectors(3)
    cases = {
        "webui.pt": lambda p: write_webui_pt(p, vec),
        "webui.safetensors": lambda p: save_file({"emb_params": vec}, str(p)),
        "diffusers.bin": lambda p: torch.save({"<cat-toy>": vec[0].clone()}, p),
        "diffusers.safetensors": lambda p: save_file({"<cat-toy>": vec.half()}, str(p)),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        emb = read_embedding(path)
        assert emb.name == path.stem
        want = vec[:1] if name == "diffusers.bin" else (vec.half().float() if name.endswith("diffusers.safetensors") else vec)
        assert torch.equal(emb.vectors, want), name


def test_pt_is_read_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, HIDDEN)}, "name": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        read_embedding(path)
    assert "system" in err.value.message and str(path) in err.value.message
    assert not marker.exists()


def test_folder_uses_file_stems_and_skips_other_widths(tmp_path):
    write_webui_pt(tmp_path / "alpha.pt", vectors(2, 1))
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": vectors(1, 2)}, str(tmp_path / "sub" / "beta.safetensors"))
    save_file({"emb_params": vectors(1, 3, width=48)}, str(tmp_path / "xl_size.safetensors"))
    (tmp_path / "notes.txt").write_text("not an embedding")
    found = load_embeddings([str(tmp_path)], HIDDEN)
    assert set(found.by_name) == {"alpha", "beta"}
    assert found.by_name["alpha"].count == 2
    assert len(found.warnings) == 1 and "xl_size" in found.warnings[0]
    with pytest.raises(CheckpointError, match="48 wide"):
        load_embeddings([str(tmp_path / "xl_size.safetensors")], HIDDEN)
    with pytest.raises(InvalidInput) as err:
        load_embeddings([str(tmp_path / "missing.pt")], HIDDEN)
    assert err.value.field == "embedding"


# ------------------------------------------------------------------------------ tokenizing
def test_name_expands_to_its_vectors_and_counts_them(tok):
    emb = {"mystyle": vectors(3)}
    cat = tok.encode("cat")
    p = tokenize_prompt(tok, "mystyle cat", embeddings=emb)
    assert p.token_count == 3 + len(cat)
    chunk = p.chunks[0]
    assert chunk.tokens[:5] == (tok.bos_id, EMBEDDING_PLACEHOLDER, EMBEDDING_PLACEHOLDER, EMBEDDING_PLACEHOLDER, *cat)
    assert chunk.fixes == ((1, "mystyle"),)
    weighted = tokenize_prompt(tok, "(mystyle:1.5) cat", embeddings=emb).chunks[0]
    assert weighted.weights[1:4] == (1.5, 1.5, 1.5) and weighted.fixes == ((1, "mystyle"),)
    # without the embedding the word is ordinary text
    assert tokenize_prompt(tok, "mystyle cat").chunks[0].fixes == ()


def test_embedding_never_straddles_chunks_and_moves_with_comma_backtrack(tok):
    emb = {"mystyle": vectors(3)}
    a = tok.encode("a")[0]
    p = tokenize_prompt(tok, "a " * 73 + "mystyle", embeddings=emb)
    assert len(p.chunks) == 2 and p.token_count == 76
    assert p.chunks[0].fixes == () and p.chunks[1].fixes == ((1, "mystyle"),)
    assert p.chunks[0].tokens[1:74] == (a,) * 73
    # 70 words, a comma, the embedding, two more words: the chunk fills at the first word after
    # it, and the text after the comma (embedding included) moves to the next chunk
    p = tokenize_prompt(tok, "a " * 70 + ", mystyle b c", embeddings=emb)
    b, c = tok.encode("b")[0], tok.encode("c")[0]
    assert p.chunks[0].fixes == () and p.chunks[1].fixes == ((1, "mystyle"),)
    assert p.chunks[1].tokens[:6] == (tok.bos_id, 0, 0, 0, b, c)
    with pytest.raises(InvalidInput):
        tokenize_prompt(tok, "huge", embeddings={"huge": vectors(CHUNK_TOKENS + 1)})


def test_extra_network_tags_never_reach_the_tokenizer(tok):
    plain = tokenize_prompt(tok, "a red balloon")
    tagged = tokenize_prompt(tok, "a <lora:style:0.8>red <hypernet:x:1>balloon")
    assert tagged.chunks == plain.chunks and tagged.token_count == plain.token_count


# -------------------------------------------------------------------------------- encoding
def hf_model_from(ckpt) -> "transformers.CLIPTextModel":
    t = TINY.text
    cfg = transformers.CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                                      intermediate_size=t.intermediate_size, max_position_embeddings=t.max_positions,
                                      layer_norm_eps=t.layer_norm_eps, hidden_act=t.hidden_act)
    model = transformers.CLIPTextModel(cfg).eval()
    sources = ckpt.component("text")
    state = {k: read_source(sources[canonical_text_key(k)]).float() for k in model.state_dict()
             if canonical_text_key(k) in sources}
    missing = set(model.state_dict()) - set(state)
    assert missing <= {"text_model.embeddings.position_ids", "embeddings.position_ids"}, missing
    model.load_state_dict(state, strict=False)
    return model


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_encoding_matches_clip_text_model_with_the_vectors_in_its_token_table(ckpt, tok, clip_skip):
    embs = {"mystyle": vectors(3, 7), "pal": vectors(1, 8)}
    prompt = "a photo of mystyle, with pal and a cat"
    ours = components.encode_text(ckpt, [prompt], clip_skip, torch.float32, torch.device("cpu"), 0,
                                  embeddings=embs)[0]
    # reference: the vectors appended to the token table as new tokens, the prompt's name tokens
    # replaced by the new ids
    ref = hf_model_from(ckpt)
    vocab = TINY.text.vocab_size
    ref.resize_token_embeddings(vocab + 4)
    with torch.no_grad():
        ref.get_input_embeddings().weight[vocab:vocab + 3] = embs["mystyle"]
        ref.get_input_embeddings().weight[vocab + 3] = embs["pal"][0]
    ids = tok.encode(prompt)
    for name, new in (("mystyle", [vocab, vocab + 1, vocab + 2]), ("pal", [vocab + 3])):
        nid = tok.encode(name)
        at = next(i for i in range(len(ids)) if ids[i:i + len(nid)] == nid)
        ids = ids[:at] + new + ids[at + len(nid):]
    row = [tok.bos_id] + ids + [tok.eos_id] * (76 - len(ids))
    with torch.no_grad():
        out = ref(torch.tensor([row]), output_hidden_states=True)
    want = out.last_hidden_state if clip_skip == 1 else getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[-clip_skip])
    diff = (ours - want).abs().max().item()
    print(f"clip_skip {clip_skip}: max abs diff vs transformers with the vectors as tokens {diff:.2e}")
    assert diff < 1e-5
    plain = components.encode_text(ckpt, [prompt], clip_skip, torch.float32, torch.device("cpu"), 0)[0]
    assert (plain - ours).abs().max().item() > 1e-2  # without the embeddings the words are ordinary text
