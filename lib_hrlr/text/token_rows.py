"""Token embedding rows read straight from the checkpoint, never the whole table.

OpenCLIP ViT-bigG/14's token embedding is 49408 x 1280 (126 MB in fp16, 253 MB in fp32);
a prompt uses a few dozen of its rows.  :func:`read_token_rows` reads exactly the rows of
the distinct ids in ``input_ids`` (one ``pread`` each: a row is ``hidden`` contiguous
elements at ``offset + id * hidden * itemsize`` of the row-major table) and returns the
looked-up embeddings ``(B, T, hidden)`` in the compute dtype, which
:meth:`~lib_hrlr.text.clip_text.ClipTextEncoder.encode_sdxl` takes as ``token_embeds``.
"""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError, InvalidInput
from ..weights.safetensors_file import TensorSource, pread_into, tensor_memoryview


def read_token_rows(source: TensorSource, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``table[input_ids]`` for the (vocab, hidden) table at ``source``: (B, T, hidden) in ``dtype``."""
    info = source.info
    if len(info.shape) != 2:
        raise CheckpointError("model", f"token embedding {info.name!r} has shape {list(info.shape)}; (vocab, hidden) is needed")
    vocab, hidden = info.shape
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InvalidInput("input_ids", "must be an integer tensor of shape (batch, tokens)")
    ids = input_ids.to("cpu", torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InvalidInput("input_ids", f"token ids must lie in 0..{vocab - 1}")
    unique, inverse = torch.unique(ids, return_inverse=True)
    row_bytes = hidden * info.dtype.itemsize
    raw = torch.empty(len(unique), hidden, dtype=info.dtype)
    fd = os.open(source.path, os.O_RDONLY)
    try:
        for i, token in enumerate(unique.tolist()):
            pread_into(fd, info.offset + token * row_bytes, tensor_memoryview(raw[i]))
    finally:
        os.close(fd)
    return raw.to(dtype)[inverse]
