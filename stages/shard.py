"""The terminal stage: write each shard's rows in the LAION / img2dataset
layout. It runs once per shard over every row of that shard (ok or not), so
it is not a per-row stage: the runners call :meth:`ShardStage.write_group`."""

from __future__ import annotations

from pathlib import Path

from pairforge.manifests.shards import write_shard
from pairforge.stages.base import Batch, Resources, Stage
from pairforge.stages.options import options


@options
class Config:
    #: write embedding columns (``store: embeddings``) to ``OUT/embeddings`` (clip-retrieval layout)
    write_embeddings: bool = True
    #: CPUs per shard-writing task
    num_cpus: float = 1.0


class ShardStage(Stage):
    name = "shard"
    Config = Config

    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus)

    def write_group(self, rows: Batch, out_dir: str | Path, shard_id: int, schema=None, counters=None) -> dict:
        return write_shard(
            rows, out_dir, shard_id, write_embeddings=self.config.write_embeddings, schema=schema, counters=counters
        )
