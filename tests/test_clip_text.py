import dataclasses

import pytest
import torch

from lib_hrlr.config.architectures import SD15, TINY, TextEncoderConfig
from lib_hrlr.errors import InvalidInput
from lib_hrlr.text.clip_text import ClipTextEncoder, canonical_text_key, ignorable_text_keys

transformers = pytest.importorskip("transformers")


def hf_config(cfg: TextEncoderConfig):
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
    )


def paired(cfg: TextEncoderConfig):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(hf_config(cfg)).eval()
    with torch.no_grad():  # default init leaves LayerNorms at 1/0 and biases at 0
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
    ours = ClipTextEncoder(cfg).eval()
    # transformers >= 5 names its modules without "text_model." (its files still have it)
    state = {canonical_text_key(k): v for k, v in ref.state_dict().items() if k not in ignorable_text_keys()}
    ours.load_state_dict(state, strict=True)
    return ref, ours


@pytest.mark.parametrize("cfg", [TINY.text, dataclasses.replace(TINY.text, num_layers=3, hidden_act="gelu")],
                         ids=["tiny", "gelu"])
def test_matches_transformers_clip_text_model(cfg):
    ref, ours = paired(cfg)
    g = torch.Generator().manual_seed(1)
    for length in (77, 9):
        ids = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
        with torch.no_grad():
            out = ref(input_ids=ids, output_hidden_states=True)
            last = ours(ids)
            skip2 = ours(ids, clip_skip=2)
            skip3 = ours(ids, clip_skip=cfg.num_layers)
        assert last.shape == (2, length, cfg.hidden_size)
        assert (last - out.last_hidden_state).abs().max().item() <= 1e-5
        # webui clip skip: hidden_states[-n] then final_layer_norm
        with torch.no_grad():
            ref2 = ref.final_layer_norm(out.hidden_states[-2])
            ref_first = ref.final_layer_norm(out.hidden_states[1])
        assert (skip2 - ref2).abs().max().item() <= 1e-5
        assert (skip3 - ref_first).abs().max().item() <= 1e-5
        assert (skip2 - last).abs().max().item() > 0.1  # a different layer indeed


def test_causal_mask():
    _, ours = paired(TINY.text)
    ids = torch.randint(0, 49408, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 12:] = 7
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 0.1


def test_clip_l_on_meta_is_in_bijection_with_transformers():
    cfg = SD15.text
    with torch.device("meta"):
        ours = ClipTextEncoder(cfg)
        ref = transformers.CLIPTextModel(hf_config(cfg))
    assert all(p.device.type == "meta" for p in ours.parameters())
    ours_shapes = {k: tuple(p.shape) for k, p in ours.named_parameters()}
    ref_shapes = {canonical_text_key(k): tuple(p.shape) for k, p in ref.named_parameters()}
    assert ours_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    assert "text_model.embeddings.position_ids" in ignorable_text_keys()
    assert "text_model.embeddings.position_ids" not in dict(ours.named_buffers())
    assert ours_shapes["text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)


def test_clip_l_config_from_shared_tokenizer_folder(shared_weights):
    hf = transformers.CLIPTextConfig.from_pretrained(shared_weights / "clip-vit-large-patch14-tokenizer")
    cfg = SD15.text
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size,
            hf.max_position_embeddings, hf.hidden_act) == (cfg.vocab_size, cfg.hidden_size, cfg.num_layers,
                                                            cfg.num_heads, cfg.intermediate_size,
                                                            cfg.max_positions, cfg.hidden_act)


def test_bad_inputs_name_the_field():
    enc = ClipTextEncoder(TINY.text)
    ids = torch.zeros(1, 5, dtype=torch.long)
    cases = [
        (lambda: enc(ids, clip_skip=0), "clip_skip"),
        (lambda: enc(ids, clip_skip=3), "clip_skip"),
        (lambda: enc(torch.zeros(1, 78, dtype=torch.long)), "input_ids"),
        (lambda: enc(torch.full((1, 3), 49408)), "input_ids"),
        (lambda: enc(torch.zeros(5, dtype=torch.long)), "input_ids"),
        (lambda: ClipTextEncoder(dataclasses.replace(TINY.text, hidden_act="relu")), "hidden_act"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidInput) as err:
            call()
        assert err.value.field == field
