"""ALIGN's text rules (Jia et al., 2021): the cheap filters that kept 1.8B
noisy alt-texts usable without a model.

* ``caption_shared``: the normalised caption is shared by more than
  ``max_caption_images`` rows (ALIGN: 10). Boilerplate such as "image",
  "IMG_2041.JPG" or "click to enlarge" describes no particular image.
* ``rare_token``: the caption holds a token outside the ``rare_token_rank``
  most frequent tokens of the dataset (ALIGN: unigrams and bigrams, 100M of
  them over 1.8B alt-texts; off by default here, since the rank only means
  something for a given dataset size).
* ``too_few_unigrams`` / ``too_many_unigrams``: fewer than ``min_unigrams``
  or more than ``max_unigrams`` word tokens (ALIGN: 3 and 20).

The first rule that holds, in that order, names the row; its detail holds
the values behind the decision. Frequencies are counted over every row still
alive at this stage, as ALIGN counted over its raw data, so the length rule
runs in the same pass as the others (``decide_rows``), not before them.

Normal form: NFKC, ``casefold``, runs of whitespace as one space
(``stages.common.metadata.normalize``). Tokens: runs of word characters
(``\\w+``) of the normal form; a bigram is two adjacent tokens. A token's
frequency is the number of rows that hold it. Captions and tokens travel as
64-bit hashes; the fit is a count per hash, summed over shards in buckets:

* ``bucket_rows``: per shard, each distinct caption and token with its rows;
* ``reduce_bucket``: per bucket, the sums; captions over the limit and every
  token pass on;
* ``combine``: the captions over the limit, and the count of the token at
  rank ``rare_token_rank`` (ties at the cut are frequent); its rule for
  ``decide_rows`` holds those captions and the smaller of the frequent and
  the rare token sets (hashes, as arrays: they grow with the data).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import ClassVar

import numpy as np

from pairforge.stages.base import (
    Batch,
    FitResult,
    GlobalStage,
    Learned,
    Resources,
    batch_len,
    concat,
    object_array,
    require,
)
from pairforge.stages.common.metadata import normalize
from pairforge.stages.options import options

_TOKEN = re.compile(r"\w+")
CAPTIONS, TOKENS = 0, 1


@options
class Config:
    #: drop captions shared by more than this many rows (null: no limit)
    max_caption_images: int | None = 10
    #: drop captions with a token outside this many most frequent tokens (null: off)
    rare_token_rank: int | None = None
    #: count bigrams as tokens too (ALIGN does)
    bigrams: bool = True
    #: drop captions with fewer word tokens (null: no bound)
    min_unigrams: int | None = 3
    #: drop captions with more word tokens (null: no bound)
    max_unigrams: int | None = 20
    #: shuffle buckets per kind (captions, tokens)
    buckets: int = 64

    def __post_init__(self):
        for name in ("max_caption_images", "rare_token_rank", "min_unigrams", "max_unigrams"):
            v = getattr(self, name)
            require(v is None or v >= (0 if name == "min_unigrams" else 1), name, v, ">= 1 (or null: off)")
        lo, hi = self.min_unigrams, self.max_unigrams
        require(lo is None or hi is None or lo <= hi, "max_unigrams", hi, f">= min_unigrams ({lo})")
        require(self.buckets >= 1, "buckets", self.buckets, ">= 1")


def caption_form(caption) -> str:
    return " ".join(normalize(caption).split()) if isinstance(caption, str) else ""


def tokens(form: str, bigrams: bool) -> tuple[list[str], list[str]]:
    """(unigrams, unigrams and bigrams) of a caption in normal form."""
    uni = _TOKEN.findall(form)
    return uni, (uni + [f"{a} {b}" for a, b in zip(uni, uni[1:])] if bigrams else uni)


def hash64(texts) -> np.ndarray:
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
            for t in texts
        ],
        dtype=np.uint64,
    )


def _lookup(sorted_keys: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, position) of each of ``q`` in ``sorted_keys``."""
    if not len(sorted_keys) or not len(q):
        return np.zeros(len(q), dtype=bool), np.zeros(len(q), dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, q), len(sorted_keys) - 1)
    return sorted_keys[pos] == q, pos


class AlignTextStage(GlobalStage):
    name: ClassVar[str] = "align_text"
    fit_columns = ("key", "caption")
    Config = Config

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4096)

    def needs_fit(self) -> bool:
        c = self.config
        return any(v is not None for v in (c.max_caption_images, c.rare_token_rank, c.min_unigrams, c.max_unigrams))

    def process_batch(self, batch: Batch) -> Batch:
        return dict(batch)

    # ---------------------------------------------------------- global fit

    def bucket_rows(self, rows: Batch, learned: Learned) -> Batch:
        c, parts = self.config, []
        forms = [caption_form(x) for x in rows["caption"]]
        if c.max_caption_images is not None:
            parts.append(self._counted(CAPTIONS, hash64(forms)))
        if c.rare_token_rank is not None:
            per_row = [np.unique(hash64(tokens(f, c.bigrams)[1])) for f in forms]
            parts.append(self._counted(TOKENS, np.concatenate(per_row) if per_row else np.zeros(0, np.uint64)))
        return concat(parts) or {"bucket": np.zeros(0, np.int64)}

    def _counted(self, kind: int, hashes: np.ndarray) -> Batch:
        h, n = np.unique(hashes, return_counts=True)
        b = np.int64(kind * self.config.buckets) + (h % np.uint64(self.config.buckets)).astype(np.int64)
        return {"bucket": b, "kind": np.full(len(h), kind, np.int64), "hash": h, "count": n.astype(np.int64)}

    def reduce_bucket(self, group: Batch, learned: Learned) -> Batch:
        kind = int(np.asarray(group["kind"])[0])
        h, inv = np.unique(np.asarray(group["hash"], dtype=np.uint64), return_inverse=True)
        n = np.bincount(inv, weights=np.asarray(group["count"], dtype=np.float64)).astype(np.int64)
        if kind == CAPTIONS:
            over = n > self.config.max_caption_images
            h, n = h[over], n[over]
        return {"kind": np.full(len(h), kind, np.int64), "hash": h, "count": n}

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        """The counters; the rule: the shared captions' hashes (sorted) and
        row counts, the token set and whether it holds the rare tokens (an
        empty rare set: no token is rare) or the frequent ones, and the count
        a token needs to be frequent (0: the rule is off)."""
        c = self.config
        kind = np.asarray(reduced.get("kind", np.zeros(0)), dtype=np.int64)
        h = np.asarray(reduced.get("hash", np.zeros(0)), dtype=np.uint64)
        n = np.asarray(reduced.get("count", np.zeros(0)), dtype=np.int64)
        cap = kind == CAPTIONS
        order = np.argsort(h[cap], kind="stable")
        arrays = {"shared": h[cap][order], "shared_rows": n[cap][order], "token_set": np.zeros(0, np.uint64)}
        values = {"token_set_is_rare": True, "token_min_count": 0}
        counters = {"captions_shared": int(cap.sum()), "rows_with_shared_captions": int(n[cap].sum())}
        tok = kind == TOKENS
        if c.rare_token_rank is not None:
            th, tn = h[tok], n[tok]
            counters["tokens"] = len(th)
            if len(th) > c.rare_token_rank:
                min_count = int(np.sort(tn)[::-1][c.rare_token_rank - 1])
                frequent = tn >= min_count
                is_rare = int((~frequent).sum()) < int(frequent.sum())
                arrays["token_set"] = np.sort(th[~frequent] if is_rare else th[frequent])
                values = {"token_set_is_rare": is_rare, "token_min_count": min_count}
                counters["rare_tokens"] = int((~frequent).sum())
                counters["token_min_count"] = min_count
            else:
                counters["rare_tokens"] = 0
        return FitResult(counters=counters, rule=Learned(values, arrays))

    def decide_rows(self, rows: Batch, rule: Learned) -> FitResult:
        c = self.config
        keys, reasons, details = [], [], []
        forms = [caption_form(x) for x in rows["caption"]]
        shared_rows = rule.arrays["shared_rows"]
        shared, at = _lookup(rule.arrays["shared"], hash64(forms))
        for i, form in enumerate(forms):
            if shared[i]:
                why, detail = (
                    "caption_shared",
                    {"images": int(shared_rows[at[i]]), "max_caption_images": c.max_caption_images},
                )
            else:
                why, detail = self._token_rules(form, rule)
            if why:
                keys.append(str(rows["key"][i]))
                reasons.append(why)
                details.append(json.dumps(detail, sort_keys=True, ensure_ascii=False))
        return FitResult(
            {"key": object_array(keys), "reason": object_array(reasons), "detail": object_array(details)},
            counters={"rows_seen": batch_len(rows)},
        )

    def _token_rules(self, form: str, rule: Learned) -> tuple[str, dict]:
        c = self.config
        uni, toks = tokens(form, c.bigrams)
        min_count = rule.values["token_min_count"]
        if c.rare_token_rank is not None and min_count:
            found, _ = _lookup(rule.arrays["token_set"], hash64(toks))
            rare = found if rule.values["token_set_is_rare"] else ~found
            if rare.any():
                words = [t for t, r in zip(toks, rare) if r][:5]
                return "rare_token", {
                    "tokens": words,
                    "min_count": min_count,
                    "rare_token_rank": c.rare_token_rank,
                }
        if c.min_unigrams is not None and len(uni) < c.min_unigrams:
            return "too_few_unigrams", {"unigrams": len(uni), "min_unigrams": c.min_unigrams}
        if c.max_unigrams is not None and len(uni) > c.max_unigrams:
            return "too_many_unigrams", {"unigrams": len(uni), "max_unigrams": c.max_unigrams}
        return "", {}
