"""HighRes-LowRAM: Stable Diffusion at 2K and beyond in a memory budget independent of the output size.

Importing this package is cheap: it pulls in nothing heavier than the standard library.
"""

__version__ = "0.1.0"
