"""Confounders: hard negatives linked to the pairs they confound, for every
dataset pairforge builds.

Hateful Memes made models reason across modalities with "benign
confounders" (one modality swapped so the meaning flips); Winoground showed
that CLIP-style models cannot tell the same words in another order apart.
This stage adds, for each alive pair, up to three rows to the side table
``OUT/confounders`` (references by key, no images copied, no row dropped):

* ``word_order``: the caption's words in another order that changes its
  meaning (``stages.common.wordorder``: attribute or phrase swaps). When
  the dataset holds a sample with exactly that caption, ``partner_key``
  names it, and the two make a Winoground group (two images, two captions,
  the same words); otherwise ``partner_key`` is null.
* ``swap_image``: the anchor's caption with its nearest *other* image by
  image embedding, among rows whose caption says something else (text
  similarity below ``max_text_similarity``).
* ``swap_text``: the anchor's image with the nearest other caption by text
  embedding whose image shows something else (image similarity below
  ``max_image_similarity``) and that is no paraphrase of the anchor's own
  (text similarity below ``max_text_similarity`` too; otherwise the nearest
  caption is mostly one that still describes the anchor's image).

Columns: ``anchor_key``, ``kind``, ``partner_key``, ``caption`` (the new
caption, or the one the swap pairs with the other image), ``similarity``
(of the searched embeddings; for ``word_order`` the two captions' text
similarity, NaN without a partner), ``other_similarity`` (the bounded one),
``rule``, ``group_key`` and ``split``. Groups join rows linked by
``word_order`` (the smallest key names them), and ``split`` (``train`` /
``val``) hashes the group like ``pairforge train`` does (``val_fraction`` and
``seed`` match its ``eval_fraction`` and ``seed`` defaults), so both halves of
a pair fall on one side. Anchors without a confounder of a kind are counted
in ``OUT/confounder_skips`` (``anchor_key``, ``kind``, ``reason``).

The fit (``stages.common.knn``): ``learn`` fits spherical k-means cells
(image and text spaces, ``rows_per_cell`` rows each) on a hash sample and
calibrates the margin within which a row joins more cells than its nearest,
so that ``target_recall`` of the exact partners would be found;
``bucket_rows`` puts each row in those cells (at most ``probes``) and in a
caption bucket by the hash of its word multiset (a caption and its rewrites
share it); ``reduce_bucket`` searches each cell exactly (float64 re-scoring)
for the rows whose nearest cell it is and joins rewrites to captions;
``combine`` keeps each row's best answer, links the groups and writes the
tables. Place the stage after every filter (last before ``shard``): a
partner a later stage dropped fails ``manifest verify``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import ClassVar

import numpy as np

from pairforge.stages.base import Batch, FitResult, GlobalStage, Learned, Resources, batch_len, concat, object_array
from pairforge.stages.common import dedup as dd
from pairforge.stages.common import knn
from pairforge.stages.common import wordorder as wo
from pairforge.stages.options import options

KINDS = ("word_order", "swap_image", "swap_text")
#: rows of the sample k-means sees per cell (faiss's default), and the fewest it fits a cell on
KMEANS_ROWS_PER_CELL, KMEANS_MIN_ROWS_PER_CELL = 256, 40
TABLE, SKIPS = "confounders", "confounder_skips"
_OUT = ("anchor_key", "kind", "partner_key", "caption", "similarity", "other_similarity", "rule", "reason")


@options
class Config:
    #: which confounders to make
    kinds: tuple[str, ...] = KINDS
    #: the caption column (word_order confounders reorder its words)
    caption_column: str = "caption"
    #: the image embedding column (``clip_score``'s ``img_emb``)
    image_column: str = "img_emb"
    #: the caption embedding column (``clip_score``'s ``text_emb``)
    text_column: str = "text_emb"
    #: two captions less similar than this say different things (swap_image's bound, and
    #: swap_text's upper limit); per model: measure on a first run's ``other_similarity``
    max_text_similarity: float = 0.85
    #: swap_text: the partner's image must be less similar than this (it shows something else)
    max_image_similarity: float = 0.85
    #: k-means cells per space; 0: the dataset's swappable rows / ``rows_per_cell`` (the rows are
    #: estimated from the hash sample), at most the sample's / ``KMEANS_MIN_ROWS_PER_CELL``
    n_clusters: int = 0
    #: the cost of the search grows with the cell size, that of sorting rows into cells with the
    #: cell count: ~2,000 suits a CPU, ~20,000 a GPU (``bench/confounders.py``)
    rows_per_cell: int = 2000
    #: the most cells a row joins: its nearest, and those within the calibrated margin of it
    probes: int = 16
    #: the share of partners the search should find: ``learn`` measures, on the sample, how far
    #: beyond its nearest cell a row must join to reach it (``knn.calibrate``); 0: every row joins
    #: exactly ``probes`` cells
    target_recall: float = 0.98
    #: sample rows whose exact partner the calibration looks up
    calibration_queries: int = 2000
    #: each row looks for its partner in its ``query_probes`` nearest cells (<= probes); 1 needs no
    #: merge across cells, more buys a little recall (``bench/confounders.py``) for more work
    query_probes: int = 1
    #: Lloyd iterations of each space's k-means fit
    kmeans_iters: int = 20
    #: rows of the hash sample the cells and the calibration are fitted on
    fit_sample: int = 100_000
    #: buckets of the caption join; 0: as many as the cells of both spaces
    caption_buckets: int = 0
    #: share of confounder groups put in the ``val`` split (``pairforge train``'s ``eval_fraction``)
    val_fraction: float = 0.1
    #: seed of the k-means fits and of the train/val split (``pairforge train``'s ``seed``)
    seed: int = 0
    #: the search inside a cell: ``cpu`` (numpy), ``auto`` (a GPU where the task sees one), ``cuda``
    device: str = "cpu"
    #: longer captions get no word_order confounder
    max_words: int = 40

    def __post_init__(self):
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds: expected some of {KINDS}, got {self.kinds}")
        for name in ("max_text_similarity", "max_image_similarity"):
            if not -1.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a cosine in (-1, 1], got {getattr(self, name)}")
        if self.probes < 1 or self.n_clusters < 0 or self.rows_per_cell < 1:
            raise ValueError("probes and rows_per_cell must be >= 1, n_clusters >= 0")
        if not 0.0 <= self.target_recall <= 1.0:
            raise ValueError(f"target_recall: expected a share in [0, 1], got {self.target_recall}")
        if not 1 <= self.query_probes <= self.probes:
            raise ValueError(f"query_probes: expected 1..probes ({self.probes}), got {self.query_probes}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction: expected a share in [0, 1], got {self.val_fraction}")


def split_of(group: str, fraction: float, seed: int) -> str:
    """``val`` for a share ``fraction`` of groups by hash (``trainer.data.is_held_out``'s rule)."""
    digest = hashlib.sha1(f"{seed}:{group}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < fraction else "train"


def key_hashes(keys) -> np.ndarray:
    return np.array([_hash(str(k)) for k in keys], dtype=np.uint64)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class ConfounderStage(GlobalStage):
    name: ClassVar[str] = "confounders"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.fit_columns = tuple(dict.fromkeys(("key", c.caption_column, c.image_column, c.text_column)))
        self.sample_rows = c.fit_sample

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4096)

    def side_tables(self) -> dict[str, tuple[str, ...]]:
        return {TABLE: ("anchor_key", "partner_key", "group_key"), SKIPS: ("anchor_key",)}

    def process_batch(self, batch: Batch) -> Batch:
        return dict(batch)

    # ---------------------------------------------------------- the fit

    def _swaps(self) -> bool:
        return any(k in self.config.kinds for k in ("swap_image", "swap_text"))

    def _embeddings(self, rows: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit image and text rows, and which rows can take part in a swap."""
        img, ok_i = knn.unit_rows(rows[self.config.image_column])
        txt, ok_t = knn.unit_rows(rows[self.config.text_column])
        has_caption = np.array([bool(wo.words(c)) for c in rows[self.config.caption_column]], dtype=bool)
        return img, txt, ok_i & ok_t & has_caption

    def learn(self, sample: Batch) -> Learned:
        """Per space searched (``image``, ``text``): its k-means cells
        (``arrays["cells_<space>"]``), the margin within which a row joins
        more cells than its nearest (``values["margins"][space]``) and what
        the calibration found on the sample (``values["calibration"]``)."""
        if not self._swaps() or not batch_len(sample):
            return Learned()
        order = np.argsort(dd.str_keys(sample["key"]), kind="stable")
        sample = {k: v[order] for k, v in sample.items()}
        img, txt, ok = self._embeddings(sample)
        if not ok.any():
            return Learned()
        c = self.config
        hashes = key_hashes(sample["key"])
        rows = int(ok.sum()) * self._population(hashes) / len(hashes)  # the dataset's swappable rows
        k = c.n_clusters or min(
            knn.auto_cells(int(rows), c.rows_per_cell), -(-int(ok.sum()) // KMEANS_MIN_ROWS_PER_CELL)
        )
        # k-means needs a few hundred rows a cell (faiss's default: 256): the smallest key hashes
        pick = np.flatnonzero(ok)
        pick = np.sort(pick[np.argsort(hashes[pick], kind="stable")[: k * KMEANS_ROWS_PER_CELL]])
        _, group = np.unique([wo.normalize(x) for x in sample[c.caption_column][ok]], return_inverse=True)
        # swap_image searches image embeddings, swap_text text embeddings, each with its bounds
        spaces = {"image": (img, txt, c.max_text_similarity, np.inf, c.seed),
                  "text": (txt, img, c.max_image_similarity, c.max_text_similarity, c.seed + 1)}  # fmt: skip
        cells, margins, calibration = {}, {}, {}
        for space, (p, s, bound, top, seed) in spaces.items():
            if f"swap_{space}" not in c.kinds:
                continue
            cells[f"cells_{space}"] = knn.spherical_kmeans(p[pick], k, c.kmeans_iters, seed, c.device)
            if c.target_recall > 0:
                cal = knn.calibrate(
                    p[ok], cells[f"cells_{space}"], c.probes, c.target_recall, c.query_probes, s[ok], bound, group,
                    top, c.device, c.calibration_queries, seed,
                )  # fmt: skip
                margins[space] = float(cal.margin)
                calibration[space] = {"recall": float(cal.recall), "cells_per_row": float(cal.cells_per_row)}
        return Learned({"margins": margins, "calibration": calibration}, cells)

    def _population(self, hashes: np.ndarray) -> float:
        """Alive rows in the dataset, from the hash sample: all of them when
        it is short of ``fit_sample``, else (the runner's sample holds the
        smallest key hashes) ``m`` hashes below ``h`` of ``2**64`` say
        about ``m * 2**64 / h`` rows."""
        if len(hashes) < self.config.fit_sample:
            return float(len(hashes))
        return max(float(len(hashes)), len(hashes) * 2.0**64 / (float(hashes.max()) + 1.0))

    @staticmethod
    def _offsets(learned: Learned) -> tuple[int, int, int]:
        """First bucket of the image cells, the text cells and the caption buckets."""
        n_img = len(learned.arrays.get("cells_image", ()))
        n_txt = len(learned.arrays.get("cells_text", ()))
        return 0, n_img, n_img + n_txt

    def _caption_buckets(self, learned: Learned) -> int:
        _, _, base = self._offsets(learned)
        return self.config.caption_buckets or max(1, base)

    def bucket_rows(self, rows: Batch, learned: Learned) -> Batch:
        c = self.config
        keys = dd.str_keys(rows["key"])
        caps = object_array([str(x) if x is not None else "" for x in rows[c.caption_column]])
        img_raw = np.asarray(rows[c.image_column])
        txt_raw = np.asarray(rows[c.text_column])
        img, txt, ok = self._embeddings(rows)
        o_img, o_txt, o_cap = self._offsets(learned)
        parts = []  # (row indices, bucket, home)
        m = self._caption_buckets(learned)
        parts.append(
            (np.arange(len(keys)), np.array([o_cap + _hash(wo.bag(x)) % m for x in caps]), np.ones(len(keys), bool))
        )
        for space, emb, base in (("image", img, o_img), ("text", txt, o_txt)):
            if f"cells_{space}" not in learned.arrays:
                continue
            idx = np.flatnonzero(ok)
            near, sims = knn.nearest_cells(emb[idx], learned.arrays[f"cells_{space}"], c.probes, c.device)
            joined = knn.members(sims, learned.values["margins"].get(space, np.inf), c.query_probes)
            home = np.zeros(near.shape, dtype=bool)
            home[:, : c.query_probes] = True  # the cells the row looks in
            parts.append((np.repeat(idx, joined.sum(axis=1)), base + near[joined], home[joined]))
        at = np.concatenate([p[0] for p in parts])
        return {
            "bucket": np.concatenate([p[1] for p in parts]).astype(np.int64),
            "key": keys[at],
            "caption": caps[at],
            "home": np.concatenate([p[2] for p in parts]),
            "img": img_raw[at],
            "txt": txt_raw[at],
            "swappable": ok[at],
        }

    def reduce_bucket(self, rows: Batch, learned: Learned) -> Batch:
        keys, first = np.unique(dd.str_keys(rows["key"]), return_index=True)  # key order: ties go to the smaller key
        rows = {k: np.asarray(v)[first] for k, v in rows.items()}
        _, o_txt, o_cap = self._offsets(learned)
        bucket = int(rows["bucket"][0])
        if bucket >= o_cap:
            return self._join(keys, rows)
        c = self.config
        if bucket < o_txt:
            return self._search(keys, rows, "swap_image", "img", "txt", c.max_text_similarity)
        # the nearest caption that still says something else (not a paraphrase), of an image that differs
        return self._search(keys, rows, "swap_text", "txt", "img", c.max_image_similarity, c.max_text_similarity)

    def _search(self, keys, rows, kind, primary, secondary, bound, max_primary=np.inf) -> Batch:
        p, _ = knn.unit_rows(rows[primary])
        s, _ = knn.unit_rows(rows[secondary])
        norm = [wo.normalize(x) for x in rows["caption"]]
        _, group = np.unique(np.array(norm, dtype=object).astype(str), return_inverse=True)
        home = np.flatnonzero(rows["home"])
        best, sim_p, sim_s = knn.best_partners(p, home, s, bound, group, self.config.device, max_primary=max_primary)
        found = best >= 0
        partner = object_array([keys[b] if b >= 0 else None for b in best])
        caption = rows["caption"][np.where(found, best, 0)] if kind == "swap_text" else rows["caption"][home]
        return _rows(
            keys[home], kind, partner, object_array([c if f else "" for c, f in zip(caption, found)]),
            sim_p, sim_s, "", object_array(["" if f else "no_partner" for f in found]),
        )  # fmt: skip

    def _join(self, keys, rows) -> Batch:
        """The caption buckets: each row once. Rewrites joined to the captions
        of the bucket; skips of rows that cannot take part in a swap."""
        c = self.config
        out = []
        swappable = np.asarray(rows["swappable"], dtype=bool)
        for kind in ("swap_image", "swap_text"):
            if kind in c.kinds and (~swappable).any():
                lost = np.flatnonzero(~swappable)
                why = ["empty_caption" if not wo.words(rows["caption"][i]) else "no_embedding" for i in lost]
                out.append(_rows(keys[lost], kind, None, "", np.nan, np.nan, "", object_array(why)))
        if "word_order" not in c.kinds:
            return _concat(out)
        by_caption: dict[str, int] = {}
        for i, cap in enumerate(rows["caption"]):
            by_caption.setdefault(wo.normalize(cap), i)  # rows are in key order: the smallest key
        txt, ok_t = knn.unit_rows(rows["txt"])
        img, ok_i = knn.unit_rows(rows["img"])
        rec = {k: [] for k in _OUT}
        for i, cap in enumerate(rows["caption"]):
            found, why = wo.rewrites(cap, c.max_words)
            pick, partner = (found[0], None) if found else (None, None)
            for r in found:
                j = by_caption.get(wo.normalize(r.caption))
                if j is not None and j != i:
                    pick, partner = r, j
                    break
            sim = other = np.nan
            if partner is not None and ok_t[i] and ok_t[partner]:
                sim = float(txt[i].astype(np.float64) @ txt[partner].astype(np.float64))
            if partner is not None and ok_i[i] and ok_i[partner]:
                other = float(img[i].astype(np.float64) @ img[partner].astype(np.float64))
            for col, v in zip(_OUT, (keys[i], "word_order", keys[partner] if partner is not None else None,
                                     pick.caption if pick else "", sim, other, pick.rule if pick else "", why)):  # fmt: skip
                rec[col].append(v)
        out.append(
            _rows(
                *(
                    object_array(rec[k]) if k not in ("similarity", "other_similarity") else np.array(rec[k])
                    for k in _OUT
                )
            )
        )
        return _concat(out)

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        if not batch_len(reduced):
            return FitResult()
        c = self.config
        anchor = dd.str_keys(reduced["anchor_key"])
        kind = np.asarray(reduced["kind"], dtype=object).astype(str)
        # per (anchor, kind) the best answer over the cells it looked in: found, similarity, partner key
        missing = np.array([p is None for p in reduced["partner_key"]])
        partner = np.array(["" if p is None else str(p) for p in reduced["partner_key"]])
        sim = np.nan_to_num(np.asarray(reduced["similarity"], dtype=np.float64), nan=-np.inf)
        order = np.lexsort((partner, -sim, missing & (kind != "word_order"), [KINDS.index(k) for k in kind], anchor))
        r = {k: np.asarray(v)[order] for k, v in reduced.items()}
        anchor, kind = anchor[order], kind[order]
        first = np.r_[True, (anchor[1:] != anchor[:-1]) | (kind[1:] != kind[:-1])]
        r = {k: v[first] for k, v in r.items()}
        anchor, kind = anchor[first], kind[first]
        skip = np.asarray(r["reason"], dtype=object) != ""
        table = {k: v[~skip] for k, v in r.items() if k != "reason"}
        group = _groups(anchor[~skip], table["partner_key"], table["kind"])
        table["group_key"] = group
        table["split"] = object_array([split_of(g, c.val_fraction, c.seed) for g in group])
        skips = {"anchor_key": r["anchor_key"][skip], "kind": r["kind"][skip], "reason": r["reason"][skip]}
        # counts per kind made and per kind and reason skipped, for the manifest's fit entry
        counters = Counter(f"made:{k}" for k in table["kind"])
        counters.update(f"skipped:{k}:{why}" for k, why in zip(skips["kind"], skips["reason"]))
        for space in ("image", "text"):  # the search's cells and what calibration promised (per mille)
            if f"cells_{space}" not in learned.arrays:
                continue
            counters[f"search:{space}:cells"] = len(learned.arrays[f"cells_{space}"])
            cal = learned.values["calibration"].get(space)
            if cal is not None:
                counters[f"search:{space}:sample_recall_permille"] = int(round(1000 * cal["recall"]))
                counters[f"search:{space}:cells_per_row_permille"] = int(round(1000 * cal["cells_per_row"]))
        return FitResult(tables={TABLE: table, SKIPS: skips}, counters=dict(sorted(counters.items())))


def _groups(anchor: np.ndarray, partner: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Per table row: the smallest key of its anchor's word_order component."""
    linked = np.array([k == "word_order" and p is not None for k, p in zip(kind, partner)], dtype=bool)
    nodes, inv = np.unique(np.concatenate([anchor, dd.str_keys(partner[linked].astype(str))]), return_inverse=True)
    a = inv[: len(anchor)]
    b = inv[len(anchor) :]
    labels = dd.components(a[linked], b, len(nodes))  # the smallest node index = the smallest key
    return object_array(list(nodes[labels[a]]))


def _rows(anchor, kind, partner, caption, sim, other, rule, reason) -> Batch:
    n = len(anchor)

    def col(v, dtype=object):
        if isinstance(v, np.ndarray) and v.shape[:1] == (n,):
            return v if dtype is object else v.astype(dtype)
        return object_array([v] * n) if dtype is object else np.full(n, v, dtype=dtype)

    return {
        "anchor_key": object_array(list(anchor)),
        "kind": col(kind),
        "partner_key": col(partner),
        "caption": col(caption),
        "similarity": col(sim, np.float64),
        "other_similarity": col(other, np.float64),
        "rule": col(rule),
        "reason": col(reason),
    }


def _concat(parts: list[Batch]) -> Batch:
    return concat([p for p in parts if batch_len(p)])
