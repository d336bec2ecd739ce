import dataclasses

import pytest
import torch

from lib_hrlr.config.architectures import SD15, TINY, UNetConfig
from lib_hrlr.errors import InvalidInput
from lib_hrlr.models.unet import MIN_CHUNK, GroupedConv2d, UNet, chunk_spans, diffusers_key_map

diffusers = pytest.importorskip("diffusers")


# a second small architecture: linear proj_in/proj_out, two transformer blocks per
# SpatialTransformer, a level without attention and three levels (two downsamples)
LINEAR = dataclasses.replace(
    TINY.unet, use_linear_in_transformer=True, transformer_depth=2,
    channel_mult=(1, 2, 2), attention_levels=(True, False, True),
)


def diffusers_config(cfg: UNetConfig) -> dict:
    return dict(
        sample_size=16,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        attention_head_dim=cfg.num_heads,  # diffusers' SD1 naming: this is the head count
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        transformer_layers_per_block=cfg.transformer_depth,
        use_linear_projection=cfg.use_linear_in_transformer,
    )


def paired(cfg: UNetConfig, seed: int = 0):
    """diffusers' UNet with random weights, and ours loaded from it through the key map."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**diffusers_config(cfg)).eval()
    with torch.no_grad():  # default init leaves norms at 1/0: make every tensor matter
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif p.dim() == 1:
                p.uniform_(0.8, 1.2)
    ours = UNet(cfg).eval()
    key_map = diffusers_key_map(cfg)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict({key_map[k]: v.reshape(shapes[key_map[k]]) for k, v in ref.state_dict().items()},
                         strict=True)
    return ref, ours


def inputs(cfg: UNetConfig, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([15.0, 801.0])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("cfg", [TINY.unet, LINEAR], ids=["tiny", "linear"])
def test_matches_diffusers_with_and_without_chunking(cfg):
    ref, ours = paired(cfg)
    for h, w in [(16, 16), (24, 32)]:
        x, t, ctx = inputs(cfg, h, w)
        x0, ctx0 = x.clone(), ctx.clone()
        with torch.no_grad():
            expected = ref(x, t, ctx).sample
            plain = ours(x, t, ctx)
            ours.set_chunking(ff_tokens=48, attn_queries=40, conv_weights=1)  # convs in groups of 32 channels
            chunked = ours(x, t, ctx)
            ours.set_chunking(ff_tokens=1, attn_queries=1)  # raised to MIN_CHUNK
            smallest = ours(x, t, ctx)
            ours.set_chunking(None, None)
        assert expected.abs().max() > 0.1 and expected.std() > 0.05
        assert plain.shape == expected.shape and plain.dtype == torch.float32
        assert (plain - expected).abs().max().item() <= 1e-5
        assert (chunked - expected).abs().max().item() <= 1e-5
        assert (chunked - plain).abs().max().item() <= 1e-6
        assert (smallest - plain).abs().max().item() <= 1e-6
        # the in-place arithmetic never touches the caller's tensors
        assert torch.equal(x, x0) and torch.equal(ctx, ctx0)


def test_grouped_convolution_equals_the_whole_one_and_splits_by_weight_count(monkeypatch):
    torch.manual_seed(0)
    conv = GroupedConv2d(96, 100, 3, stride=2, padding=1).eval()
    x = torch.randn(2, 96, 9, 11)
    with torch.no_grad():
        whole = conv(x)
        seen = []
        real = torch.nn.functional.conv2d
        monkeypatch.setattr(torch.nn.functional, "conv2d", lambda inp, w, *a: seen.append(w.shape[0]) or real(inp, w, *a))
        conv.weight_limit = 40 * 96 * 9  # at most 40 output channels per call: 34 + 33 + 33
        grouped = conv(x)
    assert seen == [34, 33, 33]
    assert grouped.shape == whole.shape and (grouped - whole).abs().max().item() <= 1e-5
    assert conv.state_dict().keys() == {"weight", "bias"}  # checkpoints load as into nn.Conv2d


def test_chunk_spans_are_balanced_and_bounded():
    assert chunk_spans(100, None) == [(0, 100)]
    assert chunk_spans(100, 100) == [(0, 100)]
    assert chunk_spans(100, 40) == [(0, 34), (34, 67), (67, 100)]
    spans = chunk_spans(4096, 1000)
    assert [e - s for s, e in spans] == [820, 819, 819, 819, 819]
    assert spans[0][0] == 0 and spans[-1][1] == 4096
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert MIN_CHUNK == 32 and [e - s for s, e in chunk_spans(100, 3)] == [25, 25, 25, 25]
    assert [e - s for s, e in chunk_spans(33, 1)] == [17, 16]


def test_each_weight_module_is_called_once_per_forward():
    """Weight streaming hooks leaves: chunked attention must not call projections per chunk."""
    unet = UNet(TINY.unet).eval()
    calls: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, m in unet.named_modules() if list(m.parameters(recurse=False))]
    unet.set_chunking(ff_tokens=100, attn_queries=40)
    x, t, ctx = inputs(TINY.unet, 16, 16)
    with torch.no_grad():
        unet(x, t, ctx)
    for h in hooks:
        h.remove()
    ff = {k: v for k, v in calls.items() if ".ff.net." in k}
    assert len(calls) == len(hooks)
    assert all(v == 1 for k, v in calls.items() if k not in ff)
    # level 0 has 16 * 16 = 256 tokens: 3 spans of <= 100; level 1 has 64: one span
    assert ff["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"] == 3
    assert ff["input_blocks.4.1.transformer_blocks.0.ff.net.2"] == 1


def test_latent_sizes_that_are_not_multiples_of_the_downsampling():
    ref, ours = paired(LINEAR, seed=3)  # two downsamples: 15x17 -> 8x9 -> 4x5
    x, t, ctx = inputs(LINEAR, 15, 17)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        plain = ours(x, t, ctx)
        ours.set_chunking(ff_tokens=48, attn_queries=1)
        chunked = ours(x, t, ctx)
    assert (plain - expected).abs().max().item() <= 1e-5
    # odd query counts change the attention kernel's internal blocking: rounding-level only
    assert (chunked - plain).abs().max().item() <= 1e-5


def test_autograd_path_equals_inference_path():
    torch.manual_seed(0)
    unet = UNet(TINY.unet)
    x, t, ctx = inputs(TINY.unet, 8, 16)
    with torch.no_grad():
        fast = unet(x, t, ctx)
    slow = unet(x, t, ctx)  # parameters require grad: out-of-place arithmetic
    assert slow.requires_grad
    slow.sum().backward()
    assert unet.out[2].weight.grad is not None
    assert (slow.detach() - fast).abs().max().item() <= 1e-6


def test_scalar_timestep_broadcasts_and_bf16_runs():
    torch.manual_seed(0)
    unet = UNet(TINY.unet).eval()
    x, _, ctx = inputs(TINY.unet, 8, 8)
    with torch.no_grad():
        a = unet(x, torch.tensor(500.0), ctx)
        b = unet(x, torch.tensor([500.0, 500.0]), ctx)
        assert torch.equal(a, b)
        unet16 = unet.to(torch.bfloat16)
        c = unet16(x.bfloat16(), torch.tensor([500.0, 500.0]), ctx.bfloat16())
    assert c.dtype == torch.bfloat16
    assert (c.float() - a).abs().max().item() < 0.05 * a.abs().max().item() + 0.05


def test_sd15_on_meta_is_in_bijection_with_diffusers():
    with torch.device("meta"):
        ours = UNet(SD15.unet)
        ref = diffusers.UNet2DConditionModel(**diffusers_config(SD15.unet))
    assert all(p.device.type == "meta" for p in ours.parameters())
    assert not list(ours.buffers())
    ours_numel = {k: p.numel() for k, p in ours.named_parameters()}
    ref_numel = {k: p.numel() for k, p in ref.named_parameters()}
    key_map = diffusers_key_map(SD15.unet)
    assert set(key_map) == set(ref_numel)
    assert set(key_map.values()) == set(ours_numel)
    assert len(set(key_map.values())) == len(key_map)  # injective
    assert all(ours_numel[key_map[k]] == n for k, n in ref_numel.items())
    assert sum(ours_numel.values()) == 859_520_964
    # LDM layout spot checks
    shapes = {k: tuple(p.shape) for k, p in ours.named_parameters()}
    assert shapes["input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert shapes["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["output_blocks.8.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes["input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight"] == (5120, 640)
    assert shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
    assert shapes["out.2.weight"] == (4, 320, 3, 3)
    assert key_map["up_blocks.2.upsamplers.0.conv.weight"] == "output_blocks.8.2.conv.weight"
    assert key_map["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"


def test_bad_inputs_name_the_field():
    unet = UNet(TINY.unet)
    x, t, ctx = inputs(TINY.unet, 8, 8)
    cases = [
        (lambda: unet(x[:, :3], t, ctx), "x"),
        (lambda: unet(x, t, ctx[..., :16]), "context"),
        (lambda: unet(x, t, ctx[:1]), "context"),
        (lambda: unet(x, torch.zeros(3), ctx), "timesteps"),
        (lambda: unet.set_chunking(0, None), "ff_tokens"),
        (lambda: unet.set_chunking(None, 2.5), "attn_queries"),
        (lambda: UNet(dataclasses.replace(TINY.unet, attention_levels=(True,))), "attention_levels"),
        (lambda: UNet(dataclasses.replace(TINY.unet, num_heads=3)), "num_heads"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidInput) as err:
            call()
        assert err.value.field == field
