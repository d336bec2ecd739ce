"""The pure-torch SD autoencoder against diffusers' AutoencoderKL, and its parameter layout."""

import pytest
import torch

from lib_hrlr.config.architectures import SD15, TINY
from lib_hrlr.errors import InvalidInput
from lib_hrlr.models.vae import AutoencoderKL, diffusers_key_map

diffusers = pytest.importorskip("diffusers")


def diffusers_vae(cfg):
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.ch_mult),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=512,
        scaling_factor=cfg.scaling_factor,
    )


def load_from_diffusers(ours: torch.nn.Module, theirs: torch.nn.Module, cfg) -> None:
    mapping = diffusers_key_map(cfg)
    target = ours.state_dict()
    converted = {}
    for k, v in theirs.state_dict().items():
        name = mapping[k]
        assert v.numel() == target[name].numel(), name
        converted[name] = v.reshape(target[name].shape)
    ours.load_state_dict(converted, strict=True)  # raises on any missing or unexpected name


def test_tiny_matches_diffusers_encode_and_decode():
    torch.manual_seed(0)
    cfg = TINY.vae
    ref = diffusers_vae(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial so every parameter matters
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    ours = AutoencoderKL(cfg).eval()
    load_from_diffusers(ours, ref, cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 96, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 12, 10, generator=g)
    with torch.no_grad():
        enc_ref = ref.encode(x).latent_dist.mean
        enc = ours.encode(x)
        dec_ref = ref.decode(z).sample
        dec = ours.decode(z)
    assert enc.shape == enc_ref.shape == (1, 4, 12, 8)
    assert dec.shape == dec_ref.shape == (1, 3, 96, 80)
    e, d = (enc - enc_ref).abs().max().item(), (dec - dec_ref).abs().max().item()
    print(f"tiny vs diffusers: encode max abs diff {e:.2e}, decode {d:.2e}")
    assert enc_ref.abs().max() > 0.1 and dec_ref.abs().max() > 0.1
    assert e <= 1e-4 and d <= 1e-4


def test_sd15_layout_is_a_bijection_with_diffusers_on_meta():
    cfg = SD15.vae
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        theirs = diffusers_vae(cfg)
    assert all(p.is_meta for p in ours.parameters())
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    mapping = diffusers_key_map(cfg)
    assert set(mapping) == set(theirs_sd)
    assert set(mapping.values()) == set(ours_sd)
    assert len(set(mapping.values())) == len(mapping)
    for k, v in mapping.items():
        assert theirs_sd[k].numel() == ours_sd[v].numel(), (k, v)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    # a few names exactly as LDM checkpoints spell them
    for name in ("encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                 "encoder.down.2.downsample.conv.bias", "encoder.mid.attn_1.proj_out.weight",
                 "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.norm2.bias",
                 "decoder.up.1.block.0.nin_shortcut.bias", "decoder.mid.block_2.conv1.weight",
                 "quant_conv.weight", "post_quant_conv.bias", "decoder.norm_out.weight"):
        assert name in ours_sd, name
    assert "encoder.down.3.downsample.conv.weight" not in ours_sd
    assert "decoder.up.0.upsample.conv.weight" not in ours_sd
    assert ours_sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_halves_can_be_built_alone():
    with torch.device("meta"):
        full = set(AutoencoderKL(SD15.vae).state_dict())
        dec = AutoencoderKL(SD15.vae, encoder=False)
        enc = AutoencoderKL(SD15.vae, decoder=False)
    dec_keys, enc_keys = set(dec.state_dict()), set(enc.state_dict())
    assert dec_keys | enc_keys == full and not dec_keys & enc_keys
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in dec_keys)
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in enc_keys)
    with pytest.raises(InvalidInput) as e:
        dec.encode(torch.zeros(1, 3, 8, 8, device="meta"))
    assert e.value.field == "vae"


def test_invalid_shapes_name_the_field():
    vae = AutoencoderKL(TINY.vae)
    with pytest.raises(InvalidInput) as e:
        vae.encode(torch.zeros(1, 3, 20, 16))
    assert e.value.field == "image" and "multiples of 8" in e.value.message
    with pytest.raises(InvalidInput) as e:
        vae.decode(torch.zeros(1, 3, 8, 8))
    assert e.value.field == "latent"
