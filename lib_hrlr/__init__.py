"""HighRes-LowRAM: Stable Diffusion at 2K and beyond in a memory budget independent of the output size.

Importing this package is cheap: it pulls in nothing heavier than the standard library.  The
Python API is loaded on first use::

    from lib_hrlr import generate, upscale, GenerationParams

See :mod:`lib_hrlr.api`.
"""

__version__ = "0.1.0"

_API = {"generate", "upscale", "upscale_params", "run_batch", "Result", "GenerationParams", "UPSCALE_STRENGTH"}
__all__ = sorted(_API | {"__version__"})


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lib_hrlr' has no attribute {name!r}")


def __dir__():
    return __all__
