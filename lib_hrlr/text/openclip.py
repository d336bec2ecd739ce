"""OpenCLIP text-tower checkpoint names -> the names of :class:`~lib_hrlr.text.clip_text.ClipTextEncoder`.

SDXL single files keep the OpenCLIP ViT-bigG/14 text tower below
``conditioner.embedders.1.model.`` in OpenCLIP's own names; the encoder here uses
transformers' ``CLIPTextModelWithProjection`` names (what a diffusers folder's
``text_encoder_2/`` holds).  The mapping is pure bookkeeping on tensor locations
(:class:`~lib_hrlr.weights.safetensors_file.TensorInfo`), nothing is read:

=====================================================  ==============================================
OpenCLIP                                               ours
=====================================================  ==============================================
``token_embedding.weight``                             ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                               ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.i.ln_1`` / ``ln_2``            ``text_model.encoder.layers.i.layer_norm1`` / ``2``
``transformer.resblocks.i.attn.in_proj_weight``        ``...self_attn.{q,k,v}_proj.weight``: rows
                                                       ``[0:h]``, ``[h:2h]``, ``[2h:3h]``, each a
                                                       contiguous byte range of the packed tensor
``transformer.resblocks.i.attn.in_proj_bias``          ``...self_attn.{q,k,v}_proj.bias``, likewise
``transformer.resblocks.i.attn.out_proj``              ``...self_attn.out_proj``
``transformer.resblocks.i.mlp.c_fc`` / ``c_proj``      ``...mlp.fc1`` / ``fc2``
``ln_final``                                           ``text_model.final_layer_norm``
``text_projection`` (hidden, proj), ``y = x P``        ``text_projection.weight`` (proj, hidden): the
                                                       same bytes, described with the model's shape;
                                                       listed in the returned ``transposed`` set
=====================================================  ==============================================

``logit_scale`` (CLIP's contrastive temperature) is not part of the text encoder and is
dropped, as is any key outside these patterns.
"""

from __future__ import annotations

import dataclasses
import re

from ..errors import CheckpointError
from ..weights.safetensors_file import TensorInfo

PROJECTION_KEY = "text_projection.weight"

_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}


def split_rows(info: TensorInfo, parts: int) -> list[TensorInfo]:
    """``info``'s tensor cut along its first dimension into ``parts`` equal, contiguous pieces."""
    rows = info.shape[0]
    if rows % parts or info.nbytes % parts:
        raise CheckpointError("model", f"{info.name!r} has shape {list(info.shape)}; its first dimension must split in {parts}")
    step = info.nbytes // parts
    shape = (rows // parts, *info.shape[1:])
    return [dataclasses.replace(info, name=f"{info.name}[{i}/{parts}]", shape=shape, offset=info.offset + i * step,
                                nbytes=step) for i in range(parts)]


def openclip_text_infos(tensors: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], frozenset[str]]:
    """OpenCLIP text-tower keys (without their checkpoint prefix) -> our names.

    Returns the mapped locations and the set of our names whose bytes hold the transpose
    of the model's tensor (the text projection)."""
    out: dict[str, TensorInfo] = {}
    transposed: set[str] = set()
    for key, info in tensors.items():
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = info
        elif key == "text_projection":
            if len(info.shape) != 2:
                raise CheckpointError("model", f"{info.name!r} has shape {list(info.shape)}; (hidden, projection) is needed")
            out[PROJECTION_KEY] = dataclasses.replace(info, shape=(info.shape[1], info.shape[0]))
            transposed.add(PROJECTION_KEY)
        elif m := _LAYER.match(key):
            base = f"text_model.encoder.layers.{m.group(1)}."
            rest = m.group(2)
            if rest in _LAYER_NAMES:
                out[base + _LAYER_NAMES[rest]] = info
            elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = "weight" if rest.endswith("weight") else "bias"
                for proj, piece in zip("qkv", split_rows(info, 3)):
                    out[f"{base}self_attn.{proj}_proj.{leaf}"] = piece
    return out, frozenset(transposed)
