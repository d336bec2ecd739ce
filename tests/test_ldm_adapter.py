"""The backend over an already-loaded LDM-style model (what the webui glue hands the engine)
gives the same image as streaming the same weights from the checkpoint file."""

import numpy as np
import pytest
import torch
from PIL import Image

from lib_hrlr.adapters.ldm import LdmBackend, LdmVaeView
from lib_hrlr.models.unet import UNet
from lib_hrlr.models.vae import AutoencoderKL
from lib_hrlr.pipeline.generate import generate
from lib_hrlr.pipeline.params import GenerationParams
from lib_hrlr.text.clip_text import ClipTextEncoder
from lib_hrlr.text.prompts import encode_prompts
from lib_hrlr.vae.tiled_vae import decode_tiled
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint
from tests.conftest import read_source


def _load(module: torch.nn.Module, sources) -> torch.nn.Module:
    own = module.state_dict()
    module.load_state_dict({k: read_source(sources[k]).float().reshape(own[k].shape) for k in own})
    return module.eval()


class LdmShaped(torch.nn.Module):
    """The LatentDiffusion surface the adapter uses, over our own networks with resident weights."""

    def __init__(self, ckpt):
        super().__init__()
        cfg = ckpt.config
        self.model = torch.nn.Module()
        self.model.diffusion_model = _load(UNet(cfg.unet), ckpt.component("unet"))
        self.first_stage_model = _load(AutoencoderKL(cfg.vae), ckpt.component("vae"))
        self.text = _load(ClipTextEncoder(cfg.text), ckpt.component("text"))
        self.scale_factor = cfg.vae.scaling_factor

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, cond)

    def get_learned_conditioning(self, prompts):
        return torch.cat(encode_prompts(self.text, prompts, clip_skip=1))


@pytest.fixture(scope="module")
def tiny():
    path = cached_random_checkpoint("tiny")
    return str(path), open_checkpoint(path)


def test_resident_ldm_model_matches_streamed_checkpoint(tiny, tmp_path):
    path, ckpt = tiny
    common = dict(prompt="a lighthouse", negative="fog", width=256, height=192, steps=2, seed=5,
                  sampler="euler", budget_mb=8000, dtype="fp32")
    streamed = generate(GenerationParams(model=path, out=str(tmp_path / "a.png"), **common))
    model = LdmShaped(ckpt)
    backend = LdmBackend(model, ckpt.config, "tiny-resident", "0000000000")
    resident = generate(GenerationParams(out=str(tmp_path / "b.png"), **common), backend=backend)
    a = np.asarray(Image.open(streamed.path), dtype=np.int16)
    b = np.asarray(Image.open(resident.path), dtype=np.int16)
    assert a.shape == b.shape == (192, 256, 3)
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
    assert "Model: tiny-resident" in resident.infotext
    assert backend.resident_mb > 0 and resident.stats["unet_evals"] == streamed.stats["unet_evals"]


def test_resident_model_computes_in_its_own_dtype_whatever_the_run_asks(tiny, tmp_path):
    """A resident fp32 model asked for a bf16 run (what ``auto`` picks on AVX512-BF16 CPUs)
    gets its inputs in fp32: the image equals the fp32 run's."""
    path, ckpt = tiny
    common = dict(prompt="a lighthouse", negative="fog", width=128, height=128, steps=2, seed=5,
                  sampler="euler", budget_mb=8000)
    backend = LdmBackend(LdmShaped(ckpt), ckpt.config, "tiny-resident", "0000000000")
    a = generate(GenerationParams(out=str(tmp_path / "a.png"), dtype="fp32", **common), backend=backend)
    b = generate(GenerationParams(out=str(tmp_path / "b.png"), dtype="bf16", **common), backend=backend)
    ia = np.asarray(Image.open(a.path), dtype=np.int16)
    ib = np.asarray(Image.open(b.path), dtype=np.int16)
    assert np.abs(ia - ib).max() == 0


@pytest.mark.parametrize("weights,expected", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                              (torch.float8_e4m3fn, None)])
def test_model_dtype_is_the_unets_compute_dtype(tiny, weights, expected):
    """fp8 weights are storage only (the webui computes them under autocast): the run keeps its dtype."""
    _, ckpt = tiny
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.diffusion_model = torch.nn.Linear(4, 4).to(weights)
    model.get_learned_conditioning = None
    assert LdmBackend(model, ckpt.config, "x", "0").model_dtype == expected


def test_vae_view_decodes_an_ldm_autoencoder_like_the_engine_model(tiny):
    _, ckpt = tiny
    vae = _load(AutoencoderKL(ckpt.config.vae), ckpt.component("vae"))
    z = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = decode_tiled(vae, z, tile=16, output="float")
        via_view = decode_tiled(LdmVaeView(vae, ckpt.config.vae), z, tile=16, output="float")
    try:
        diff = (ref.to_tensor() - via_view.to_tensor()).abs().max().item()
    finally:
        ref.close()
        via_view.close()
    assert diff == 0.0
