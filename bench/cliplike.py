"""Synthetic image and text embeddings shaped like CLIP's, for the
nearest-neighbour benchmark (``bench/confounders.py``) and the recall tests.

Why not Gaussian noise around random centres: real CLIP embeddings are
anisotropic (they sit in a narrow cone: two random images of a web crawl
have cosine ~0.4-0.5), clustered at several scales (topics, then tight
groups of near-same pictures), of low intrinsic dimension, with cluster
sizes that follow a heavy tail; a row's nearest neighbour is clearly
closer (cosine ~0.85-0.95) than the rest of its group. Isotropic noise in
512 dimensions (the benchmark's first generator) puts the neighbour at
cosine ~0.3 and every other row of its cluster at ~0.2: a cell search must
then keep whole clusters together, with nothing that says which ones to
group, which is neither what CLIP looks like nor what an index can do.

:func:`pairs` writes each row (before scaling to unit length) as

    sqrt(w_cone) mu + sqrt(w_topic) topic + sqrt(w_group) group
        + sqrt(w_local) z B_group + sqrt(w_iso) eps        (WEIGHTS)

``mu`` one direction for all rows, ``topic`` one of ``groups / 10``,
``group`` one of ``n / 5000`` groups with log-normal sizes (larger than a
cell of the search, a few 10x the mean, so cells cut through them), ``z B``
a point in the group's own 24-dimensional subspace (CLIP's intrinsic
dimension is a few tens), ``eps`` isotropic noise. The cluster count grows
with ``n`` so the neighbour is as far at 1M rows as at 30k (the search does
not get easier with ``n``). Image and text rows of one pair share the group
and half their ``z``: near images tend to have near captions, so the bound
on caption similarity does reject a share of the nearest images, as on real
data. Measured at 60k rows: nearest-neighbour cosine median 0.84 (10%:
0.81), random pairs 0.45, the same group 0.60; with 2,000 rows a cell the
nearest cell holds a row's neighbour for ~70% of rows, the two nearest
~88%: the search has borders to cross, as on real embeddings.

Generation runs in threads over fixed chunks of groups (numpy's generators
release the GIL), each with its own seed: the rows do not depend on the
thread count.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: cone, topic, group, local, isotropic: shares of a row's squared length
WEIGHTS = (0.35, 0.1, 0.15, 0.35, 0.05)
#: dimension of a group's local structure
LOCAL = 24
ROWS_PER_GROUP, GROUPS_PER_TOPIC = 5000, 10
#: share of a row's local offset the image and text sides have in common
SHARED_LOCAL = 0.5
_CHUNK = 64  # groups per generation task


def _unit(rng, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def pairs(n: int, dim: int = 512, seed: int = 0, threads: int | None = None):
    w_cone, w_topic, w_group, w_local, w_iso = WEIGHTS
    """``(image, text, group)``: ``n`` rows of float16 image and text
    embeddings (not unit length) and each row's group, rows grouped by group."""
    root = np.random.default_rng([seed, 0])
    groups = max(1, n // ROWS_PER_GROUP)
    topics = max(1, groups // GROUPS_PER_TOPIC)
    sizes = root.multinomial(n, _weights(root, groups))
    topic_of = root.integers(0, topics, groups)
    starts = np.r_[0, np.cumsum(sizes)]
    spaces = []
    for space in (1, 2):  # image, text: their own directions, the same groups
        rng = np.random.default_rng([seed, space])
        centre = (
            np.sqrt(w_cone) * _unit(rng, 1, dim)
            + np.sqrt(w_topic) * _unit(rng, topics, dim)[topic_of]
            + np.sqrt(w_group) * _unit(rng, groups, dim)
        )
        spaces.append(centre.astype(np.float32))
    img = np.empty((n, dim), dtype=np.float16)
    txt = np.empty((n, dim), dtype=np.float16)

    def chunk(lo: int) -> None:
        rng = np.random.default_rng([seed, 3, lo])
        for g in range(lo, min(lo + _CHUNK, groups)):
            a, b = starts[g], starts[g + 1]
            if a == b:
                continue
            shared = rng.standard_normal((b - a, LOCAL), dtype=np.float32)
            for out, centre in ((img, spaces[0]), (txt, spaces[1])):
                z = np.sqrt(SHARED_LOCAL) * shared + np.sqrt(1 - SHARED_LOCAL) * rng.standard_normal(
                    (b - a, LOCAL), dtype=np.float32
                )
                basis = rng.standard_normal((LOCAL, dim), dtype=np.float32) / np.sqrt(dim)
                eps = rng.standard_normal((b - a, dim), dtype=np.float32) / np.sqrt(dim)
                local = (z / np.sqrt(LOCAL)) @ basis
                out[a:b] = centre[g] + np.sqrt(w_local) * local + np.sqrt(w_iso) * eps

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        list(pool.map(chunk, range(0, groups, _CHUNK)))
    return img, txt, np.repeat(np.arange(groups), sizes)


def _weights(rng, groups: int) -> np.ndarray:
    w = rng.lognormal(0.0, 1.0, groups)
    return w / w.sum()


def blobs(n: int, dim: int = 512, seed: int = 0) -> np.ndarray:
    """The first generator: ``n / 500`` random centres, noise of twice a
    centre's spread per dimension (a neighbour at cosine ~0.3, its cluster at
    ~0.2): a stress case, not CLIP."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 500), dim), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 2.0 * rng.standard_normal((n, dim), dtype=np.float32)
    return x.astype(np.float16)
