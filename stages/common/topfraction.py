"""The top-fraction fit of :mod:`stages.clip_score`: keep the best
``top_fraction`` of the alive rows by score over the whole dataset
(DataComp's "CLIP score top 30%" baseline) without bringing per-row data
for the whole dataset into one place.

It lives apart from the stage because it is pure numpy over ``(key, score)``
rows: no model, no images, testable on synthetic scores, and reusable by any
stage that ranks rows by one score column.

Rows are ranked by (score desc, key asc): ties are broken by key, so exactly
``k = round(top_fraction * N)`` rows are kept and the result does not depend
on how rows were batched. The steps (:class:`TopFraction`'s methods, called
by the stage's :class:`stages.base.GlobalStage` methods of the same names;
each returns what the next one takes, ``stages.fitting.Learned``):

1. ``learn(sample)`` finds a score window that holds the cut with a wide
   margin (from a hash sample's quantiles): ``values["window"]``.
2. ``bucket_rows`` emits a histogram (:data:`BINS` bins over [-1, 1]) of its
   shard, plus ``(key, score)`` for the rows inside the window only.
3. ``reduce_bucket`` sums the histogram bins; window rows pass through.
4. ``combine`` finds the bin holding the k-th row from the histogram and the
   exact cut row among the window rows of that bin. It returns the cut as
   its rule (``values["cut"]``) and no key-named decisions.
5. ``decide_rows(rows, rule)`` runs per shard after the fit: a row is kept
   iff it ranks at or above the cut (a rule per shard replaces a 70M-entry
   decision list at 100M rows and DataComp's 30%).

If the sample misled ``learn`` (the cut fell outside the window), combine
cuts at the bin's lower edge instead (keeping at most one bin's rows too
many) and says so in the detail (``"exact": false``) and the log.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from pairforge.stages.base import Batch, FitResult, Learned, batch_len, object_array

log = logging.getLogger(__name__)

#: histogram bins over [-1, 1]
BINS = 8192
#: learn's window: this many standard deviations of a sample quantile,
#: plus this share of the sample's rows, either side of the estimated cut
WINDOW_SIGMAS = 6.0
WINDOW_SHARE = 0.01


def _bins(scores: np.ndarray) -> np.ndarray:
    b = np.floor((np.nan_to_num(scores, nan=-1.0).astype(np.float64) + 1.0) * (BINS / 2.0))
    return np.clip(b, 0, BINS - 1).astype(np.int64)


class TopFraction:
    """The top-fraction fit's steps for one stage; it holds their settings
    only (what the fit finds is returned, never kept). ``top_fraction``
    ``None``: no fit (every step is empty). ``score`` names the score column
    (and the detail's key for a row's score), ``reason`` the rejects' reason."""

    def __init__(self, top_fraction: float | None, score: str = "clip_score",
                 reason: str = "clip_score_below_top_fraction", name: str = "clip_score"):  # fmt: skip
        self.top_fraction = top_fraction
        self.score, self.reason, self.name = score, reason, name

    def learn(self, sample: Batch) -> Learned:
        """The histogram bins ``[lo, hi]`` that hold the estimated cut (see
        the module doc), as ``values["window"]``; none without a sample."""
        f = self.top_fraction
        s = np.sort(np.asarray(sample.get(self.score, []), dtype=np.float32))[::-1]
        if f is None or not len(s):
            return Learned()
        m = len(s)
        margin = WINDOW_SIGMAS * math.sqrt(f * (1 - f) * m) + WINDOW_SHARE * m + 1
        hi_rank, lo_rank = int(max(0, f * m - margin)), int(min(m - 1, f * m + margin))
        window = [int(_bins(s[lo_rank : lo_rank + 1])[0]), int(_bins(s[hi_rank : hi_rank + 1])[0])]
        return Learned({"window": window})

    def bucket_rows(self, batch: Batch, learned: Learned) -> Batch:
        if self.top_fraction is None:
            return {}
        s = np.asarray(batch[self.score], dtype=np.float32)
        b = _bins(s)
        hist_bins, counts = np.unique(b, return_counts=True)
        lo, hi = learned.values.get("window") or (BINS, -1)
        inside = np.flatnonzero((b >= lo) & (b <= hi))
        nh, nw = len(hist_bins), len(inside)
        return {
            "bucket": np.concatenate([hist_bins, BINS + b[inside]]).astype(np.int64),
            "count": np.concatenate([counts, np.ones(nw, dtype=np.int64)]).astype(np.int64),
            "score": np.concatenate([np.full(nh, np.nan, dtype=np.float32), s[inside]]),
            "key": object_array([""] * nh + [str(k) for k in batch["key"][inside]]),
        }

    def reduce_bucket(self, group: Batch) -> Batch:
        g = int(np.asarray(group["bucket"])[0])
        if g >= BINS:  # window rows pass through, in a fixed order
            order = np.argsort(np.asarray(group["key"]).astype(str), kind="stable")
            return {c: np.asarray(v)[order] for c, v in group.items()}
        return {
            "bucket": np.array([g], dtype=np.int64),
            "count": np.array([int(np.sum(group["count"]))], dtype=np.int64),
            "score": np.array([np.nan], dtype=np.float32),
            "key": object_array([""]),
        }

    def combine(self, reduced: Batch, detail: dict | None = None) -> FitResult:
        """The cut row as the rule (``values["cut"]``; ``detail``: more
        entries for every reject's detail, as ``values["detail"]``);
        decisions are made per shard by :meth:`decide_rows`."""
        f = self.top_fraction
        if f is None or not reduced or not batch_len(reduced):
            return FitResult()
        groups = np.asarray(reduced["bucket"], dtype=np.int64)
        counts = np.asarray(reduced["count"], dtype=np.int64)
        is_hist = groups < BINS
        hist = np.zeros(BINS, dtype=np.int64)
        np.add.at(hist, groups[is_hist], counts[is_hist])
        total = int(hist.sum())
        k = int(math.floor(f * total + 0.5))
        cut = {"top_fraction": f, "rows": total, "keep": k, "exact": True}
        if k >= total:
            cut.update(score=-math.inf, key=None)
        elif k == 0:
            cut.update(score=math.inf, key="")
        else:
            above = np.cumsum(hist[::-1])[::-1]  # above[b]: rows in bins >= b
            c = int(np.flatnonzero(above >= k).max())  # the bin holding the k-th best row
            need = k - (int(above[c + 1]) if c + 1 < BINS else 0)
            w = np.flatnonzero(groups == BINS + c)
            if len(w) == int(hist[c]):
                keys = np.asarray(reduced["key"])[w].astype(str)
                sc = np.asarray(reduced["score"], dtype=np.float32)[w]
                order = np.lexsort((keys, -sc))
                cut.update(score=float(sc[order[need - 1]]), key=str(keys[order[need - 1]]))
            else:
                edge = float(np.float32(-1.0 + 2.0 * c / BINS))
                log.warning("%s: top_fraction cut outside the sampled window; cutting at %.5f", self.name, edge)
                cut.update(score=edge, key=None, exact=False)
        return FitResult(rule=Learned({"cut": cut, "detail": dict(detail or {})}))

    def decide_rows(self, rows: Batch, rule: Learned) -> FitResult:
        """Per shard after the fit: drop the alive rows ranked below the
        rule's cut. Each reject's detail (JSON, sorted keys) holds the cut
        score as ``threshold``, ``top_fraction``, ``exact``, the row's score,
        and the rule's ``detail`` entries (the stage's ``model``)."""
        cut = rule.values.get("cut")
        if cut is None or not batch_len(rows):
            return FitResult()
        s = np.asarray(rows[self.score], dtype=np.float32)
        keys = np.asarray(rows["key"]).astype(str)
        cs = np.float32(cut["score"])
        if cut["key"] is None:  # keep everything at or above the cut score
            keep = s >= cs
        else:
            keep = (s > cs) | ((s == cs) & (keys <= cut["key"]))
        drop = np.flatnonzero(~keep)
        common = {"threshold": float(cs), "top_fraction": cut["top_fraction"], "exact": cut["exact"],
                  **rule.values.get("detail", {})}  # fmt: skip
        details = [json.dumps({**common, self.score: float(s[i])}, sort_keys=True) for i in drop]
        return FitResult(
            {
                "key": object_array([str(keys[i]) for i in drop]),
                "reason": object_array([self.reason] * len(drop)),
                "detail": object_array(details),
            }
        )
