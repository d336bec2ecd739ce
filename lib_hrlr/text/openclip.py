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

Some re-saved SDXL files hold the projection as a linear layer, ``text_projection.weight``
(proj, hidden), which is our layout already (ComfyUI reads both spellings).
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
        elif key == PROJECTION_KEY:  # a linear layer's weight: (proj, hidden), as ours
            out[PROJECTION_KEY] = info
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


_OURS_TOP = {v: k for k, v in _TOP_NAMES.items()}
_OURS_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_OURS_LAYER_RX = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)$")
LOGIT_SCALE = "logit_scale"


def openclip_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The OpenCLIP checkpoint keys and shapes of a text tower whose (our) parameter shapes
    are ``shapes``, in our order, q/k/v packed into ``in_proj_*`` (at q's place), the
    projection as (hidden, projection), and ``logit_scale`` () last, as SDXL files have it."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if name in _OURS_TOP:
            out[_OURS_TOP[name]] = shape
        elif name == PROJECTION_KEY:
            out["text_projection"] = (shape[1], shape[0])
        elif m := _OURS_LAYER_RX.match(name):
            base, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
            if rest in _OURS_LAYER:
                out[base + _OURS_LAYER[rest]] = shape
            elif rest in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                out[base + "attn.in_proj_" + rest.rsplit(".", 1)[1]] = (3 * shape[0], *shape[1:])
            elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                raise CheckpointError("model", f"text weight {name!r} has no OpenCLIP name")
        else:
            raise CheckpointError("model", f"text weight {name!r} has no OpenCLIP name")
    out[LOGIT_SCALE] = ()
    return out


def openclip_origin(name: str) -> tuple[str, int | None, bool]:
    """Where our text weight ``name`` lies in an OpenCLIP checkpoint: (key, index of the
    q/k/v third of the packed ``in_proj_*`` or None, stored transposed)."""
    if name in _OURS_TOP:
        return _OURS_TOP[name], None, False
    if name == PROJECTION_KEY:
        return "text_projection", None, True
    if m := _OURS_LAYER_RX.match(name):
        base, rest = f"transformer.resblocks.{m.group(1)}.", m.group(2)
        if rest in _OURS_LAYER:
            return base + _OURS_LAYER[rest], None, False
        for i, proj in enumerate("qkv"):
            for leaf in ("weight", "bias"):
                if rest == f"self_attn.{proj}_proj.{leaf}":
                    return f"{base}attn.in_proj_{leaf}", i, False
    raise CheckpointError("model", f"text weight {name!r} has no OpenCLIP name")
