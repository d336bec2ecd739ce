"""TAESD: the tiny autoencoder for Stable Diffusion 1.x/2.x latents, in plain torch.

Both networks are ``nn.Sequential`` stacks whose child indices reproduce the layout of
madebyollin's released files (``0.weight``, ``1.conv.0.weight`` ...), so the real MIT
weights load with a strict ``load_state_dict``.  Only 3x3 convolutions (stride 1 or 2),
ReLU, nearest-neighbour 2x upsampling and a soft clamp: no normalisation, no attention,
so every output pixel depends on a bounded neighbourhood of the input — which is what
makes exact tiling possible (see ``lib_hrlr.vae.tiled_taesd``).

Value conventions (those of the released weights):

* encoder input: RGB in [0, 1], (N, 3, H, W), H and W multiples of 8;
* encoder output / decoder input: (N, 4, H/8, W/8) latents **already scaled** by the SD
  scaling factor, i.e. the latents the UNet works on;
* decoder output: RGB, nominally [0, 1] (not clamped; callers clamp).

A caller that holds *unscaled* latents ``z`` (what the full SD VAE encoder produces
before the pipeline multiplies by ``VAEConfig.scaling_factor`` = 0.18215) converts with
``taesd_latent = z * 0.18215`` before decoding, and ``z = taesd_latent / 0.18215`` after
encoding.  ``lib_hrlr.vae.tiled_taesd`` does that conversion itself, so the pipeline can
use both VAEs the same way.

The weights are read from ``.safetensors`` or from the ``.pth`` state dicts madebyollin
publishes and the webui downloads (same key names); a ``.pth`` goes through the safe pickle
reader (:func:`lib_hrlr.weights.ckpt_file.read_ckpt`): no code in it runs.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import CheckpointError

CHANNELS = 64
LATENT_CHANNELS = 4


def _conv(cin: int, cout: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """``3 * tanh(x / 3)``: keeps decoder input latents in (-3, 3) smoothly."""

    def __init__(self, limit: float = 3.0):
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.limit) * self.limit


class Block(nn.Module):
    """Residual block: three 3x3 convolutions with ReLUs between, identity skip, ReLU after.

    Parameters live under ``conv.0``, ``conv.2``, ``conv.4`` as in the released files.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c0, _, c2, _, c4 = self.conv
        # in-place ReLUs and add: at most the input and two conv maps are alive at once
        h = torch.relu_(c0(x))
        h = torch.relu_(c2(h))
        h = c4(h)
        h += x
        return torch.relu_(h)


class Upsample2x(nn.Module):
    """Nearest-neighbour upsampling by an integer factor."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=self.factor, mode="nearest")


class TAESDEncoder(nn.Sequential):
    """RGB [0, 1] (N, 3, H, W) -> scaled latent (N, 4, H/8, W/8).

    Indices: 0 conv(3→64), 1 Block, then three times [stride-2 conv without bias, Block x3],
    14 conv(64→4).
    """

    def __init__(self, channels: int = CHANNELS, latent_channels: int = LATENT_CHANNELS):
        layers: list[nn.Module] = [_conv(3, channels), Block(channels)]
        for _ in range(3):
            layers += [_conv(channels, channels, stride=2, bias=False)] + [Block(channels) for _ in range(3)]
        layers.append(_conv(channels, latent_channels))
        super().__init__(*layers)


class TAESDDecoder(nn.Sequential):
    """Scaled latent (N, 4, h, w) -> RGB nominally in [0, 1] (N, 3, 8h, 8w).

    Indices: 0 SoftClamp, 1 conv(4→64), 2 ReLU, then three times [Block x3, Upsample, conv
    without bias], then Block, 19 conv(64→3).
    """

    def __init__(self, channels: int = CHANNELS, latent_channels: int = LATENT_CHANNELS):
        layers: list[nn.Module] = [SoftClamp(), _conv(latent_channels, channels), nn.ReLU()]
        for _ in range(3):
            layers += [Block(channels) for _ in range(3)] + [Upsample2x(2), _conv(channels, channels, bias=False)]
        layers += [Block(channels), _conv(channels, 3)]
        super().__init__(*layers)


PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def _read_pickled_state(path: str, what: str) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state dict read by the safe reader (no code runs); errors name ``taesd``."""
    from ..weights.ckpt_file import read_ckpt
    from ..weights.safetensors_file import read_tensor

    try:
        tensors = read_ckpt(path).tensors
        fd = os.open(path, os.O_RDONLY)
        try:
            return {name: read_tensor(fd, info) for name, info in tensors.items()}
        finally:
            os.close(fd)
    except CheckpointError as e:
        raise CheckpointError("taesd", f"{what} file: {e.message}") from None
    except OSError as e:
        raise CheckpointError("taesd", f"{what} file {path} cannot be read ({e.strerror or e})") from None


def _read_state(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            zip_archive = f.read(4) == b"PK\x03\x04"  # what torch.save writes
    except OSError as e:
        raise CheckpointError("taesd", f"{what} file {path} cannot be read ({e.strerror or e})") from None
    if zip_archive or path.lower().endswith(PICKLE_SUFFIXES):
        return _read_pickled_state(path, what)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError("taesd", f"{what} file {path} is not a readable safetensors file ({e})") from e


def _load(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype, what: str) -> nn.Module:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError("taesd", f"{what} file not found: {path}")
    state = _read_state(path, what)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "taesd",
            f"{path} is not a TAESD {what} (missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})",
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                "taesd", f"{path}: {k} has shape {tuple(v.shape)}, a TAESD {what} needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.to(dtype).eval().requires_grad_(False)


def load_taesd_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TAESDEncoder:
    """Build the encoder and load ``taesd_encoder.safetensors`` (or ``.pth``) into it (CheckpointError if wrong)."""
    return _load(TAESDEncoder(), path, dtype, "encoder")


def load_taesd_decoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TAESDDecoder:
    """Build the decoder and load ``taesd_decoder.safetensors`` (or ``.pth``) into it (CheckpointError if wrong)."""
    return _load(TAESDDecoder(), path, dtype, "decoder")
