"""Synthetic rows for ``bench/scale.py``: the columns a download and a CLIP
stage would have made, without the network or a model, so the benchmark
measures what the global stages and the shard writer cost at scale.

Row ``i`` of ``n`` (its key names ``i``) takes its content from a *content
seed*: its own, or, for planted rows, another row's:

* 10% exact copies: the same image bytes (so the same sha256, pHash, embedding)
* 5% URL copies: planted in the URL list itself (:func:`write_urls`)
* 5% near copies: other bytes, the pHash with 2 bits flipped, the embedding
  nudged (cosine ~0.9998): found by pHash (and semantic dedup)
* 3% close copies: other bytes and pHash, the embedding nudged: for semantic dedup

Images are ~2 KB of random bytes behind a JPEG marker (nothing decodes them:
``dedup_phash`` reads the planted ``synthetic_phash`` column, as it would a
hash the download stage computed from pixels it had decoded anyway).
Jobs name the stage ``bench.scalekit:SyntheticRows``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.stages.base import Batch, Column, Resources, Stage, batch_len, object_array

IMAGE_BYTES = 2048
EMB_DIM = 64


def _u64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def plan_row(i: int, n: int) -> tuple[str, int]:
    """(kind, content seed) of row ``i``: kind is ``own``, ``exact``, ``url`` or ``near``."""
    r = _u64(f"kind{i}") % 100
    other = (i * 7919 + 13) % n  # another row, often in another shard
    if other == i:
        return "own", i
    if r < 10:
        return "exact", other
    if r < 15:
        return "url", i
    if r < 20:
        return "near", other
    if r < 23:
        return "close", other
    return "own", i


#: rows per parquet row group of the URL list: a reader decodes a row group at once, so its size,
#: not the list's, bounds the memory of reading it (pyarrow's default, 1Mi rows, is ~90 MB here)
ROW_GROUP = 65_536


def write_urls(path: str, n: int, chunk: int = 1_000_000) -> None:
    """The URL list: row ``i`` points at ``/i.jpg``, URL copies at another row's."""
    writer = None
    for lo in range(0, n, chunk):
        ids = range(lo, min(n, lo + chunk))
        urls = []
        for i in ids:
            kind, _ = plan_row(i, n)
            urls.append(f"http://synthetic.invalid/{(i * 7919 + 13) % n if kind == 'url' else i}.jpg")
        t = pa.table({"url": urls, "caption": [f"a synthetic picture number {i % 5000}" for i in ids]})
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t, row_group_size=ROW_GROUP)
    writer.close()


@dataclass(frozen=True)
class Config:
    #: rows in the whole URL list (plan_row needs it)
    rows: int = 1
    #: rows of one shard (keys are ``{shard:05d}{index:0Wd}``)
    samples_per_shard: int = 10000
    batch_size: int = 4096


class SyntheticRows(Stage):
    name: ClassVar[str] = "synthetic"
    Config = Config

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=self.config.batch_size)

    def outputs(self) -> tuple[Column, ...]:
        return (
            Column("image", "bytes"),
            Column("image_ext", "string"),
            Column("sha256", "string"),
            Column("original_width", "scalar", "int64", default=-1),
            Column("original_height", "scalar", "int64", default=-1),
            Column("synthetic_phash", "string"),
            Column("img_emb", "vector", "float16", (EMB_DIM,), store="embeddings"),
        )

    def process_batch(self, batch: Batch) -> Batch:
        n = batch_len(batch)
        w = len(str(self.config.samples_per_shard - 1))
        images, shas, hashes = [], [], []
        emb = np.empty((n, EMB_DIM), dtype=np.float16)
        for j, key in enumerate(batch["key"]):
            k = str(key)
            i = int(k[:-w]) * self.config.samples_per_shard + int(k[-w:])
            kind, seed = plan_row(i, self.config.rows)
            rng = np.random.default_rng(seed)
            data = b"\xff\xd8\xff\xe0" + rng.bytes(IMAGE_BYTES - 4)
            h = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
            e = rng.standard_normal(EMB_DIM)
            if kind in ("near", "close"):  # other bytes, a nudge of the embedding
                data = data[:-8] + i.to_bytes(8, "big")
                e = e + 0.02 * np.random.default_rng(i).standard_normal(EMB_DIM)
            if kind == "near":  # 2 bits of the hash
                h ^= (1 << (i % 64)) | (1 << ((i + 17) % 64))
            elif kind == "close":  # a hash of its own
                h = _u64(f"hash{i}")
            images.append(data)
            shas.append(hashlib.sha256(data).hexdigest())
            hashes.append(f"{h & (2**64 - 1):016x}")
            emb[j] = (e / np.linalg.norm(e)).astype(np.float16)
        out = dict(batch)
        out["image"] = object_array(images)
        out["image_ext"] = object_array(["jpg"] * n)
        out["sha256"] = object_array(shas)
        out["original_width"] = np.full(n, 64, dtype=np.int64)
        out["original_height"] = np.full(n, 64, dtype=np.int64)
        out["synthetic_phash"] = object_array(hashes)
        out["img_emb"] = emb
        return out
