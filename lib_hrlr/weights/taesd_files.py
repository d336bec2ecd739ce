"""Where TAESD's two weight files come from when ``--taesd-dir`` is not given.

Order: ``--taesd-dir``, ``$HRLR_TAESD_DIR``, then the user cache
(``$HRLR_CACHE/taesd``, else ``$XDG_CACHE_HOME/hrlr/taesd``, else ``~/.cache/hrlr/taesd``).
When the files are not there, they are fetched from the Hugging Face hub
(``madebyollin/taesd``, MIT licence) into the cache, with huggingface_hub's progress bar,
but only when online: without huggingface_hub, with ``HF_HUB_OFFLINE`` set, or when the
hub cannot be reached, it fails at once and says where to put which files.  "Cannot be
reached" is decided by one TCP connection to the hub's host (or to the proxy the environment
names) that must answer within :data:`HUB_PROBE_TIMEOUT_S`, name lookup included, before
huggingface_hub is asked (it retries a dead network for half a minute).

Each file may be a ``.safetensors`` or a ``.pth`` of the same name (the state dicts the
AUTOMATIC1111 webui downloads into ``models/VAE-approx``, read without running code by
:func:`lib_hrlr.models.taesd.load_taesd_decoder`); ``.safetensors`` is preferred where both are.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidInput

REPOS = {"taesd": "madebyollin/taesd", "taesdxl": "madebyollin/taesdxl"}
FIELD = "taesd_dir"
HUB_PROBE_TIMEOUT_S = 3.0  # one connection attempt, no retries
SUFFIXES = (".safetensors", ".pth")  # in order of preference
PARTS = ("encoder", "decoder")


def files_of(kind: str = "taesd") -> tuple[str, str]:
    return (f"{kind}_encoder.safetensors", f"{kind}_decoder.safetensors")


def weight_file(folder: str | os.PathLike, kind: str, part: str) -> Path | None:
    """``{kind}_{part}.safetensors`` in ``folder``, else ``{kind}_{part}.pth``, else None."""
    for suffix in SUFFIXES:
        p = Path(folder) / f"{kind}_{part}{suffix}"
        if p.is_file():
            return p
    return None


def folder_with_taesd(folder: str | os.PathLike) -> Path | None:
    """``folder`` when it holds a complete encoder + decoder pair of some TAESD family (either
    suffix), else None: how the webui glue decides whether to use ``models/VAE-approx``."""
    p = Path(folder)
    return p if any(not _missing(p, kind) for kind in REPOS) else None


def user_cache_dir() -> Path:
    """``$HRLR_CACHE``, else ``$XDG_CACHE_HOME/hrlr``, else ``~/.cache/hrlr``."""
    if os.environ.get("HRLR_CACHE"):
        return Path(os.environ["HRLR_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hrlr"


def cache_folder(kind: str = "taesd") -> Path:
    return user_cache_dir() / kind


def _missing(folder: Path, kind: str) -> list[str]:
    """The ``.safetensors`` names of the parts found under neither suffix."""
    return [f for part, f in zip(PARTS, files_of(kind)) if weight_file(folder, kind, part) is None]


def _offline_reason() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return "HF_HUB_OFFLINE is set"
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return "huggingface_hub is not installed (pip install 'hrlr[hub]')"
    return None


def _probe_target(endpoint: str) -> tuple[str, int]:
    """(host, port) a download from ``endpoint`` connects to first: the proxy if one is set."""
    from urllib.parse import urlsplit

    scheme = urlsplit(endpoint).scheme or "https"
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[n] for n in names + ("ALL_PROXY", "all_proxy") if os.environ.get(n)), None)
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    url = urlsplit(proxy or endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.hostname or "", port


def hub_unreachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (one TCP connection within ``timeout`` s, name lookup
    included, no retries), or None when it answered."""
    import socket
    import threading

    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    host, port = _probe_target(endpoint)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or e}")

    t = threading.Thread(target=probe, daemon=True)  # name lookup has no timeout of its own
    t.start()
    t.join(timeout)
    return result[0] if result else f"{host}:{port}: no answer within {timeout:g} s"


def _where_to_put(kind: str, folder: Path) -> str:
    a, b = files_of(kind)
    return (f"download {a} and {b} from https://huggingface.co/{REPOS[kind]} into {folder} "
            f"(or pass --taesd-dir DIR / set HRLR_TAESD_DIR to a folder holding them; the .pth files of the "
            f"same names work too)")


def fetch(kind: str, folder: Path) -> Path:
    """Download the two files into ``folder`` (online only); raise InvalidInput otherwise."""
    reason = _offline_reason()
    if reason is not None:
        raise InvalidInput(FIELD, f"the TAESD weights are not in {folder} and {reason}: {_where_to_put(kind, folder)}")
    unreachable = hub_unreachable()
    if unreachable is not None:
        raise InvalidInput(FIELD, f"the TAESD weights are not in {folder} and the Hugging Face hub cannot be reached "
                                  f"({unreachable}): {_where_to_put(kind, folder)}")
    from huggingface_hub import hf_hub_download

    folder.mkdir(parents=True, exist_ok=True)
    for name in _missing(folder, kind):
        try:
            hf_hub_download(REPOS[kind], name, local_dir=str(folder), etag_timeout=5)
        except Exception as e:  # any network/hub failure: say so at once, with the way out
            raise InvalidInput(FIELD, f"the TAESD weights are not in {folder} and fetching {name} from "
                                      f"{REPOS[kind]} failed ({type(e).__name__}): {_where_to_put(kind, folder)}") from None
    return folder


def find_taesd(explicit: str | None = None, kind: str = "taesd", *, allow_fetch: bool = True) -> Path:
    """The folder holding ``{kind}_encoder`` and ``{kind}_decoder`` (``.safetensors`` or ``.pth``);
    :func:`weight_file` picks the file of each part in it."""
    if kind not in REPOS:
        raise InvalidInput("taesd", f"'{kind}' is not one of: {', '.join(REPOS)}")
    given = explicit or os.environ.get("HRLR_TAESD_DIR")
    if given:
        p = Path(given).expanduser()
        missing = _missing(p, kind)
        if missing:
            raise InvalidInput(FIELD, f"'{p}' lacks {', '.join(missing)} (a .pth of the same name works too)")
        return p
    folder = cache_folder(kind)
    if not _missing(folder, kind):
        return folder
    if not allow_fetch:
        raise InvalidInput(FIELD, f"the TAESD weights are not in {folder}: {_where_to_put(kind, folder)}")
    return fetch(kind, folder)
