"""Helpers for tests that need rows shaped like the pipeline's, with real
JPEG bytes, without running a download."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from PIL import Image

from stages.base import object_array


def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rows(n: int, shard_id: int = 0, rejected: dict[int, str] | None = None, emb_dim: int = 0) -> dict:
    rejected = rejected or {}
    imgs = [jpeg(shard_id * 1000 + i) for i in range(n)]
    out = {
        "key": object_array([f"{shard_id:05d}{i:04d}" for i in range(n)]),
        "shard_id": np.full(n, shard_id, dtype=np.int64),
        "status": object_array(["dropped" if i in rejected else "ok" for i in range(n)]),
        "stage": object_array(["filter" if i in rejected else "" for i in range(n)]),
        "reason": object_array([rejected.get(i, "") for i in range(n)]),
        "detail": object_array([json.dumps({"i": i}) if i in rejected else "" for i in range(n)]),
        "url": object_array([f"http://h/{shard_id}/{i}.jpg" for i in range(n)]),
        "caption": object_array([f"caption number {i}" for i in range(n)]),
        "image": object_array(imgs),
        "image_ext": object_array(["jpg"] * n),
        "width": np.full(n, 32, dtype=np.int64),
        "height": np.full(n, 32, dtype=np.int64),
        "sha256": object_array([hashlib.sha256(b).hexdigest() for b in imgs]),
        "__t_download": np.full(n, 0.01),
    }
    if emb_dim:
        out["img_emb"] = np.random.default_rng(shard_id).standard_normal((n, emb_dim)).astype(np.float32)
    return out
