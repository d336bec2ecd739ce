"""LowRAM mode's model lifecycle inside the webui: release the webui's model, restore it after.

``--medvram`` / ``--lowvram`` (webui ``modules/lowvram.py``) hook the model's big modules with a
forward pre-hook that first moves the module the webui remembers in ``lowvram.module_in_gpu``
back to the CPU.  Releasing the model moves its tensors to the ``meta`` device; if that
remembered module is one of them, the next model's first hook would try to copy it out of
``meta`` and fail ("Cannot copy out of meta tensor"), and every generation after it too.  So:

- release: a remembered module of the released model is forgotten (its memory goes with the
  model); one of another loaded model is sent to the CPU first, as the webui itself does;
- restore: the webui's own loader brings the model back (its hooks are set up again by
  ``lowvram.apply``); if that fails, the lowvram state is cleared and a fresh load is tried
  once, so the webui can generate again, and only then is the error reported.
"""

from __future__ import annotations

import functools
import gc
from modules import devices, lowvram, sd_hijack, sd_models

from lib_hrlr.runtime import trim_allocator
from lib_hrlr.weights.checkpoint import FAMILIES, open_checkpoint


class RestoreError(RuntimeError):
    """The webui's model could not be loaded back (the message says what the webui holds now)."""


@functools.lru_cache(maxsize=1)
def model_config(filename: str):
    """The architecture of the webui's checkpoint, read from the file's tensor table: SD 1.x or
    SDXL (both run, from the webui's model and in LowRAM mode); another family is refused
    naming what it is."""
    return open_checkpoint(filename, families=FAMILIES).config


def current_checkpoint_info():
    model = sd_models.model_data.sd_model
    if model is not None:
        return model.sd_checkpoint_info
    return sd_models.select_checkpoint()


def _owns(model, module) -> bool:
    return module is not None and any(m is module for m in model.modules())


def _on_meta(module) -> bool:
    try:
        return any(p.is_meta for p in module.parameters())
    except Exception:
        return False


def forget_lowvram_module(model=None) -> None:
    """Clear ``lowvram.module_in_gpu`` when it belongs to ``model`` (about to be dropped) or is
    already on ``meta``; send it to the CPU when it belongs to another, live model."""
    held = getattr(lowvram, "module_in_gpu", None)
    if held is None:
        return
    if (model is not None and _owns(model, held)) or _on_meta(held):
        lowvram.module_in_gpu = None
    else:
        lowvram.send_everything_to_cpu()


def release_webui_model():
    """Drop the webui's copy of the model (LowRAM mode); returns its CheckpointInfo or None."""
    model = sd_models.model_data.sd_model
    if model is None:
        return None
    info = model.sd_checkpoint_info
    try:
        sd_hijack.model_hijack.undo_hijack(model)
    except Exception:
        pass
    try:
        forget_lowvram_module(model)
        sd_models.model_data.sd_model = None
        sd_models.model_data.loaded_sd_models = [m for m in sd_models.model_data.loaded_sd_models if m is not model]
        # other webui objects (finished jobs, samplers, hijacks) may still point at the model:
        # move its tensors to the meta device so their memory goes whoever holds the module
        model.to(device="meta")
    except Exception:
        # the webui's own state first: a model (half) moved away is loaded back, then the error shows
        model = None
        gc.collect()
        sd_models.model_data.sd_model = None
        restore_webui_model(info)
        raise
    model = None
    gc.collect()
    devices.torch_gc()
    trim_allocator()
    return info


def restore_webui_model(info) -> list[str]:
    """Load ``info`` back unless the webui already holds a model.  Returns warnings (a first
    attempt that failed and a clean second one that worked); raises RestoreError when the
    second attempt fails too."""
    if info is None or sd_models.model_data.sd_model is not None:
        return []
    forget_lowvram_module()
    try:
        sd_models.reload_model_weights(info=info)
        return []
    except Exception as e:
        first: BaseException = e
    # a half-loaded model may hold hooks on modules the failed load left behind: start clean
    forget_lowvram_module(sd_models.model_data.sd_model)
    broken = sd_models.model_data.sd_model
    sd_models.model_data.sd_model = None
    if broken is not None:
        sd_models.model_data.loaded_sd_models = [m for m in sd_models.model_data.loaded_sd_models if m is not broken]
        del broken
        gc.collect()
    try:
        sd_models.load_model(info)
    except Exception as second:
        raise RestoreError(f"the webui's model {info.title} could not be loaded back ({first}; then {second}); "
                           "select a checkpoint in the webui to load one") from second
    return [f"loading the webui's model back failed once ({first}); it was loaded again from scratch"]
