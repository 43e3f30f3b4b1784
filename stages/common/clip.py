"""CLIP scoring machinery for :mod:`stages.clip_score` that every device
needs: model loading and identity, the tokenizer, image decoding and
preprocessing (PIL, libjpeg or nvJPEG, then tensor resizing; nvImageCodec's
hardware decoding is :mod:`stages.common.gpudecode`), and the two
towers run eagerly in fixed-size chunks. The GPU-only path (CUDA graphs,
streams, pinned buffers, chunked decoding) is :mod:`stages.common.cuda_towers`.

Why fixed-size chunks: a matrix multiply may pick a different kernel (and so
a different summation order) for a different number of rows, which would
make a row's score depend on which rows shared its batch, and the Ray runner
and the in-process runner cut batches differently. Every forward pass here
sees exactly ``micro_batch`` rows (the last chunk is padded with copies of
its last row), so a row's embedding depends only on the row.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pairforge.stages.common.assets import resolve as resolve_asset

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
#: ``pretrained`` value for random weights (benchmarks and smoke tests only)
RANDOM_WEIGHTS = "random"
DECODERS = ("auto", "pil", "nvjpeg", "nvimgcodec", "libjpeg")

_registered = False
_lock = threading.Lock()
_sha_cache: dict[tuple, str] = {}
_pools: dict[int, ThreadPoolExecutor] = {}


def thread_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` threads (made once, reused by every batch)."""
    with _lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix=f"clip{threads}")
        return _pools[threads]


def in_slices(fn, items: list, threads: int) -> list:
    """``[fn(x) for x in items]`` on ``threads`` threads of :func:`thread_pool`,
    one contiguous slice of ``items`` a thread, in order. A slice, not a task
    an item: a task an item adds its queueing to every decode, under the GIL
    (libjpeg decoding ran 1.15-1.24x faster in slices, docs/gpu.md)."""
    n = len(items)
    k = min(threads, n)
    if k <= 1:
        return [fn(x) for x in items]
    cut = [n * j // k for j in range(k + 1)]
    parts = thread_pool(threads).map(lambda j: [fn(x) for x in items[cut[j] : cut[j + 1]]], range(k))
    return [r for part in parts for r in part]


@functools.lru_cache(maxsize=8)
def tokenizer(model: str):
    """open_clip's tokenizer for ``model``, made once per process."""
    import open_clip

    register_model_configs()
    return open_clip.get_tokenizer(model)


def size_hw(size) -> tuple[int, int]:
    """open_clip's ``size`` (an int or a pair) as (height, width)."""
    return (size, size) if isinstance(size, int) else tuple(size)


@functools.lru_cache(maxsize=8)
def pixel_cfg(model: str) -> dict:
    """What :func:`resize_crop` needs of ``model``'s preprocessing, from its
    open_clip config alone (no weights): ``size``, ``interpolation``,
    ``resize_mode``, with open_clip's defaults where the config is silent."""
    import open_clip

    register_model_configs()
    model_cfg = open_clip.get_model_config(model) or {}
    cfg = {"size": model_cfg.get("vision_cfg", {}).get("image_size", 224), "interpolation": "bicubic",
           "resize_mode": "shortest"}  # fmt: skip
    cfg.update({k: v for k, v in (model_cfg.get("preprocess_cfg") or {}).items() if k in cfg})
    return cfg


def register_model_configs() -> None:
    """Make the project's model configs (``pf-tiny``) known to open_clip."""
    global _registered
    with _lock:
        if not _registered:
            import open_clip

            open_clip.add_model_config(MODEL_CONFIG_DIR)
            _registered = True


def embed_dim(model: str) -> int | None:
    """The embedding width of a named open_clip architecture, from its config
    (no weights are loaded); ``None`` for names without a local config.
    Reads the config file itself (the project's ``model_configs`` first, as
    :func:`register_model_configs` makes them win, then open_clip's), so it
    needs no ``import open_clip`` (seconds: torch, timm); open_clip's own
    lookup where no file is found."""
    if model.startswith(("hf-hub:", "local-dir:")):
        return None
    cfg = _config_file(model)
    if cfg is None:
        register_model_configs()
        import open_clip

        cfg = open_clip.get_model_config(model)
    return int(cfg["embed_dim"]) if cfg else None


def _config_file(model: str) -> dict | None:
    """``model``'s JSON config as open_clip would register it, read from the
    project's folder or open_clip's package folder; ``None`` if not found."""
    if not model or os.sep in model or "/" in model:
        return None
    spec = importlib.util.find_spec("open_clip")
    package = (spec.submodule_search_locations or []) if spec else []
    for folder in [MODEL_CONFIG_DIR] + [Path(p) / "model_configs" for p in package]:
        try:
            cfg = json.loads((folder / f"{model}.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            return cfg
    return None


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def model_identity(model: str, pretrained: str, weights_file: str | None = None) -> dict:
    """What a reject records about the scorer: architecture, weights source
    and the sha256 of the checkpoint file (``None`` for random weights, or
    for an open_clip tag whose file is not on this machine)."""
    path = weights_file
    if path is None and pretrained != RANDOM_WEIGHTS and os.path.isfile(resolve_asset(pretrained)):
        path = resolve_asset(pretrained)
    return {"name": model, "pretrained": pretrained, "sha256": file_sha256(path) if path else None}


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU. Called on the
    worker (in ``setup``), never on the driver."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    #: open_clip's own eval transform (PIL image -> normalised tensor)
    preprocess: Any
    #: open_clip's preprocess config: size, mean, std, interpolation, resize_mode
    cfg: dict
    device: str
    identity: dict


def load(model: str, pretrained: str, device: str) -> Loaded:
    """Build the open_clip model with weights from a local checkpoint file, an
    open_clip tag (downloaded by open_clip when a network exists) or
    :data:`RANDOM_WEIGHTS`, in eval mode on ``device`` (fp32 weights;
    reduced precision comes from autocast)."""
    import open_clip

    register_model_configs()
    weights_file = None
    pretrained = resolve_asset(pretrained)  # a shipped asset's short name (pf-tiny-scorer)
    if pretrained == RANDOM_WEIGHTS:
        log.warning("clip_score: %s with random weights; its scores mean nothing", model)
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None, device=device)
    elif os.path.isfile(pretrained):
        weights_file = pretrained
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    else:  # an open_clip tag: resolve (and download) the file so its sha256 can be recorded
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        tag_cfg = get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            raise ValueError(f"pretrained: {pretrained!r} is neither a file nor an open_clip tag of {model!r}")
        weights_file = download_pretrained(tag_cfg)
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    net.eval()
    cfg = dict(open_clip.get_model_preprocess_cfg(net))
    return Loaded(
        model=net,
        tokenizer=open_clip.get_tokenizer(model),
        preprocess=preprocess,
        cfg=cfg,
        device=device,
        identity=model_identity(model, pretrained, weights_file),
    )


# ------------------------------------------------------------------ images


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_pil(images: list, preprocess, threads: int) -> tuple[list, list[str | None]]:
    """PIL decode + open_clip's own transform, on ``threads`` threads (PIL
    releases the GIL while it decodes and resizes). Returns per image a
    ``[3, S, S]`` float tensor or ``None``, and an error message or ``None``."""
    from PIL import Image

    def one(data):
        try:
            with Image.open(io.BytesIO(data)) as im:
                return preprocess(im), None
        except Exception as e:  # any undecodable input is a per-row failure
            return None, f"{type(e).__name__}: {e}"

    res = in_slices(one, images, threads)
    return [r[0] for r in res], [r[1] for r in res]


def decode_tensors(images: list, device: str) -> tuple[list, list[str | None]]:
    """Decode to ``[3, H, W]`` uint8 tensors on ``device``: JPEGs in one
    batched ``torchvision.io.decode_jpeg`` call (nvJPEG when ``device`` is a
    GPU), anything else (PNG, WebP, a JPEG nvJPEG refuses) with PIL."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list = [None] * len(images)
    errors: list[str | None] = [None] * len(images)
    jpeg = [i for i, b in enumerate(images) if isinstance(b, (bytes, bytearray)) and is_jpeg(b)]
    if jpeg:
        data = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: retry one by one
            decoded = []
            for d in data:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, t in zip(jpeg, decoded):
            out[i] = t
    for i, b in enumerate(images):
        if out[i] is None:
            t, errors[i] = pil_tensor(b)
            out[i] = t.to(device) if t is not None else None
    return out, errors


def pil_tensor(data) -> tuple[Any, str | None]:
    """One image decoded by PIL to a ``[3, H, W]`` uint8 CPU tensor (RGB), or
    ``None`` and what was wrong with it: the fallback of the tensor decoders."""
    import torch
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), None
    except Exception as e:  # undecodable: a per-row failure
        return None, f"{type(e).__name__}: {e}"


def decode_cpu(images: list, device: str, threads: int) -> tuple[list, list[str | None]]:
    """:func:`decode_tensors` on the CPU (libjpeg-turbo for JPEGs, PIL for the
    rest) on ``threads`` threads (:func:`in_slices`; both decoders release the
    GIL), then one pinned host-to-device copy per image shape. Returns what
    :func:`decode_tensors` returns, the tensors on ``device``: the pixels are
    exactly those of ``decode_tensors(images, "cpu")``."""
    import torch

    def one(data):
        t, e = decode_tensors([data], "cpu")
        return t[0], e[0]

    res = in_slices(one, images, threads)
    out: list = [r[0] for r in res]
    errors = [r[1] for r in res]
    if device != "cpu":
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(out):
            if t is not None:
                by_shape.setdefault(tuple(t.shape), []).append(i)
        for shape, idx in by_shape.items():
            host = torch.empty((len(idx), *shape), dtype=torch.uint8, pin_memory=True)
            torch.stack([out[i] for i in idx], out=host)
            stacked = host.to(device, non_blocking=True)
            for i, t in zip(idx, stacked.unbind(0)):
                out[i] = t
    return out, errors


def resize_crop(images: list, cfg: dict) -> "Any":
    """open_clip's eval transform on uint8 ``[3, H, W]`` tensors: resize the
    shortest side to the model's size (antialiased bicubic, like PIL),
    round to uint8, centre crop. Images of one shape are resized together.
    Returns a uint8 ``[n, 3, S, S]`` tensor on the images' device."""
    import torch
    import torch.nn.functional as F

    size = cfg.get("size", 224)
    th, tw = size_hw(size)
    mode = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    squash = cfg.get("resize_mode", "shortest") == "squash"
    out = torch.empty((len(images), 3, th, tw), dtype=torch.uint8, device=images[0].device)
    by_shape: dict[tuple, list[int]] = {}
    for i, t in enumerate(images):
        by_shape.setdefault(tuple(t.shape[1:]), []).append(i)
    for (h, w), idx in by_shape.items():
        if squash:
            nh, nw = th, tw
        else:  # torchvision's Resize(int): shortest side to size, the other scaled and truncated
            short, long = (h, w) if h <= w else (w, h)
            s = min(th, tw) if th == tw else th
            ns, nl = s, int(s * long / short)
            nh, nw = (ns, nl) if h <= w else (nl, ns)
        x = torch.stack([images[i] for i in idx]).float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False)
        x = x.clamp_(0, 255).round_().to(torch.uint8)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: pad like CenterCrop does
            x = F.pad(x, (max(-left, 0), max(-left, 0) + 1, max(-top, 0), max(-top, 0) + 1))
            top, left = max(top, 0), max(left, 0)
        out[torch.as_tensor(idx, device=out.device)] = x[:, :, top : top + th, left : left + tw]
    return out


def normalize(x, cfg: dict):
    """uint8 ``[n, 3, S, S]`` -> float, scaled and normalised as ToTensor +
    Normalize would."""
    import torch

    mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


# ------------------------------------------------------------------ towers


def chunks(n: int, size: int):
    for i in range(0, n, size):
        yield i, min(i + size, n)


def padded(x, size: int):
    """``x`` with its first dimension padded to ``size`` by repeating its last row."""
    import torch

    if len(x) == size:
        return x
    return torch.cat([x, x[-1:].expand(size - len(x), *x.shape[1:])])


def encode(encode_fn, inputs, device: str, micro_batch: int, bf16: bool, transform=None):
    """Run ``encode_fn`` over ``inputs`` in fixed ``micro_batch`` chunks
    (``transform`` maps a chunk once it is on the device). Returns
    L2-normalised float32 features on the device; on a GPU nothing waits
    for the result, so the caller's CPU work overlaps the forward pass."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    parts = []
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        for a, b in chunks(len(inputs), micro_batch):
            x = padded(inputs[a:b].to(dev, non_blocking=True), micro_batch)
            if transform is not None:
                x = transform(x)
            parts.append(F.normalize(encode_fn(x)[: b - a].float(), dim=-1))
    return torch.cat(parts)
