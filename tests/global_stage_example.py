"""A whole global stage written with only the public contract
(``stages.base``, ``stages.options``), as a user would: drop rows whose
caption an earlier key has. ``tests/stages/test_global_contract.py`` counts its
lines and runs it; a job names it ``tests.global_stage_example:CaptionDedup``
(this module is importable by Ray workers, a test module is not)."""

import hashlib
import json

import numpy as np

from pairforge.stages.base import FitResult, GlobalStage, batch_len, object_array
from pairforge.stages.options import options


@options
class CaptionDedupConfig:
    #: shuffle buckets: rows with one caption meet in one
    buckets: int = 8


class CaptionDedup(GlobalStage):
    """Drop rows whose caption (case and spacing aside) an earlier key has."""

    name = "caption_dedup"
    Config = CaptionDedupConfig
    fit_columns = ("key", "caption")

    def process_batch(self, batch):
        return batch  # no per-row work: the decision needs every row

    def bucket_rows(self, rows, learned):
        caps = [" ".join(str(c).lower().split()) for c in rows["caption"]]
        bucket = [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=4).digest(), "big") for c in caps]
        return {"key": rows["key"], "caption": object_array(caps), "bucket": np.array(bucket) % self.config.buckets}

    def reduce_bucket(self, rows, learned):
        first, keys, details = {}, [], []
        for key, cap in sorted(zip(rows["key"].astype(str), rows["caption"])):
            if cap in first:
                keys.append(key)
                details.append(json.dumps({"duplicate_of": first[cap]}))
            first.setdefault(cap, key)
        return {"key": object_array(keys), "detail": object_array(details)}

    def combine(self, reduced, learned):
        n = batch_len(reduced)
        keys, details = reduced.get("key", object_array([])), reduced.get("detail", object_array([]))
        return FitResult({"key": keys, "reason": object_array(["duplicate_caption"] * n), "detail": details},
                         counters={"duplicate_captions": n})  # fmt: skip
