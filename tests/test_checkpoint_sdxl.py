"""SDXL checkpoints as users have them: the single-file sgm layout (names of the real SDXL
base file, shapes of the tiny config or of the full one) and diffusers folders; detection
from key shapes; refusals of the neighbours (refiner, SD 2.x, SD3, Flux, inpainting)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_hrlr.config.architectures import SDXL, TINY_XL
from lib_hrlr.errors import CheckpointError
from lib_hrlr.models.unet import UNet, adm_vector
from lib_hrlr.pipeline.sdxl_text import encode_text_sdxl
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.random_checkpoint import tensor_plan, write_random_checkpoint, write_random_diffusers_folder
from lib_hrlr.weights.safetensors_file import build_header
from lib_hrlr.weights.streaming import WeightStreamer
from tests.conftest import read_source

BOTH = ("sd1x", "sdxl")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("xl") / "tiny_xl.safetensors", TINY_XL, torch.float32, seed=7)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_random_diffusers_folder(tmp_path_factory.mktemp("xlf") / "tiny_xl", TINY_XL, torch.float32, seed=7)


@pytest.fixture(scope="module")
def real_layout_file(tiny_file, tmp_path_factory):
    """The same tensors without our metadata, plus the position_ids buffer real files carry:
    the architecture has to be read from the key shapes."""
    state = load_file(str(tiny_file))
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    p = tmp_path_factory.mktemp("xlr") / "real_layout.safetensors"
    save_file(state, str(p))
    return p


# names and shapes of the real sd_xl_base_1.0 single file (sgm's UNet, the SD VAE, transformers'
# CLIP ViT-L/14 and open_clip's ViT-bigG/14 text tower), written out independently of our models
REAL_SDXL_KEYS = {
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.out_proj.weight": (1280, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight": (1280, 5120),
    "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight": (1280,),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.logit_scale": (),
}


def sdxl_file_shapes(config=SDXL) -> dict[str, tuple[int, ...]]:
    prefixes = config.prefixes
    return {prefixes[c] + n: shape for c, n, _, shape, _ in tensor_plan(config)}


def sparse_safetensors(path, shapes, dtype=torch.float16):
    header, _ = build_header([(k, dtype, s) for k, s in shapes.items()], None)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize)
    return path


def refused(path, *needles):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path, families=BOTH)
    for n in needles:
        assert n in str(e.value), str(e.value)
    return str(e.value)


def test_writer_uses_the_real_sdxl_key_names_and_shapes():
    shapes = sdxl_file_shapes()
    for key, shape in REAL_SDXL_KEYS.items():
        assert shapes.get(key) == shape, key
    assert not any(".q_proj." in k or "text_model" in k for k in shapes if k.startswith("conditioner.embedders.1."))


def test_full_size_sdxl_detected_from_key_shapes(tmp_path):
    shapes = sdxl_file_shapes()
    shapes["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = (1, 77)
    p = sparse_safetensors(tmp_path / "sd_xl_base.safetensors", shapes)
    ck = open_checkpoint(p, families=BOTH)
    assert ck.config == SDXL and ck.config.name == "sdxl" and ck.config_source == "inferred"
    assert ck.config.latent_tile == 128 and ck.config.default_overlap == 32 and ck.config.vae.scaling_factor == 0.13025
    assert ck.component_bytes("unet") == 2_567_463_684 * 2
    assert ck.component_bytes("text2") == 694_659_840 * 2  # in_proj counted once: its three views add up
    assert ck.transposed == {"text2.text_projection.weight"}
    q = ck.component("text2")["text_model.encoder.layers.5.self_attn.q_proj.weight"].info
    k = ck.component("text2")["text_model.encoder.layers.5.self_attn.k_proj.weight"].info
    assert q.shape == k.shape == (1280, 1280) and k.offset == q.offset + 1280 * 1280 * 2
    # by default (the pipeline's families) SDXL opens; a caller limited to SD 1.x refuses it by name
    assert open_checkpoint(p).config == SDXL
    with pytest.raises(CheckpointError, match="is an SDXL model .*allowed here: SD1X models"):
        open_checkpoint(p, families=("sd1x",))


def test_tiny_real_layout_infers_the_tiny_xl_structure(real_layout_file, tiny_file):
    ck = open_checkpoint(real_layout_file, families=BOTH)
    # head counts are not in the weights: SDXL's 64-channel heads and 64-wide text heads are assumed
    expected = dataclasses.replace(
        TINY_XL, name="sdxl", native_size=1024,
        unet=dataclasses.replace(TINY_XL.unet, num_head_channels=64),
        text=dataclasses.replace(TINY_XL.text, num_heads=1), text2=dataclasses.replace(TINY_XL.text2, num_heads=1))
    assert ck.config == expected and ck.config_source == "inferred"
    assert "text_model.embeddings.position_ids" not in ck.component("text")
    meta = open_checkpoint(tiny_file, families=BOTH)
    assert meta.config == TINY_XL and meta.config_source == "metadata"
    for comp in ("unet", "vae", "text", "text2"):
        a, b = ck.component(comp), meta.component(comp)
        assert set(a) == set(b)
        assert all(torch.equal(read_source(a[n]), read_source(b[n])) for n in a), comp


def test_diffusers_folder_holds_the_same_weights_as_the_single_file(tiny_folder, tiny_file):
    folder = open_checkpoint(tiny_folder, families=BOTH)
    single = open_checkpoint(tiny_file, families=BOTH)
    assert folder.config == TINY_XL and folder.format == "diffusers" and folder.transposed == frozenset()
    for comp in ("unet", "vae", "text", "text2"):
        a, b = folder.component(comp), single.component(comp)
        assert set(a) == set(b), (comp, sorted(set(a) ^ set(b))[:4])
        for n in a:
            x, y = read_source(a[n]), read_source(b[n])
            if f"{comp}.{n}" in single.transposed:
                y = y.reshape(y.shape[1], y.shape[0]).t()
            assert torch.equal(x.reshape(y.shape), y), (comp, n)


def streamed_unet_eps(ck, x, t, ctx, y):
    with torch.device("meta"):
        unet = UNet(ck.config.unet).eval()
    with torch.inference_mode(), WeightStreamer(unet, ck.component("unet"), dtype=torch.float32):
        return unet(x, t, ctx, y)


def test_single_file_and_folder_give_the_same_conditioning_and_eps(tiny_folder, tiny_file):
    folder = open_checkpoint(tiny_folder, families=BOTH)
    single = open_checkpoint(tiny_file, families=BOTH)
    prompts = ["a (castle:1.2) on a hill, " * 16, ""]  # two chunks
    a = encode_text_sdxl(single, prompts, [False, True], torch.float32, torch.device("cpu"))
    b = encode_text_sdxl(folder, prompts, [False, True], torch.float32, torch.device("cpu"))
    assert a[0].context.shape == (1, 154, 80) and a[0].pooled.shape == (1, 40)
    assert a[0].context.abs().max() > 0.1 and a[0].pooled.abs().max() > 0.01
    assert not a[1].context.any() and not a[1].pooled.any()
    assert torch.equal(a[0].context, b[0].context)
    assert (a[0].pooled - b[0].pooled).abs().max() <= 1e-6  # x @ P vs x @ (P^T)^T: same products
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    y = adm_vector(a[0].pooled, torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]), 8)
    e1 = streamed_unet_eps(single, x, torch.tensor([500.0]), a[0].context, y)
    e2 = streamed_unet_eps(folder, x, torch.tensor([500.0]), a[0].context, y)
    assert torch.equal(e1, e2) and e1.std() > 0.05


def test_neighbours_are_refused_naming_what_was_found(tmp_path, tiny_file):
    state = load_file(str(tiny_file))
    # SDXL refiner: bigG alone as embedders.0, a 2560-wide label embedding
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in state.items()
               if not k.startswith("conditioner.embedders.0.")}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    refused(tmp_path / "refiner.safetensors", "SDXL refiner", "conditioner.embedders.0.model.")
    # an SDXL-layout inpainting UNet
    inpaint = dict(state)
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(inpaint, str(tmp_path / "inpaint.safetensors"))
    refused(tmp_path / "inpaint.safetensors", "inpainting model", "9 latent input channels")
    # a label embedding that is not pooled + 6 equal parts
    odd = dict(state)
    odd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(128, 87)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    refused(tmp_path / "odd.safetensors", "label embedding over 87 values")
    # SDXL UNet keys without the conditioner
    bare = {k: v for k, v in state.items() if not k.startswith("conditioner.")}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    refused(tmp_path / "bare.safetensors", "looks like SDXL without its text encoders")
    # hrlr metadata that contradicts the layout
    save_file(bare | {"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(32)},
              str(tmp_path / "mixed.safetensors"), metadata={"hrlr_config": TINY_XL.to_json()})
    refused(tmp_path / "mixed.safetensors", "describes an sdxl model but its keys are laid out as sd1x")


@pytest.mark.parametrize("extra, what", [
    ({"cond_stage_model.model.token_embedding.weight": (10, 4)}, "Stable Diffusion 2.x"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "Stable Diffusion 3"),
    ({"double_blocks.0.img_attn.qkv.weight": (4, 4)}, "Flux"),
])
def test_other_families_refused(tmp_path, extra, what):
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), **extra}
    refused(sparse_safetensors(tmp_path / "other.safetensors", shapes), f"looks like {what}")


def test_diffusers_refiner_and_sdxl_without_second_encoder_refused(tmp_path, tiny_folder):
    import json
    import shutil

    ref = tmp_path / "refiner"
    shutil.copytree(tiny_folder, ref)
    index = json.loads((ref / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
    (ref / "model_index.json").write_text(json.dumps(index))
    refused(ref, "SDXL refiner")
    lone = tmp_path / "lone"
    shutil.copytree(tiny_folder, lone)
    index = json.loads((lone / "model_index.json").read_text())
    del index["text_encoder_2"]
    index["_class_name"] = "StableDiffusionPipeline"
    (lone / "model_index.json").write_text(json.dumps(index))
    refused(lone, "looks like SDXL", "no text_encoder_2")


def test_the_published_sdxl_diffusers_configs_give_the_sdxl_architecture():
    """stabilityai/stable-diffusion-xl-base-1.0's config.json values, written out."""
    from lib_hrlr.weights.checkpoint import config_from_diffusers

    unet = {"act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
            "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "flip_sin_to_cos": True, "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
    vae = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
           "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
           "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4}
    text = {"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
            "vocab_size": 49408}
    text2 = {"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
             "max_position_embeddings": 77, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
             "vocab_size": 49408}
    cfg = config_from_diffusers(unet, vae, text, "sdxl-base", text2=text2)
    assert cfg == SDXL and cfg.name == "sdxl"
    refiner_like = dict(unet, projection_class_embeddings_input_dim=2560)
    with pytest.raises(CheckpointError, match="2560 wide: the SDXL refiner"):
        config_from_diffusers(refiner_like, vae, text, "x", text2=text2)


@pytest.mark.parametrize("marker, what", [("v_pred", "a v-prediction model"), ("edm_mean", "Playground v2.5"),
                                          ("edm_vpred.sigma_max", "EDM v-prediction")])
def test_sdxl_files_sampled_otherwise_are_refused(tmp_path, tiny_file, marker, what):
    state = load_file(str(tiny_file))
    state[marker] = torch.zeros(())
    save_file(state, str(tmp_path / "m.safetensors"))
    refused(tmp_path / "m.safetensors", what, marker)


@pytest.mark.parametrize("sched", [{"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"},
                                   {"_class_name": "EDMDPMSolverMultistepScheduler"}])
def test_diffusers_folders_sampled_otherwise_are_refused(tmp_path, tiny_folder, sched):
    import json
    import shutil

    d = tmp_path / "v"
    shutil.copytree(tiny_folder, d)
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    refused(d, "epsilon-prediction models only", sched["_class_name"])
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler",
                                                                       "prediction_type": "epsilon"}))
    assert open_checkpoint(d, families=BOTH).config == TINY_XL
