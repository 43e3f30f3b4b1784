"""What open_clip has on this machine, for the whole-job check
(:mod:`pipeline.checks`): its model names and pretrained tags, whether a
tag's weights are in the local caches and where they would come from, and
whether there is a network to fetch them.

Why on its own: importing open_clip imports torch and timm (seconds), and
the check must stay quick and load no weights. So open_clip's registries
are read from its own files (its model configs, and its ``pretrained.py``
loaded without the package, which would import torch), the weights are
looked up in the Hugging Face and open_clip caches, and "no network" is
``HF_HUB_OFFLINE``, no route to a public address (a UDP ``connect`` asks
the kernel's routing table; it sends nothing), a hub whose name does not
resolve, or a hub that does not accept a TCP connection, each within a few
seconds (:data:`HUB_TIMEOUT`). The last two matter: on a machine whose DNS
fails, open_clip's download retried for a minute in every worker.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import types
from pathlib import Path
from urllib.parse import urlsplit

#: public addresses for the route check (Cloudflare's resolver; nothing is sent to it)
ROUTE_PROBES = ((socket.AF_INET, ("1.1.1.1", 53)), (socket.AF_INET6, ("2606:4700:4700::1111", 53)))
#: seconds the hub's DNS lookup, then its TCP connect, may take before it counts as unreachable
HUB_TIMEOUT = 3.0


def _weights_source(reg, tag_cfg: dict) -> str:
    """Where open_clip would download a tag's weights from (the file it prefers)."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return tag_cfg.get("url") or "its source"
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    alternatives = list(getattr(reg, "_get_safe_alternatives", lambda _: ())(filename))
    names = " or ".join([*alternatives, filename])
    return f"{names} from https://huggingface.co/{repo}"


def offline_reason(hub: str | None = None, timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the weights hub cannot be downloaded from, or ``None`` when it
    can be reached. ``HF_HUB_OFFLINE``; then whether the kernel has a route
    to a public address (``connect`` on a UDP socket only picks a route);
    then the hub (``hub``: a URL or host, default ``$HF_ENDPOINT``, else
    ``https://huggingface.co``): its name looked up, then a TCP connect,
    each given ``timeout`` seconds; nothing is sent over the connection."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    for family, addr in ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
            break
        except OSError:
            continue
    else:
        return "no route to the internet"
    return hub_unreachable(hub or constants.ENDPOINT, timeout)


def hub_unreachable(hub: str, timeout: float = HUB_TIMEOUT) -> str | None:
    """Why ``hub`` (``https://host[:port]`` or ``host``) cannot be reached:
    its name does not resolve, or no TCP connection opens, each within
    ``timeout`` seconds; ``None`` when a connection opened."""
    parsed = urlsplit(hub if "://" in hub else f"https://{hub}")
    host = parsed.hostname or hub
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    found = _within(timeout, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    if found is None or isinstance(found, BaseException):
        why = "no answer" if found is None else (getattr(found, "strerror", None) or str(found))
        return f"{host} cannot be resolved ({why}, within {timeout:g}s)"
    family, kind, proto, _, addr = found[0]

    def connect() -> bool:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            s.connect(addr)
        return True

    opened = _within(timeout + 1.0, connect)
    if opened is True:
        return None
    why = "no answer" if opened is None else (getattr(opened, "strerror", None) or type(opened).__name__)
    return f"{host} ({addr[0]}) cannot be reached on port {port} ({why}, within {timeout:g}s)"


def _within(seconds: float, fn):
    """``fn()``'s result (or the exception it raised) if it returns within
    ``seconds``, else ``None``; it runs on a daemon thread, so a lookup that
    hangs past that is left behind rather than waited for."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as e:  # noqa: BLE001 - returned, for the caller to word
            box.append(e)

    t = threading.Thread(target=run, daemon=True, name="pairforge-hub-probe")
    t.start()
    t.join(seconds)
    return box[0] if box else None


def cached_weights(reg, tag_cfg: dict) -> str | None:
    """The local file open_clip's ``download_pretrained`` would use for a tag,
    if it is already there (Hugging Face cache, or open_clip's ``~/.cache/clip``)."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        alternatives = getattr(reg, "_get_safe_alternatives", lambda _: ())
        for name in (*alternatives(filename), filename):
            hit = _hub_cached(repo, name)
            if hit:
                return hit
    url = tag_cfg.get("url", "")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _hub_cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, filename)
    except Exception:  # noqa: BLE001 - a malformed repo id is "not cached"; the name check reports it
        return None
    return hit if isinstance(hit, str) else None


# ------------------------------------------------------------------ open_clip's registries, without torch


def _open_clip_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    locations = spec.submodule_search_locations if spec else None
    return Path(next(iter(locations))) if locations else None


@functools.lru_cache(maxsize=1)
def open_clip_models() -> tuple[str, ...]:
    """``open_clip.list_models()`` plus the project's configs (``pf-tiny``):
    the model config files open_clip scans, read without importing it (its
    import costs seconds: torch, timm)."""
    from pairforge.stages.common.clip import MODEL_CONFIG_DIR

    if "open_clip" in sys.modules:
        import open_clip

        from pairforge.stages.common.clip import register_model_configs

        register_model_configs()
        return tuple(open_clip.list_models())
    names = []
    base = _open_clip_dir()
    for folder in (base / "model_configs" if base else None, MODEL_CONFIG_DIR):
        for f in sorted(folder.glob("*.json")) if folder else ():
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):  # what open_clip's scan keeps
                names.append(f.stem)
    # open_clip's own order (``factory._natural_key``): digits compare as numbers
    return tuple(
        sorted(
            dict.fromkeys(names), key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.lower())]
        )
    )


_REGISTRY_PACKAGE = "_pairforge_open_clip_registry"


@functools.lru_cache(maxsize=1)
def pretrained_registry() -> types.ModuleType:
    """open_clip's ``pretrained`` module (``get_pretrained_cfg``,
    ``list_pretrained_tags_by_model``). Importing it through ``open_clip``
    imports the whole package (torch, timm: seconds), so unless open_clip is
    loaded already, its file is loaded as a module of a private package
    over open_clip's folder (it needs only ``constants`` and ``version``
    there), with ``safetensors.torch`` (which imports torch; the registry
    does not use it) hidden while it loads."""
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.pretrained")
    base = _open_clip_dir()
    if base is None:
        return importlib.import_module("open_clip.pretrained")  # raises the ImportError a user should see
    pkg = types.ModuleType(_REGISTRY_PACKAGE)
    pkg.__path__ = [str(base)]
    sys.modules[_REGISTRY_PACKAGE] = pkg
    hide = "safetensors.torch" not in sys.modules
    if hide:
        sys.modules["safetensors.torch"] = None  # type: ignore[assignment]  # makes its import an ImportError
    try:
        return importlib.import_module(f"{_REGISTRY_PACKAGE}.pretrained")
    except Exception:  # noqa: BLE001 - open_clip changed: pay for the real import
        return importlib.import_module("open_clip.pretrained")
    finally:
        if hide:
            sys.modules.pop("safetensors.torch", None)
