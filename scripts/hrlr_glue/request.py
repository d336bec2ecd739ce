"""The one request of the tab and the ``/hrlr/v1/txt2img`` route, its limits, and its mapping
to the engine's :class:`GenerationParams` (in :func:`to_params`, nowhere else).

Defaults come from ``GenerationParams``; the settings whose engine default depends on the
model (tile, overlap) are ``None`` here ("the model's own"); the tab's and the accordion's
sliders say the same with :data:`MODEL_TILE` (tile 0) and :data:`QUARTER_OVERLAP` (overlap -1),
which :func:`slider_tiles` maps to ``None`` and :func:`resolve_tiles` to the loaded model's
values (SD 1.x 64/16, SDXL 128/32: :data:`SD1`, :data:`SDXL`).  Only the webui-specific fields (sampler and scheduler names,
LowRAM switches) have their defaults declared here.

Limits (each answered with a 422 / tab error naming the field):

- ``width``, ``height``: at most :data:`MAX_SIDE` px (the engine checks multiples of 8 and the tile);
- ``prompt``, ``negative_prompt`` and each region prompt: at most :data:`MAX_PROMPT_CHUNKS` chunks
  of 75 CLIP tokens (and :data:`MAX_PROMPT_CHARS` characters, checked first so that no huge text
  reaches the tokenizer);
- ``regions``: at most :data:`MAX_REGIONS`;
- ``tile``: a positive multiple of 8 latent px when given (``0`` is not "default").
"""

import dataclasses
import functools
import math
from typing import List, Optional

from pydantic import BaseModel, Field

from lib_hrlr.config.architectures import ARCHITECTURES
from lib_hrlr.errors import InvalidInput
from lib_hrlr.pipeline.params import GenerationParams, with_model_defaults
from lib_hrlr.tiling.regions import WEIGHT_HELP, Region

DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationParams)}
# the engine's model-dependent defaults resolved per family: what tile 0 / overlap -1 stand for
SD1 = with_model_defaults(GenerationParams(prompt=""), ARCHITECTURES["sd15"])
SDXL = with_model_defaults(GenerationParams(prompt=""), ARCHITECTURES["sdxl"])
# the sliders' "the model's own" positions (a slider cannot be empty): tile 0, overlap -1
MODEL_TILE = 0
QUARTER_OVERLAP = -1
TILE_HELP = f"{MODEL_TILE} = the model's own: {SD1.tile} for SD 1.x, {SDXL.tile} for SDXL"
OVERLAP_HELP = f"{QUARTER_OVERLAP} = a quarter of the tile"

MAX_SIDE = 8192
MAX_PROMPT_CHUNKS = 20  # x 75 tokens = 1500 tokens
MAX_PROMPT_CHARS = 20_000
MAX_REGIONS = 16
CHUNK_TOKENS = 75

SIZE_PRESETS = {"2048×2048": (2048, 2048), "2560×1440": (2560, 1440), "1440×2560": (1440, 2560),
                "2048×1152": (2048, 1152), "Custom": None}
# UI label -> request value
VAE_CHOICES = {"Tiled full VAE": "full", "TAESD": "taesd"}
WEIGHTING_CHOICES = {"Gaussian": "gaussian", "Uniform": "uniform"}
LOWRAM_DTYPE_CHOICES = {"Follow the webui": "webui", "bf16": "bf16", "fp32": "fp32"}
REGION_HEADERS = ["x", "y", "w", "h", "weight", "prompt"]


def slider_tiles(tile: Optional[int], overlap: Optional[int]) -> tuple:
    """``(tile, overlap)`` as the request takes them: the sliders' "model's own" positions
    (:data:`MODEL_TILE`, :data:`QUARTER_OVERLAP`) become ``None``; other values pass unchanged."""
    return (None if tile == MODEL_TILE else tile, None if overlap == QUARTER_OVERLAP else overlap)


def resolve_tiles(tile: Optional[int], overlap: Optional[int], model) -> tuple:
    """Concrete ``(tile, overlap)`` for ``model`` (a ``ModelConfig``): the engine's own rule
    (the model's latent tile, a quarter of the tile) for the ``None`` / slider defaults."""
    t, o = slider_tiles(tile, overlap)
    p = with_model_defaults(GenerationParams(prompt="", tile=t, overlap=o), model)
    return p.tile, p.overlap


def label_of(choices: dict, value: str) -> str:
    """The UI label of a request value (``"gaussian"`` -> ``"Gaussian"``)."""
    return next(k for k, v in choices.items() if v == value)

# the regions table starts with this row (skipped while its prompt is empty): a usable template,
# not a row of zeros that would be rejected as weight 0
REGION_TEMPLATE = [0, 0, 512, 512, 1.0, ""]


class RegionModel(BaseModel):
    x: int
    y: int
    w: int
    h: int
    prompt: str
    weight: float = Field(1.0, description=WEIGHT_HELP)


class HrlrRequest(BaseModel):
    """One HighRes-LowRAM generation (the tab builds the same object from its inputs)."""

    prompt: str = ""
    negative_prompt: str = DEFAULTS["negative"]
    width: int = DEFAULTS["width"]
    height: int = DEFAULTS["height"]
    steps: int = DEFAULTS["steps"]
    cfg_scale: float = DEFAULTS["cfg"]
    seed: int = DEFAULTS["seed"]
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    denoising_strength: float = Field(DEFAULTS["strength"], description="guide strength: how far the tiled pass "
                                      "may move away from the upscaled base image")
    tile: Optional[int] = Field(DEFAULTS["tile"], description="latent px; default: the model's native size")
    overlap: Optional[int] = Field(DEFAULTS["overlap"], description="latent px; default: a quarter of the tile")
    tile_batch: Optional[int] = Field(DEFAULTS["tile_batch"], description="tiles per UNet call; "
                                      "default (or 0): as many as the budget allows")
    weighting: str = DEFAULTS["weighting"]
    regions: List[RegionModel] = []
    vae: str = Field(DEFAULTS["vae"], description="full (tiled SD VAE) or taesd")
    micro_conditioning: str = Field(DEFAULTS["micro_conditioning"], description="SDXL only: the size and crop "
                                    "each tile is told (offset, zero or canvas); ignored for SD 1.x")
    budget_mb: float = DEFAULTS["budget_mb"]
    lowram: bool = False
    lowram_dtype: str = Field("webui", description="LowRAM mode's compute dtype: webui (follow the webui's "
                              "precision flags), bf16 or fp32")
    restore_model: bool = True
    send_images: bool = True


def request_from(values: dict) -> HrlrRequest:
    """A request from plain values (the tab's), type errors as InvalidInput naming the field."""
    try:
        return HrlrRequest(**values)
    except Exception as e:  # pydantic's ValidationError (v1 in the webui, v2 elsewhere)
        errs = getattr(e, "errors", None)
        if callable(errs):
            first = errs()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidInput(loc or "request", first.get("msg", str(e))) from None
        raise


# ----------------------------------------------------------------------------- limits
@functools.lru_cache(maxsize=1)
def _tokenizer():
    from lib_hrlr.text.tokenizer import ClipTokenizer

    return ClipTokenizer()


def prompt_chunks(text: str) -> int:
    """How many 75-token chunks ``text`` takes (its CLIP tokens, at least one chunk)."""
    return max(1, math.ceil(len(_tokenizer().encode(text)) / CHUNK_TOKENS))


def _check_prompt(field: str, text: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidInput(field, f"at most {MAX_PROMPT_CHARS} characters and {MAX_PROMPT_CHUNKS} chunks of "
                                  f"{CHUNK_TOKENS} tokens are allowed, got {len(text)} characters")
    n = prompt_chunks(text) if text else 0
    if n > MAX_PROMPT_CHUNKS:
        raise InvalidInput(field, f"at most {MAX_PROMPT_CHUNKS} chunks of {CHUNK_TOKENS} tokens "
                                  f"({MAX_PROMPT_CHUNKS * CHUNK_TOKENS} tokens) are allowed, got {n} chunks")


def check_limits(req: HrlrRequest) -> None:
    """Raise InvalidInput (request field names) for input beyond the documented limits."""
    for name in ("width", "height"):
        v = getattr(req, name)
        if v > MAX_SIDE:
            raise InvalidInput(name, f"must be at most {MAX_SIDE} px, got {v}")
    if req.tile is not None and (req.tile <= 0 or req.tile % 8):
        raise InvalidInput("tile", f"must be a positive multiple of 8 latent px (or left out for the model's "
                                   f"native size), got {req.tile}")
    if req.tile_batch is not None and req.tile_batch < 0:
        raise InvalidInput("tile_batch", f"must be 0 (as many as the budget allows) or more, got {req.tile_batch}")
    if len(req.regions) > MAX_REGIONS:
        raise InvalidInput("regions", f"at most {MAX_REGIONS} regions are allowed, got {len(req.regions)}")
    if req.lowram_dtype not in LOWRAM_DTYPE_CHOICES.values():
        raise InvalidInput("lowram_dtype", f"'{req.lowram_dtype}' is not one of: "
                                           f"{', '.join(LOWRAM_DTYPE_CHOICES.values())}")
    _check_prompt("prompt", req.prompt)
    _check_prompt("negative_prompt", req.negative_prompt)
    for i, r in enumerate(req.regions):
        _check_prompt(f"regions[{i}].prompt", r.prompt)


# ----------------------------------------------------------------------------- regions
def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def regions_from_table(rows) -> List[RegionModel]:
    """The tab's regions table (rows, or a pandas DataFrame) as request regions.

    Rows without a prompt whose rectangle is the template's or all zero / empty are skipped
    (the table's blank rows); any other row must be complete.
    """
    if rows is None:
        return []
    if hasattr(rows, "values") and hasattr(rows, "columns"):
        rows = rows.values.tolist()
    if isinstance(rows, dict):  # gradio's {"headers": [...], "data": [...]}
        rows = rows.get("data") or []
    out = []
    for i, row in enumerate(rows):
        vals = list(row)[:6] + [None] * (6 - len(list(row)[:6]))
        x, y, w, h, weight, prompt = vals
        prompt = "" if _blank(prompt) else str(prompt)
        rect = [x, y, w, h]
        if not prompt.strip():
            if all(_blank(v) or v in (0, "0") for v in rect) or \
                    [None if _blank(v) else float(v) for v in rect] == [float(v) for v in REGION_TEMPLATE[:4]]:
                continue
            raise InvalidInput(f"regions[{i}].prompt", "a region needs a prompt")
        try:
            nums = [int(float(v)) for v in rect]
            wt = 1.0 if _blank(weight) else float(weight)
        except (TypeError, ValueError):
            raise InvalidInput(f"regions[{i}]", "x, y, w, h must be integers (pixels) and weight a number") from None
        out.append(RegionModel(x=nums[0], y=nums[1], w=nums[2], h=nums[3], weight=wt, prompt=prompt))
    return out


def engine_regions(regions: List[RegionModel]) -> tuple:
    return tuple(Region(r.x, r.y, r.w, r.h, r.prompt, float(r.weight)) for r in regions)


# ----------------------------------------------------------------------------- -> GenerationParams
def to_params(req: HrlrRequest, *, model: str, taesd_dir: Optional[str] = None, out: str = "hrlr.png",
              dtype: str = DEFAULTS["dtype"], device: str = DEFAULTS["device"]) -> GenerationParams:
    """The engine's parameters for ``req`` (limits checked; the engine validates the rest)."""
    check_limits(req)
    return GenerationParams(
        prompt=req.prompt, negative=req.negative_prompt, width=req.width, height=req.height,
        steps=req.steps, cfg=req.cfg_scale, seed=req.seed, strength=req.denoising_strength,
        tile=req.tile, overlap=req.overlap, tile_batch=req.tile_batch or None,
        weighting=WEIGHTING_CHOICES.get(req.weighting, req.weighting),
        regions=engine_regions(req.regions), vae=VAE_CHOICES.get(req.vae, req.vae),
        micro_conditioning=req.micro_conditioning,
        budget_mb=float(req.budget_mb), budget_scope="run", taesd_dir=taesd_dir,
        model=model, out=out, dtype=dtype, device=device,
    )


# ----------------------------------------------------------------------------- LowRAM precision
def lowram_dtype(choice: str, *, webui_dtype: str, precision_full: bool, no_half: bool, device: str) -> str:
    """The dtype a LowRAM run computes in.

    ``webui`` (the default) follows the webui's precision flags, so LowRAM and normal mode make
    the same image: ``--no-half`` or ``--precision full`` -> fp32; otherwise the webui's compute
    dtype (fp16 on CUDA), and on a CPU (where the webui has no half mode) fp32.  ``bf16`` and
    ``fp32`` are explicit choices.
    """
    if choice in ("bf16", "fp32"):
        return choice
    if choice != "webui":
        raise InvalidInput("lowram_dtype", f"'{choice}' is not one of: {', '.join(LOWRAM_DTYPE_CHOICES.values())}")
    if no_half or precision_full or device == "cpu":
        return "fp32"
    return webui_dtype if webui_dtype in ("fp16", "bf16", "fp32") else "fp32"
