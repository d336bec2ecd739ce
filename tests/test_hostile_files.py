"""Hostile and large checkpoint files: crafted pickles are read in time linear in their size,
the model hash is cached by (path, size, mtime), metadata-declared configs are shape-checked."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_hrlr.config.architectures import TINY, UNET_PREFIX
from lib_hrlr.errors import CheckpointError
from lib_hrlr.weights.checkpoint import open_checkpoint
from lib_hrlr.weights.ckpt_file import check_expansion, read_ckpt
from lib_hrlr.weights.random_checkpoint import write_random_checkpoint


def dag(levels: int, kind=list):
    node = kind()
    for _ in range(levels):
        node = kind([node, node])
    return node


def torch_zip_with_pickle(path: Path, pickled: bytes) -> Path:
    """A torch.save-style zip archive whose data.pkl is ``pickled`` (no storages)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def tuple_dag_key_pickle(levels: int) -> bytes:
    """Protocol 2: ``{"state_dict": {}, "cb": {t: 1}}`` where ``t = (t', t')`` nested ``levels``
    deep through the memo, so the dict key is a DAG of shared tuples that the unpickler hashes
    as a tree (2^levels) when it builds the dict."""
    key = b")"  # EMPTY_TUPLE
    for i in range(levels):
        key += b"q" + bytes([i]) + b"h" + bytes([i]) + b"\x86"  # BINPUT i, BINGET i, TUPLE2
    body = b"}" + b"X" + (10).to_bytes(4, "little") + b"state_dict" + b"}" + b"s"  # top["state_dict"] = {}
    body += b"X" + (2).to_bytes(4, "little") + b"cb" + b"}" + key + b"K\x01" + b"s" + b"s"
    return b"\x80\x02" + body + b"."


def timed_read(path):
    t = time.perf_counter()
    try:
        result = read_ckpt(path)
    except CheckpointError as e:
        result = e
    return result, time.perf_counter() - t


def test_shared_reference_dag_reads_in_linear_time(tmp_path):
    """The issue's crafted file: 20 levels of [node, node] in the training bookkeeping beside a
    real state dict took 1.1-4 s (doubling per level); now well under a second."""
    p = tmp_path / "dag20.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "callbacks": dag(20)}, p)
    assert p.stat().st_size < 2048  # 1.7 KB
    ck, seconds = timed_read(p)
    assert not isinstance(ck, Exception), ck
    assert list(ck.tensors) == ["w"] and ck.other_keys == ["callbacks"]
    assert seconds < 0.1, seconds
    # the same DAG inside the state dict (not a tensor: skipped, but scanned for inert objects)
    torch.save({"state_dict": {"w": torch.arange(4.0), "x": dag(20)}}, p)
    ck, seconds = timed_read(p)
    assert list(ck.tensors) == ["w"] and seconds < 0.1, seconds


@pytest.mark.parametrize("levels", [30, 60])
def test_deeper_dags_are_refused_quickly(tmp_path, levels):
    p = tmp_path / f"dag{levels}.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "callbacks": dag(levels)}, p)
    err, seconds = timed_read(p)
    assert isinstance(err, CheckpointError) and err.field == "model"
    assert "shares references so deeply" in err.message
    assert seconds < 0.1, seconds


def test_tuple_dag_hashed_by_the_unpickler_is_refused_before_unpickling(tmp_path):
    """A dict key that is a 40-deep DAG of shared tuples: hashing it as a tree would take 2^40
    steps inside pickle itself; the opcode pre-pass refuses it first."""
    pickled = tuple_dag_key_pickle(40)
    assert len(pickled) < 300
    err, seconds = timed_read(torch_zip_with_pickle(tmp_path / "tuples.ckpt", pickled))
    assert isinstance(err, CheckpointError) and "shares references so deeply" in err.message
    assert seconds < 0.1, seconds
    # 10 levels is harmless and goes through the unpickler
    ck, _ = timed_read(torch_zip_with_pickle(tmp_path / "small.ckpt", tuple_dag_key_pickle(10)))
    assert ck.tensors == {} and ck.other_keys == ["cb"]


def test_expansion_of_a_real_checkpoint_pickle_is_small(tmp_path):
    state = {f"layer{i}.weight": torch.zeros(3, 2) for i in range(50)}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "global_step": 5}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    largest = check_expansion(pickled)
    assert 50 * 5 < largest < len(pickled)  # about one node per tensor argument, fewer than bytes


# ------------------------------------------------------------------------------ hash cache


@pytest.fixture
def hash_calls(monkeypatch, tmp_path):
    """Counts whole-file hashes (the real function runs) with the cache under tmp_path."""
    from lib_hrlr.weights import file_hash

    monkeypatch.setenv("HRLR_CACHE", str(tmp_path / "cache"))
    calls = []
    real = file_hash.sha256_file

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(file_hash, "sha256_file", counting)
    return calls


def test_checkpoint_hash_is_cached_by_path_size_and_mtime(tmp_path, hash_calls):
    model = write_random_checkpoint(tmp_path / "m.safetensors", TINY, torch.float16, seed=1)
    want = hashlib.sha256(model.read_bytes()).hexdigest()
    ck = open_checkpoint(model)
    assert ck.sha256 == want and ck.sha256_short == want[:10]
    assert ck.sha256 == want and len(hash_calls) == 1  # once per object
    assert open_checkpoint(model).sha256 == want and len(hash_calls) == 1  # a second run: from the cache
    cache = json.loads((tmp_path / "cache" / "hashes.json").read_text())
    st = model.stat()
    assert cache[os.path.realpath(model)] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": want}
    # same size, new mtime: hashed again
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_checkpoint(model).sha256 == hashlib.sha256(bytes(data)).hexdigest() != want
    assert len(hash_calls) == 2
    # a link to the same file shares the entry
    link = tmp_path / "link.safetensors"
    link.symlink_to(model)
    assert open_checkpoint(link).sha256 == hashlib.sha256(bytes(data)).hexdigest() and len(hash_calls) == 2


def test_damaged_or_read_only_cache_only_costs_a_rehash(tmp_path, hash_calls):
    from lib_hrlr.weights.file_hash import cached_sha256

    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3000))
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    cache = tmp_path / "cache" / "hashes.json"
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert cached_sha256(f) == want and len(hash_calls) == 1
    assert json.loads(cache.read_text())[os.path.realpath(f)]["sha256"] == want  # rewritten whole
    cache.write_text(json.dumps({os.path.realpath(f): {"size": 3000, "mtime_ns": f.stat().st_mtime_ns, "sha256": "x"}}))
    assert cached_sha256(f) == want and len(hash_calls) == 2  # a malformed entry is not trusted
    # a cache that cannot be written (its folder is a file: fails for root too) is skipped
    unwritable = str(f) + "/hashes.json"
    assert cached_sha256(f, cache_file=unwritable) == want
    assert cached_sha256(f, cache_file=unwritable) == want
    assert len(hash_calls) == 4 and sorted(os.listdir(tmp_path)) == ["cache", "w.bin"]


# ------------------------------------------------------------------------ declared configs


def test_declared_config_gets_the_same_shape_checks(tmp_path):
    """A safetensors file with ``hrlr_config`` metadata: a weight with the right number of
    elements in the wrong shape (transposed channels) is refused as for any other file, while a
    1x1 convolution stored as a linear layer (as diffusers-converted files do) is accepted."""
    from safetensors.torch import load_file

    good = write_random_checkpoint(tmp_path / "good.safetensors", TINY, torch.float16, seed=2)
    state = load_file(str(good))
    md = {"hrlr_config": TINY.to_json()}
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    w = state[key]
    assert w.shape == (32, 4, 3, 3)
    bad = dict(state)
    bad[key] = w.reshape(4, 32, 3, 3).contiguous()
    p = tmp_path / "bad.safetensors"
    save_file(bad, str(p), metadata=md)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert "'input_blocks.0.0.weight' has shape [4, 32, 3, 3]" in e.value.message and "needs [32, 4, 3, 3]" in e.value.message

    one_by_one = [k for k, v in state.items() if v.ndim == 4 and v.shape[2:] == (1, 1)]
    assert one_by_one  # proj_in / proj_out / VAE attention
    linear = {k: (v[:, :, 0, 0].contiguous() if k in one_by_one else v) for k, v in state.items()}
    q = tmp_path / "linear.safetensors"
    save_file(linear, str(q), metadata=md)
    ck = open_checkpoint(q)
    assert ck.config == TINY and ck.config_source == "metadata"
