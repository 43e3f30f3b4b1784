"""Helpers for tests that need rows shaped like the pipeline's, with real
JPEG bytes, without running a download."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from PIL import Image

from pairforge.stages.base import object_array


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


def lay_out(rows: dict, out, stage, width: int):
    """Fit files as a run leaves them, rows going to shard
    ``int(key[:-width])``: returns the run's ``RunSpec`` and the shard ids."""
    import json

    import pyarrow.parquet as pq

    from pairforge.manifests import layout
    from pairforge.manifests.shards import to_arrow
    from pairforge.pipeline.engine import RunSpec
    from pairforge.stages.base import take
    from pairforge.stages.shard import Config as ShardConfig
    from pairforge.stages.shard import ShardStage

    keys = np.asarray(rows["key"]).astype(str)
    n = len(keys)
    rows = {
        **rows,
        "status": np.array(["ok"] * n, dtype=object),
        "stage": np.array([""] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
    }
    sids = np.array([int(k[:-width]) for k in keys])
    spec = RunSpec(str(out), (stage,), ShardStage(ShardConfig()), 10**width)
    for sid in np.unique(sids):
        part = take(rows, np.flatnonzero(sids == sid))
        folder = layout.rows_dir(out, int(sid))
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            to_arrow(part, [c for c in spec.fit_columns if c in part], spec.schema), folder / "p.fit.parquet"
        )
        layout.rows_done(out, int(sid)).write_text(json.dumps({"rows": int(np.sum(sids == sid)), "parts": ["p"]}))
    return spec, [int(s) for s in np.unique(sids)]


def fit_on_ray(stage, rows: dict, out, width: int, launcher=None) -> dict:
    """Fit a global stage with the Ray launcher (or ``launcher``) over fit
    files laid out as a run would leave them (:func:`lay_out`). Returns the
    dropped rows (key order), like ``pipeline.local.fit_global``."""
    from pairforge.pipeline.engine import read_decisions
    from pairforge.pipeline.fit import run_fit
    from pairforge.pipeline.plan import RayLauncher
    from pairforge.stages.base import concat, take

    spec, sids = lay_out(rows, out, stage, width)
    # small_fit_shards=0: through the Ray Data shuffle, as a large run would
    launcher = launcher if launcher is not None else RayLauncher(small_fit_shards=0)
    run_fit(launcher, spec, stage, sids, len(rows["key"]))
    dec = concat([read_decisions(spec, stage.name, s) for s in sids])
    if not dec:
        return {}
    drop = np.flatnonzero(np.asarray(dec["reason"], dtype=object) != "")
    dec = take({c: v for c, v in dec.items() if c != "survivor"}, drop)
    return take(dec, np.argsort(dec["key"].astype(str), kind="stable"))
