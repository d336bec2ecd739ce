"""Where the TAESD weights are found: offline resolution fails at once, naming where the two
files go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

_CHILD = textwrap.dedent("""
    import json, sys, time
    import huggingface_hub  # imported before the clock starts: only the resolution is timed
    from lib_hrlr.pipeline import components
    t = time.perf_counter()
    try:
        components.taesd_dir(None)
        msg = None
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
    print(json.dumps({"seconds": time.perf_counter() - t, "message": msg}))
""")


def _offline_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HRLR_TAESD_DIR", "HF_HUB_OFFLINE") and not k.lower().endswith("_proxy")}
    env.update({"HRLR_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT),
                **extra})
    return env


@pytest.mark.parametrize("extra", [{}, {"HF_HUB_OFFLINE": "1"}, {"HTTPS_PROXY": "http://127.0.0.1:9",
                                                                 "HF_ENDPOINT": "https://huggingface.co"}],
                         ids=["unreachable-endpoint", "hf-hub-offline", "unreachable-proxy"])
def test_offline_taesd_resolution_fails_within_two_seconds_naming_folder_and_files(tmp_path, extra):
    p = subprocess.run([sys.executable, "-c", _CHILD], env=_offline_env(tmp_path, **extra), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"\noffline TAESD resolution ({extra or 'unreachable endpoint'}): {got['seconds']:.3f} s")
    assert got["seconds"] < 2.0, got
    msg = got["message"]
    folder = str(tmp_path / "cache" / "taesd")
    assert msg.startswith("InvalidInput: taesd_dir:") and folder in msg, msg
    assert "taesd_encoder.safetensors" in msg and "taesd_decoder.safetensors" in msg, msg
    assert "HF_HUB_OFFLINE" in msg if extra.get("HF_HUB_OFFLINE") else "cannot be reached (127.0.0.1:9" in msg, msg
    assert "Retry" not in p.stderr  # huggingface_hub's retry loop never started
    assert not (tmp_path / "cache").exists()  # nothing created offline


def test_probe_answers_none_for_a_listening_port():
    import socket

    from lib_hrlr.weights.taesd_files import hub_unreachable

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert hub_unreachable(f"http://127.0.0.1:{port}", timeout=1.0) is None
    assert "127.0.0.1:9" in hub_unreachable("http://127.0.0.1:9", timeout=1.0)


# ------------------------------------------------------------------ the webui's .pth downloads
def _write_pth(shared_weights, folder, kind: str, part: str):
    """The real weights as the webui's download is: a plain state dict saved by torch.save."""
    from safetensors.torch import load_file

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{kind}_{part}.pth"
    torch.save(load_file(str(shared_weights / "taesd" / f"{kind}_{part}.safetensors")), out)
    return out


@pytest.mark.parametrize("kind", ["taesd", "taesdxl"])
def test_pth_state_dict_decodes_and_encodes_bit_for_bit_as_the_safetensors(shared_weights, tmp_path, kind):
    import torch

    from lib_hrlr.models.taesd import load_taesd_decoder, load_taesd_encoder

    dec_pth = _write_pth(shared_weights, tmp_path, kind, "decoder")
    enc_pth = _write_pth(shared_weights, tmp_path, kind, "encoder")
    assert dec_pth.read_bytes()[:4] == b"PK\x03\x04"  # torch.save's zip format, as downloaded
    ref = shared_weights / "taesd"
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 24, 32, generator=g)
    x = torch.rand(1, 3, 96, 128, generator=g)
    with torch.inference_mode():
        a = load_taesd_decoder(dec_pth)(z)
        b = load_taesd_decoder(ref / f"{kind}_decoder.safetensors")(z)
        c = load_taesd_encoder(enc_pth)(x)
        d = load_taesd_encoder(ref / f"{kind}_encoder.safetensors")(x)
    assert a.shape == (1, 3, 192, 256) and torch.equal(a, b)
    assert c.shape == (1, 4, 12, 16) and torch.equal(c, d)
    assert a.std() > 0.05  # real weights, not an all-zero model


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_with_a_malicious_reduce_is_refused_without_running_it(shared_weights, tmp_path):
    import torch
    from safetensors.torch import load_file

    from lib_hrlr.errors import CheckpointError
    from lib_hrlr.models.taesd import load_taesd_decoder

    marker = tmp_path / "ran"
    state = dict(load_file(str(shared_weights / "taesd" / "taesd_decoder.safetensors")))
    state["1.weight"] = _RunsCode(marker)  # looks like a state dict, runs a command when torch.load reads it
    bad = tmp_path / "taesd_decoder.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as e:
        load_taesd_decoder(bad)
    assert not marker.exists()
    assert e.value.field == "taesd" and "refusing to load" in str(e.value) and "system" in str(e.value), str(e.value)
    # in the webui the same error names the request's field, with no CLI flag
    sys.path.insert(0, str(ROOT / "scripts"))
    from hrlr_glue import names

    mapped = names.api_error(e.value)
    assert mapped.field == "vae" and "--" not in str(mapped)


def test_folders_of_pth_files_are_found_and_safetensors_preferred(shared_weights, tmp_path, monkeypatch):
    from lib_hrlr.pipeline import components, sdxl
    from lib_hrlr.weights.taesd_files import find_taesd, folder_with_taesd, weight_file

    monkeypatch.delenv("HRLR_TAESD_DIR", raising=False)
    approx = tmp_path / "models" / "VAE-approx"  # the webui's folder, with its downloads
    for kind in ("taesd", "taesdxl"):
        for part in ("encoder", "decoder"):
            _write_pth(shared_weights, approx, kind, part)
    assert folder_with_taesd(approx) == approx and find_taesd(str(approx)) == approx
    assert components._taesd_file(str(approx), "taesd", 1) == approx / "taesd_decoder.pth"
    assert sdxl.taesdxl_files(str(approx)) == (approx / "taesdxl_encoder.pth", approx / "taesdxl_decoder.pth")
    os.symlink(shared_weights / "taesd" / "taesd_decoder.safetensors", approx / "taesd_decoder.safetensors")
    assert weight_file(approx, "taesd", "decoder") == approx / "taesd_decoder.safetensors"
    # a decoder alone (what the webui fetches for live previews) is not a usable folder
    lone = tmp_path / "lone"
    _write_pth(shared_weights, lone, "taesd", "decoder")
    assert folder_with_taesd(lone) is None and folder_with_taesd(tmp_path / "absent") is None


def test_a_folder_lacking_a_part_is_refused_in_the_requests_words(shared_weights, tmp_path, monkeypatch):
    from lib_hrlr.errors import InvalidInput
    from lib_hrlr.pipeline import components, sdxl

    monkeypatch.delenv("HRLR_TAESD_DIR", raising=False)
    _write_pth(shared_weights, tmp_path, "taesd", "decoder")
    sys.path.insert(0, str(ROOT / "scripts"))
    from hrlr_glue import names

    messages = []
    for call in (lambda: components.taesd_dir(str(tmp_path)), lambda: sdxl.taesdxl_files(None)):
        with pytest.raises(InvalidInput) as e:
            call()
        mapped = names.api_error(e.value)
        assert mapped.field == "vae" and "--" not in str(mapped), str(mapped)
        messages.append(str(mapped))
    assert "lacks taesd_encoder.safetensors (a .pth of the same name works too)" in messages[0], messages[0]
    assert "models/VAE-approx" in messages[1] and "taesdxl_decoder.safetensors" in messages[1], messages[1]
