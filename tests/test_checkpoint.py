"""open_checkpoint and the file readers: same tensors from every format, clear refusals."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_hrlr.config.architectures import SD15, TEXT_PREFIX, TINY, UNET_PREFIX, VAE_PREFIX
from lib_hrlr.errors import CheckpointError
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.ckpt_file import read_ckpt
from lib_hrlr.weights.random_checkpoint import tensor_plan, write_random_checkpoint, write_random_diffusers_folder
from lib_hrlr.weights.safetensors_file import build_header, read_header, read_tensor
from tests.conftest import read_source

SUPPORTED = "supports Stable Diffusion 1.x checkpoints"




def assert_same_components(a, b):
    for comp in ("unet", "vae", "text"):
        ca, cb = a.component(comp), b.component(comp)
        assert set(ca) == set(cb), (comp, sorted(set(ca) ^ set(cb))[:5])
        for name in ca:
            x, y = read_source(ca[name]), read_source(cb[name])
            assert x.dtype == y.dtype and torch.equal(x.flatten(), y.flatten()), (comp, name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return write_random_checkpoint(d / "tiny.safetensors", TINY, torch.float16, seed=3)


@pytest.fixture(scope="module")
def tiny_state(tiny):
    return load_file(str(tiny))  # the reference reader


def fake_lightning(monkeypatch):
    """Register a stand-in pytorch_lightning module so torch.save can pickle its class."""
    root = types.ModuleType("pytorch_lightning")
    cb = types.ModuleType("pytorch_lightning.callbacks")
    mc = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/logs/last.ckpt"
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = mc.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mc.ModelCheckpoint = ModelCheckpoint
    for m in (root, cb, mc):
        monkeypatch.setitem(sys.modules, m.__name__, m)
    return ModelCheckpoint


# ------------------------------------------------------------------------------ formats


def test_ldm_safetensors_detected_from_metadata(tiny, tiny_state):
    ck = open_checkpoint(tiny)
    assert ck.config == TINY and ck.config_source == "metadata" and ck.format == "safetensors"
    assert ck.name == "tiny"
    n = {c: len(ck.component(c)) for c in ("unet", "vae", "text")}
    assert n == {c: sum(1 for p in tensor_plan(TINY) if p[0] == c) for c in ("unet", "vae", "text")}
    # tensors equal what the safetensors library reads
    for name, src in ck.component("unet").items():
        assert torch.equal(read_source(src), tiny_state[UNET_PREFIX + name])
    assert ck.sha256 == hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert ck.sha256_short == ck.sha256[:10] and len(ck.sha256_short) == 10


def test_component_names(tiny):
    from lib_hrlr.errors import InvalidInput

    ck = open_checkpoint(tiny)
    assert ck.component("text_encoder") == ck.component("text")
    with pytest.raises(InvalidInput, match="allowed are unet, vae, text"):
        ck.component("clip")


def test_ckpt_with_lightning_bookkeeping_equals_safetensors(tmp_path, tiny, tiny_state, monkeypatch):
    ModelCheckpoint = fake_lightning(monkeypatch)
    path = tmp_path / "tiny.ckpt"
    torch.save(
        {
            "state_dict": dict(tiny_state),
            "global_step": 470000,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}, "cb": ModelCheckpoint()},
        },
        path,
    )
    monkeypatch.delitem(sys.modules, "pytorch_lightning.callbacks.model_checkpoint")  # not importable when read
    contents = read_ckpt(path)
    assert contents.state_key == "state_dict" and "callbacks" in contents.other_keys
    assert contents.ignored_globals == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    ck = open_checkpoint(path)
    assert ck.format == "ckpt" and ck.name == "tiny"
    assert_same_components(ck, open_checkpoint(tiny))


def test_ckpt_top_level_old_text_keys_and_position_ids(tmp_path, tiny, tiny_state):
    """A flat .ckpt whose text keys lack ``text_model.`` (old transformers) and carry position_ids."""
    state = {}
    for k, v in tiny_state.items():
        if k.startswith(TEXT_PREFIX + "text_model."):
            k = TEXT_PREFIX + k[len(TEXT_PREFIX + "text_model."):]
        state[k] = v
    state[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    state["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "flat.pt"
    torch.save(state, path)
    ck = open_checkpoint(path)
    assert "text_model.embeddings.position_ids" not in ck.component("text")
    # no metadata: the config is inferred from shapes (head counts are not in the weights)
    assert ck.config_source == "inferred"
    u = ck.config.unet
    assert (u.model_channels, u.channel_mult, u.num_res_blocks, u.attention_levels, u.context_dim) == (32, (1, 2), 2, (True, True), 32)
    assert ck.config.vae == TINY.vae and ck.config.text.num_layers == 2 and ck.config.text.hidden_size == 32
    assert_same_components(ck, open_checkpoint(tiny))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_random_diffusers_folder(tmp_path_factory.mktemp("diffusers") / "tiny-sd", TINY, torch.float16, seed=3)


def test_diffusers_folder_equals_single_file(tiny_folder, tiny):
    ck = open_checkpoint(tiny_folder)
    assert ck.format == "diffusers" and ck.config == TINY and ck.name == "tiny-sd"
    assert ck.sha256 == hashlib.sha256((tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    # diffusers stores the VAE attention projections as Linear (c, c): same bytes as our 1x1 convs
    q = ck.component("vae")["decoder.mid.attn_1.q.weight"].info
    assert len(q.shape) == 2
    assert_same_components(ck, open_checkpoint(tiny))


def test_diffusers_fp16_variant_and_bin_files(tmp_path, tiny_folder, tiny):
    import shutil

    folder = tmp_path / "variant"
    shutil.copytree(tiny_folder, folder)
    # unet: only an fp16 variant; text encoder: a torch .bin instead of safetensors
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    te = folder / "text_encoder"
    torch.save(load_file(str(te / "model.safetensors")), te / "pytorch_model.bin")
    (te / "model.safetensors").unlink()
    ck = open_checkpoint(folder)
    assert ck.component("unet")["out.2.weight"].path.endswith("diffusion_pytorch_model.fp16.safetensors")
    assert ck.component("text")["text_model.final_layer_norm.weight"].path.endswith("pytorch_model.bin")
    assert_same_components(ck, open_checkpoint(tiny))


def test_diffusers_models_agree_with_streamed_ldm_unet(tiny_folder, tiny):
    """Non-circular check of the key map: diffusers' own UNet on the folder equals our UNet
    streamed from the single file."""
    import diffusers

    from lib_hrlr.models.unet import UNet
    from lib_hrlr.weights.streaming import WeightStreamer

    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g), torch.tensor([321.0])
    with torch.no_grad():
        ref = diffusers.UNet2DConditionModel.from_pretrained(str(tiny_folder / "unet")).float().eval()
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        del ref
        with torch.device("meta"):
            unet = UNet(TINY.unet)
        with WeightStreamer(unet, open_checkpoint(tiny).component("unet"), torch.float32) as ws:
            out = unet(x, t, ctx)
            assert ws.stats.bytes_read == open_checkpoint(tiny).component_bytes("unet")
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), (out - expected).abs().max()


def sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype=torch.float16, metadata=None) -> Path:
    """A valid safetensors file of zeros, written sparse: full-size models cost no disk or time."""
    header, offsets = build_header([(k, dtype, s) for k, s in shapes.items()], metadata)
    data = sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)
    return path


def sd15_shapes(text_model_level=True) -> dict[str, tuple[int, ...]]:
    from lib_hrlr.weights.random_checkpoint import PREFIXES

    out = {}
    for comp, name, _, shape, _ in tensor_plan(SD15):
        if comp == "text" and not text_model_level:
            name = name[len("text_model."):]
        out[PREFIXES[comp] + name] = shape
    return out


def test_sd15_architecture_inferred_from_shapes(tmp_path):
    shapes = sd15_shapes(text_model_level=False)
    shapes[TEXT_PREFIX + "embeddings.position_ids"] = (1, 77)
    shapes["model_ema.num_updates"] = ()
    ck = open_checkpoint(sparse_safetensors(tmp_path / "v1-5.safetensors", shapes))
    assert ck.config == SD15 and ck.config_source == "inferred"
    assert ck.component_bytes("unet") == 859_520_964 * 2


# ------------------------------------------------------------------------------ refusals


def refused(path, *needles):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    err = e.value
    assert err.field == "model"
    for n in needles:
        assert n in str(err), str(err)
    return str(err)


def test_missing_path_and_plain_folder(tmp_path):
    refused(tmp_path / "nope.safetensors", "does not exist", SUPPORTED)
    (tmp_path / "folder").mkdir()
    refused(tmp_path / "folder", "without model_index.json", SUPPORTED)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".weird"])
def test_garbage_and_empty_files(tmp_path, suffix):
    p = tmp_path / f"junk{suffix}"
    p.write_bytes(os.urandom(4096))
    msg = refused(p)
    assert "Allowed" in msg or SUPPORTED in msg
    p.write_bytes(b"")
    refused(p, "is empty", SUPPORTED)


def test_truncated_files(tmp_path, tiny):
    data = tiny.read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:100])  # inside the header
    refused(p, "the header claims", "Allowed are complete safetensors files")
    p.write_bytes(data[:-10])  # inside the data
    refused(p, "the file is truncated")
    p.write_bytes(data[:5])
    refused(p, "shorter than the 8-byte header length")


def test_truncated_ckpt(tmp_path, tiny_state):
    p = tmp_path / "cut.ckpt"
    torch.save({"state_dict": tiny_state}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    refused(p, "damaged or truncated")


@pytest.mark.parametrize(
    "extra, what",
    [
        ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 4)}, "SDXL"),
        ({UNET_PREFIX + "label_emb.0.0.weight": (4, 4)}, "SDXL"),
        ({"cond_stage_model.model.token_embedding.weight": (10, 4)}, "Stable Diffusion 2.x"),
        ({UNET_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "Stable Diffusion 3"),
    ],
)
def test_other_architectures_refused(tmp_path, extra, what):
    shapes = {UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3), **extra}
    refused(sparse_safetensors(tmp_path / "other.safetensors", shapes), f"looks like {what}", SUPPORTED)


def test_not_a_model_and_inpainting_refused(tmp_path):
    refused(sparse_safetensors(tmp_path / "lora.safetensors", {"lora_unet_down.alpha": ()}), "looks like a LoRA")
    refused(sparse_safetensors(tmp_path / "x.safetensors", {"foo": (3,)}), "does not look like a Stable Diffusion model")
    shapes = sd15_shapes()
    shapes[UNET_PREFIX + "input_blocks.0.0.weight"] = (320, 9, 3, 3)
    refused(sparse_safetensors(tmp_path / "inpaint.safetensors", shapes), "inpainting model", "text-to-image")


def test_missing_and_misshapen_weights_refused(tmp_path, tiny_state):
    md = {"hrlr_config": TINY.to_json()}
    state = dict(tiny_state)
    del state[VAE_PREFIX + "decoder.conv_out.bias"]
    p = tmp_path / "holes.safetensors"
    save_file(state, str(p), metadata=md)
    refused(p, "lacks 1 vae weight(s)", "decoder.conv_out.bias")
    state = dict(tiny_state)
    state[UNET_PREFIX + "out.2.bias"] = torch.zeros(5, dtype=torch.float16)
    save_file(state, str(p), metadata=md)
    refused(p, "'out.2.bias' has shape [5]", "needs [4]")
    save_file({k: v for k, v in tiny_state.items() if not k.startswith(VAE_PREFIX)}, str(p))
    refused(p, "no vae weights", SUPPORTED)


def test_malicious_pickles_rejected_without_running(tmp_path, tiny_state, monkeypatch):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class EvalEvil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    for i, payload in enumerate([{"state_dict": tiny_state, "x": Evil()}, {"state_dict": {**tiny_state, "y": EvalEvil()}}]):
        p = tmp_path / f"evil{i}.ckpt"
        torch.save(payload, p)
        msg = refused(p, "refusing to load", "allowed in a checkpoint's pickle are torch tensor rebuild functions")
        assert ("posix.system" in msg) if i == 0 else ("__builtin__.eval" in msg)  # protocol 2 names
    assert not marker.exists()

    # a tolerated bookkeeping class is still refused inside the state dict
    ModelCheckpoint = fake_lightning(monkeypatch)
    p = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {**tiny_state, "cb": ModelCheckpoint()}}, p)
    refused(p, "state dict", "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")


def test_compressed_and_legacy_ckpt_refused(tmp_path, tiny_state):
    import zipfile

    src = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tiny_state}, src)
    dst = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, zin.read(item.filename))
    refused(dst, "is compressed", "uncompressed")
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": tiny_state}, legacy, _use_new_zipfile_serialization=False)
    refused(legacy, "legacy", "Allowed are .safetensors files")


# ------------------------------------------------------------------------------ safetensors parser


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, needle",
    [
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "known dtypes are F64"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "spans 4 bytes but shape [2]"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4, "the file is truncated"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "0 <= begin <= end"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative integers"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "must map strings to strings"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly dtype, shape and data_offsets"),
    ],
)
def test_safetensors_header_validation(tmp_path, header, data, needle):
    p = write_raw(tmp_path / "h.safetensors", header, data)
    with pytest.raises(CheckpointError, match="not a valid .safetensors file") as e:
        read_header(p)
    assert needle in str(e.value)


def test_safetensors_duplicate_keys_and_bad_json(tmp_path):
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    p = tmp_path / "d.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(p)


def test_safetensors_reader_matches_library_for_all_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([250, 1], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    p = tmp_path / "all.safetensors"
    save_file(ts, str(p), metadata={"who": "test"})
    h = read_header(p)
    assert h.metadata == {"who": "test"} and set(h.tensors) == set(ts)
    fd = os.open(p, os.O_RDONLY)
    try:
        for name, t in ts.items():
            info = h.tensors[name]
            assert info.shape == tuple(t.shape) and info.dtype == t.dtype and info.nbytes == t.numel() * t.element_size()
            assert torch.equal(read_tensor(fd, info), t), name
    finally:
        os.close(fd)
