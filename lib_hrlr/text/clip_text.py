"""The CLIP text transformers of Stable Diffusion 1.x and SDXL, in plain torch.

One module serves CLIP ViT-L/14 (SD 1.x, and SDXL's first encoder) and OpenCLIP
ViT-bigG/14's text tower (SDXL's second): they differ by configuration only (width, depth,
GELU, and bigG's ``text_projection`` of the pooled state, built when
``TextEncoderConfig.projection_dim`` is set; transformers' ``CLIPTextModelWithProjection``).
OpenCLIP's own checkpoint names are mapped to these by :mod:`lib_hrlr.text.openclip`.

Parameter names are those of Hugging Face's ``CLIPTextModel``
(``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.{i}.
self_attn.{q,k,v,out}_proj.{weight,bias}``, ``layer_norm1``, ``mlp.fc1``, ``mlp.fc2``,
``layer_norm2``, ``text_model.final_layer_norm``).  The same names are found

* in an LDM single-file checkpoint below ``cond_stage_model.transformer.``
  (:data:`lib_hrlr.config.architectures.TEXT_PREFIX`);
* in a diffusers folder's ``text_encoder/`` file, as they are: no key map is needed.

Very old single-file checkpoints (saved with transformers < 4.x) lack the ``text_model.``
level; :func:`canonical_text_key` adds it.  Checkpoints may also carry the
``text_model.embeddings.position_ids`` buffer, which this model does not have (positions
are ``0..T-1``): a loader drops the keys of :func:`ignorable_text_keys`.

The model is built from a :class:`TextEncoderConfig` and can be built on the ``meta``
device (``with torch.device("meta"): ClipTextEncoder(cfg)``) without allocating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib_hrlr.config.architectures import TextEncoderConfig
from lib_hrlr.errors import InvalidInput

_ACTIVATIONS = ("quick_gelu", "gelu")


def ignorable_text_keys() -> frozenset[str]:
    """Checkpoint keys (below the text prefix) that a loader may drop: buffers we do not keep."""
    return frozenset({"text_model.embeddings.position_ids", "embeddings.position_ids"})


def canonical_text_key(key: str) -> str:
    """Our name for a text-encoder key of any vintage (adds a missing ``text_model.``)."""
    return key if key.startswith("text_model.") else "text_model." + key


def _normal(*shape: int) -> torch.Tensor:
    w = torch.empty(*shape)
    if w.device.type != "meta":
        nn.init.normal_(w)
    return w


class _Embeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        # Embedding's own init (normal_) on the meta device pulls in torch's Python
        # decompositions (~74 MB of resident memory): give it the weight, initialised only
        # when it is real
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            _weight=_normal(cfg.vocab_size, cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size,
                                               _weight=_normal(cfg.max_positions, cfg.hidden_size))

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``token_embeds``: the token embedding rows of ``input_ids`` already looked up (e.g.
        read row by row from the checkpoint, :mod:`lib_hrlr.text.token_rows`): the whole
        ``token_embedding`` table is then never touched."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_embeds is None:
            x = self.token_embedding(input_ids)
        else:
            x = token_embeds.clone()  # in the compute dtype: the caller reads the rows in it
        x += self.position_embedding(positions)[None]
        return x


class _SelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        heads = self.num_heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, heads, d // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        del q, k, v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.quick = cfg.hidden_act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.quick:
            h = h * torch.sigmoid(1.702 * h)
        else:
            h = F.gelu(h)
        return self.fc2(h)


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = _SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class _Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_layers))


class _TextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class TextProjection(nn.Module):
    """``text_projection`` of the pooled state, ``weight`` (projection_dim, hidden) as in
    transformers (``y = x W^T``).  OpenCLIP stores the (hidden, projection_dim) matrix ``P``
    with ``y = x P``; a loader that streams those bytes into ``weight`` unchanged sets
    ``transposed = True`` and the same result is computed from them."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, hidden))
        self.transposed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.transposed:
            return x @ w.reshape(w.shape[1], w.shape[0])
        return F.linear(x, w)


class ClipTextEncoder(nn.Module):
    """CLIP text transformer: ``forward(input_ids (B, T) long, clip_skip=1) -> (B, T, hidden)``.

    ``clip_skip=n`` stops after layer ``num_layers - n + 1`` (``n=2``: the penultimate
    layer's output) and applies ``final_layer_norm`` to it, as the AUTOMATIC1111 webui
    does; ``clip_skip=1`` is the usual last hidden state.  Attention is causal, with no
    padding mask (SD 1.x conditions on the padded sequence).  Output is in the weights'
    dtype.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise InvalidInput("hidden_act", f"{cfg.hidden_act!r} is not supported; use one of {_ACTIVATIONS}")
        if cfg.hidden_size % cfg.num_heads:
            raise InvalidInput("num_heads", f"{cfg.num_heads} does not divide hidden_size {cfg.hidden_size}")
        self.config = cfg
        self.text_model = _TextTransformer(cfg)
        self.text_projection = TextProjection(cfg.hidden_size, cfg.projection_dim) if cfg.projection_dim else None

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        cfg = self.config
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                or input_ids.dtype not in (torch.int64, torch.int32)):
            raise InvalidInput("input_ids", "must be an integer tensor of shape (batch, tokens)")
        if not 1 <= input_ids.shape[1] <= cfg.max_positions:
            raise InvalidInput("input_ids", f"{input_ids.shape[1]} tokens; 1 to {cfg.max_positions} are allowed")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise InvalidInput("input_ids", f"token ids must lie in 0..{cfg.vocab_size - 1}")

    def encode_sdxl(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What SDXL takes from this encoder: the penultimate layer's hidden states (B, T,
        hidden) *without* the final LayerNorm (CLIP ViT-L: ``hidden_states[11]``, bigG:
        "penultimate"), and, with a text projection, the pooled output (B, projection_dim):
        ``text_projection(final_layer_norm(last layer)[eos])`` where ``eos`` is the position
        of the largest token id (the first EOS; sgm/OpenCLIP's ``argmax``).  Without a
        projection the last layer is not run and the pooled output is None.

        ``token_embeds`` (B, T, hidden): the token embedding rows, looked up by the caller."""
        self._check_ids(input_ids)
        tm = self.text_model
        x = tm.embeddings(input_ids, token_embeds)
        layers = tm.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        hidden = x
        if self.text_projection is None:
            return hidden, None
        last = layers[-1](x)
        eos = input_ids.argmax(dim=-1)
        pooled = tm.final_layer_norm(last[torch.arange(last.shape[0], device=last.device), eos])
        del last
        return hidden, self.text_projection(pooled)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, token_vectors=()) -> torch.Tensor:
        """``token_vectors``: ``(row, position, vectors (n, hidden))`` triples whose vectors
        replace the token embeddings at ``position..position+n`` of ``row`` (textual-inversion
        embeddings, :mod:`lib_hrlr.text.embeddings`), before the position embeddings are added."""
        cfg = self.config
        self._check_ids(input_ids)
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= cfg.num_layers:
            raise InvalidInput("clip_skip", f"{clip_skip!r}; an integer from 1 to {cfg.num_layers} is allowed")
        tm = self.text_model
        if token_vectors:
            from .embeddings import place_vectors

            x = tm.embeddings(input_ids, place_vectors(tm.embeddings.token_embedding(input_ids), token_vectors))
        else:
            x = tm.embeddings(input_ids)
        for layer in tm.encoder.layers[: cfg.num_layers - clip_skip + 1]:
            x = layer(x)
        return tm.final_layer_norm(x)
