"""LoRA: parsed from kohya/webui and diffusers/PEFT files, merged into weights as they stream in.

The reference for every comparison is a copy of the checkpoint whose weights were merged by
hand (W + w * alpha/rank * up @ down, in float64, on the LDM names the diffusers key map —
itself checked against diffusers in test_unet — gives), streamed without any LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_hrlr.config.architectures import TEXT_PREFIX, TINY, UNET_PREFIX
from lib_hrlr.errors import CheckpointError
from lib_hrlr.models.unet import diffusers_key_map
from lib_hrlr.pipeline import components
from lib_hrlr.text.extra_networks import LoraSpec
from lib_hrlr.text.tokenizer import ClipTokenizer
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.lora import LoraMerger, load_loras, read_lora
from lib_hrlr.weights.random_checkpoint import write_random_checkpoint

# diffusers module names (UNet) / transformers module names (text) of the layers the test LoRAs touch
UNET_LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # linear
    "down_blocks.0.attentions.0.proj_in",  # 1x1 conv in the LDM UNet
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv: LoCon (3x3 down, 1x1 up)
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",  # inside a unit streamed whole
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",  # cross-attention (context width)
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "time_embedding.linear_1",
]
TEXT_LAYERS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
RANK = 4


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("lora") / "tiny.safetensors", TINY, torch.float32, seed=3)


@pytest.fixture(scope="module")
def ckpt(ckpt_path):
    return open_checkpoint(ckpt_path)


def ldm_name(diffusers_module: str) -> str:
    return diffusers_key_map(TINY.unet)[diffusers_module + ".weight"][: -len(".weight")]


def make_factors(ckpt, seed: int = 0, alpha: float | None = 2.0):
    """{(component, module): (down, up, alpha)} with down shaped as a kohya/PEFT file stores it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, layers in (("unet", UNET_LAYERS), ("text", TEXT_LAYERS)):
        for mod in layers:
            ours = (ldm_name(mod) if comp == "unet" else mod) + ".weight"
            shape = ckpt.components[comp][ours].info.shape
            o, i = shape[0], shape[1]
            if len(shape) == 4:  # conv: k x k down, 1x1 up
                down = torch.randn(RANK, i, shape[2], shape[3], generator=g) * 0.3
                up = torch.randn(o, RANK, 1, 1, generator=g) * 0.3
            else:
                down = torch.randn(RANK, i, generator=g) * 0.3
                up = torch.randn(o, RANK, generator=g) * 0.3
            out[(comp, mod)] = (down, up, alpha)
    return out


def kohya_file(path, factors, ldm_names: bool = False):
    sd = {}
    for (comp, mod), (down, up, alpha) in factors.items():
        name = ldm_name(mod) if (comp == "unet" and ldm_names) else mod
        key = ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = down.to(torch.float16)
        sd[key + ".lora_up.weight"] = up.to(torch.float16)
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    if str(path).endswith(".pt"):
        torch.save(sd, path)
    else:
        save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def peft_file(path, factors, alpha: float):
    sd = {}
    for (comp, mod), (down, up, _) in factors.items():
        prefix = "unet." if comp == "unet" else "text_encoder."
        sd[prefix + mod + ".lora_A.weight"] = down.contiguous()
        sd[prefix + mod + ".lora_B.weight"] = up.contiguous()
    meta = {"unet.lora_alpha": alpha, "unet.r": RANK, "text_encoder.lora_alpha": alpha, "text_encoder.r": RANK}
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return path


def merged_copy(ckpt_path, out_path, loras):
    """The checkpoint with ``loras`` = [(factors, unet_weight, te_weight)] merged by hand (float64)."""
    sd = load_file(str(ckpt_path))
    for factors, w_unet, w_te in loras:
        for (comp, mod), (down, up, alpha) in factors.items():
            key = (UNET_PREFIX + ldm_name(mod) if comp == "unet" else TEXT_PREFIX + mod) + ".weight"
            # the file holds what was written: fp16 factors for kohya files
            d = down.double().reshape(RANK, -1)
            u = up.double().reshape(up.shape[0], RANK)
            scale = (alpha / RANK if alpha is not None else 1.0) * (w_unet if comp == "unet" else w_te)
            w = sd[key].double()
            sd[key] = (w + scale * (u @ d).reshape(w.shape)).to(sd[key].dtype)
    from safetensors import safe_open

    with safe_open(str(ckpt_path), "pt") as f:
        meta = f.metadata()
    save_file(sd, str(out_path), metadata=meta)
    return open_checkpoint(out_path)


def fp16_factors(factors):
    return {k: (d.half().float(), u.half().float(), a if a is None else float(torch.tensor(a).half()))
            for k, (d, u, a) in factors.items()}


def unet_out(ckpt, merger=None, dtype=torch.float32, cache_bytes=0, calls=1):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    with components.unet_streamer(ckpt, dtype, torch.device("cpu"), cache_bytes, transform=merger) as eps:
        outs = [eps(x.to(dtype), t, ctx.to(dtype)).float() for _ in range(calls)]
        stats = eps.streamer.stats
    return outs, stats


def text_out(ckpt, merger=None, dtype=torch.float32):
    return components.encode_text(ckpt, ["a red balloon over a city", "night"], 1, dtype, torch.device("cpu"), 0,
                                  transform=merger)


def run_with(lora_set, component, fn):
    merger = lora_set.merger(component)
    with merger:
        return fn(merger), merger


# ------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("fmt", ["kohya", "kohya_ldm_names", "kohya_pt", "peft", "diffusers_old"])
def test_every_format_maps_onto_the_same_ldm_weights(ckpt, tmp_path, fmt):
    factors = make_factors(ckpt)
    if fmt == "kohya":
        path = kohya_file(tmp_path / "l.safetensors", factors)
    elif fmt == "kohya_ldm_names":
        path = kohya_file(tmp_path / "l.safetensors", factors, ldm_names=True)
    elif fmt == "kohya_pt":
        path = kohya_file(tmp_path / "l.pt", factors)
    elif fmt == "peft":
        path = peft_file(tmp_path / "l.safetensors", factors, alpha=2.0)
    else:  # diffusers' own conversion of the kohya file: attn processor / lora_linear_layer names
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

        kohya = load_file(str(kohya_file(tmp_path / "k.safetensors", factors)))
        converted, _alphas = _convert_non_diffusers_lora_to_diffusers(kohya)
        path = tmp_path / "l.safetensors"
        save_file({k: v.contiguous() for k, v in converted.items()}, str(path))
    lora = read_lora(path, ckpt.config)
    expected = {("unet", ldm_name(m) + ".weight") for m in UNET_LAYERS} | {("text", m + ".weight") for m in TEXT_LAYERS}
    assert {(layer.component, layer.target) for layer in lora.layers} == expected
    assert lora.unmatched == ()
    assert lora.format == ("kohya" if fmt.startswith("kohya") else "diffusers")
    want_alpha = None if fmt == "diffusers_old" else 2.0
    assert {layer.alpha for layer in lora.layers} == {want_alpha}
    assert lora.nbytes == sum(
        (d.numel() + u.numel()) * (2 if fmt.startswith("kohya") or fmt == "diffusers_old" else 4)
        for d, u, _ in factors.values())


def test_lora_matching_nothing_is_an_error_naming_the_file(ckpt, tmp_path):
    path = tmp_path / "sdxl_style.safetensors"
    save_file({"lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q.lora_up.weight": torch.zeros(640, 4)},
              str(path))
    with pytest.raises(CheckpointError) as err:
        load_loras([LoraSpec(str(path))], ckpt.config)
    assert err.value.field == "lora" and str(path) in err.value.message and "match" in err.value.message


def test_not_a_lora_and_unsupported_variants_are_refused(ckpt, ckpt_path, tmp_path):
    with pytest.raises(CheckpointError, match="no LoRA layers"):
        read_lora(ckpt_path, ckpt.config)  # a whole checkpoint
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 4)}, str(loha))
    with pytest.raises(CheckpointError, match="LoHa") as err:
        read_lora(loha, ckpt.config)
    assert str(loha) in err.value.message
    bad = tmp_path / "bad_shape.safetensors"
    mod = "lora_unet_" + UNET_LAYERS[0].replace(".", "_")
    save_file({mod + ".lora_down.weight": torch.zeros(4, 31), mod + ".lora_up.weight": torch.zeros(32, 4)}, str(bad))
    with pytest.raises(CheckpointError, match="does not fit") as err:
        read_lora(bad, ckpt.config)
    assert str(bad) in err.value.message


def test_partly_matching_lora_warns_about_the_rest(ckpt, tmp_path):
    factors = make_factors(ckpt)
    sd = load_file(str(kohya_file(tmp_path / "k.safetensors", factors)))
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(64, 4)
    save_file(sd, str(tmp_path / "p.safetensors"))
    loras = load_loras([LoraSpec(str(tmp_path / "p.safetensors"))], ckpt.config)
    assert len(loras.items[0][0].layers) == len(UNET_LAYERS) + len(TEXT_LAYERS)
    assert len(loras.warnings) == 1 and "lora_te2_" in loras.warnings[0]


# ------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_streamed_with_lora_equals_hand_merged_checkpoint(ckpt, ckpt_path, tmp_path, fmt):
    factors = make_factors(ckpt, alpha=2.0)
    path = kohya_file(tmp_path / "k.safetensors", factors) if fmt == "kohya" else \
        peft_file(tmp_path / "p.safetensors", factors, alpha=2.0)
    stored = fp16_factors(factors) if fmt == "kohya" else factors
    loras = load_loras([LoraSpec(str(path), weight=0.8, te_weight=0.6)], ckpt.config)
    ref = merged_copy(ckpt_path, tmp_path / "merged.safetensors", [(stored, 0.8, 0.6)])

    (got,), _ = run_with(loras, "unet", lambda m: unet_out(ckpt, m))[0]
    (want,), _ = unet_out(ref)
    (plain,), _ = unet_out(ckpt)
    diff = (got - want).abs().max().item()
    effect = (want - plain).abs().max().item()
    print(f"{fmt}: UNet max abs diff vs hand-merged {diff:.2e} (LoRA effect {effect:.2e})")
    assert effect > 1e-2  # the LoRA changes the output...
    assert diff < 2e-5  # ...exactly as the hand-merged weights do

    got_t, merger = run_with(loras, "text", lambda m: text_out(ckpt, m))
    want_t = text_out(ref)
    plain_t = text_out(ckpt)
    diff_t = max((a - b).abs().max().item() for a, b in zip(got_t, want_t))
    effect_t = max((a - b).abs().max().item() for a, b in zip(want_t, plain_t))
    print(f"{fmt}: text max abs diff vs hand-merged {diff_t:.2e} (LoRA effect {effect_t:.2e})")
    assert effect_t > 1e-2 and diff_t < 2e-5
    assert merger.merges == len(TEXT_LAYERS)


def test_two_loras_add_and_bf16_stays_close(ckpt, ckpt_path, tmp_path):
    a, b = make_factors(ckpt, seed=1, alpha=1.0), make_factors(ckpt, seed=2, alpha=None)
    pa, pb = kohya_file(tmp_path / "a.safetensors", a), kohya_file(tmp_path / "b.safetensors", b)
    loras = load_loras([LoraSpec(str(pa), 1.0), LoraSpec(str(pb), -0.5)], ckpt.config)
    ref = merged_copy(ckpt_path, tmp_path / "m.safetensors", [(fp16_factors(a), 1.0, 1.0), (fp16_factors(b), -0.5, -0.5)])
    (got,), _ = run_with(loras, "unet", lambda m: unet_out(ckpt, m))[0]
    (want,), _ = unet_out(ref)
    diff = (got - want).abs().max().item()
    print(f"two LoRAs fp32: max abs diff {diff:.2e}")
    assert diff < 2e-5
    # bf16: the streamer rounds the file's weight to bf16, the merge adds in float32 and rounds
    # again (the hand-merged copy is rounded once): one extra rounding, so the two bf16 runs
    # differ by about as much as bf16 differs from fp32
    (got16,), _ = run_with(loras, "unet", lambda m: unet_out(ckpt, m, dtype=torch.bfloat16))[0]
    (want16,), _ = unet_out(ref, dtype=torch.bfloat16)
    d16 = (got16 - want16).abs().max().item()
    scale = want.abs().max().item()
    print(f"two LoRAs bf16: max abs diff {d16:.2e} (output max {scale:.2f}; bf16 vs fp32 {(want16 - want).abs().max().item():.2e})")
    assert d16 <= 2.0 * (want16 - want).abs().max().item()


def test_alpha_scales_the_update(ckpt, tmp_path):
    """alpha = rank/2 halves the update: the output moves half as far (the UNet is near linear
    in a tiny weight change; exactly half for the text encoder's first layer weight)."""
    base = make_factors(ckpt, alpha=None)
    half = {k: (d * 0.05, u, RANK / 2) for k, (d, u, _) in base.items()}
    full = {k: (d * 0.05, u, None) for k, (d, u, _) in base.items()}
    p_half, p_full = kohya_file(tmp_path / "h.safetensors", half), kohya_file(tmp_path / "f.safetensors", full)
    w = {}
    for name, p in (("half", p_half), ("full", p_full)):
        loras = load_loras([LoraSpec(str(p))], ckpt.config)
        merger = loras.merger("text")
        with merger:
            wt = torch.zeros(ckpt.components["text"][TEXT_LAYERS[0] + ".weight"].info.shape)
            merger(TEXT_LAYERS[0] + ".weight", wt)
        w[name] = wt
    assert torch.allclose(w["half"], w["full"] / 2, atol=1e-7, rtol=1e-5)
    assert w["full"].abs().max() > 1e-3


def test_weight_zero_changes_nothing_bit_for_bit(ckpt, tmp_path):
    path = kohya_file(tmp_path / "k.safetensors", make_factors(ckpt))
    loras = load_loras([LoraSpec(str(path), weight=0.0, te_weight=0.0)], ckpt.config)
    assert loras.merger("unet") is None and loras.merger("text") is None
    merger = LoraMerger([(layer, 0.0) for layer in loras.items[0][0].layers])
    with merger:
        (got,), _ = unet_out(ckpt, merger)
    (want,), _ = unet_out(ckpt)
    assert torch.equal(got, want)
    assert merger.merges == 0


def test_pinned_cache_holds_merged_weights_and_memory_grows_only_by_merge_scratch(ckpt, tmp_path):
    factors = make_factors(ckpt)
    path = kohya_file(tmp_path / "k.safetensors", factors)
    loras = load_loras([LoraSpec(str(path))], ckpt.config)
    total = sum(s.info.nbytes for s in ckpt.components["unet"].values())
    for cache in (0, total // 2, 2 * total):
        with loras.merger("unet") as merger:
            outs, stats = unet_out(ckpt, merger, cache_bytes=cache, calls=3)
        plain, plain_stats = unet_out(ckpt, cache_bytes=cache, calls=3)
        for o in outs[1:]:
            assert torch.equal(o, outs[0])  # pinned (merged once) and re-streamed (merged again) agree
        assert not torch.equal(outs[0], plain[0])
        # the streamer holds exactly what it holds without LoRA
        for f in ("arena_bytes", "peak_inflight_bytes", "pinned_bytes", "scratch_bytes", "total_bytes"):
            assert getattr(stats, f) == getattr(plain_stats, f), f
        if cache >= total:
            assert merger.merges == len(UNET_LAYERS)  # every unit pinned in the first pass: merged once
        elif cache == 0:
            assert merger.merges == 3 * len(UNET_LAYERS)
    # the merge itself holds one layer's factors at a time: float32 plus a copy in the compute dtype
    # (plus a float32 row block for fp16 weights on the CPU)
    largest = max((d.numel() + u.numel()) * 4 for d, u, _ in factors.values())
    with loras.merger("unet") as merger:
        unet_out(ckpt, merger, dtype=torch.bfloat16)
    print(f"merge scratch peak {merger.peak_scratch_bytes} B; largest layer factors fp32 {largest} B; "
          f"LoRA file factors {loras.nbytes} B")
    assert 0 < merger.peak_scratch_bytes <= 1.5 * largest
    with loras.merger("unet") as merger:
        unet_out(ckpt, merger, dtype=torch.float16)
    assert 0 < merger.peak_scratch_bytes <= largest + merger.block_bytes


@pytest.mark.slow
def test_lora_adds_no_resident_memory_at_sd15_size(tmp_path):
    """SD 1.5-sized text encoder streamed in a child process with and without a rank-128 LoRA on
    every linear: the peak RSS differs by far less than the LoRA's size."""
    script = r"""
import sys, torch, resource
from lib_hrlr.config.architectures import SD15
from lib_hrlr.pipeline import components
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.lora import load_loras
from lib_hrlr.text.extra_networks import LoraSpec
ckpt = open_checkpoint(sys.argv[1])
loras = load_loras([LoraSpec(sys.argv[2])], ckpt.config) if len(sys.argv) > 2 else None
merger = loras.merger("text") if loras else None
import contextlib
with (merger or contextlib.nullcontext()):
    components.encode_text(ckpt, ["a cat"] * 2, 1, torch.float32, torch.device("cpu"), 0, transform=merger)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

    ckpt_file = cached_random_checkpoint("sd15", torch.float16)
    ckpt = open_checkpoint(ckpt_file)
    sd = {}
    for name, src in ckpt.components["text"].items():
        if name.endswith(".weight") and len(src.info.shape) == 2 and "embedding" not in name:
            key = "lora_te_" + name[:-7].replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(128, src.info.shape[1], dtype=torch.float16) * 0.01
            sd[key + ".lora_up.weight"] = torch.randn(src.info.shape[0], 128, dtype=torch.float16) * 0.01
    lora = tmp_path / "big.safetensors"
    save_file(sd, str(lora))
    lora_mb = os.path.getsize(lora) / 2**20
    env = dict(os.environ, PYTHONPATH=str(os.path.dirname(os.path.dirname(__file__))))
    peaks = []
    for args in ([str(ckpt_file)], [str(ckpt_file), str(lora)]):
        out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=True)
        peaks.append(float(out.stdout.split()[-1]))
    print(f"text encoder peak RSS without LoRA {peaks[0]:.1f} MB, with a {lora_mb:.1f} MB LoRA {peaks[1]:.1f} MB")
    assert peaks[1] - peaks[0] < 0.25 * lora_mb


# ------------------------------------------------------------------------------ end to end
def test_cli_lora_and_embedding_end_to_end(tmp_path, capsys):
    """--lora changes the image exactly as the hand-merged checkpoint does (fp32), weight 0 and a
    prompt tag the CLI cannot resolve change nothing, --embedding changes it, and a LoRA that
    matches nothing exits 2 naming the file and writes nothing."""
    import numpy as np
    from PIL import Image

    from lib_hrlr.cli import main
    from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

    tiny = cached_random_checkpoint("tiny")
    ckpt = open_checkpoint(tiny)
    factors = make_factors(ckpt, seed=4, alpha=2.0)
    lora = kohya_file(tmp_path / "style.safetensors", factors)
    # the hand-merged copy in fp32 (the tiny cache file is fp16)
    sd = {k: v.float() for k, v in load_file(str(tiny)).items()}
    save_file(sd, str(tmp_path / "f32.safetensors"), metadata=_metadata(tiny))
    merged = merged_copy(tmp_path / "f32.safetensors", tmp_path / "merged.safetensors", [(fp16_factors(factors), 0.7, 0.7)])
    common = ["generate", "--quiet", "--budget-mb", "8000", "--width", "128", "--height", "128", "--steps", "2",
              "--seed", "5", "--dtype", "fp32", "--prompt", "a red lighthouse"]

    def run(name, *args):
        out = tmp_path / f"{name}.png"
        code = main(common + ["--out", str(out), *args])
        err = capsys.readouterr().err
        return code, out, err

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    code, plain, err = run("plain", "--model", str(tiny))
    assert code == 0, err
    code, with_lora, err = run("lora", "--model", str(tiny), "--lora", f"{lora}:0.7")
    assert code == 0, err
    code, ref, err = run("ref", "--model", str(merged.path))
    assert code == 0, err
    d_ref = np.abs(pixels(with_lora) - pixels(ref))
    d_plain = np.abs(pixels(with_lora) - pixels(plain))
    print(f"CLI --lora vs hand-merged checkpoint: max pixel diff {d_ref.max()}, mean {d_ref.mean():.4f}; "
          f"vs no LoRA: mean {d_plain.mean():.2f}")
    assert d_ref.max() <= 1 and d_ref.mean() < 0.2  # last-bit weight differences: some pixels one level off
    assert d_plain.mean() > 1.0
    assert "style:0.7" in Image.open(with_lora).info["parameters"]

    code, zero, err = run("zero", "--model", str(tiny), "--lora", f"{lora}:0")
    assert code == 0 and np.array_equal(pixels(zero), pixels(plain))
    code, tagged, err = run("tag", "--model", str(tiny), "--prompt", "a red lighthouse <lora:style:1>")
    assert code == 0 and "no LoRA named 'style'" in err
    assert np.array_equal(pixels(tagged), pixels(plain))  # the tag never reaches the tokenizer

    emb = tmp_path / "emb"
    emb.mkdir()
    save_file({"emb_params": torch.randn(2, TINY.text.hidden_size, generator=torch.Generator().manual_seed(1))},
              str(emb / "lighthouse.safetensors"))
    code, with_emb, err = run("emb", "--model", str(tiny), "--embedding", str(emb))
    assert code == 0, err
    assert np.abs(pixels(with_emb) - pixels(plain)).mean() > 1.0

    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_label_emb_0_0.lora_down.weight": torch.zeros(4, 2816),
               "lora_unet_label_emb_0_0.lora_up.weight": torch.zeros(1280, 4)}, str(foreign))
    code, out, err = run("foreign", "--model", str(tiny), "--lora", str(foreign))
    assert code == 2 and "lora" in err and str(foreign) in err
    assert not out.exists()


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_blocks_merge_like_one_block(ckpt, tmp_path, dtype):
    """Reading the up factor in row blocks (here 1-3 rows at a time) gives the one-block merge."""
    a, b = make_factors(ckpt, seed=5), make_factors(ckpt, seed=6, alpha=None)
    loras = load_loras([LoraSpec(str(kohya_file(tmp_path / "a.safetensors", a)), 0.9),
                        LoraSpec(str(kohya_file(tmp_path / "b.safetensors", b)), -0.4)], ckpt.config)
    entries = [(layer, spec.weight) for lora, spec in loras.items for layer in lora.layers if layer.component == "unet"]
    g = torch.Generator().manual_seed(0)
    for layer in {e[0].target: e[0] for e in entries}.values():
        shape = ckpt.components["unet"][layer.target].info.shape
        w0 = torch.randn(shape, generator=g).to(dtype)
        merged = {}
        for block in (64, 1 << 20):
            w = w0.clone()
            with LoraMerger(entries, block_bytes=block) as m:
                m(layer.target, w)
            merged[block] = w
        assert torch.allclose(merged[64].float(), merged[1 << 20].float(), atol=1e-6 if dtype == torch.float32 else 1e-2)
        ref = w0.double().view(shape[0], -1)
        for (lay, mult) in entries:
            if lay.target == layer.target:
                d = load_file(lay.down.path)[lay.key + ".lora_down.weight"].double().reshape(lay.rank, -1)
                u = load_file(lay.up.path)[lay.key + ".lora_up.weight"].double().reshape(shape[0], lay.rank)
                ref = ref + mult * lay.scale * (u @ d)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
        assert (merged[64].double().view(shape[0], -1) - ref).abs().max().item() <= tol


def test_merges_run_on_the_calling_thread_even_when_prefetched(ckpt, tmp_path):
    """The prefetch thread only reads: merging there would start a second OpenMP team."""
    import threading

    loras = load_loras([LoraSpec(str(kohya_file(tmp_path / "k.safetensors", make_factors(ckpt))))], ckpt.config)
    merger = loras.merger("unet")
    threads = set()

    def recording(name, weight):
        threads.add(threading.get_ident())
        merger(name, weight)

    with merger:
        (outs, stats) = unet_out(ckpt, recording, calls=3)
    assert stats.prefetch_hits > 0  # units did come from the prefetch thread
    assert threads == {threading.get_ident()} and merger.merges == 3 * len(UNET_LAYERS)
