"""LoRA files, mapped onto our parameter names and merged into weights as they stream in.

Formats read (``.safetensors``, or ``.pt``/``.ckpt``/``.bin`` through the code-free reader of
:mod:`lib_hrlr.weights.ckpt_file`):

* **kohya / webui**: ``lora_unet_<module>`` / ``lora_te_<module>`` (``lora_te1_`` too) with
  ``.lora_down.weight``, ``.lora_up.weight`` and an optional scalar ``.alpha``; ``<module>`` is
  the diffusers UNet module path (what kohya's sd-scripts trains on) or the LDM one, dots as
  underscores (``lora_unet_down_blocks_0_attentions_0_proj_in``,
  ``lora_unet_input_blocks_1_1_proj_in``), and for the text encoder the transformers path
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).  LoCon conv layers are the same
  keys on convolutions: a ``k x k`` ``lora_down`` and a ``1 x 1`` ``lora_up``.
* **diffusers / PEFT**: ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` and
  ``text_encoder.<module>.lora_A/B.weight`` (also ``.lora.down/up.weight``,
  ``.lora_linear_layer.down/up.weight``, old attention-processor names
  ``attn1.processor.to_q_lora.down.weight``, PEFT's ``base_model.model.`` prefix).  Alpha comes
  from ``.alpha`` keys, else from the ``lora_adapter_metadata`` JSON diffusers writes
  (``unet.lora_alpha``, ``unet.alpha_pattern``), else it equals the rank (scale 1).

Each matched layer is a :class:`LoraLayer`: where its two factors lie in the file (nothing is
read but the alphas) and which of our parameters (LDM names, as in the checkpoint's
components) it changes.  The weight update is the usual

    W' = W + multiplier * (alpha / rank) * up @ down      (reshaped to W's shape)

applied by :class:`LoraMerger`, a :data:`~lib_hrlr.weights.streaming.WeightTransform`: the
streamer calls it on every tensor right after reading it, in the compute dtype, so pinned
(cached) units hold merged weights like streamed ones.  The factors are read from the LoRA
file at that moment (page cache): the whole ``down`` factor and the ``up`` factor in row blocks
of about ``MERGE_BLOCK_BYTES`` (float32), so a merge holds a layer's ``down`` factor and one
block (each also in the compute dtype), one merge at a time: memory does not grow with the
number or size of the LoRAs.  Several LoRAs on one layer are concatenated
along the rank: one GEMM ``W.addmm_(up, down)`` per block adds their sum to W and rounds once
(half-precision weights on the CPU go through float32 row blocks of W instead).

Errors (:class:`~lib_hrlr.errors.CheckpointError`, field ``lora``) name the file: a file
whose layers match nothing of the model, factors whose shapes do not fit their layer, and
LoRA variants that are not plain low-rank (LoHa, LoKr, DoRA, Tucker ``lora_mid``, full diffs).
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.architectures import ModelConfig
from ..errors import CheckpointError, InvalidInput
from ..text.extra_networks import LoraSpec
from .safetensors_file import TensorInfo, TensorSource, pread_into, read_header, read_tensor, tensor_memoryview

MERGE_BLOCK_BYTES = 1024 * 1024  # float32 rows of the up factors (and, for fp16 on the CPU, of W) per GEMM
FIELD = "lora"

# the factor (or alpha) a key suffix holds
_PARTS = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = (
    ("hada_", "LoHa (hada_*)"), ("lokr_", "LoKr (lokr_*)"), (".lora_mid.", "Tucker-decomposed LoCon (lora_mid)"),
    ("dora_scale", "DoRA (dora_scale)"), ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".oft_", "OFT"), (".ia3", "IA3"),
)
_UNSUPPORTED_SUFFIXES = ((".diff", ".diff_b"), "full weight differences (.diff)")
# old diffusers attention-processor LoRA names: attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_ATTN = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

# file prefixes: kohya (flat names) and dotted names
_KOHYA = (("lora_unet_", "unet"), ("lora_te1_", "text"), ("lora_te2_", "text2"), ("lora_te_", "text"))
_DOTTED = (("unet.", "unet"), ("text_encoder_2.", "text2"), ("text_encoder.", "text"), ("base_model.model.", None))
_METADATA_PREFIX = {"unet": "unet", "text": "text_encoder", "text2": "text_encoder_2"}


def _err(msg: str) -> CheckpointError:
    return CheckpointError(FIELD, msg)


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: ``target`` (our parameter name in ``component``) += scale * up @ down."""

    component: str  # "unet" | "text"
    target: str  # e.g. "input_blocks.1.1.proj_in.weight"
    key: str  # the module's name in the file
    down: TensorSource  # (rank, in[, kh, kw])
    up: TensorSource  # (out, rank[, 1, 1])
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.info.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank (1 when the file gives no alpha)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        return self.down.info.nbytes + self.up.info.nbytes


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: its layers mapped onto a model, and the module names that matched nothing."""

    path: str
    format: str  # "kohya" | "diffusers"
    layers: tuple[LoraLayer, ...]
    unmatched: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def components(self) -> set[str]:
        return {layer.component for layer in self.layers}


# --------------------------------------------------------------------------------- reading
def _tensor_table(p: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise _err(f"cannot read '{p}': {e.strerror}") from None
    try:
        if head == b"PK\x03\x04":
            from .ckpt_file import read_ckpt

            return read_ckpt(p).tensors, {}
        header = read_header(p)
        return header.tensors, header.metadata
    except CheckpointError as e:
        raise _err(f"'{p}' is not a readable LoRA file ({e.message})") from None


def _read_scalar(path: str, info: TensorInfo) -> float:
    if info.numel != 1 or not info.dtype.is_floating_point and info.dtype not in (torch.int64, torch.int32):
        raise _err(f"'{path}': {info.name!r} should be one number (the LoRA alpha), it has shape {list(info.shape)}")
    fd = os.open(path, os.O_RDONLY)
    try:
        return float(read_tensor(fd, info).reshape(()).item())
    finally:
        os.close(fd)


def _metadata_alphas(metadata: dict[str, str]) -> dict[str, object]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _metadata_alpha(meta: dict[str, object], component: str, module: str) -> float | None:
    prefix = _METADATA_PREFIX.get(component, component)
    pattern = meta.get(f"{prefix}.alpha_pattern")
    if isinstance(pattern, dict):
        for pat, value in pattern.items():
            if re.search(rf"(^|\.){re.escape(pat)}$", module) or re.fullmatch(pat, module):
                return float(value)
    alpha = meta.get(f"{prefix}.lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) else None


def _split_key(key: str) -> tuple[str, str] | None:
    """``(module, part)`` of a LoRA key, part in down/up/alpha; None for other keys."""
    m = _PROCESSOR.search(key)
    if m:
        sub = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        return key[: m.start()] + "." + sub, m.group(2)
    m = _TEXT_ATTN.search(key)
    if m:
        return key[: m.start()] + ".self_attn." + _TEXT_PROJ[m.group(1)], m.group(2)
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _component_of(module: str) -> tuple[str | None, str, bool]:
    """``(component or None = unknown, module name below the prefix, is_kohya)``."""
    for prefix, comp in _KOHYA:
        if module.startswith(prefix):
            return comp, module[len(prefix):], True
    for prefix, comp in _DOTTED:
        if module.startswith(prefix):
            return comp, module[len(prefix):], False
    return None, module, False


# --------------------------------------------------------------------------------- mapping
class LayerNames:
    """Every name a LoRA may use for a weight of the model, per component, to our parameter name."""

    def __init__(self, config: ModelConfig):
        from .checkpoint import expected_shapes
        from ..models.unet import diffusers_key_map

        self.shapes = expected_shapes(config)
        self.dotted: dict[str, dict[str, str]] = {}
        self.flat: dict[str, dict[str, str]] = {}
        unet: dict[str, str] = {}
        for theirs, ours in diffusers_key_map(config.unet).items():
            if theirs.endswith(".weight") and ours in self.shapes["unet"]:
                unet[theirs[:-7]] = ours
                unet[ours[:-7]] = ours
        self._add("unet", unet)
        for comp in [c for c in self.shapes if c.startswith("text")]:
            names: dict[str, str] = {}
            for ours in self.shapes[comp]:
                if ours.endswith(".weight"):
                    names[ours[:-7]] = ours
                    if ours.startswith("text_model."):
                        names[ours[len("text_model."):-7]] = ours
            self._add(comp, names)

    def _add(self, comp: str, names: dict[str, str]) -> None:
        self.dotted[comp] = names
        self.flat[comp] = {k.replace(".", "_"): v for k, v in names.items()}

    def find(self, comp: str | None, module: str, kohya: bool) -> tuple[str, str] | None:
        comps = [comp] if comp is not None else ["unet", "text"]
        for c in comps:
            table = (self.flat if kohya else self.dotted).get(c, {})
            if module in table:
                return c, table[module]
        return None


def read_lora(path: str | os.PathLike, config: ModelConfig, names: LayerNames | None = None) -> LoraFile:
    """Parse the LoRA at ``path`` and map its layers onto the model of ``config``.

    Reads the header (and the alphas) only.  Raises CheckpointError naming the file when no
    layer matches, a layer's factors do not fit its weight, or the file is not a plain LoRA.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(FIELD, f"'{p}' is not a file; expected a LoRA .safetensors (or .pt)")
    table, metadata = _tensor_table(p)
    spath = str(p)
    for key in table:
        for marker, what in _UNSUPPORTED:
            if marker in key:
                raise _err(f"'{p}' is a {what} network (key {key!r}); only plain LoRA/LoCon "
                           "(lora_down/lora_up, lora_A/lora_B) is supported")
        if key.endswith(_UNSUPPORTED_SUFFIXES[0]):
            raise _err(f"'{p}' holds {_UNSUPPORTED_SUFFIXES[1]} (key {key!r}); only plain LoRA/LoCon "
                       "(lora_down/lora_up, lora_A/lora_B) is supported")
    names = names or LayerNames(config)
    meta = _metadata_alphas(metadata)
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in table.items():
        split = _split_key(key)
        if split is not None:
            groups.setdefault(split[0], {})[split[1]] = info
    if not groups:
        shown = ", ".join(list(table)[:4]) or "none"
        raise _err(f"'{p}' holds no LoRA layers (keys: {shown}); expected lora_down/lora_up or lora_A/lora_B pairs")
    kohya_count = 0
    layers: list[LoraLayer] = []
    unmatched: list[str] = []
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            if parts.keys() == {"alpha"}:
                continue  # a lone alpha (diffusers' converted "...down.weight.alpha"): its layer keeps scale 1
            raise _err(f"'{p}': LoRA layer {module!r} lacks its {missing} factor")
        comp, local, kohya = _component_of(module)
        kohya_count += kohya
        hit = names.find(comp, local, kohya)
        if hit is None:
            unmatched.append(module)
            continue
        c, target = hit
        down, up = parts["down"], parts["up"]
        alpha = _read_scalar(spath, parts["alpha"]) if "alpha" in parts else _metadata_alpha(meta, c, local)
        _check_fit(p, module, target, names.shapes[c][target], down, up)
        layers.append(LoraLayer(c, target, module, TensorSource(spath, down), TensorSource(spath, up), alpha))
    if not layers:
        shown = ", ".join(unmatched[:3]) + (f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else "")
        raise _err(f"'{p}': none of its {len(unmatched)} LoRA layers match a layer of the {config.name} model "
                   f"({shown}); is it a LoRA for another architecture (SDXL, SD 2.x)?")
    targets = [(layer.component, layer.target) for layer in layers]
    if len(set(targets)) != len(targets):
        dup = next(t for t in targets if targets.count(t) > 1)
        raise _err(f"'{p}' holds two LoRA layers for the same weight {dup[1]!r} ({dup[0]})")
    fmt = "kohya" if kohya_count else "diffusers"
    return LoraFile(spath, fmt, tuple(layers), tuple(unmatched))


def _check_fit(p: Path, module: str, target: str, shape: tuple[int, ...], down: TensorInfo, up: TensorInfo) -> None:
    for what, info in (("down", down), ("up", up)):
        if not info.dtype.is_floating_point or len(info.shape) < 2:
            raise _err(f"'{p}': LoRA {what} factor of {module!r} has dtype {info.dtype} and shape {list(info.shape)}; "
                       "a floating matrix (or conv kernel) is required")
    out = shape[0]
    k = math.prod(shape) // out
    rank = down.shape[0]
    if up.shape[0] != out or up.numel != out * rank or down.numel != rank * k:
        raise _err(f"'{p}': LoRA layer {module!r} (down {list(down.shape)}, up {list(up.shape)}) does not fit the "
                   f"weight {target!r} of shape {list(shape)}")


# ---------------------------------------------------------------------------------- merging
class LoraMerger:
    """A streamer transform adding the low-rank updates of one component's layers.

    ``entries`` are ``(layer, multiplier)``; multipliers of 0 are dropped (weight 0 leaves the
    model bit for bit unchanged).  Use as a context manager (holds one descriptor per file).
    The streamer calls it on its calling thread as it attaches a unit (the counters are locked,
    so calls from several threads are safe too).
    """

    def __init__(self, entries: list[tuple[LoraLayer, float]], block_bytes: int = MERGE_BLOCK_BYTES):
        self.by_target: dict[str, list[tuple[LoraLayer, float]]] = {}
        for layer, mult in entries:
            if mult != 0.0:
                self.by_target.setdefault(layer.target, []).append((layer, float(mult)))
        self.block_bytes = max(4, int(block_bytes))
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.merges = 0  # weights merged so far
        self.peak_scratch_bytes = 0  # the most temporary memory one merge used

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(self.by_target)

    def __enter__(self) -> "LoraMerger":
        try:
            for path in sorted({s.path for entries in self.by_target.values() for layer, _ in entries
                                for s in (layer.down, layer.up)}):
                self._fds[path] = os.open(path, os.O_RDONLY)
        except OSError as e:
            self.close()
            raise _err(f"cannot open LoRA file '{e.filename}': {e.strerror}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _read(self, src: TensorSource, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Elements ``start .. start+count`` of a factor, flat, in float32."""
        fd = self._fds.get(src.path)
        if fd is None:
            raise RuntimeError("LoraMerger used outside its 'with' block")
        info = src.info
        raw = torch.empty(count, dtype=info.dtype)
        pread_into(fd, info.offset + start * info.dtype.itemsize, tensor_memoryview(raw))
        return raw.to(device=device, dtype=torch.float32)

    def __call__(self, name: str, weight: torch.Tensor) -> None:
        entries = self.by_target.get(name)
        if not entries:
            return
        out = weight.shape[0]
        w = weight.view(out, -1)
        k = w.shape[1]
        dev = weight.device
        # CPU half GEMMs are slow: float32 row blocks, rounded once; otherwise the GEMM adds W
        # in float32 and rounds once (bf16: the same bits as a float32 merge rounded to bf16 for
        # all but ~1e-6 of the elements)
        via_f32 = weight.dtype == torch.float16 and dev.type == "cpu"
        gemm_dtype = torch.float32 if via_f32 else weight.dtype
        # several LoRAs: one product over the concatenated ranks
        down = torch.cat([self._read(layer.down, 0, layer.rank * k, dev).view(layer.rank, k) for layer, _ in entries])
        scratch = down.numel() * 4
        if gemm_dtype != torch.float32:
            down = down.to(gemm_dtype)
            scratch += down.numel() * gemm_dtype.itemsize
        rank = down.shape[0]
        # the up factors are read in row blocks, so a big layer never holds its whole (out, rank) factor
        rows = max(1, self.block_bytes // (4 * (rank + (k if via_f32 else 0))))
        rows = min(rows, out)
        for r0 in range(0, out, rows):
            n = min(rows, out - r0)
            up = torch.cat([self._read(layer.up, r0 * layer.rank, n * layer.rank, dev).view(n, layer.rank)
                            .mul_(mult * layer.scale) for layer, mult in entries], dim=1)
            block = w[r0 : r0 + n]
            if via_f32:
                acc = block.float()
                acc.addmm_(up, down)
                block.copy_(acc)
            else:
                block.addmm_(up.to(gemm_dtype), down)
        scratch += rows * rank * (4 + gemm_dtype.itemsize) + (rows * k * 4 if via_f32 else 0)
        with self._lock:
            self.merges += 1
            self.peak_scratch_bytes = max(self.peak_scratch_bytes, scratch)


@dataclass(frozen=True)
class LoraSet:
    """The LoRAs of one run: each parsed file with the spec (multipliers) it was asked with."""

    items: tuple[tuple[LoraFile, LoraSpec], ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def nbytes(self) -> int:
        """Bytes of every matched factor in its file (what holding them all would cost)."""
        return sum(f.nbytes for f, _ in self.items)

    def merger(self, component: str) -> LoraMerger | None:
        """The transform for ``component`` ("unet" or "text"), None when no LoRA touches it."""
        entries = []
        for lora, spec in self.items:
            mult = spec.weight if component == "unet" else spec.text_weight
            entries += [(layer, mult) for layer in lora.layers if layer.component == component]
        merger = LoraMerger(entries)
        return merger if merger.by_target else None

    def infotext(self) -> str | None:
        """``name:weight`` (``name:te:unet`` when they differ) of every LoRA, for the infotext."""
        if not self.items:
            return None
        parts = []
        for _, s in self.items:
            w = f"{s.weight:g}" if s.te_weight is None else f"{s.text_weight:g}:{s.weight:g}"
            parts.append(f"{s.display_name}:{w}")
        return ", ".join(parts)


def load_loras(specs, config: ModelConfig) -> LoraSet:
    """Parse every spec's file against ``config`` (headers and alphas only)."""
    specs = tuple(specs or ())
    if not specs:
        return LoraSet()
    names = LayerNames(config)
    items, warnings = [], []
    for spec in specs:
        if not isinstance(spec, LoraSpec):
            raise InvalidInput(FIELD, f"expected LoraSpec entries, got {type(spec).__name__}")
        if not math.isfinite(spec.weight) or not math.isfinite(spec.text_weight):
            raise InvalidInput(FIELD, f"'{spec.path}': weights must be finite numbers")
        lora = read_lora(spec.path, config, names)
        if lora.unmatched:
            shown = ", ".join(lora.unmatched[:3]) + (f" and {len(lora.unmatched) - 3} more" if len(lora.unmatched) > 3 else "")
            warnings.append(f"'{spec.path}': {len(lora.unmatched)} of its layers match nothing in the model and are "
                            f"ignored ({shown})")
        items.append((lora, spec))
    return LoraSet(tuple(items), tuple(warnings))
