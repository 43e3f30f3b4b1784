"""Helpers for the confounders tests: embeddings with known neighbours, and
a stand-in for ``clip_score`` that declares ``img_emb`` / ``text_emb`` the
way it does (jobs name it ``tests.confounder_kit:EmbedStage``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pairforge.stages.base import Batch, Column, Stage, object_array
from pairforge.stages.common import wordorder as wo


def _vec(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng(seed).normal(size=dim)


def bag_embedding(caption: str, dim: int) -> np.ndarray:
    """A text embedding that sees only the multiset of words (the failure
    Winoground measures): rewrites of a caption embed identically."""
    return sum((_vec("w:" + w, dim) for w in wo.words(caption)), np.zeros(dim)) + 1e-3 * _vec("c", dim)


@dataclass(frozen=True)
class EmbedConfig:
    dim: int = 16


class EmbedStage(Stage):
    """``text_emb``: a bag of words; ``img_emb``: one direction per caption
    meaning (its word order included) plus a little noise per key."""

    name: ClassVar[str] = "embed_test"
    Config = EmbedConfig

    def outputs(self) -> tuple[Column, ...]:
        d = (self.config.dim,)
        return (
            Column("img_emb", "vector", "float16", d, store="embeddings"),
            Column("text_emb", "vector", "float16", d, store="embeddings"),
        )

    def process_batch(self, batch: Batch) -> Batch:
        out = dict(batch)
        d = self.config.dim
        caps, keys = batch["caption"], batch["key"]
        out["text_emb"] = np.stack([bag_embedding(c, d) for c in caps]).astype(np.float16)
        img = [_vec("i:" + wo.normalize(c), d) + 0.05 * _vec("k:" + str(k), d) for c, k in zip(caps, keys)]
        out["img_emb"] = np.stack(img).astype(np.float16)
        return out


def clustered(n: int, dim: int, topics: int, spread: float, seed: int) -> np.ndarray:
    """Rows around ``topics`` random centres (real embeddings cluster like this)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim))
    return centres[rng.integers(0, topics, n)] + spread * rng.normal(size=(n, dim))


def fit_rows(n: int, dim: int = 32, seed: int = 0, captions=None, first_key: int = 0) -> Batch:
    """Fit rows for the stage: keys, captions, clustered image and text embeddings."""
    rng = np.random.default_rng(seed)
    caps = captions if captions is not None else [f"thing number {i}" for i in range(n)]
    return {
        "key": object_array([f"{first_key + i:09d}" for i in rng.permutation(n)]),
        "caption": object_array(list(caps)),
        "img_emb": clustered(n, dim, 30, 0.7, seed + 1).astype(np.float16),
        "text_emb": clustered(n, dim, 30, 0.7, seed + 2).astype(np.float16),
    }


def brute(p, s=None, bound=np.inf, group=None):
    """float64 all pairs, ties to the smaller index: (partner or -1, its similarity)."""
    p = p.astype(np.float64)
    sim = p @ p.T
    n = len(p)
    bad = np.eye(n, dtype=bool) if group is None else group[:, None] == group[None, :]
    if s is not None:
        s = s.astype(np.float64)
        bad |= s @ s.T >= bound
    sim[bad] = -np.inf
    best = np.argmax(sim, axis=1)
    return np.where(np.isfinite(sim[np.arange(n), best]), best, -1), sim[np.arange(n), best]
