"""MetaCLIP's curation, step 2: balance the rows over the metadata entries.

CLIP capped each of its 500,000 queries at 20,000 pairs so that the head of
the distribution ("photo", "image", "t-shirt") could not swamp the tail;
MetaCLIP (Xu et al., 2023) showed the balanced set beats a CLIP-score filter
at equal size. Here, over every row still alive at this stage (after
``metadata_match``, dedup, ...):

1. **count** rows per entry (the ragged ``metadata_entries`` column):
   ``bucket_rows`` counts each input shard's entries, ``reduce_bucket`` sums
   the per-shard counts of the entries in one bucket, ``combine`` holds one
   count per entry used (never a row list) and returns the entries over
   ``t`` with their counts as its rule;
2. **sample** per shard (``decide_rows`` by that rule): a row is kept if any of its
   entries selects it, entry ``e`` selecting each of its rows with
   probability ``min(1, t / c_e)``; a row with an entry at or under ``t`` is
   always kept. Each draw is a hash of the row's URL and caption, the entry
   and ``seed`` (``stages.common.balancing``), not the key: the same rows are
   kept on both runners, any cluster size, any ``samples_per_shard`` and a
   resume.

A dropped row has reason ``balance_not_sampled`` and, in its detail, its
entries over ``t`` with their counts and ``t``. A row with no entry at all
is dropped as ``no_metadata_match`` unless ``keep_unmatched``. The fit's
counters record the count distribution before and after (entries used, the
top and every entry over ``t`` by id, a log histogram; see
``stages.common.balancing``), which ``pairforge report`` draws as MetaCLIP's
figure.
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np

from pairforge.stages.base import Batch, FitResult, GlobalStage, Learned, Resources, batch_len, object_array, require
from pairforge.stages.common import balancing as bal
from pairforge.stages.options import options


@options
class Config:
    #: the most rows an entry keeps on its own (CLIP's and MetaCLIP's 20,000)
    t: int = 20000
    #: seed of the draws (another seed, another balanced subset)
    seed: int = 0
    #: the ragged column of entry ids (``metadata_match`` writes ``metadata_entries``)
    entries_column: str = "metadata_entries"
    #: keep rows that hold no entry (MetaCLIP drops them: no entry can select them)
    keep_unmatched: bool = False
    #: entries recorded by id in the manifest besides every entry over ``t``: the largest
    top_entries: int = 20
    #: shuffle buckets of the per-shard counts
    buckets: int = 64

    def __post_init__(self):
        require(self.t >= 1, "t", self.t, ">= 1")
        require(0 <= self.top_entries <= bal.MAX_TRACKED, "top_entries", self.top_entries, f"0..{bal.MAX_TRACKED}")
        require(self.buckets >= 1, "buckets", self.buckets, ">= 1")
        require(bool(self.entries_column), "entries_column", self.entries_column, "a column name")


class BalanceStage(GlobalStage):
    name: ClassVar[str] = "balance"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        self.fit_columns = ("key", "url", "caption", config.entries_column)

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4096)

    def process_batch(self, batch: Batch) -> Batch:
        return dict(batch)

    # ---------------------------------------------------------- global fit

    def bucket_rows(self, rows: Batch, learned: Learned) -> Batch:
        r, e = bal.flatten(rows[self.config.entries_column])
        entry, count = np.unique(e, return_counts=True)
        unmatched = batch_len(rows) - len(np.unique(r))
        # entry -1 carries the shard's rows without an entry (and its row count, below)
        entry = np.concatenate([[-1, -2], entry])
        count = np.concatenate([[unmatched, batch_len(rows)], count]).astype(np.int64)
        return {"bucket": np.maximum(entry, 0) % self.config.buckets, "entry": entry, "count": count}

    def reduce_bucket(self, group: Batch, learned: Learned) -> Batch:
        entry, inv = np.unique(np.asarray(group["entry"], dtype=np.int64), return_inverse=True)
        count = np.bincount(inv, weights=np.asarray(group["count"], dtype=np.float64)).astype(np.int64)
        return {"entry": entry, "count": count}

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        """The counts per entry; the rule: the entries over ``t`` (sorted
        ids, ``head_ids``) and their counts (``head_counts``), and the
        entries whose count after is counted by id (``tracked``: the head
        and the top ones)."""
        t = self.config.t
        entry = np.asarray(reduced.get("entry", np.zeros(0)), dtype=np.int64)
        count = np.asarray(reduced.get("count", np.zeros(0)), dtype=np.int64)
        rows = int(count[entry == -2].sum())
        unmatched = int(count[entry == -1].sum())
        used = entry >= 0
        entry, count = entry[used], count[used]
        over = count > t
        top = np.lexsort((entry, -count))[: self.config.top_entries]
        order = np.lexsort((entry[over], -count[over]))[: bal.MAX_TRACKED]
        tracked = np.union1d(entry[top], entry[over][order])
        # entry ids are sorted (np.unique)
        rule = Learned(arrays={"head_ids": entry[over], "head_counts": count[over], "tracked": tracked})
        counters = {
            "t": t,
            "rows": rows,
            "rows_without_entries": unmatched,
            "matches": int(count.sum()),
            "entries_used": int(len(entry)),
            "entries_over_t": int(over.sum()),
        }
        bins, n = np.unique(bal.log_bin(count), return_counts=True)
        counters.update({f"hist_before:{b}": int(k) for b, k in zip(bins.tolist(), n.tolist())})
        is_tracked = np.isin(entry, tracked)
        counters.update({f"before:{i}": int(c) for i, c in zip(entry[is_tracked].tolist(), count[is_tracked].tolist())})
        return FitResult(counters=counters, rule=rule)

    def decide_rows(self, rows: Batch, rule: Learned) -> FitResult:
        n = batch_len(rows)
        head_ids, head_counts = rule.arrays["head_ids"], rule.arrays["head_counts"]
        r, e = bal.flatten(rows[self.config.entries_column])
        pos = np.minimum(np.searchsorted(head_ids, e), max(len(head_ids) - 1, 0))
        is_head = (head_ids[pos] == e) if len(head_ids) else np.zeros(len(e), dtype=bool)
        keep = np.zeros(n, dtype=bool)
        keep[r[~is_head]] = True  # an entry at or under t selects every row
        if not self.config.keep_unmatched:
            has = np.zeros(n, dtype=bool)
            has[r] = True
        else:
            has = np.ones(n, dtype=bool)
            keep[np.setdiff1d(np.arange(n), r)] = True
        draw = is_head & ~keep[r]  # head pairs of rows no tail entry kept already
        if draw.any():
            need = np.unique(r[draw])
            hashes = np.zeros(n, dtype=np.uint64)
            hashes[need] = bal.row_hashes(rows["url"][need], rows["caption"][need], self.config.seed)
            thr = bal.thresholds(head_counts, self.config.t)
            chosen = bal.draws(hashes[r[draw]], e[draw]) < thr[pos[draw]]
            keep[r[draw][chosen]] = True
        counters = {"kept": int(keep.sum())}
        kept_pairs = keep[r] & np.isin(e, rule.arrays["tracked"])
        ids, k = np.unique(e[kept_pairs], return_counts=True)
        counters.update({f"after:{i}": int(c) for i, c in zip(ids.tolist(), k.tolist())})
        drop = np.flatnonzero(~keep)
        keys = np.asarray(rows["key"]).astype(str)
        reasons, details = [], []
        lo, hi = np.searchsorted(r, drop), np.searchsorted(r, drop, side="right")  # pairs are sorted by row
        for i, a, b in zip(drop.tolist(), lo.tolist(), hi.tolist()):
            if not has[i]:
                reasons.append("no_metadata_match")
                details.append(json.dumps({"column": self.config.entries_column}))
                continue
            # a dropped row holds head entries only: each one's id and count
            mine = {"entries": e[a:b].tolist(), "counts": head_counts[pos[a:b]].tolist(), "t": self.config.t}
            reasons.append("balance_not_sampled")
            details.append(json.dumps(mine, sort_keys=True))
        return FitResult(
            {
                "key": object_array([keys[i] for i in drop]),
                "reason": object_array(reasons),
                "detail": object_array(details),
            },
            counters=counters,
        )
