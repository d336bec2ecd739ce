"""What a generation asks for, as plain data, and the checks it must pass before any work starts."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from ..config.architectures import ModelConfig
from ..errors import InvalidInput
from ..text.extra_networks import LoraSpec
from ..tiling.regions import Region, validate_feather, validate_regions

WEIGHTINGS = ("gaussian", "uniform")
VAE_MODES = ("full", "taesd")


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    width: int = 2048
    height: int = 2048
    model: str | None = None
    negative: str = ""
    steps: int = 20
    base_steps: int | None = None  # steps of the native-size base pass; None = steps
    strength: float = 0.45
    sampler: str = "dpmpp_2m_karras"
    cfg: float = 7.0
    seed: int = -1
    tile: int | None = None  # latent px; None = the model's native latent size (64 for SD 1.x)
    overlap: int | None = None  # latent px; None = a quarter of the tile
    weighting: str = "gaussian"
    # SDXL: what each tile's added time embedding says (lib_hrlr.sampling.micro_conditioning)
    micro_conditioning: str = "offset"
    regions: tuple[Region, ...] = ()
    region_feather: float | None = None  # px of each region's soft edge; None = 1/8 of its shorter side
    tile_batch: int | None = None  # tiles per UNet call; None = as many as the budget allows
    vae: str = "full"
    vae_tile: int | None = None  # latent px per decoder tile; None = from the budget
    vae_attention: str = "global"
    taesd_dir: str | None = None
    clip_skip: int = 1
    dtype: str = "auto"
    device: str = "auto"
    vae_device: str = "cpu"  # the VAE may stay on the CPU while the UNet runs on CUDA
    budget_mb: float = 800.0
    # "process": the whole process's peak RSS (the CLI); "run": what the run adds to the process
    # as it is when the run starts (inside a long-lived host such as the webui)
    budget_scope: str = "process"
    stream_unet: bool = True
    # the streamed UNet's weights prepared in the compute dtype, written once and then read
    # without conversion (lib_hrlr.weights.prepared): "auto" (the user cache), "off", or a folder
    weight_cache: str = "auto"
    spill_dir: str | None = None
    out: str = "hrlr.png"
    report: str | None = None
    # the user's image (PNG/JPEG/WebP) resized to width x height replaces the base pass
    # (``hrlr upscale``, ``generate --init-image``); strength 0 is then allowed (VAE round trip)
    init_image: str | None = None
    # a separate VAE file (single-file LDM or diffusers AutoencoderKL; .safetensors or .ckpt)
    # replacing the checkpoint's own for encode and decode; ``vae`` stays the decoder choice
    vae_file: str | None = None
    # LoRAs merged into the streamed weights (LoraSpec: file, UNet weight, text-encoder weight)
    loras: tuple[LoraSpec, ...] = ()
    # textual-inversion embedding files or folders (name = file stem, used as a word in prompts)
    embeddings: tuple[str, ...] = ()

    def with_seed(self) -> "GenerationParams":
        """A copy with a concrete seed (a random one for -1, as the webui does)."""
        if self.seed >= 0:
            return self
        return replace(self, seed=random.SystemRandom().randrange(0, 2**32 - 1))


def with_model_defaults(p: GenerationParams, model: ModelConfig) -> GenerationParams:
    """Fill the settings whose defaults depend on the model (tile, overlap)."""
    tile = model.latent_tile if p.tile is None else p.tile
    overlap = tile // 4 if p.overlap is None else p.overlap
    return replace(p, tile=tile, overlap=overlap)


def _int_field(name: str, value, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(name, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"≥ {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidInput(name, f"must be {allowed}, got {value}")


def validate(p: GenerationParams, model: ModelConfig) -> None:
    """Raise InvalidInput naming the first field that is not allowed."""
    f = model.vae.downscale
    for name in ("width", "height"):
        v = getattr(p, name)
        _int_field(name, v, 8)
        if v % 8:
            raise InvalidInput(name, f"must be a multiple of 8, got {v}")
    _int_field("tile", p.tile, 8)
    if p.tile % 8:
        raise InvalidInput("tile", f"must be a multiple of 8 latent pixels, got {p.tile}")
    _int_field("overlap", p.overlap, 0)
    if p.overlap >= p.tile:
        raise InvalidInput("overlap", f"must be smaller than the tile ({p.tile}), got {p.overlap}")
    lw, lh = p.width // f, p.height // f
    if lw < p.tile or lh < p.tile:
        raise InvalidInput(
            "width" if lw < p.tile else "height",
            f"the canvas {p.width}x{p.height} is smaller than one tile ({p.tile * f}x{p.tile * f} px); "
            f"make it at least {p.tile * f} px or lower --tile",
        )
    _int_field("steps", p.steps, 1, 1000)
    if p.base_steps is not None:
        _int_field("base_steps", p.base_steps, 1, 1000)
    if p.init_image is not None and not (0.0 <= p.strength <= 1.0):
        raise InvalidInput("strength", f"must be in [0, 1] with an init image (0: the VAE round trip), got {p.strength}")
    if p.init_image is None and not (0.0 < p.strength <= 1.0):
        raise InvalidInput("strength", f"must be in (0, 1], got {p.strength}")
    if not (math.isfinite(p.cfg) and 0.0 <= p.cfg <= 50.0):
        raise InvalidInput("cfg", f"must be between 0 and 50, got {p.cfg}")
    if not isinstance(p.seed, int) or p.seed < -1 or p.seed >= 2**32:
        raise InvalidInput("seed", f"must be -1 (random) or in [0, 2^32), got {p.seed}")
    if p.weighting not in WEIGHTINGS:
        raise InvalidInput("weighting", f"'{p.weighting}' is not one of: {', '.join(WEIGHTINGS)}")
    if p.vae not in VAE_MODES:
        raise InvalidInput("vae", f"'{p.vae}' is not one of: {', '.join(VAE_MODES)}")
    if p.vae_attention not in ("global", "tile"):
        raise InvalidInput("vae_attention", f"'{p.vae_attention}' is not one of: global, tile")
    if p.tile_batch is not None:
        _int_field("tile_batch", p.tile_batch, 1, 256)
    if p.vae_tile is not None:
        _int_field("vae_tile", p.vae_tile, 8)
    _int_field("clip_skip", p.clip_skip, 1, model.text.num_layers)
    for i, spec in enumerate(p.loras):
        if not isinstance(spec, LoraSpec) or not (math.isfinite(spec.weight) and math.isfinite(spec.text_weight)):
            raise InvalidInput(f"loras[{i}]", f"must be a LoraSpec(path, weight, te_weight) with finite weights, got {spec!r}")
    if isinstance(p.embeddings, str) or any(not isinstance(e, str) or not e for e in p.embeddings):
        raise InvalidInput("embeddings", f"must be a tuple of file or folder paths, got {p.embeddings!r}")
    if not (math.isfinite(p.budget_mb) and p.budget_mb > 0):
        raise InvalidInput("budget_mb", f"must be a positive number of MB, got {p.budget_mb}")
    if p.budget_scope not in ("process", "run"):
        raise InvalidInput("budget_scope", f"'{p.budget_scope}' is not one of: process, run")
    if not isinstance(p.weight_cache, str) or not p.weight_cache.strip():
        raise InvalidInput("weight_cache", f"must be auto, off or a folder, got {p.weight_cache!r}")
    if not p.out.lower().endswith(".png"):
        raise InvalidInput("out", f"must be a .png path, got '{p.out}'")
    from ..sampling.micro_conditioning import check_policy

    check_policy(p.micro_conditioning)
    validate_regions(p.regions, p.width, p.height)
    validate_feather(p.region_feather, p.regions)
    from ..sampling.samplers import get_sampler

    get_sampler(p.sampler)


def base_size(width: int, height: int, native: int, multiple: int = 64) -> tuple[int, int]:
    """The native-area size with the target's aspect ratio, sides multiples of ``multiple``.

    512² for a square SD 1.x target; 2560x1440 gives 704x384.
    """
    aspect = width / height
    bw = native * math.sqrt(aspect)
    bh = native / math.sqrt(aspect)
    bw = max(multiple, int(round(bw / multiple)) * multiple)
    bh = max(multiple, int(round(bh / multiple)) * multiple)
    return min(bw, width), min(bh, height)
