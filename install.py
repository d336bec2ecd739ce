"""AUTOMATIC1111 webui installer hook: add what HighRes-LowRAM needs, never touch the webui's pins.

The engine needs only torch, numpy, Pillow and safetensors, which every webui install
already has; this installs one of them only if it is missing, at whatever version pip
picks alongside the webui's own pins.
"""

import importlib.util

NEEDED = {"numpy": "numpy", "PIL": "pillow", "safetensors": "safetensors"}


def missing() -> list[str]:
    return [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]


def install() -> None:
    todo = missing()
    if not todo:
        return
    try:
        import launch  # the webui's own installer helpers
    except ImportError:
        print("HighRes-LowRAM needs: pip install " + " ".join(todo))
        return
    for pkg in todo:
        launch.run_pip(f"install {pkg}", f"{pkg} for HighRes-LowRAM")


install()  # the webui executes this file at start-up
