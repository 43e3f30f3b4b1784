"""The terminal stage: where a job's rows go, in the LAION / img2dataset
layout. It runs once per shard over every row of that shard (ok or not), so
it is not a per-row stage: it has no ``process_batch``, and what it holds is
its options. The writer itself is the on-disk contract's
(``manifests.shards.write_shard``); the runners call it with these options."""

from __future__ import annotations

from pairforge.stages.base import Resources, Stage
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
