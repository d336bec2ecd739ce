"""The Python API: :func:`generate` (text to image), :func:`upscale` (your image, bigger)
and :func:`run_batch` (several images with consecutive seeds, the model opened once).

Every setting is a field of :class:`~lib_hrlr.pipeline.params.GenerationParams` and can be
passed as a keyword::

    from lib_hrlr import generate, upscale

    r = generate(prompt="a lighthouse on a cliff", width=2048, height=2048,
                 model="v1-5-pruned-emaonly.safetensors", steps=20)
    r.path, r.seed, r.image(), r.memory["peak_rss_mb"]

    u = upscale("photo.jpg", scale=2, prompt="a sharp photo", model="v1-5-pruned-emaonly.safetensors")

Without ``out``, images go to ``outputs/<kind>-images/YYYY-MM-DD/NNNNN-SEED.png`` (the
webui's layout; :mod:`lib_hrlr.image.outputs`), never overwriting a file.  Bad input raises
:class:`~lib_hrlr.errors.HrlrError` (``.field`` names the setting) before any file is written.
The command line (:mod:`lib_hrlr.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import InvalidInput
from .image.outputs import DEFAULT_ROOT, batch_path, day_folder, next_output_path
from .pipeline.params import GenerationParams
from .pipeline.progress import ProgressEvent

__all__ = ["GenerationParams", "Result", "generate", "upscale", "upscale_params", "run_batch", "UPSCALE_STRENGTH",
           "BatchProgress"]

# the upscaler keeps closer to the picture it is given than text-to-image keeps to its own
# base image (0.45): detail is added, composition and colours stay
UPSCALE_STRENGTH = 0.3
UPSCALE_SCALES = (2, 4)


@dataclass
class Result:
    """One image written by a run."""

    path: str
    seed: int
    infotext: str
    params: GenerationParams
    memory: dict  # the meter's report: peak_rss_mb and a row per stage/module
    stats: dict = field(default_factory=dict)  # unet_evals, wall_s, tiles, dtype...

    def image(self):
        """The PNG as a PIL image (decodes the whole file: mind the size)."""
        from PIL import Image

        return Image.open(self.path)


# ------------------------------------------------------------------------------ progress
class BatchProgress:
    """Wraps a progress sink for a batch: each event's ``overall`` / ``overall_eta_s`` (one
    run's share done and seconds left, :class:`~lib_hrlr.pipeline.progress.WorkTracker`)
    become the whole batch's, and the detail says which image is running."""

    def __init__(self, sink: Callable[[ProgressEvent], None] | None, count: int = 1,
                 clock: Callable[[], float] = time.perf_counter):
        self.sink, self.count, self.clock = sink, count, clock
        self.index = 0  # images finished
        self.image_t0 = clock()
        self.image_seconds: list[float] = []

    def next_image(self) -> None:
        now = self.clock()
        self.image_seconds.append(now - self.image_t0)
        self.index += 1
        self.image_t0 = now

    def batch_eta(self, run_eta: float | None) -> float | None:
        """Seconds left in the batch: this image's ETA plus the images still to come, each
        taking what the finished ones took (before any finished: this one's expected time)."""
        if run_eta is None:
            return None
        later = self.count - self.index - 1
        if self.image_seconds:
            per = sum(self.image_seconds) / len(self.image_seconds)
        else:
            per = (self.clock() - self.image_t0) + run_eta
        return run_eta + per * later

    def __call__(self, ev: ProgressEvent) -> None:
        if self.sink is None:
            return
        if self.count == 1:
            self.sink(ev)
            return
        overall = None if ev.overall is None else (self.index + ev.overall) / self.count
        tag = f"image {self.index + 1}/{self.count}"
        self.sink(replace(ev, detail=f"{ev.detail} {tag}" if ev.detail else tag, overall=overall,
                          overall_eta_s=self.batch_eta(ev.overall_eta_s)))


# --------------------------------------------------------------------------------- runs
def _params(params: GenerationParams | None, fields: dict) -> GenerationParams:
    if params is None:
        if "prompt" not in fields:
            fields = {"prompt": "", **fields}
        try:
            return GenerationParams(**fields)
        except TypeError as e:
            raise InvalidInput("params", f"{e}; the settings are the fields of GenerationParams") from None
    if not isinstance(params, GenerationParams):
        raise InvalidInput("params", f"must be a GenerationParams, got {type(params).__name__}")
    try:
        return replace(params, **fields)
    except TypeError as e:
        raise InvalidInput("params", f"{e}; the settings are the fields of GenerationParams") from None


def _kind(p: GenerationParams, upscaling: bool) -> str:
    return "upscale" if upscaling else ("img2img" if p.init_image else "txt2img")


def run_batch(params: GenerationParams, count: int = 1, *, out: str | None = None, outdir: str = DEFAULT_ROOT,
              kind: str | None = None, progress: Callable[[ProgressEvent], None] | None = None,
              log: Callable[[str], None] | None = None, meter=None,
              should_stop: Callable[[], bool] | None = None) -> list[Result]:
    """``count`` images with seeds ``seed, seed + 1, ...`` (a random first seed for -1).

    The checkpoint (and the VAE file, and the init image) is opened and read once for the
    whole batch; each image then streams its weights as a single run does.  ``out``: one
    PNG path (``name-SEED.png`` for each of several images); without it, the webui layout
    under ``outdir``.  ``progress`` gets per-stage events whose ``overall`` / ``overall_eta_s`` cover the batch.
    """
    from .memory.meter import MemoryMeter
    from .pipeline.generate import generate as run_pipeline, open_backend
    from .pipeline.params import validate, with_model_defaults

    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10000:
        raise InvalidInput("batch_count", f"must be an integer from 1 to 10000, got {count!r}")
    if out is not None and not str(out).lower().endswith(".png"):
        raise InvalidInput("out", f"must be a .png path, got '{out}'")
    kind = kind or _kind(params, False)
    own_meter = meter is None
    meter = meter or MemoryMeter()
    if own_meter:
        meter.start()
    init = None
    results: list[Result] = []
    try:
        with meter.stage("load"):
            backend = open_backend(params)
        first = params.with_seed()
        # every setting checked before anything is read or created on disk
        validate(with_model_defaults(first, backend.config), backend.config)
        if params.init_image is not None:
            from .image.init_image import load_init_image, probe, check_target

            pr = probe(params.init_image)
            check_target(pr.width, pr.height, params.width, params.height)
            from .image.spill import choose_spill_dir
            from .pipeline.disk import init_image_spill_bytes

            # read once for the whole batch, into a spill folder checked as every run checks its own
            place = choose_spill_dir(params.spill_dir, init_image_spill_bytes(params))
            if place.warning and log:
                log(f"warning: {place.warning}")
            with meter.stage("init_image"):
                init = load_init_image(params.init_image, params.width, params.height, spill_dir=place.path,
                                       log=log, should_stop=should_stop)
        overall = BatchProgress(progress, count) if progress is not None else None
        for i in range(count):
            p = replace(first, seed=(first.seed + i) % 2**32)
            made: list[Path] = []
            if out is not None:
                path = batch_path(str(out), p.seed, count)
            else:
                folder = day_folder(outdir, kind)
                made = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
                folder.mkdir(parents=True, exist_ok=True)
                path = str(next_output_path(outdir, kind, p.seed))
            p = replace(p, out=path)
            try:
                r = run_pipeline(p, meter=meter, progress=overall, log=log, backend=backend, init=init,
                                 should_stop=should_stop)
            except BaseException:
                _remove_empty(made)
                raise
            if overall is not None:
                overall.next_image()
            results.append(Result(path=r.path, seed=r.params.seed, infotext=r.infotext, params=r.params,
                                  memory=r.report, stats=r.stats))
            if log is not None and count > 1:
                log(f"image {i + 1}/{count}: {r.path} (seed {r.params.seed})")
    finally:
        if init is not None:
            init.close()
        if own_meter:
            meter.stop()
    return results


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders this run created (deepest first) while they are still empty."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            return


def generate(params: GenerationParams | None = None, /, *, out: str | None = None, outdir: str = DEFAULT_ROOT,
             progress: Callable[[ProgressEvent], None] | None = None, log: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None, **fields) -> Result:
    """Text to image (or, with ``init_image=``, your image as the guide) at any size.

    Settings: a :class:`GenerationParams` and/or its fields as keywords (``prompt``,
    ``width``, ``height``, ``model``, ``steps``, ``strength``, ``regions``, ``vae`` (decoder:
    ``"full"`` or ``"taesd"``), ``vae_file``, ``budget_mb``...).  Returns the :class:`Result`.
    """
    p = _params(params, fields)
    return run_batch(p, 1, out=out, outdir=outdir, progress=progress, log=log, should_stop=should_stop)[0]


def upscale_params(image: str | os.PathLike, *, scale: float | None = None, width: int | None = None,
                   height: int | None = None, strength: float = UPSCALE_STRENGTH,
                   params: GenerationParams | None = None, **fields) -> GenerationParams:
    """The settings of an upscale of ``image``: its header is read for the target size
    (``scale`` x the source, default 2; or ``width``/``height``, one of them keeping the
    aspect ratio; sides rounded up to multiples of 8, never below the source)."""
    from .image.init_image import probe, target_size

    if not isinstance(image, (str, os.PathLike)):
        raise InvalidInput("init_image", f"must be the path of a PNG, JPEG or WebP file, got {type(image).__name__} "
                                         "(save a PIL image to a file first)")
    image = os.fspath(image)
    pr = probe(image)
    if scale is None and width is None and height is None:
        scale = 2
    w, h = target_size(pr.width, pr.height, scale=scale, width=width, height=height)
    return _params(params, {**fields, "init_image": image, "width": w, "height": h, "strength": strength})


def upscale(image: str | os.PathLike, /, *, scale: float | None = None, width: int | None = None,
            height: int | None = None, strength: float = UPSCALE_STRENGTH, out: str | None = None,
            outdir: str = DEFAULT_ROOT, progress: Callable[[ProgressEvent], None] | None = None,
            log: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
            **fields) -> Result:
    """Your PNG/JPEG/WebP, resized to ``scale`` x its size (default 2; or ``width``/``height``)
    and re-detailed by the tiled pass at ``strength`` (default 0.3, below text-to-image's
    0.45; 0 gives the VAE round trip of the resized image).  ``prompt``, ``regions`` and the
    other settings as for :func:`generate`.  Images go to ``outputs/upscale-images/...``
    without ``out``."""
    p = upscale_params(image, scale=scale, width=width, height=height, strength=strength, **fields)
    return run_batch(p, 1, out=out, outdir=outdir, kind="upscale", progress=progress, log=log,
                     should_stop=should_stop)[0]
