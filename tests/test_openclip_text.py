"""SDXL's text side: the OpenCLIP ViT-bigG/14 text tower (tiny config) against transformers'
CLIPTextModelWithProjection, loaded from OpenCLIP-named weights (packed in_proj, transposed
projection) and streamed with the token embedding read row by row; and the two-encoder SDXL
conditioning against transformers' models driven by hand the way the webui drives them."""

import pytest
import torch

from lib_hrlr.config.architectures import SDXL, TINY_XL
from lib_hrlr.text.clip_text import ClipTextEncoder, canonical_text_key, ignorable_text_keys
from lib_hrlr.text.openclip import openclip_text_infos
from lib_hrlr.text.sdxl_conditioning import encode_prompts_sdxl, pad_after_eos
from lib_hrlr.text.token_rows import read_token_rows
from lib_hrlr.text.tokenizer import ClipTokenizer
from lib_hrlr.weights.safetensors_file import TensorSource, read_header
from lib_hrlr.weights.streaming import WeightStreamer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

EOS = 49407


def hf_model(cfg, projection: bool, seed: int):
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
              max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
              eos_token_id=EOS, bos_token_id=49406, pad_token_id=0)
    torch.manual_seed(seed)
    if projection:
        model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(projection_dim=cfg.projection_dim, **kw))
    else:
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
    return model.eval()


def hf_state(model):
    return {canonical_text_key(k) if not k.startswith("text_projection") else k: v
            for k, v in model.state_dict().items() if k not in ignorable_text_keys()}


def ids_batch():
    g = torch.Generator().manual_seed(3)
    a = [49406, *torch.randint(300, 40000, (20,), generator=g).tolist(), EOS] + [EOS] * 55
    b = [49406, *torch.randint(300, 40000, (75,), generator=g).tolist(), EOS]
    return torch.tensor([pad_after_eos(a, EOS), b])


def openclip_state(state):
    """transformers' names -> OpenCLIP's, as in an SDXL single file (the published relation:
    in_proj = cat(q, k, v), text_projection = W^T)."""
    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].t().contiguous(),
           "logit_scale": torch.tensor(4.6)}
    i = 0
    while f"text_model.encoder.layers.{i}.mlp.fc1.weight" in state:
        s, d = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours, theirs in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            for leaf in ("weight", "bias"):
                out[f"{d}{theirs}.{leaf}"] = state[f"{s}{ours}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{d}attn.in_proj_{leaf}"] = torch.cat([state[f"{s}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
        i += 1
    return out


def test_bigg_tower_matches_transformers_with_projection():
    cfg = TINY_XL.text2
    ref = hf_model(cfg, True, 0)
    ours = ClipTextEncoder(cfg).eval()
    ours.load_state_dict(hf_state(ref), strict=True)
    ids = ids_batch()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours.encode_sdxl(ids)
    dh = (hidden - out.hidden_states[-2]).abs().max().item()
    dp = (pooled - out.text_embeds).abs().max().item()
    print(f"bigG tiny: max |hidden - hf| = {dh:.2e}, max |pooled - hf text_embeds| = {dp:.2e}")
    assert pooled.shape == (2, 40) and out.text_embeds.abs().max() > 0.1
    assert dh <= 1e-5 and dp <= 1e-5


def test_clip_l_sdxl_hidden_is_penultimate_without_final_norm():
    cfg = TINY_XL.text
    ref = hf_model(cfg, False, 1)
    ours = ClipTextEncoder(cfg).eval()
    ours.load_state_dict(hf_state(ref), strict=True)
    ids = ids_batch()
    with torch.no_grad():
        hidden, pooled = ours.encode_sdxl(ids)
        expected = ref(ids, output_hidden_states=True).hidden_states[-2]
    assert pooled is None
    assert (hidden - expected).abs().max().item() <= 1e-5


def test_openclip_single_file_names_stream_with_rows_read_from_the_file(tmp_path):
    cfg = TINY_XL.text2
    ref = hf_model(cfg, True, 2)
    path = tmp_path / "bigg.safetensors"
    safetensors_torch.save_file({"conditioner.embedders.1.model." + k: v.half() for k, v in openclip_state(ref.state_dict()).items()},
                                str(path))
    header = read_header(path)
    prefix = "conditioner.embedders.1.model."
    infos, transposed = openclip_text_infos({k[len(prefix):]: v for k, v in header.tensors.items()})
    sources = {k: TensorSource(str(path), v) for k, v in infos.items()}
    assert transposed == {"text_projection.weight"}
    with torch.device("meta"):
        enc = ClipTextEncoder(cfg).eval()
    assert set(sources) == set(enc.state_dict())  # in_proj split in three, logit_scale dropped
    enc.text_projection.transposed = True
    loaded = []
    ids = ids_batch()
    with torch.inference_mode(), WeightStreamer(enc, sources, dtype=torch.float32,
                                                on_event=lambda kind, name, n, s: loaded.append(name)):
        rows = read_token_rows(sources["text_model.embeddings.token_embedding.weight"], ids, torch.float32)
        hidden, pooled = enc.encode_sdxl(ids, token_embeds=rows)
    assert "text_model.embeddings.token_embedding" not in loaded and "text_projection" in loaded
    ref.half().float()  # the file holds fp16 values
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    dh = (hidden - out.hidden_states[-2]).abs().max().item()
    dp = (pooled - out.text_embeds).abs().max().item()
    print(f"bigG from OpenCLIP names, streamed: max |hidden - hf| = {dh:.2e}, |pooled - hf| = {dp:.2e}")
    assert dh <= 1e-5 and dp <= 1e-5


def webui_emphasis(z, weights):
    """The webui's "Original" emphasis, written out: z * w, then rescaled to the old mean."""
    before = z.mean()
    z = z * weights[None, :, None]
    return z * (before / z.mean())


def test_sdxl_conditioning_concatenates_both_encoders_with_emphasis_and_zero_negative():
    ref_l, ref_g = hf_model(TINY_XL.text, False, 4), hf_model(TINY_XL.text2, True, 5)
    enc_l, enc_g = ClipTextEncoder(TINY_XL.text).eval(), ClipTextEncoder(TINY_XL.text2).eval()
    enc_l.load_state_dict(hf_state(ref_l), strict=True)
    enc_g.load_state_dict(hf_state(ref_g), strict=True)
    tok = ClipTokenizer()
    long_prompt = "a (red:1.3) fox, " + ", ".join(["in a [quiet] forest at dusk"] * 12)
    conds = encode_prompts_sdxl(enc_l.encode_sdxl, enc_g.encode_sdxl, [long_prompt, ""], zero_if_empty=[False, True],
                                tokenizer=tok)
    pos, neg = conds
    assert pos.context.shape == (1, 154, 80) and pos.pooled.shape == (1, 40)
    assert neg.context.shape == (1, 154, 80) and not neg.context.any() and not neg.pooled.any()
    from lib_hrlr.text.prompts import tokenize_prompt

    chunks = tokenize_prompt(tok, long_prompt).chunks
    assert len(chunks) == 2 and any(w != 1.0 for w in chunks[0].weights)
    with torch.no_grad():
        parts = []
        for k, ch in enumerate(chunks):
            w = torch.tensor(ch.weights)
            ids_l = torch.tensor([ch.tokens])
            ids_g = torch.tensor([[t if i <= ch.tokens.index(EOS) else 0 for i, t in enumerate(ch.tokens)]])
            zl = ref_l(ids_l, output_hidden_states=True).hidden_states[-2]
            og = ref_g(ids_g, output_hidden_states=True)
            parts.append(torch.cat([webui_emphasis(zl, w), webui_emphasis(og.hidden_states[-2], w)], dim=-1))
            if k == 0:
                pooled = og.text_embeds
        expected = torch.cat(parts, dim=1)
    assert (pos.context - expected).abs().max().item() <= 1e-5
    assert (pos.pooled - pooled).abs().max().item() <= 1e-5
    # an empty positive prompt is encoded, not zeroed
    empty_pos = encode_prompts_sdxl(enc_l.encode_sdxl, enc_g.encode_sdxl, [""], tokenizer=tok)[0]
    assert empty_pos.context.abs().max() > 0.1


def test_bigg_on_meta_has_the_real_size():
    with torch.device("meta"):
        enc = ClipTextEncoder(SDXL.text2)
    n = sum(t.numel() for t in enc.state_dict().values())
    # 63,242,240 token embedding + 98,560 positions + 32 x 19,677,440 layers + 2,560 final norm + 1,638,400 projection
    assert n == 694_659_840
    assert enc.text_model.embeddings.token_embedding.weight.shape == (49408, 1280)
