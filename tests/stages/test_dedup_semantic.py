"""Semantic dedup on float embeddings: against brute force, on the planted
set (with a pixel stand-in embedding), determinism and Ray."""

import json

import numpy as np
import pytest

from pairforge.pipeline.local import fit_global, run_global
from pairforge.stages.base import STATUS_DROPPED, Learned, object_array, take
from pairforge.stages.common import dedup as dd
from pairforge.stages.dedup_semantic import Config, SemanticDedupStage, spherical_kmeans
from tests.planted import build_planted, evaluate, pixel_embedding, run_kind


def embedded(n=600, dim=32, seed=0, copies=0.3, noise=0.02):
    """Random directions in tight topic clusters; a share of rows is a noisy
    copy of an earlier row."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(12, dim))
    e = topics[rng.integers(0, 12, n)] + 0.6 * rng.normal(size=(n, dim))
    for i in np.flatnonzero(rng.random(n) < copies):
        if i:
            e[i] = e[rng.integers(0, i)] + noise * rng.normal(size=dim) * np.linalg.norm(e[i]) / np.sqrt(dim)
    return {
        "key": object_array([f"{i:06d}" for i in rng.permutation(n)]),
        "img_emb": e.astype(np.float32),
        "original_width": rng.integers(1, 9, n) * 32,
        "original_height": np.full(n, 32),
    }


def brute_force_dropped(rows, eps):
    e = rows["img_emb"] / np.linalg.norm(rows["img_emb"], axis=1, keepdims=True)
    a, b = np.nonzero(np.triu(e @ e.T > 1 - eps, 1))
    prio = dd.row_priority(rows, "largest")
    c = dd.cluster_pairs(rows["key"][a], rows["key"][b], prio[a], prio[b])
    return dict(zip(c["key"][c["dropped"]], c["key"][c["survivor"][c["dropped"]]]))


def test_probing_every_cluster_equals_all_pairs():
    rows = embedded()
    dec = fit_global(SemanticDedupStage(Config(n_clusters=6, probes=6, eps=0.01)), rows)
    want = brute_force_dropped(rows, 0.01)
    assert len(want) > 100
    assert dict(zip(dec["key"], dec["duplicate_of"])) == want


def test_one_probe_finds_tight_copies_and_nothing_else():
    rows = embedded(seed=1)
    want = brute_force_dropped(rows, 0.01)
    dec = fit_global(SemanticDedupStage(Config(n_clusters=12, eps=0.01)), rows)
    got = dict(zip(dec["key"], dec["duplicate_of"]))
    assert set(got) <= set(want) and len(got) >= 0.95 * len(want)
    for d, s in zip(dec["detail"], dec["duplicate_of"]):
        d = json.loads(d)
        assert d["similarity"] > 0.99 and d["eps"] == 0.01
        assert "via" not in d or d["via"] != s


def test_same_drops_for_any_input_order():
    rows = embedded(seed=2)
    first = fit_global(SemanticDedupStage(Config(n_clusters=10, eps=0.01)), rows)
    assert len(first["key"]) > 100
    for seed in (1, 2):
        perm = np.random.default_rng(seed).permutation(len(rows["key"]))
        again = fit_global(SemanticDedupStage(Config(n_clusters=10, eps=0.01)), take(rows, perm))
        for c in first:
            assert list(again[c]) == list(first[c])


def test_rows_without_a_usable_embedding_are_left_alone():
    rows = embedded(n=50, seed=3)
    rows["img_emb"][5] = 0.0
    rows["img_emb"][6] = np.nan
    rows["img_emb"][7] = rows["img_emb"][5]
    dec = fit_global(SemanticDedupStage(Config(n_clusters=4, eps=0.01)), rows)
    assert not {rows["key"][i] for i in (5, 6, 7)} & set(dec["key"])


def test_planted_set_with_a_pixel_embedding():
    rows = build_planted()
    rows["img_emb"] = np.stack([pixel_embedding(b) for b in rows["image"]])
    m = evaluate(rows, run_kind(SemanticDedupStage(Config(eps=0.01, n_clusters=8)), rows))
    assert m["precision"] == 1.0 and m["recall_reencode"] >= 0.95 and m["recall_resize"] >= 0.95


def test_run_global_marks_duplicates():
    rows = embedded(n=200, seed=4)
    n = len(rows["key"])
    for c, v in (("status", "ok"), ("stage", ""), ("reason", ""), ("detail", "")):
        rows[c] = object_array([v] * n)
    stage = SemanticDedupStage(Config(n_clusters=4, eps=0.01))
    out = run_global(stage, stage.process_batch(rows))
    dropped = out["status"] == STATUS_DROPPED
    assert dropped.sum() > 20 and set(out["reason"][dropped]) == {"duplicate_semantic"}
    assert set(out["duplicate_of"][dropped]) <= set(out["key"][~dropped])


def test_kmeans_is_deterministic_and_unit_length():
    x = np.random.default_rng(5).normal(size=(300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c1, c2 = spherical_kmeans(x, 7, 10, 0), spherical_kmeans(x, 7, 10, 0)
    assert np.array_equal(c1, c2) and np.allclose(np.linalg.norm(c1, axis=1), 1, atol=1e-5)
    assert len(spherical_kmeans(x[:3], 7, 10, 0)) == 3


def test_bucket_rows_need_learn():
    rows = embedded(n=20)
    with pytest.raises(RuntimeError, match="learn"):
        SemanticDedupStage(Config()).bucket_rows(rows, Learned())
    stage = SemanticDedupStage(Config(n_clusters=3))
    assert set(stage.bucket_rows(rows, stage.learn(rows))["bucket"]) <= {0, 1, 2}


@pytest.mark.slow
def test_ray_fit_with_several_blocks_matches_in_process(ray_local, tmp_path):
    from tests.shardkit import fit_on_ray

    rows = embedded(n=1500, seed=6)
    local = fit_global(SemanticDedupStage(Config(n_clusters=8, eps=0.01)), rows)
    remote = fit_on_ray(SemanticDedupStage(Config(n_clusters=8, eps=0.01)), rows, tmp_path, width=3)
    assert len(local["key"]) > 200
    for c in local:
        assert list(remote[c]) == list(local[c])


def test_nearest_columns_is_the_stable_argsort_with_ties():
    from pairforge.stages.common.knn import _top_columns as nearest_columns

    rng = np.random.default_rng(3)
    for k in (1, 2, 3, 9):
        s = rng.integers(0, 4, (300, 9)).astype(np.float64)  # many ties
        assert np.array_equal(nearest_columns(s, k), np.argsort(-s, axis=1, kind="stable")[:, :k])
