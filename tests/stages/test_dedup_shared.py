"""The shared dedup machinery (stages/common/dedup.py) against plain reference
implementations: BFS components, brute-force pairs and Hamming search."""

from collections import deque

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pairforge.stages.common import dedup as dd


def bfs_components(a, b, n):
    adj = [[] for _ in range(n)]
    for x, y in zip(a, b):
        adj[x].append(y)
        adj[y].append(x)
    label = [-1] * n
    for s in range(n):
        if label[s] >= 0:
            continue
        comp, q = [s], deque([s])
        label[s] = s
        while q:
            for y in adj[q.popleft()]:
                if label[y] < 0:
                    label[y] = s
                    comp.append(y)
                    q.append(y)
        m = min(comp)
        for x in comp:
            label[x] = m
    return np.array(label)


@pytest.mark.parametrize("seed", range(5))
def test_components_match_bfs(seed):
    rng = np.random.default_rng(seed)
    n = 300
    e = rng.integers(0, n, size=(rng.integers(50, 400), 2))
    # a long chain in adversarial order too
    chain = np.stack([np.arange(200, 299), np.arange(201, 300)], axis=1)[::-1]
    e = np.concatenate([e, chain])
    assert np.array_equal(dd.components(e[:, 0], e[:, 1], n), bfs_components(e[:, 0], e[:, 1], n))


def test_components_without_edges_are_singletons():
    assert np.array_equal(dd.components(np.zeros(0), np.zeros(0), 4), np.arange(4))


@pytest.mark.parametrize("max_pairs", [1, 7, 4_000_000])
def test_pairs_in_runs_lists_every_pair_once(max_pairs):
    rng = np.random.default_rng(1)
    runs = np.sort(rng.integers(0, 40, size=300))
    got = set()
    for i, j in dd.pairs_in_runs(runs, max_pairs=max_pairs):
        pairs = list(zip(i.tolist(), j.tolist()))
        assert len(set(pairs)) == len(pairs)
        assert not got & set(pairs)
        got |= set(pairs)
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if runs[i] == runs[j]}
    assert got == want


def test_band_layout_covers_64_bits_and_near_pairs_share_a_band():
    rng = np.random.default_rng(2)
    for d in (0, 1, 2, 3, 5, 9):
        layout = dd.band_layout(d)
        assert len(layout) == d + 1 and sum(w for _, w in layout) == 64
        assert min(s for s, _ in layout) == 0
        h = rng.integers(0, 2**63, size=500, dtype=np.int64).astype(np.uint64) << np.uint64(1)
        flips = np.zeros(500, dtype=np.uint64)
        for i in range(500):
            for bit in rng.choice(64, size=d, replace=False):
                flips[i] |= np.uint64(1) << np.uint64(int(bit))
        assert np.all(dd.popcount(flips) == d)
        assert np.all((dd.band_values(h, layout) == dd.band_values(h ^ flips, layout)).any(axis=1))
        assert np.all(dd.first_equal_band(flips, layout) < len(layout))


def test_hex_round_trip_keeps_imagehash_bit_order():
    im = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64), dtype=np.uint8))
    h = imagehash.phash(im)
    u = dd.hex_to_u64([str(h)])
    assert int(u[0]) == int(str(h), 16)
    assert dd.u64_to_hex(u)[0] == str(h)
    # the first (top-left DCT) bit is the most significant
    assert bool(h.hash.flatten()[0]) == bool(int(u[0]) >> 63)


def test_keep_rank_prefers_largest_then_smallest_key():
    keys = np.array(["003", "001", "002", "000"], dtype=object)
    area = np.array([10, 50, 50, 5])
    rank = dd.keep_rank(keys, area)
    assert list(keys[np.argsort(rank)]) == ["001", "002", "003", "000"]
    assert list(keys[np.argsort(dd.keep_rank(keys, np.zeros(4)))]) == ["000", "001", "002", "003"]


def test_row_priority_treats_missing_sizes_as_zero():
    batch = {
        "key": np.array(["a", "b", "c"]),
        "original_width": np.array([10, -1, 4]),
        "original_height": np.array([3, 8, np.nan]),
    }
    for policy, want in (("largest", [30, 0, 0]), ("first", [0, 0, 0])):
        prio = dd.row_priority(batch, policy)
        assert prio.dtype == np.float64 and list(prio) == want


def test_clip_score_policy_keeps_the_best_score_nan_worst_ties_by_key():
    keys = np.array(["e", "d", "c", "b", "a"], dtype=object)
    batch = {"key": keys, "clip_score": np.array([0.1, 0.3, np.nan, 0.3, np.nan], dtype=np.float32)}
    assert dd.fit_columns_for("clip_score", "phash") == ("key", "phash", "clip_score")
    prio = dd.row_priority(batch, "clip_score")
    assert prio.dtype == np.float64 and not np.isnan(prio).any()  # NaN scores get an ordinary (lowest) priority
    assert list(keys[np.argsort(dd.keep_rank(keys, prio))]) == ["b", "d", "e", "a", "c"]
    # one cluster: the best score survives, ties to the smaller key; NaN loses to any score
    c = dd.cluster_pairs(keys[:-1], keys[1:], prio[:-1], prio[1:])
    assert list(c["key"][c["survivor"]]) == ["b"] * 5
    nan_vs_low = dd.cluster_pairs(
        ["a"], ["z"], [prio[4]], [dd.row_priority({"key": ["z"], "clip_score": [-5.0]}, "clip_score")[0]]
    )
    assert list(nan_vs_low["key"][nan_vs_low["dropped"]]) == ["a"]
    only_nan = dd.cluster_pairs(["c"], ["a"], [prio[2]], [prio[4]])
    assert list(only_nan["key"][only_nan["dropped"]]) == ["c"]


def test_hamming_index_matches_brute_force():
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 2**63, size=400, dtype=np.int64).astype(np.uint64)
    keys = np.array([f"{i:05d}" for i in range(400)], dtype=object)
    q = stored[rng.integers(0, 400, size=300)].copy()
    for i in range(300):  # 0..4 flipped bits
        for bit in rng.choice(64, size=rng.integers(0, 5), replace=False):
            q[i] ^= np.uint64(1) << np.uint64(int(bit))
    q = np.concatenate([q, rng.integers(0, 2**63, size=50, dtype=np.int64).astype(np.uint64)])
    for d in (1, 3):
        best, dist = dd.HammingIndex(stored, keys, d).nearest(q)
        full = dd.popcount(q[:, None] ^ stored[None, :])
        for i in range(len(q)):
            m = full[i].min()
            if m <= d:
                assert dist[i] == m and best[i] == np.flatnonzero(full[i] == m)[0]
            else:
                assert best[i] == -1 and dist[i] == -1


def test_read_prior_build_reads_shards_and_rejects_bad_folders(tmp_path):
    (tmp_path / "shards").mkdir()
    for s in range(2):
        pq.write_table(
            pa.table({"key": [f"{s}a", f"{s}b"], "phash": ["00ff00ff00ff00ff", ""]}),
            tmp_path / "shards" / f"0000{s}.parquet",
        )
    got = dd.read_prior_build(str(tmp_path), ("key", "phash"))
    assert list(got["key"]) == ["0a", "0b", "1a", "1b"]
    with pytest.raises(ValueError, match="no column 'sha256'"):
        dd.read_prior_build(str(tmp_path), ("key", "sha256"))
    with pytest.raises(ValueError, match="no shards"):
        dd.read_prior_build(str(tmp_path / "nowhere"), ("key",))
