"""A cheap live preview of an SD 1.x latent: a fixed linear map from the 4 latent channels to
RGB (no VAE), on a canvas shrunk to at most ``max_side`` latent pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# least-squares fit of RGB in [-1, 1] on the SD 1.x latent channels (widely used approximation)
SD1_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def latent_preview(latent: torch.Tensor, max_side: int = 128):
    """``latent``: (1|N, 4, h, w), scaled as the UNet sees it.  Returns a PIL RGB image."""
    from PIL import Image

    z = latent[:1].detach().float().cpu()
    h, w = z.shape[-2:]
    k = max(1, -(-max(h, w) // max_side))
    if k > 1:
        z = F.avg_pool2d(z, k)
    rgb = torch.einsum("nchw,cr->nhwr", z, SD1_LATENT_RGB)[0]
    arr = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")
