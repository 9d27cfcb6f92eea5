"""Hugging Face hub probes: is the hub reachable (bounded, no import of datasets), is a name in the
local HF cache, a context that forces offline mode, and the one-line offline message."""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from typing import Dict, List, Optional
from urllib.parse import urlparse

_TRUE = ("1", "ON", "YES", "TRUE")
_probe_cache: Dict[str, Optional[str]] = {}


def hub_offline_reason(timeout: float = 1.5) -> Optional[str]:
    """None if the hub looks reachable, else why not. Bounded by `timeout` (DNS included)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in _TRUE:
            return f"{var}=1 is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _probe_cache:
        result: List[Optional[str]] = ["no answer within %.1fs" % timeout]

        def probe():  # in a thread: getaddrinfo ignores socket timeouts and can hang for long
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                result[0] = None
            except OSError as e:
                result[0] = f"{type(e).__name__}: {e}"
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout)
        _probe_cache[key] = None if (not t.is_alive() and result[0] is None) else result[0]
    return _probe_cache[key]


def in_local_hf_cache(name: str, repo_type: str = "datasets") -> bool:
    """Does the HF cache hold anything for `name`? (filesystem check, no import)"""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    ds_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")
    hub_cache = (os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                 or os.path.join(home, "hub"))
    in_hub = os.path.isdir(os.path.join(hub_cache, f"{repo_type}--" + name.replace("/", "--")))
    in_ds = repo_type == "datasets" and os.path.isdir(os.path.join(ds_cache, name.replace("/", "___")))
    return in_hub or in_ds


@contextmanager
def hf_offline():
    """Force datasets / huggingface_hub into offline mode for one call (no 20 s of retries)."""
    import datasets.config
    import huggingface_hub.constants as hc
    old = datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = old


def offline_message(name: str, reason: str) -> str:
    return (f"data.hf_name: cannot reach the Hugging Face hub for dataset '{name}' ({reason}) and it "
            f"is not in the local HF cache; download it elsewhere and use data=text_files "
            f"data.train=... data.valid=... data.test=..., or point data.hf_name at a local "
            f"save_to_disk directory, or set HF_DATASETS_OFFLINE=1 with a populated HF cache")


