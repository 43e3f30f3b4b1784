"""Perceptual dedup: 64-bit pHash (or dHash) per image, near-duplicates at
Hamming distance <= ``max_distance`` across the whole dataset.

How the global fit finds pairs without comparing all of them:

* ``bucket_rows``: the hash is cut into ``max_distance + 1`` bands. Two hashes
  within ``max_distance`` bits differ in at most that many bands, so by
  pigeonhole they agree on at least one band. Each row is emitted once per
  band with ``bucket`` = (band index, bucket of the band value); rows with equal
  band values always land in the same bucket.
* ``reduce_bucket``: inside a bucket, rows are sorted by (band, band value) and
  only rows of equal band value are compared (vectorised XOR + popcount).
  A pair is reported only in the first band where it agrees, and identical
  hashes collapse onto one representative first, so each edge appears once.
* ``combine``: connected components over the verified pairs (never over all
  rows), then the keep policy picks one survivor per cluster.

Grouping by a bucket of band values instead of the exact band value keeps the
number of buckets (and per-bucket overhead) fixed at ``bands *
buckets_per_band`` while the work inside a group stays vectorised.

The default ``max_distance`` (2) comes from the planted set (``python -m
tests.planted --report``, 1020 rows from 85 real and generated originals):
JPEG re-encodes (q50-90), resizes (0.5x-1.5x) and brightness changes land at
distance 0 or 2 for ~95% of copies and at 4-8 for the rest (mostly smooth,
low-detail images), while the closest different images (the two views of the
stereo pair, look-alike generated pairs) sit at 6-8, and their re-encodes
reach 4. At d=2 recall is 0.992 on re-encodes and 0.996 on resizes
(clusters link the few far copies through closer ones) at precision 1.0;
d=4 reaches recall 1.0 at precision 0.97. pHash distances are even (each hash
has 32 bits above its median), so 3 finds what 2 finds. Crops of 3-5% land
at 4-16 and need the semantic stage. Three bands of 21-22 bits also keep random
collisions rare up to many millions of rows (see ``bench/dedup.py``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from pairforge.stages.base import (
    STATUS_FAILED,
    Batch,
    Column,
    FitResult,
    GlobalStage,
    Learned,
    Resources,
    batch_len,
    object_array,
    reject,
)
from pairforge.stages.common import dedup as dd
from pairforge.stages.common.phash import ALGORITHMS, image_hash
from pairforge.stages.options import options

#: Rows sharing one band value are compared pairwise; chosen from the planted set.
DEFAULT_MAX_DISTANCE = 2


@options
class Config:
    #: ``phash`` (DCT-based, default) or ``dhash`` (gradients); the column
    #: holding the 16-hex-digit hash is named after it
    algorithm: str = "phash"
    #: near-duplicates differ in at most this many of the 64 bits
    max_distance: int = DEFAULT_MAX_DISTANCE
    #: which row of a cluster survives: ``largest``, ``first`` or ``clip_score`` (see ``common.dedup.KEEP_POLICIES``)
    keep: str = "largest"
    #: an earlier output folder: rows within ``max_distance`` of one of its
    #: rows are dropped as ``duplicate_prior_build``
    prior_build: str | None = None
    #: evaluation-set indexes (``pairforge eval-index``): rows within ``max_distance``
    #: of one of their images are dropped as ``eval_contamination``
    eval_sets: tuple[str, ...] = ()
    #: dedup the run's rows among themselves (the global fit); ``false``: drop only what
    #: ``prior_build`` or ``eval_sets`` hold (decontamination alone, for a baseline recipe)
    within_run: bool = True
    #: shuffle buckets per band; raise it for billions of rows
    buckets_per_band: int = 64
    #: take each row's hash (16 hex digits) from this column, made upstream
    #: from pixels that were decoded anyway, instead of decoding the image again
    hash_column: str | None = None


class PerceptualDedupStage(GlobalStage):
    name: ClassVar[str] = "dedup_phash"
    Config = Config
    #: a reduced row is one verified pair: it links its two keys
    link_columns = ("key_a", "key_b")

    def __init__(self, config: Config):
        super().__init__(config)
        if config.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {config.algorithm!r}")
        dd.check_keep(config.keep)
        if config.buckets_per_band < 1:
            raise ValueError(f"buckets_per_band: expected >= 1, got {config.buckets_per_band!r}")
        self.column = config.algorithm
        self.layout = dd.band_layout(config.max_distance)
        self.fit_columns = dd.fit_columns_for(config.keep, self.column)
        self._prior: dd.HammingIndex | None = None
        self._eval: dd.HammingIndex | None = None

    @classmethod
    def wants_decoded(cls, config: Config) -> str | None:
        """The hash, when the job gives no ``hash_column``: a ``download``
        before this stage takes it of each image it stores, right after
        encoding it (``stages.common.phash``, the hash this stage computes, so
        the decisions are the same: ``tests/stages/test_resize.py``), into this
        stage's own column (``phash``), which this stage then checks and
        keeps: the shards hold the hash once."""
        return config.algorithm if config.hash_column is None else None

    @classmethod
    def take_decoded(cls, config: Config, value: str) -> Config:
        return dataclasses.replace(config, hash_column=value)

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=256)

    def needs_fit(self) -> bool:
        return self.config.within_run

    def outputs(self) -> tuple[Column, ...]:
        return (Column(self.column, "string"), Column(dd.DUPLICATE_OF, "string", nullable=True))

    def inputs(self) -> tuple[str, ...]:
        return (self.config.hash_column or "image", *self.fit_columns)

    def check(self, declared: dict) -> list[str]:
        """``prior_build`` is a local earlier run's output folder."""
        return dd.check_prior_build(self.config.prior_build)

    def setup(self) -> None:
        if self.config.prior_build and self._prior is None:
            self._prior = self._index(dd.read_prior_build(self.config.prior_build, ("key", self.column)))
        if self.config.eval_sets and self._eval is None:
            self._eval = self._index(dd.read_eval_sets(self.config.eval_sets, ("key", self.column)))

    def _index(self, rows: Batch) -> dd.HammingIndex:
        ok = np.array([bool(h) for h in rows[self.column]], dtype=bool)
        return dd.HammingIndex(dd.hex_to_u64(rows[self.column][ok]), rows["key"][ok], self.config.max_distance)

    # ------------------------------------------------------------ per row

    def process_batch(self, batch: Batch) -> Batch:
        n = batch_len(batch)
        hashes, bad = [], []
        if self.config.hash_column:
            for h in batch[self.config.hash_column]:
                good = isinstance(h, str) and len(h) == 16
                hashes.append(h if good else "")
                bad.append(False if good else "no_hash")
        for data in batch["image"] if not self.config.hash_column else ():
            try:
                hashes.append(image_hash(data, self.config.algorithm))
                bad.append(False)
            except Exception as e:  # noqa: BLE001 - any decoder error is a per-row outcome
                hashes.append("")
                bad.append(type(e).__name__)
        out = dict(batch)
        out[self.column] = object_array(hashes)
        out[dd.DUPLICATE_OF] = object_array([""] * n)
        bad_mask = np.array([b is not False for b in bad], dtype=bool)
        reject(
            out,
            bad_mask,
            self.name,
            "decode_error",
            [{"error": b} for b in bad if b is not False],
            status=STATUS_FAILED,
        )
        if self.config.eval_sets or self.config.prior_build:
            self.setup()
        alive = ~bad_mask
        if self.config.eval_sets:  # first: a contaminated row is named so even if a prior build has it too
            where = {"sets": ",".join(self.config.eval_sets)}
            alive &= ~self._drop_near(out, alive, self._eval, dd.EVAL_CONTAMINATION, where)
        if self.config.prior_build:
            self._drop_near(out, alive, self._prior, "duplicate_prior_build", {"build": self.config.prior_build})
        return out

    def _drop_near(self, out: Batch, alive: np.ndarray, index: dd.HammingIndex, reason: str, where: dict) -> np.ndarray:
        """Reject the ``alive`` rows within ``max_distance`` of a hash in ``index``; returns which."""
        idx = np.flatnonzero(alive)
        best, dist = index.nearest(dd.hex_to_u64(out[self.column][idx]))
        hit = best >= 0
        mask = np.zeros(len(alive), dtype=bool)
        mask[idx[hit]] = True
        known = index.keys[best[hit]]
        details = [{"kind": self.column, "distance": int(d), **where} for d in dist[hit]]
        reject(out, mask, self.name, reason, details)
        out[dd.DUPLICATE_OF][idx[hit]] = [str(k) for k in known]
        return mask

    # ---------------------------------------------------------- global fit

    def bucket_rows(self, batch: Batch, learned: Learned) -> Batch:
        valid = np.array([bool(h) for h in batch[self.column]], dtype=bool)
        hashes = dd.hex_to_u64(batch[self.column][valid])
        keys = batch["key"][valid]
        prio = dd.row_priority({c: batch[c][valid] for c in self.fit_columns}, self.config.keep)
        nb = len(self.layout)
        bvals = dd.band_values(hashes, self.layout)  # (n, nb)
        band = np.tile(np.arange(nb, dtype=np.int64), len(hashes))
        bval = bvals.ravel()
        rep = np.repeat(np.arange(len(hashes)), nb)
        return {
            "bucket": band * self.config.buckets_per_band + _bucket(bval, self.config.buckets_per_band),
            "band": band,
            "bval": bval,
            "hash": hashes[rep],
            "key": dd.str_keys(keys)[rep],  # fixed-width: copies without refcounting
            "priority": prio[rep],
        }

    def reduce_bucket(self, group: Batch, learned: Learned) -> Batch:
        band = np.asarray(group["band"], dtype=np.int64)
        bval = np.asarray(group["bval"], dtype=np.uint64)
        h = np.asarray(group["hash"], dtype=np.uint64)
        # no need to order by key: whichever row represents a hash, the
        # clusters (and so combine's survivors) come out the same
        order = np.lexsort((h, bval, band))
        band, bval, h = band[order], bval[order], h[order]
        keys = np.asarray(group["key"])[order]
        prio = np.asarray(group["priority"], dtype=np.float64)[order]
        edges_a, edges_b, dists = [], [], []

        # identical hashes: every member to the first; emitted
        # in band 0 only, where all rows with one hash always meet
        new_hash = np.r_[True, (h[1:] != h[:-1]) | (band[1:] != band[:-1])] if len(h) else np.zeros(0, bool)
        rep_of = np.maximum.accumulate(np.where(new_hash, np.arange(len(h)), 0))
        same = ~new_hash & (band == 0)
        edges_a.append(rep_of[same])
        edges_b.append(np.flatnonzero(same))
        dists.append(np.zeros(int(same.sum()), dtype=np.int64))

        # distinct hashes sharing a band value: verify, keep each pair once
        reps = np.flatnonzero(new_hash)
        rb, rv = band[reps], bval[reps]
        run = np.cumsum(np.r_[True, (rb[1:] != rb[:-1]) | (rv[1:] != rv[:-1])]) if len(reps) else reps
        for i, j in dd.pairs_in_runs(run):
            a, b = reps[i], reps[j]
            x = h[a] ^ h[b]
            d = dd.popcount(x)
            keep = (d <= self.config.max_distance) & (dd.first_equal_band(x, self.layout) == band[a])
            edges_a.append(a[keep])
            edges_b.append(b[keep])
            dists.append(d[keep])
        a, b = np.concatenate(edges_a), np.concatenate(edges_b)
        return {
            "key_a": keys[a],
            "key_b": keys[b],
            "hash_a": h[a],
            "hash_b": h[b],
            "prio_a": prio[a],
            "prio_b": prio[b],
            "distance": np.concatenate(dists),
        }

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        if not reduced or not batch_len(reduced):
            return dd.no_decisions()
        c = dd.cluster_pairs(reduced["key_a"], reduced["key_b"], reduced["prio_a"], reduced["prio_b"])
        h = np.zeros(len(c["key"]), dtype=np.uint64)
        h[c["a"]] = np.asarray(reduced["hash_a"], dtype=np.uint64)
        h[c["b"]] = np.asarray(reduced["hash_b"], dtype=np.uint64)
        drop = np.flatnonzero(c["dropped"])
        surv = c["survivor"][drop]
        dist = dd.popcount(h[drop] ^ h[surv])
        m = self.config.max_distance
        details = [
            f'{{"cluster_size": {s}, "distance": {d}, "max_distance": {m}}}'
            for d, s in zip(dist.tolist(), c["size"][drop].tolist())
        ]
        return dd.decisions(c["key"][drop], f"duplicate_{self.column}", details, c["key"][surv])


def _bucket(bval: np.ndarray, buckets: int) -> np.ndarray:
    """Spread band values over ``buckets`` (Fibonacci hashing), so skewed
    band values still give balanced groups."""
    mixed = (np.asarray(bval, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (mixed % np.uint64(buckets)).astype(np.int64)
