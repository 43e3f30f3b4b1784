"""Where everything of one run lives under its output folder ``OUT``.

This is the on-disk contract (LAION / img2dataset layout) that trainers and
``pairforge manifest`` read:

    OUT/manifest.json                      the run manifest
    OUT/shards/00000.tar                   {key}.{jpg|png|webp} {key}.txt {key}.json
    OUT/shards/00000.parquet               one row per sample of that tar
    OUT/shards/00000_stats.json            that shard's counters; written last
    OUT/shards/sizes.json                  shard file name -> samples (open_clip)
    OUT/rejects/00000.parquet              every row of shard 0 that did not make it
    OUT/embeddings/<col>/<col>_00000.npy   2-D ``*_emb`` columns, float16, parquet row order
    OUT/_work/input/00000.parquet          the URL list cut into shards, keys assigned
    OUT/_work/parts/00000/*.pkl            a run's rows per shard before the shard is written
"""

from __future__ import annotations

import os
from pathlib import Path

SHARD_DIGITS = 5


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def shards_dir(out: str | Path) -> Path:
    return Path(out) / "shards"


def shard_tar(out, shard_id: int) -> Path:
    return shards_dir(out) / f"{shard_name(shard_id)}.tar"


def shard_parquet(out, shard_id: int) -> Path:
    return shards_dir(out) / f"{shard_name(shard_id)}.parquet"


def shard_stats(out, shard_id: int) -> Path:
    return shards_dir(out) / f"{shard_name(shard_id)}_stats.json"


def sizes_json(out) -> Path:
    return shards_dir(out) / "sizes.json"


def rejects_parquet(out, shard_id: int) -> Path:
    return Path(out) / "rejects" / f"{shard_name(shard_id)}.parquet"


def embedding_npy(out, column: str, shard_id: int) -> Path:
    return Path(out) / "embeddings" / column / f"{column}_{shard_name(shard_id)}.npy"


def rejects_embedding_npy(out, column: str, shard_id: int) -> Path:
    """Embeddings of the rejected rows, in the order of ``rejects/S.parquet``
    (zeros where a row was rejected before it had one)."""
    return Path(out) / "rejects" / f"{shard_name(shard_id)}_{column}.npy"


def manifest_json(out) -> Path:
    return Path(out) / "manifest.json"


def parts_dir(out) -> Path:
    """Rows on their way to a shard: each final task leaves its rows here,
    one file per (task, shard); the shard writer merges them."""
    return Path(out) / "_work" / "parts"


def input_dir(out) -> Path:
    return Path(out) / "_work" / "input"


def input_shard(out, shard_id: int) -> Path:
    return input_dir(out) / f"{shard_name(shard_id)}.parquet"


def input_index(out) -> Path:
    return input_dir(out) / "index.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
