"""The SDXL UNet (tiny_xl config) against diffusers' UNet2DConditionModel with added
text/time conditioning, weights converted by name; and the exact SDXL layout on meta."""

import math

import pytest
import torch

from lib_hrlr.config.architectures import SDXL, TINY_XL
from lib_hrlr.errors import InvalidInput
from lib_hrlr.models.unet import UNet, adm_vector, diffusers_key_map, micro_conditioning_embedding

diffusers = pytest.importorskip("diffusers")


def tiny_xl_diffusers():
    """diffusers' spelling of tiny_xl, written out by hand (the independent reference)."""
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=2,
        attention_head_dim=(2, 4, 8),  # diffusers' name for the head count: channels / 16
        cross_attention_dim=80, transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=88,
        norm_num_groups=32,
    ).eval()


def paired(seed=0):
    torch.manual_seed(seed)
    ref = tiny_xl_diffusers()
    with torch.no_grad():  # default init leaves norms at 1/0 and some layers at zero: make every tensor matter
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif p.dim() == 1:
                p.uniform_(0.8, 1.2)
    ours = UNet(TINY_XL.unet).eval()
    key_map = diffusers_key_map(TINY_XL.unet)
    ref_state = ref.state_dict()
    assert sorted(key_map) == sorted(ref_state)  # a bijection: nothing left over on either side
    assert sorted(key_map.values()) == sorted(ours.state_dict())
    ours.load_state_dict({key_map[k]: v for k, v in ref_state.items()}, strict=True)
    return ref, ours


def test_tiny_xl_matches_diffusers_text_time_unet():
    ref, ours = paired()
    g = torch.Generator().manual_seed(1)
    for h, w in [(16, 16), (24, 32)]:
        x = torch.randn(2, 4, h, w, generator=g)
        t = torch.tensor([15.0, 801.0])
        ctx = torch.randn(2, 77 * 2, 80, generator=g)
        pooled = torch.randn(2, 40, generator=g)
        time_ids = torch.tensor([[1024.0, 768.0, 0.0, 128.0, 2048.0, 1536.0], [512.0, 512.0, 64.0, 0.0, 512.0, 512.0]])
        with torch.no_grad():
            expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            got = ours(x, t, ctx, adm_vector(pooled, time_ids, 8))
            ours.set_chunking(ff_tokens=40, attn_queries=40, conv_weights=1)
            chunked = ours(x, t, ctx, adm_vector(pooled, time_ids, 8))
            ours.set_chunking(None, None)
            # the micro-conditioning reaches the output: other time_ids, other eps
            other = ours(x, t, ctx, adm_vector(pooled, time_ids.flip(0), 8))
        assert expected.std() > 0.05
        diff = (got - expected).abs().max().item()
        print(f"tiny_xl {h}x{w}: max |ours - diffusers| = {diff:.2e}")
        assert diff <= 2e-5
        assert (chunked - expected).abs().max().item() <= 2e-5
        assert (other - got).abs().max().item() > 1e-3


def test_micro_conditioning_embedding_is_the_cos_first_sinusoid():
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    emb = micro_conditioning_embedding(ids, 256)
    assert emb.shape == (1, 6 * 256)
    half = 128
    freqs = [math.exp(-math.log(10000.0) * i / half) for i in range(half)]
    expected0 = [math.cos(1024.0 * f) for f in freqs] + [math.sin(1024.0 * f) for f in freqs]
    assert torch.allclose(emb[0, :256], torch.tensor(expected0), atol=1e-4)
    assert torch.equal(emb[0, 512:768], torch.cat([torch.ones(128), torch.zeros(128)]))  # crop top 0
    y = adm_vector(torch.zeros(1, 1280), ids, 256)
    assert y.shape == (1, SDXL.unet.adm_in_channels)


def test_sdxl_on_meta_has_the_real_layout_and_size():
    with torch.device("meta"):
        unet = UNet(SDXL.unet)
    state = unet.state_dict()
    n = sum(t.numel() for t in state.values())
    assert n == 2_567_463_684  # SDXL base UNet parameter count (2.567 B, as measured for issue 12)
    assert state["label_emb.0.0.weight"].shape == (1280, 2816)
    assert state["input_blocks.4.1.proj_in.weight"].shape == (640, 640)  # linear proj_in
    assert "input_blocks.1.1.norm.weight" not in state  # no attention at level 0
    depths = {f"input_blocks.{i}.1": len({k.split(".")[4] for k in state if k.startswith(f"input_blocks.{i}.1.transformer_blocks.")})
              for i in (4, 5, 7, 8)}
    assert depths == {"input_blocks.4.1": 2, "input_blocks.5.1": 2, "input_blocks.7.1": 10, "input_blocks.8.1": 10}
    assert any(k.startswith("middle_block.1.transformer_blocks.9.") for k in state)
    assert unet.input_blocks[7][1].transformer_blocks[0].attn1.heads == 20  # 1280 / 64
    assert unet.input_blocks[4][1].transformer_blocks[0].attn1.heads == 10
    assert len(diffusers_key_map(SDXL.unet)) == len(state)


def test_adm_vector_is_required_exactly_when_the_config_has_one():
    unet = UNet(TINY_XL.unet).eval()
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 80)
    with pytest.raises(InvalidInput, match="'y'|y"):
        unet(x, torch.tensor([1.0]), ctx)
    with pytest.raises(InvalidInput, match="y"):
        unet(x, torch.tensor([1.0]), ctx, torch.zeros(1, 87))
    with pytest.raises(InvalidInput, match="time_ids"):
        adm_vector(torch.zeros(1, 40), torch.zeros(1, 5), 8)
