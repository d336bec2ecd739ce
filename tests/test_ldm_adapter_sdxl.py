"""The backend over the webui's loaded SDXL model (an sgm ``DiffusionEngine``) gives the same
image as streaming the same weights from the checkpoint, and the webui model's UNet receives
per-tile ADM vectors whose size and crop parts say what the micro-conditioning policy says.

``SgmShaped`` is the surface of the webui's SDXL model the adapter uses, over our own TINY_XL
networks with resident weights: ``get_learned_conditioning(list[str])`` returns the sgm dict
``{"crossattn", "vector"}`` with ``vector`` = pooled bigG projection + the Fourier embeddings
of the webui's default sizes for a plain prompt list (1024², crop (0, 0)), and
``apply_model(x, t, cond)`` runs the UNet with ``context=cond["crossattn"], y=cond["vector"]``
(sgm's OpenAIWrapper).  The Fourier embedding here is written out from its definition
(sgm ``timestep_embedding``: cosines then sines of ``v * 10000^(-i / half)``), not the engine's.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lib_hrlr.adapters.ldm import LdmBackend
from lib_hrlr.errors import InvalidInput
from lib_hrlr.models.unet import UNet
from lib_hrlr.models.vae import AutoencoderKL
from lib_hrlr.pipeline.backend import RunSettings
from lib_hrlr.pipeline.generate import generate
from lib_hrlr.pipeline.params import GenerationParams
from lib_hrlr.text.clip_text import ClipTextEncoder
from lib_hrlr.text.sdxl_conditioning import encode_prompts_sdxl
from lib_hrlr.tiling.plan import plan_tiles
from lib_hrlr.weights.checkpoint import FAMILIES, open_checkpoint
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint
from tests.conftest import read_source

WEBUI_SIZE = (1024, 1024)  # sd_models_xl.get_learned_conditioning's size for a batch without width/height
W, H = 256, 192  # the runs' canvas: 32 x 24 latent px, tiny_xl's 16-px tiles with overlap 4
BASE_HW = (112, 144)  # tiny_xl's base image for 256x192 (SDXL's 1152x896 bucket at its 128² native area)


def fourier(values, dim: int) -> np.ndarray:
    """sgm's ConcatTimestepEmbedderND for one sample: each value's ``dim``-wide sinusoid, concatenated."""
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    return np.concatenate([np.concatenate([np.cos(v * freqs), np.sin(v * freqs)]) for v in values])


def _load(module: torch.nn.Module, sources) -> torch.nn.Module:
    own = module.state_dict()
    module.load_state_dict({k: read_source(sources[k]).float().reshape(own[k].shape) for k in own})
    return module.eval()


class SgmShaped(torch.nn.Module):
    """The DiffusionEngine surface the adapter uses (module docstring); records every UNet call's
    latent size and ``vector``."""

    def __init__(self, ckpt):
        super().__init__()
        cfg = ckpt.config
        self.cfg = cfg
        self.model = torch.nn.Module()  # sgm's OpenAIWrapper holds the UNet as .diffusion_model
        self.model.diffusion_model = _load(UNet(cfg.unet), ckpt.component("unet"))
        self.first_stage_model = _load(AutoencoderKL(cfg.vae), ckpt.component("vae"))
        self.text_l = _load(ClipTextEncoder(cfg.text), ckpt.component("text"))
        self.text_g = ClipTextEncoder(cfg.text2)
        self.text_g.text_projection.transposed = "text2.text_projection.weight" in ckpt.transposed
        _load(self.text_g, ckpt.component("text2"))
        self.scale_factor = cfg.vae.scaling_factor
        self.calls: list[tuple[tuple[int, int], torch.Tensor]] = []

    def get_learned_conditioning(self, prompts):
        conds = encode_prompts_sdxl(self.text_l.encode_sdxl, self.text_g.encode_sdxl, prompts)
        h, w = WEBUI_SIZE
        sizes = fourier((h, w, 0, 0, h, w), self.cfg.unet.added_time_dim)
        vector = torch.cat([torch.cat([c.pooled, torch.tensor(sizes, dtype=torch.float32)[None]], dim=1)
                            for c in conds])
        return {"crossattn": torch.cat([c.context for c in conds]), "vector": vector}

    def apply_model(self, x, t, cond):
        assert isinstance(cond, dict) and set(cond) == {"crossattn", "vector"}
        self.calls.append((tuple(x.shape[-2:]), cond["vector"].detach().clone()))
        return self.model.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])


@pytest.fixture(scope="module")
def tiny_xl():
    path = cached_random_checkpoint("tiny_xl")
    return str(path), open_checkpoint(path, families=FAMILIES)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("policy,negative", [("offset", "fog"), ("canvas", "")])
def test_resident_sgm_model_matches_streamed_checkpoint(tiny_xl, tmp_path, policy, negative):
    """Same image (max pixel diff <= 1) as the streamed checkpoint under the same policy; the
    empty negative prompt is zeros in both (the webui's SDXL rule)."""
    path, ckpt = tiny_xl
    common = dict(prompt="a (red:1.2) lighthouse", negative=negative, width=W, height=H, steps=2, seed=5,
                  sampler="euler", budget_mb=8000, dtype="fp32", micro_conditioning=policy)
    streamed = generate(GenerationParams(model=path, out=str(tmp_path / "a.png"), **common))
    backend = LdmBackend(SgmShaped(ckpt), ckpt.config, "tiny-xl-resident", "0000000000")
    resident = generate(GenerationParams(out=str(tmp_path / "b.png"), **common), backend=backend)
    a, b = _pixels(streamed.path), _pixels(resident.path)
    assert a.shape == b.shape == (H, W, 3)
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
    assert a.std() > 5  # an image, not a flat field that any conditioning would reproduce
    assert f"HRLR micro-conditioning: {policy}" in resident.infotext
    assert resident.stats["unet_evals"] == streamed.stats["unet_evals"] > 0


def _expected_tails(policy: str, dim: int) -> set:
    """The size/crop part of every tile's vector under ``policy``, from the tile plan."""
    out = set()
    for t in plan_tiles(H // 8, W // 8, 16, 4).tiles:
        th, tw = t.h * 8, t.w * 8
        values = {"offset": (H, W, t.y * 8, t.x * 8, th, tw), "zero": (th, tw, 0, 0, th, tw),
                  "canvas": (H, W, 0, 0, H, W)}[policy]
        out.add(tuple(np.round(fourier(values, dim), 4)))
    return out


@pytest.mark.parametrize("policy", ["offset", "zero", "canvas"])
def test_webui_model_gets_per_tile_vectors_the_policy_says(tiny_xl, tmp_path, policy):
    _, ckpt = tiny_xl
    cfg = ckpt.config
    p, dim = cfg.pooled_dim, cfg.unet.added_time_dim
    model = SgmShaped(ckpt)
    backend = LdmBackend(model, cfg, "tiny-xl-resident", "0")
    generate(GenerationParams(prompt="a lighthouse", negative="fog", width=W, height=H, steps=1, seed=5,
                              sampler="euler", budget_mb=8000, dtype="fp32", micro_conditioning=policy,
                              tile_batch=1, out=str(tmp_path / "x.png")), backend=backend)
    webui = model.get_learned_conditioning(["a lighthouse", "fog"])["vector"]
    base = [v for hw, v in model.calls if hw == (BASE_HW[0] // 8, BASE_HW[1] // 8)]
    tiles = [v for hw, v in model.calls if hw == (16, 16)]
    assert len(base) + len(tiles) == len(model.calls) and base and tiles
    for v in base + tiles:  # rows: the prompt then the negative; their pooled part is the webui's
        assert v.shape == (2, p + 6 * dim)
        assert torch.equal(v[:, :p], webui[:, :p])
        assert torch.equal(v[0, p:], v[1, p:])  # the negative gets the prompt's sizes
    bh, bw = BASE_HW
    for v in base:  # the base pass: a plain generation of its own size, not the webui's 1024²
        np.testing.assert_allclose(v[0, p:].numpy(), fourier((bh, bw, 0, 0, bh, bw), dim), atol=1e-5)
    got = {tuple(np.round(v[0, p:].numpy().astype(np.float64), 4)) for v in tiles}
    expected = _expected_tails(policy, dim)
    assert got == expected
    n_tiles = len(plan_tiles(H // 8, W // 8, 16, 4).tiles)
    # offset: one vector per tile (the crops differ), the size parts alike; zero and canvas: one for all
    assert len(expected) == (n_tiles if policy == "offset" else 1) and n_tiles == 6
    if policy == "offset":
        seg = [np.array(t) for t in sorted(got)]
        orig = {tuple(s[: 2 * dim]) for s in seg}
        target = {tuple(s[4 * dim:]) for s in seg}
        crops = {tuple(s[2 * dim: 4 * dim]) for s in seg}
        assert len(orig) == 1 and len(target) == 1 and len(crops) == n_tiles
        # the tile at the origin: crop (0, 0) embeds as cos 0 = 1, sin 0 = 0
        assert tuple(np.round(np.r_[np.ones(dim // 2), np.zeros(dim // 2)] * 1.0, 4)) * 2 in crops


def test_sdxl_conditions_keep_the_pooled_part_and_zero_the_empty_negative(tiny_xl):
    _, ckpt = tiny_xl
    cfg = ckpt.config
    model = SgmShaped(ckpt)
    backend = LdmBackend(model, cfg, "x", "0")
    conds = backend.encode_text(["a lighthouse", ""], 1, zero_if_empty=[False, True])
    ref = model.get_learned_conditioning(["a lighthouse", ""])
    assert torch.equal(conds[0].context, ref["crossattn"][:1]) and torch.equal(conds[0].pooled, ref["vector"][:1, :40])
    assert conds[0].pooled.shape == (1, 40) and cfg.pooled_dim == 40
    assert conds[1].context.abs().max() == 0 and conds[1].pooled.abs().max() == 0
    # the empty prompt that is not the negative is encoded as usual
    kept = backend.encode_text(["a lighthouse", ""], 1, zero_if_empty=[False, False])
    assert torch.equal(kept[1].pooled, ref["vector"][1:2, :40]) and kept[1].pooled.abs().max() > 0


def test_sdxl_config_over_a_model_without_the_sgm_dict_names_the_model(tiny_xl):
    _, ckpt = tiny_xl
    model = SgmShaped(ckpt)
    model.get_learned_conditioning = lambda prompts: torch.zeros(len(prompts), 77, 80)
    with pytest.raises(InvalidInput) as e:
        LdmBackend(model, ckpt.config, "x", "0").encode_text(["a"], 1)
    assert e.value.field == "model" and "crossattn" in str(e.value)


def test_sdxl_taesd_is_the_taesdxl_pair(tiny_xl, tmp_path, shared_weights):
    """The resident SDXL model's TAESD pass decodes with the TAESDXL decoder (the SD 1.x pair has
    the same shapes and would decode garbage silently): same latents -> same image as the streamed run."""
    path, ckpt = tiny_xl
    common = dict(prompt="a lighthouse", negative="fog", width=128, height=128, steps=1, seed=3, sampler="euler",
                  budget_mb=8000, dtype="fp32", vae="taesd", taesd_dir=str(shared_weights / "taesd"))
    streamed = generate(GenerationParams(model=path, out=str(tmp_path / "a.png"), **common))
    backend = LdmBackend(SgmShaped(ckpt), ckpt.config, "r", "0")
    resident = generate(GenerationParams(out=str(tmp_path / "b.png"), **common), backend=backend)
    assert np.abs(_pixels(streamed.path) - _pixels(resident.path)).max() <= 1
    only_sd1 = tmp_path / "sd1"
    only_sd1.mkdir()
    for name in ("taesd_encoder.safetensors", "taesd_decoder.safetensors"):
        (only_sd1 / name).write_bytes((shared_weights / "taesd" / name).read_bytes())
    backend.prepare(RunSettings(dtype=torch.float32, device=torch.device("cpu"), vae_dtype=torch.float32,
                                vae_device=torch.device("cpu"), vae_mode="taesd", taesd_dir=str(only_sd1)), None)
    with pytest.raises(InvalidInput) as e:
        backend.decode(torch.zeros(1, 4, 16, 16), tile=16, output="uint8")
    assert e.value.field == "taesd_dir" and "taesdxl_decoder" in str(e.value)


def test_glue_request_runs_an_sdxl_webui_model_with_its_micro_conditioning(tiny_xl, tmp_path):
    """What the glue's normal mode does with a request (scripts/hrlr_glue/run.py, without the
    webui): request -> engine parameters -> the engine's validation for the model -> a run over
    the resident model; a policy the engine does not know is refused naming the request field."""
    import dataclasses
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from hrlr_glue.names import api_error
    from hrlr_glue.request import HrlrRequest, to_params
    from lib_hrlr.pipeline.params import validate, with_model_defaults

    path, ckpt = tiny_xl
    cfg = ckpt.config
    req = HrlrRequest(prompt="a lighthouse", negative_prompt="", width=128, height=128, steps=1, seed=2,
                      sampler_name="Euler", micro_conditioning="zero", budget_mb=8000)
    params = to_params(req, model=path, out=str(tmp_path / "g.png"))
    assert params.micro_conditioning == "zero"
    validate(with_model_defaults(params, cfg), cfg)
    run = dataclasses.replace(params, dtype="fp32", device="cpu", vae_device="cpu")
    result = generate(run, backend=LdmBackend(SgmShaped(ckpt), cfg, "tiny-xl", "0"))
    assert "HRLR micro-conditioning: zero" in result.infotext
    bad = to_params(HrlrRequest(prompt="x", micro_conditioning="centre"), model=path)
    with pytest.raises(InvalidInput) as e:
        try:
            validate(with_model_defaults(bad, cfg), cfg)
        except InvalidInput as err:
            raise api_error(err)
    assert e.value.field == "micro_conditioning" and "offset, zero, canvas" in str(e.value)


def test_sdxl_fp16_vae_of_the_webui_decodes_in_float32(tiny_xl):
    """SDXL's VAE overflows in float16: the webui's fp16 autoencoder is decoded in float32 (its
    weights converted step by step), which equals a float32 copy of the same fp16 weights."""
    _, ckpt = tiny_xl
    model = SgmShaped(ckpt)
    model.first_stage_model.half()
    ref = SgmShaped(ckpt)
    ref.first_stage_model.load_state_dict({k: v.float() for k, v in model.first_stage_model.state_dict().items()})
    cpu = torch.device("cpu")
    out = []
    for m in (model, ref):
        backend = LdmBackend(m, ckpt.config, "x", "0")
        backend.prepare(RunSettings(dtype=torch.float32, device=cpu, vae_dtype=torch.float16, vae_device=cpu), None)
        assert backend._vae_kw(None, None)["dtype"] == torch.float32
        z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(1))
        arr = backend.decode(z, tile=16, output="float")
        try:
            out.append(arr.to_tensor())
        finally:
            arr.close()
    assert out[0].dtype == torch.float32 and torch.equal(out[0], out[1])


def test_accordion_tiling_passes_the_webui_sdxl_cond_dict_to_every_crop(tiny_xl):
    """The txt2img/img2img accordion wraps the webui's own CFG denoiser; for SDXL the webui's cond
    is ``{"crossattn", "vector", "c_concat"}``: every crop call gets each row's crossattn and
    vector (the webui's own, for its canvas size: the ``canvas`` policy), repeated per crop, and
    the webui model's UNet runs on them (the blend of a real UNet over 2 x 3 tiles)."""
    from lib_hrlr.tiling.wrap import TiledDenoiser

    _, ckpt = tiny_xl
    model = SgmShaped(ckpt)
    c = model.get_learned_conditioning(["a lighthouse", "fog"])
    image_cond = torch.zeros(2, 5, 1, 1)  # what the webui passes for txt2img
    seen = []

    def inner(x, sigma, cond):  # the webui's CompVisDenoiser seen from the CFG denoiser, at t = sigma
        seen.append(cond)
        with torch.no_grad():
            return model.apply_model(x, sigma, {"crossattn": cond["crossattn"], "vector": cond["vector"]})

    x = torch.randn(2, 4, 24, 32, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([500.0, 500.0])
    plan = plan_tiles(24, 32, 16, 4)
    out = TiledDenoiser(inner, plan, batch=2)(x, sigma, cond={**c, "c_concat": [image_cond]})
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(seen) == 3 and len(plan.tiles) == 6
    for cond in seen:  # 2 crops per call, each with both rows
        assert torch.equal(cond["vector"], c["vector"].repeat(2, 1))
        assert torch.equal(cond["crossattn"], c["crossattn"].repeat(2, 1, 1))
        assert torch.equal(cond["c_concat"][0], image_cond.repeat(2, 1, 1, 1))
    # the top-left corner is covered by the first tile alone: its value is that crop's own UNet output
    with torch.no_grad():
        first = model.apply_model(x[..., :16, :16], sigma, {"crossattn": c["crossattn"], "vector": c["vector"]})
    assert torch.allclose(out[..., :4, :4], first[..., :4, :4], atol=1e-5)


def test_accordion_encode_returns_what_the_webui_model_family_returns():
    """The accordion replaces ``encode_first_stage``: for an LDM (SD 1.x) model it must return the
    unscaled latent (the webui's get_first_stage_encoding multiplies by scale_factor), for an sgm
    (SDXL) model the scaled one (sgm's encode_first_stage scales, get_first_stage_encoding is the
    identity); the engine's encode gives scaled latents."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from hrlr_glue.accordion_plan import encode_first_stage_divisor
    from lib_hrlr.config.architectures import ARCHITECTURES

    assert encode_first_stage_divisor(ARCHITECTURES["sdxl"]) == 1.0
    assert encode_first_stage_divisor(ARCHITECTURES["tiny_xl"]) == 1.0
    assert encode_first_stage_divisor(ARCHITECTURES["sd15"]) == 0.18215
