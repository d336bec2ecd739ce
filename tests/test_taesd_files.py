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
