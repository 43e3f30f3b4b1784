"""Exact dedup: URL normalisation, the three kinds on the planted set,
clusters across kinds, reasons, determinism, prior builds and Ray."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairforge.pipeline.local import fit_global, run_global
from pairforge.stages.base import STATUS_DROPPED, batch_len, object_array, take
from pairforge.stages.dedup_exact import Config, ExactDedupStage, normalize_url
from tests.planted import build_planted, evaluate, run_kind


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def rows_of(*specs):
    """Rows from (key, url, image-id, caption, width) tuples."""
    keys, urls, imgs, caps, widths = zip(*specs)
    return {
        "key": object_array(list(keys)),
        "url": object_array(list(urls)),
        "sha256": object_array([sha(i) if i else "" for i in imgs]),
        "caption": object_array(list(caps)),
        "original_width": np.array(widths),
        "original_height": np.full(len(keys), 100),
    }


def test_normalize_url():
    same = [
        "https://Example.COM/a/b.jpg",
        " http://example.com:80/a/b.jpg#frag",
        "https://example.com:443/a/b.jpg",
        "http://example.com/a/%62.jpg?utm_source=feed",
        "HTTPS://EXAMPLE.com./a/b.jpg",
    ]
    assert len({normalize_url(u) for u in same}) == 1
    assert normalize_url("https://x.org/p?b=2&a=1") == normalize_url("https://x.org/p?a=1&b=2")
    assert normalize_url("https://x.org") == normalize_url("https://x.org/")
    different = [
        "https://example.com/a/B.jpg",
        "https://example.com:8080/a/b.jpg",
        "https://example.com/a/b.jpg?s=1",
        "https://other.com/a/b.jpg",
        "ftp://example.com/a/b.jpg",
    ]
    assert len({normalize_url(u) for u in different + same[:1]}) == len(different) + 1
    assert normalize_url("http://[::1") == "http://[::1"  # unparseable: kept as is


def test_each_kind_on_the_planted_set():
    rows = build_planted()
    got = {k: evaluate(rows, run_kind(ExactDedupStage(Config(kinds=(k,))), rows)) for k in ("sha256", "url", "pair")}
    for m in got.values():
        assert m["precision"] == 1.0 and m["wrong_drops"] == 0
    assert got["sha256"]["recall_copy"] == 1.0 and got["sha256"]["recall_reencode"] == 0.0
    # half of the byte copies keep the caption; some copies and re-encodes come back under the same URL
    assert 0.4 < got["pair"]["recall_copy"] < 0.6
    assert got["url"]["recall_copy"] > 0.2 and got["url"]["recall_reencode"] > 0.0
    both = evaluate(rows, run_kind(ExactDedupStage(Config()), rows))
    assert both["recall_copy"] == 1.0 and both["recall_reencode"] == got["url"]["recall_reencode"]


def test_clusters_merge_across_kinds_with_the_most_specific_reason():
    rows = rows_of(
        ("a", "https://h.com/1.jpg", "img1", "cat", 100),
        ("b", "http://h.com/1.jpg#x", "img2", "dog", 300),  # same URL as a, other bytes
        ("c", "https://z.com/c.jpg", "img2", "dog", 200),  # same bytes and caption as b
        ("d", "https://y.com/d.jpg", "img2", "other", 50),  # same bytes as b
        ("e", "https://q.com/e.jpg", "img9", "cat", 999),  # alone
        ("f", "", "", "cat", 999),  # no identity at all
    )
    dec = fit_global(ExactDedupStage(Config()), rows)
    assert list(dec["key"]) == ["a", "c", "d"]
    assert list(dec["duplicate_of"]) == ["b", "b", "b"]
    assert list(dec["reason"]) == ["duplicate_url", "duplicate_pair", "duplicate_sha256"]
    detail = [json.loads(x) for x in dec["detail"]]
    assert detail[1]["match"] == ["pair", "sha256"] and detail[0]["cluster_size"] == 4


def random_rows(n, seed):
    rng = np.random.default_rng(seed)
    specs = [
        (
            f"{i:06d}",
            f"https://h{rng.integers(n)}.com/x.jpg",
            f"img{rng.integers(n)}",
            ["a", "b"][rng.integers(2)],
            int(rng.integers(1, 4)),
        )
        for i in rng.permutation(n)
    ]
    return rows_of(*specs)


def reference_dropped(rows):
    """Union of rows sharing a sha256, a normalised URL or a (sha256, caption)."""
    parent = list(range(len(rows["key"])))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    seen = {}
    for i in range(len(rows["key"])):
        ids = [
            ("sha", rows["sha256"][i]),
            ("url", normalize_url(rows["url"][i])),
            ("pair", rows["sha256"][i], rows["caption"][i]),
        ]
        for ident in ids:
            j = seen.setdefault(ident, i)
            parent[find(i)] = find(j)
    clusters = {}
    for i in range(len(rows["key"])):
        clusters.setdefault(find(i), []).append(i)
    out = {}
    for members in clusters.values():
        best = min(members, key=lambda i: (-rows["original_width"][i], rows["key"][i]))
        out.update({rows["key"][i]: rows["key"][best] for i in members if i != best})
    return out


@pytest.mark.parametrize("buckets", [1, 3, 256])
def test_fit_matches_a_reference_union_find(buckets):
    rows = random_rows(1500, seed=buckets)
    dec = fit_global(ExactDedupStage(Config(buckets=buckets)), rows)
    want = reference_dropped(rows)
    assert len(want) > 500
    assert dict(zip(dec["key"], dec["duplicate_of"])) == want


def test_a_row_linked_only_through_others_says_so():
    rows = rows_of(
        ("a", "https://h.com/1.jpg", "img1", "x", 10),
        ("b", "https://h.com/1.jpg", "img2", "y", 20),
        ("c", "https://z.com/2.jpg", "img2", "z", 900),  # survivor: shares bytes with b only
    )
    dec = fit_global(ExactDedupStage(Config()), rows)
    by_key = {
        k: (r, json.loads(d), o) for k, r, d, o in zip(dec["key"], dec["reason"], dec["detail"], dec["duplicate_of"])
    }
    assert by_key["b"][0] == "duplicate_sha256" and by_key["b"][2] == "c"
    assert by_key["a"][0] == "duplicate_url" and by_key["a"][1]["match"] == []
    assert by_key["a"][1]["linked_by"] == ["url"] and by_key["a"][2] == "c"


def test_kinds_are_configurable():
    rows = rows_of(("a", "https://h.com/1.jpg", "img1", "x", 10), ("b", "https://h.com/1.jpg", "img2", "y", 20))
    assert batch_len(fit_global(ExactDedupStage(Config(kinds=("sha256",))), rows)) == 0  # no drops: an empty batch
    assert list(fit_global(ExactDedupStage(Config(kinds=("url",))), rows)["key"]) == ["a"]
    assert ExactDedupStage(Config(kinds=("sha256",))).fit_columns == (
        "key",
        "sha256",
        "original_width",
        "original_height",
    )
    assert ExactDedupStage(Config(kinds=("url",), keep="first")).fit_columns == ("key", "url")
    with pytest.raises(ValueError, match="kinds"):
        ExactDedupStage(Config(kinds=("md5",)))


def test_same_drops_for_any_input_order():
    rows = build_planted()
    fit = {c: rows[c] for c in ExactDedupStage(Config()).fit_columns}
    first = fit_global(ExactDedupStage(Config()), fit)
    assert len(first["key"]) > 80
    for seed in (1, 2):
        again = fit_global(
            ExactDedupStage(Config()), take(fit, np.random.default_rng(seed).permutation(len(fit["key"])))
        )
        for c in first:
            assert list(again[c]) == list(first[c])


def test_run_global_sets_status_and_duplicate_of():
    rows = build_planted()
    stage = ExactDedupStage(Config())
    out = run_global(stage, stage.process_batch(rows))
    dropped = out["status"] == STATUS_DROPPED
    assert set(out["reason"][dropped]) <= {"duplicate_sha256", "duplicate_url", "duplicate_pair"}
    assert all(out["duplicate_of"][~dropped] == "") and all(out["duplicate_of"][dropped] != "")
    origin = dict(zip(out["key"], out["origin"]))
    assert all(origin[o] == origin[k] for k, o in zip(out["key"][dropped], out["duplicate_of"][dropped]))
    assert set(out["duplicate_of"][dropped]) <= set(out["key"][~dropped])  # survivors are never dropped


def test_prior_build_drops_rows_whose_identity_is_already_there(tmp_path):
    old = rows_of(("p1", "https://h.com/1.jpg", "img1", "x", 10), ("p2", "https://h.com/2.jpg", "img2", "y", 10))
    (tmp_path / "shards").mkdir()
    pq.write_table(
        pa.table({c: list(old[c]) for c in ("key", "url", "sha256", "caption")}), tmp_path / "shards" / "00000.parquet"
    )
    new = rows_of(
        ("n1", "https://other.com/a.jpg", "img1", "x", 10),  # same bytes and caption as p1
        ("n2", "http://h.com/2.jpg", "img7", "q", 10),  # same URL as p2
        ("n3", "https://new.com/3.jpg", "img3", "x", 10),  # new
    )
    for c, v in (("status", "ok"), ("stage", ""), ("reason", ""), ("detail", "")):
        new[c] = object_array([v] * 3)
    out = ExactDedupStage(Config(prior_build=str(tmp_path))).process_batch(new)
    assert list(out["reason"]) == ["duplicate_prior_build", "duplicate_prior_build", ""]
    assert list(out["duplicate_of"]) == ["p1", "p2", ""]
    assert [json.loads(d)["kind"] for d in out["detail"][:2]] == ["pair", "url"]
    only_sha = ExactDedupStage(Config(kinds=("sha256",), prior_build=str(tmp_path))).process_batch(new)
    assert list(only_sha["status"]) == ["dropped", "ok", "ok"]


@pytest.mark.slow
def test_ray_fit_with_several_blocks_matches_in_process(ray_local, tmp_path):
    from tests.shardkit import fit_on_ray

    rows = build_planted()
    stage = ExactDedupStage(Config())
    fit = {c: rows[c] for c in stage.fit_columns}
    local = fit_global(stage, fit)
    remote = fit_on_ray(ExactDedupStage(Config()), fit, tmp_path, width=3)  # 1000 rows a shard
    assert len(local["key"]) > 80
    for c in local:
        assert list(remote[c]) == list(local[c])
