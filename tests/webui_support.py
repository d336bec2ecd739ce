"""Run a real AUTOMATIC1111 webui with this extension, for the integration tests and benchmark.

Nothing of the webui is in this repository: a prepared install is found at ``$HRLR_WEBUI_DIR``
(default ``/opt/sd-webui``) with its interpreter at ``$HRLR_WEBUI_PYTHON`` (default
``<dir>/venv/bin/python``).  Each run gets its own ``--data-dir`` (config, models, outputs,
extensions) under a temporary folder, so the install itself is not modified: the extension is
copied into it and a test checkpoint is generated there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
WEBUI_DIR = Path(os.environ.get("HRLR_WEBUI_DIR", "/opt/sd-webui"))
WEBUI_PYTHON = Path(os.environ.get("HRLR_WEBUI_PYTHON", str(WEBUI_DIR / "venv" / "bin" / "python")))
EXTENSION_FILES = ("install.py", "metadata.ini", "style.css", "scripts", "lib_hrlr", "javascript")
SHARED_WEIGHTS = Path(os.environ.get("HRLR_SHARED_WEIGHTS", ROOT.parent / "shared" / "weights"))
TOKENIZER = SHARED_WEIGHTS / "clip-vit-large-patch14-tokenizer"
TAESD = SHARED_WEIGHTS / "taesd"


def missing_reason() -> str | None:
    if "HRLR_SHARED_WEIGHTS" not in os.environ and not (ROOT.parent / "shared").is_dir():
        return (f"the checkout at {ROOT} does not sit beside shared/ and HRLR_SHARED_WEIGHTS is not set "
                "(the webui tests need the CLIP tokenizer and TAESD files from it)")
    if not (WEBUI_DIR / "launch.py").is_file():
        return f"no AUTOMATIC1111 webui at {WEBUI_DIR} (set HRLR_WEBUI_DIR to a prepared install)"
    if not WEBUI_PYTHON.is_file():
        return f"no webui interpreter at {WEBUI_PYTHON} (set HRLR_WEBUI_PYTHON)"
    if not TOKENIZER.is_dir():
        return f"no CLIP tokenizer files at {TOKENIZER} (set HRLR_SHARED_WEIGHTS)"
    if not TAESD.is_dir():
        return f"no TAESD files at {TAESD} (set HRLR_SHARED_WEIGHTS)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- test model
def _yaml(cfg, clip_dir: Path) -> str:
    u, v = cfg.unet, cfg.vae
    attn = [2**i for i, a in enumerate(u.attention_levels) if a]
    return f"""model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {v.scaling_factor}
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: {u.in_channels}
        out_channels: {u.out_channels}
        model_channels: {u.model_channels}
        attention_resolutions: {attn}
        num_res_blocks: {u.num_res_blocks}
        channel_mult: {list(u.channel_mult)}
        num_heads: {u.num_heads}
        use_spatial_transformer: True
        transformer_depth: {u.transformer_depth}
        context_dim: {u.context_dim}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {v.embed_dim}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {v.z_channels}
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: {v.ch}
          ch_mult: {list(v.ch_mult)}
          num_res_blocks: {v.num_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {clip_dir}
"""


def write_test_model(models_dir: Path, arch: str = "tiny") -> Path:
    """A webui-loadable checkpoint (+ .yaml + local CLIP folder) from our seeded random weights.

    The CLIP output's mean is moved away from 0 (final LayerNorm bias + 0.5): the webui's
    emphasis renormalisation divides by it, and a real CLIP's is far from 0 as well.
    """
    from safetensors.torch import load_file, save_file

    from lib_hrlr.config.architectures import ARCHITECTURES
    from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

    cfg = ARCHITECTURES[arch]
    sd_dir = models_dir / "Stable-diffusion"
    sd_dir.mkdir(parents=True, exist_ok=True)
    clip_dir = models_dir.parent / f"clip-{arch}"
    clip_dir.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, clip_dir / f.name)
    t = cfg.text
    (clip_dir / "config.json").write_text(json.dumps({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": t.hidden_act,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_heads, "num_hidden_layers": t.num_layers,
        "max_position_embeddings": t.max_positions, "vocab_size": t.vocab_size,
        "layer_norm_eps": t.layer_norm_eps, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
        "projection_dim": t.hidden_size, "torch_dtype": "float32"}))
    src = cached_random_checkpoint(arch)
    ckpt = sd_dir / f"hrlr-test-{arch}.safetensors"
    if arch == "tiny":
        sd = load_file(str(src))
        key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
        sd[key] = sd[key].float() + 0.5
        save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    else:  # big: link the cached file (the final LN offset does not matter for memory figures)
        if not ckpt.exists():
            os.symlink(src, ckpt)
    (sd_dir / f"hrlr-test-{arch}.yaml").write_text(_yaml(cfg, clip_dir))
    return ckpt


# ----------------------------------------------------------------------------- the server
class Webui:
    """A webui process on loopback with this extension, in its own data dir."""

    def __init__(self, data_dir: Path, *, api_only: bool = True, arch: str = "tiny", extra_args=(),
                 auth: tuple[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_only = api_only
        self.arch = arch
        self.extra_args = list(extra_args)
        self.auth = auth  # (user, password) for the readiness calls when started with --api-auth
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "webui.log"

    def prepare(self) -> None:
        ext = self.data_dir / "extensions" / "sd-webui-highres-lowram"
        if ext.exists():
            shutil.rmtree(ext)
        ext.mkdir(parents=True)
        for name in EXTENSION_FILES:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, ext / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, ext / name)
        self.ckpt = write_test_model(self.data_dir / "models", self.arch)
        (self.data_dir / "config.json").write_text(json.dumps({
            "sd_model_checkpoint": self.ckpt.name, "live_previews_enable": self.api_only is False,
            "show_progress_type": "Approx cheap", "show_progress_every_n_steps": 1,
            "samples_save": True, "grid_save": False, "save_images_before_face_restoration": False,
            "auto_launch_browser": "Disable", "outdir_samples": "", "enable_quantization": False}))

    # the webui adds a middleware after uvicorn starts serving; under load the app has sometimes
    # started first and the webui exits with this (an upstream race, A1111 issues #7759, #11635)
    STARTUP_RACE = "Cannot add middleware after an application has started"

    def start(self, timeout: float = 300) -> "Webui":
        try:
            return self._start(timeout)
        except RuntimeError as e:
            if self.STARTUP_RACE not in str(e):
                raise
            self.stop()
            return self._start(timeout)  # once more: the race is the webui's, not the extension's

    def _start(self, timeout: float) -> "Webui":
        self.prepare()
        args = [str(WEBUI_PYTHON), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
                "--use-cpu", "all", "--no-half", "--precision", "full", "--no-download-sd-model",
                "--skip-version-check", "--api", "--server-name", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--ckpt", str(self.ckpt)] + self.extra_args
        if self.api_only:
            args.append("--nowebui")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HRLR_TAESD_DIR=str(TAESD),
                   PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=WEBUI_DIR, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"webui exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if self.get("/sdapi/v1/options", timeout=5, _ready=True)[0] == 200:
                    # readiness = a real generation (the model loads in the background)
                    self.post("/sdapi/v1/txt2img", {"prompt": "ready", "steps": 1, "width": 64, "height": 64},
                              timeout=timeout, _ready=True)
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1)
        raise RuntimeError(f"webui not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    # -- HTTP ------------------------------------------------------------------------------------
    def _call(self, req, timeout):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def _headers(self, ready: bool) -> dict:
        if ready and self.auth:
            import base64

            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            return {"Authorization": "Basic " + token}
        return {}

    def get(self, path: str, timeout: float = 60, _ready: bool = False):
        return self._call(urllib.request.Request(self.url + path, headers=self._headers(_ready)), timeout)

    def post(self, path: str, body: dict, timeout: float = 1200, _ready: bool = False):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **self._headers(_ready)})
        return self._call(req, timeout)


@contextlib.contextmanager
def running_webui(data_dir: Path, **kw):
    """A started :class:`Webui`, stopped (by its process group) on exit."""
    w = Webui(data_dir, **kw)
    try:
        yield w.start()
    finally:
        w.stop()


def decode_png(b64: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))

