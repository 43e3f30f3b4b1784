"""Semantic dedup (SemDeDup, Abbas et al. 2023) on any 2-D float embedding
column, by default the CLIP image embeddings ``img_emb`` that ``clip_score``
stores.

* ``learn``: spherical k-means on a sample of the embeddings (rows chosen
  by a hash of the key and ordered by key, so the centroids do not depend on
  the order rows arrive in).
* ``bucket_rows``: each row goes to the bucket of its nearest centroid (or its
  ``probes`` nearest, to also catch pairs split by a cluster border); with
  many clusters, in two levels (coarse centroids first, ``coarse_probes``).
  The centroids are what ``learn`` returns (``Learned.arrays``): files in
  the work folder, read by each task, not an argument that grows with the
  dataset.
* ``reduce_bucket``: all pairs of one cluster with cosine similarity
  ``> 1 - eps``, computed block by block.
* ``combine``: connected components over those pairs, one survivor per
  component by the keep policy; the others are dropped as
  ``duplicate_semantic`` with the similarity in the detail.

With ``eval_sets`` (indexes written by ``pairforge eval-index`` with the
same model as the job's ``clip_score``), a row whose embedding is within
``eps`` of an evaluation image's is dropped before the fit as
``eval_contamination``: copies that no hash catches (crops, recolourings).

``eps`` has no measured default for CLIP here (no weights are available in
this project's tests): 0.05 is a conservative start (near-copies and light
edits); the SemDeDup paper drops up to half of LAION-440M with larger
values. Tune it on your data with the ``detail.similarity`` of a first run.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np

from pairforge.stages.base import (
    Batch,
    Column,
    FitResult,
    GlobalStage,
    Learned,
    Resources,
    batch_len,
    object_array,
    ok_mask,
    reject,
)
from pairforge.stages.common import dedup as dd
from pairforge.stages.common.knn import (
    coarse_cells,
    nearest_cells,
    nearest_cells_two_level,
    spherical_kmeans,
    unit_rows,
)
from pairforge.stages.options import options

#: clusters from which rows are assigned in two levels (``coarse_probes``); below, N x k is cheap
TWO_LEVEL_CELLS = 256


@options
class Config:
    #: the embedding column (2-D float); any float embedding works
    column: str = "img_emb"
    #: pairs with cosine similarity above ``1 - eps`` are duplicates
    eps: float = 0.05
    #: k-means clusters (SemDeDup used tens of thousands for LAION-440M)
    n_clusters: int = 100
    #: each row joins its ``probes`` nearest clusters (1 = plain SemDeDup)
    probes: int = 1
    #: Lloyd iterations of the k-means fit
    kmeans_iters: int = 20
    #: rows of the sample the centroids are fitted on
    fit_sample: int = 100_000
    #: seed of the k-means initialisation (the same seed gives the same clusters)
    seed: int = 0
    #: which row of a cluster survives: ``largest``, ``first`` or ``clip_score`` (see ``common.dedup.KEEP_POLICIES``)
    keep: str = "largest"
    #: with ``n_clusters`` >= 256, a row is compared with about sqrt(n_clusters) coarse centroids,
    #: then with the clusters under its ``coarse_probes`` nearest (about N x sqrt(k) products, not
    #: N x k); 0: with every centroid
    coarse_probes: int = 8
    #: evaluation-set indexes (``pairforge eval-index``, embeddings by the job's scorer): rows
    #: within ``eps`` of one of their images are dropped as ``eval_contamination``
    eval_sets: tuple[str, ...] = ()


class SemanticDedupStage(GlobalStage):
    name: ClassVar[str] = "dedup_semantic"
    Config = Config
    #: a reduced row is one verified pair: it links its two keys
    link_columns = ("key_a", "key_b")

    def __init__(self, config: Config):
        super().__init__(config)
        if not 0.0 <= config.eps < 2.0:
            raise ValueError(f"eps: expected 0 <= eps < 2, got {config.eps}")
        for name in ("n_clusters", "probes", "kmeans_iters", "fit_sample"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(config, name)!r}")
        if config.coarse_probes < 0:
            raise ValueError(f"coarse_probes: expected >= 0, got {config.coarse_probes!r}")
        dd.check_keep(config.keep)
        self.fit_columns = dd.fit_columns_for(config.keep, config.column)
        self.sample_rows = config.fit_sample
        self._eval: tuple[np.ndarray, np.ndarray] | None = None

    def setup(self) -> None:
        if self.config.eval_sets and self._eval is None:
            self._eval = dd.read_eval_embeddings(self.config.eval_sets, self.config.column)

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4096)

    def outputs(self) -> tuple[Column, ...]:
        return (Column(dd.DUPLICATE_OF, "string", nullable=True),)

    def process_batch(self, batch: Batch) -> Batch:
        out = dict(batch)
        out[dd.DUPLICATE_OF] = object_array([""] * batch_len(batch))
        if self.config.eval_sets and batch_len(batch):
            self.setup()
            self._drop_eval(out)
        return out

    def _drop_eval(self, out: Batch) -> None:
        keys, ref = self._eval
        emb, valid = unit_rows(out[self.config.column])
        idx = np.flatnonzero(valid & ok_mask(out))
        if not len(idx) or not len(ref):
            return
        if ref.shape[1] != emb.shape[1]:
            raise ValueError(
                f"eval_sets: {self.config.column} has {emb.shape[1]} dims, the eval index {ref.shape[1]}: "
                "index the set with the job's clip_score model"
            )
        sims = emb[idx].astype(np.float32) @ ref.T
        best = sims.argmax(axis=1)
        top = sims[np.arange(len(idx)), best].astype(np.float64)
        hit = top > 1.0 - self.config.eps
        mask = np.zeros(batch_len(out), dtype=bool)
        mask[idx[hit]] = True
        where = ",".join(self.config.eval_sets)
        details = [{"kind": self.config.column, "similarity": round(float(t), 6), "eps": self.config.eps, "sets": where}
                   for t in top[hit]]  # fmt: skip
        reject(out, mask, self.name, dd.EVAL_CONTAMINATION, details)
        out[dd.DUPLICATE_OF][idx[hit]] = [str(keys[b]) for b in best[hit]]

    # ---------------------------------------------------------- global fit

    def learn(self, sample: Batch) -> Learned:
        """The k-means centroids (``centroids``) and, with many of them, the
        coarse centroids and the coarse cell of each centroid (``coarse``,
        ``coarse_of``: the two-level assignment)."""
        if not batch_len(sample):  # every row was rejected before this stage: none will be bucketed either
            return Learned()
        keys = dd.str_keys(sample["key"])
        emb, valid = unit_rows(sample[self.config.column])
        keys, emb = keys[valid], emb[valid]
        if len(keys) > self.config.fit_sample:
            pick = np.argsort(_key_hash(keys), kind="stable")[: self.config.fit_sample]
            keys, emb = keys[pick], emb[pick]
        if not len(keys):
            raise ValueError("dedup_semantic: no valid embeddings to cluster")
        order = np.argsort(keys, kind="stable")
        centroids = spherical_kmeans(emb[order], self.config.n_clusters, self.config.kmeans_iters, self.config.seed)
        arrays = {"centroids": centroids}
        if self.config.coarse_probes and len(centroids) >= TWO_LEVEL_CELLS:
            arrays["coarse"], arrays["coarse_of"] = coarse_cells(centroids, self.config.seed)
        return Learned(arrays=arrays)

    def bucket_rows(self, batch: Batch, learned: Learned) -> Batch:
        centroids = learned.arrays.get("centroids")
        if centroids is None:
            raise RuntimeError("dedup_semantic: bucket_rows needs the centroids learn() returns")
        emb, valid = unit_rows(batch[self.config.column])
        idx = np.flatnonzero(valid)
        emb = emb[idx]
        probes = min(self.config.probes, len(centroids))
        if "coarse" in learned.arrays:
            coarse = (learned.arrays["coarse"], learned.arrays["coarse_of"])
            near, _ = nearest_cells_two_level(emb, centroids, *coarse, probes, self.config.coarse_probes)
        else:
            near, _ = nearest_cells(emb, centroids, probes)  # (n, probes), float64: the same side in any batch
        rows = np.repeat(idx, probes)
        prio = dd.row_priority(batch, self.config.keep)
        return {
            "bucket": near.ravel().astype(np.int64),
            "key": dd.str_keys(batch["key"])[rows],
            "priority": prio[rows],
            "emb": np.repeat(emb, probes, axis=0),
        }

    def reduce_bucket(self, group: Batch, learned: Learned) -> Batch:
        keys, first = np.unique(dd.str_keys(group["key"]), return_index=True)
        emb = np.asarray(group["emb"], dtype=np.float32)[first]
        prio = np.asarray(group["priority"], dtype=np.float64)[first]
        cut = 1.0 - self.config.eps
        # float32 matrix products round differently with the block's shape, so
        # they only prefilter (with slack); each candidate pair is then scored
        # again row by row in float64, which makes the decision and the
        # reported similarity independent of how rows were grouped
        loose = np.float32(cut - 1e-4)
        block = max(1, (1 << 22) // max(1, len(keys)))
        a_parts, b_parts = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for lo in range(0, len(keys), block):
            i, j = np.nonzero(emb[lo : lo + block] @ emb.T > loose)
            i = i + lo
            upper = j > i
            a_parts.append(i[upper])
            b_parts.append(j[upper])
        a, b = np.concatenate(a_parts), np.concatenate(b_parts)
        sim = (emb[a].astype(np.float64) * emb[b].astype(np.float64)).sum(axis=1)
        hit = sim > cut
        a, b = a[hit], b[hit]
        return {
            "key_a": keys[a],
            "key_b": keys[b],
            "prio_a": prio[a],
            "prio_b": prio[b],
            "similarity": sim[hit],
        }

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        if not reduced or not batch_len(reduced):
            return dd.no_decisions()
        c = dd.cluster_pairs(reduced["key_a"], reduced["key_b"], reduced["prio_a"], reduced["prio_b"])
        sim = np.asarray(reduced["similarity"], dtype=np.float64)
        ends = np.concatenate([c["a"], c["b"]])
        other = np.concatenate([c["b"], c["a"]])
        sims = np.concatenate([sim, sim])
        # per node: its most similar neighbour, preferring the survivor itself
        direct = other == c["survivor"][ends]
        order = np.lexsort((c["key"][other], -sims, ~direct, ends))
        ends, other, sims, direct = ends[order], other[order], sims[order], direct[order]
        first = np.r_[True, ends[1:] != ends[:-1]]
        best_other = np.empty(len(c["key"]), dtype=np.int64)
        best_sim = np.empty(len(c["key"]))
        is_direct = np.zeros(len(c["key"]), dtype=bool)
        best_other[ends[first]], best_sim[ends[first]], is_direct[ends[first]] = (
            other[first],
            sims[first],
            direct[first],
        )
        drop = np.flatnonzero(c["dropped"])
        details = []
        for i in drop:
            d = {"similarity": round(float(best_sim[i]), 6), "cluster_size": int(c["size"][i]), "eps": self.config.eps}
            if not is_direct[i]:
                d["via"] = str(c["key"][best_other[i]])
            details.append(d)
        return dd.decisions(c["key"][drop], "duplicate_semantic", details, c["key"][c["survivor"][drop]])


def _key_hash(keys: np.ndarray) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "big") for k in keys], dtype=np.uint64
    )
