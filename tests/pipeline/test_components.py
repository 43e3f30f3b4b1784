"""Issue 30: a dedup stage's ``combine`` per partition of whole connected
components (``pipeline/components.py``) decides exactly what the single
``combine`` task over every reduced row decided: the same rows dropped, the
same ``duplicate_of``, reason, detail and survivor rows, on

* graphs made to be hard for label passes (long chains of near-duplicate
  hashes in shuffled key order, stars, random graphs), against a reference
  union-find;
* the planted test set, for ``dedup_exact``, ``dedup_phash`` and
  ``dedup_semantic``;
* the scale bench's synthetic rows (``bench/scalekit.py``).

In process (``pipeline.fit.Launcher``, the runner of local jobs), with more
partitions than a laptop's run would pick so that components do cross
partitions; one test runs the same through Ray tasks."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pairforge.manifests import layout
from pairforge.pipeline import components, fitstore
from pairforge.pipeline.fit import Launcher, run_fit
from pairforge.pipeline.local import map_stage
from pairforge.stages.base import object_array
from pairforge.stages.common import dedup as dd
from pairforge.stages.dedup_exact import Config as ExactConfig
from pairforge.stages.dedup_exact import ExactDedupStage
from pairforge.stages.dedup_phash import Config as PhashConfig
from pairforge.stages.dedup_phash import PerceptualDedupStage
from pairforge.stages.dedup_semantic import Config as SemanticConfig
from pairforge.stages.dedup_semantic import SemanticDedupStage
from tests.planted import build_planted, pixel_embedding
from tests.shardkit import lay_out


class Partitioned(Launcher):
    """The in-process launcher with a fixed partition count."""

    def __init__(self, parts: int):
        self.parts = parts

    def partitions(self, spec, shards):
        return self.parts


def decisions_of(make_stage, rows: dict, out, width: int, launcher, single: bool) -> tuple[dict, dict]:
    """Every decision row of a fit (``key``-sorted lists per column) and its mark."""
    stage = make_stage()
    spec, shard_ids = lay_out(rows, out, stage, width)
    info = run_fit(launcher, spec, stage, shard_ids, len(rows["key"]), single_combine=single)
    files = sorted((layout.fit_dir(out, stage.name) / "decisions").glob("*.parquet"))
    table = {}
    for f in files:
        for c, v in pq.read_table(f).to_pydict().items():
            table.setdefault(c, []).extend(v)
    order = np.argsort(np.asarray(table.get("key", []), dtype=str), kind="stable")
    return {c: [v[i] for i in order] for c, v in table.items()}, info


def assert_same_decisions(make_stage, rows, tmp_path, width, parts=7, launcher=None):
    """The decisions of the fit by component (``parts`` partitions) against the single task's."""
    want, single = decisions_of(make_stage, rows, tmp_path / "single", width, Launcher(), single=True)
    launcher = launcher if launcher is not None else Partitioned(parts)
    got, split = decisions_of(make_stage, rows, tmp_path / "split", width, launcher, single=False)
    assert "components" in split and "components" not in single
    assert set(want) == set(got)
    for c in want:
        assert got[c] == want[c], c
    assert split["dropped"] == single["dropped"] and split["decisions"] == single["decisions"]
    return want, split


# ----------------------------------------------------------- hard graphs


def chain_hashes(n: int, seed: int) -> np.ndarray:
    """``n`` 64-bit hashes, each 2 bits from the previous and far from all
    others: one long path graph for ``max_distance`` 2."""
    rng = np.random.default_rng(seed)
    h = [int(rng.integers(0, 2**63))]
    for i in range(1, n):
        h.append(h[-1] ^ (1 << (2 * i % 64)) ^ (1 << ((2 * i + 1) % 64)))
    return np.array(h, dtype=np.uint64)


def graph_rows(seed: int) -> dict:
    """Chains of up to 300 near-duplicates, stars and singletons, keys shuffled."""
    rng = np.random.default_rng(seed)
    hashes = [chain_hashes(300, seed), chain_hashes(40, seed + 1)]
    for s in range(30):
        hashes.append(chain_hashes(int(rng.integers(2, 12)), seed + 2 + s))
    centre = int(rng.integers(0, 2**63))
    hashes.append(np.array([centre] + [centre ^ (1 << b) for b in range(0, 64, 3)], dtype=np.uint64))
    hashes.append(rng.integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64))
    h = np.concatenate(hashes)
    n = len(h)
    perm = rng.permutation(n)  # node order unrelated to chain order: many passes for a naive propagation
    return {
        "key": object_array([f"{i // 100:05d}{i % 100:02d}" for i in perm]),
        "phash": object_array([f"{int(x):016x}" for x in h]),
        "original_width": rng.integers(10, 20, n),
        "original_height": np.full(n, 10),
    }


def reference_survivors(rows: dict, max_distance: int) -> dict[str, str]:
    """Dropped key -> survivor by brute force: every pair within the distance, union-find."""
    h = dd.hex_to_u64(rows["phash"])
    i, j = np.triu_indices(len(h), 1)
    close = dd.popcount(h[i] ^ h[j]) <= max_distance
    a, b = i[close], j[close]
    labels = dd.components(a, b, len(h))
    prio = np.asarray(rows["original_width"], float) * np.asarray(rows["original_height"], float)
    surv, _ = dd.survivors(labels, dd.keep_rank(np.asarray(rows["key"]).astype(str), prio))
    keys = np.asarray(rows["key"]).astype(str)
    return {keys[x]: keys[s] for x, s in enumerate(surv) if s != x}


@pytest.mark.parametrize("parts", [2, 3, 16])
def test_long_chains_and_stars_give_the_single_task_decisions(tmp_path, parts):
    rows = graph_rows(seed=parts)
    make = lambda: PerceptualDedupStage(PhashConfig(max_distance=2, buckets_per_band=8))  # noqa: E731
    want, info = assert_same_decisions(make, rows, tmp_path, width=2, parts=parts)
    ref = reference_survivors(rows, 2)
    got = {k: s for k, r, s in zip(want["key"], want["reason"], want["duplicate_of"]) if r}
    assert got == ref
    assert len(ref) > 300
    # the 300-row chain's links are spread over every links task: it takes passes, and few of them
    assert 2 <= info["components"]["passes"] <= 20, info["components"]


def test_one_partition_runs_the_single_combine_task(tmp_path):
    rows = graph_rows(seed=4)
    make = lambda: PerceptualDedupStage(PhashConfig(max_distance=2, buckets_per_band=8))  # noqa: E731
    _, info = decisions_of(make, rows, tmp_path, 2, Partitioned(1), single=False)
    assert "components" not in info and info["dropped"] > 300


def test_node_ids_of_integers_spread_and_of_keys_hash_their_text():
    """Integer link values (dedup_exact's digest) become ids that spread over
    the partitions even when the integers do not (consecutive, or all
    multiples of the partition count); keys keep their text hash."""
    for ints in (np.arange(6000, dtype=np.uint64), np.arange(0, 6000 * 6, 6, dtype=np.int64)):
        ids = components.node_ids(ints)
        assert ids.dtype == np.uint64 and len(np.unique(ids)) == len(ints)
        per_part = np.bincount((ids % np.uint64(6)).astype(np.int64), minlength=6)
        assert per_part.min() > 800, per_part  # 1,000 each on average
        assert np.array_equal(ids, components.node_ids(ints))  # the same ids in every task
    keys = object_array(["000000001", "000000002"])
    assert list(components.node_ids(keys)) == list(fitstore.key_hashes(["000000001", "000000002"]))


def test_exact_reduced_rows_carry_only_what_combine_reads():
    stage = ExactDedupStage(ExactConfig(buckets=1))
    rows = {"kind": np.zeros(3, np.int64), "hi": np.array([5, 5, 7], np.uint64), "lo": np.array([1, 1, 2], np.uint64),
            "key": object_array(["b", "a", "c"]), "priority": np.zeros(3)}  # fmt: skip
    out = stage.reduce_bucket(rows, None)
    assert sorted(out) == ["hi", "key", "kind", "lo", "priority"] and sorted(out["key"]) == ["a", "b"]
    assert set(stage.link_columns) <= set(out)


# --------------------------------------------------------- planted set


def test_planted_set_same_decisions_for_every_dedup_stage(tmp_path):
    rows = build_planted()
    rows["img_emb"] = np.stack([pixel_embedding(b) for b in rows["image"]])
    makes = {
        "exact": lambda: ExactDedupStage(ExactConfig(buckets=8)),
        "phash": lambda: PerceptualDedupStage(PhashConfig(buckets_per_band=4)),
        "semantic": lambda: SemanticDedupStage(SemanticConfig(n_clusters=8, eps=0.01)),
    }
    for name, make in makes.items():
        done = map_stage(make(), rows)  # the per-row part: pHash from the pixels
        fit = {c: done[c] for c in make().fit_columns}
        want, _ = assert_same_decisions(make, fit, tmp_path / name, width=3, parts=5)
        assert sum(1 for r in want["reason"] if r) > 20, name


# ---------------------------------------------------- the scale bench's rows


def scale_rows(n: int, per_shard: int = 10_000) -> dict:
    from bench.scalekit import Config, SyntheticRows, plan_row

    w = len(str(per_shard - 1))
    keys = object_array([f"{i // per_shard:05d}{i % per_shard:0{w}d}" for i in range(n)])
    urls = []
    for i in range(n):
        kind, _ = plan_row(i, n)
        urls.append(f"http://synthetic.invalid/{(i * 7919 + 13) % n if kind == 'url' else i}.jpg")
    batch = {
        "key": keys,
        "url": object_array(urls),
        "caption": object_array([f"a picture {i % 5000}" for i in range(n)]),
    }
    out = SyntheticRows(Config(rows=n, samples_per_shard=per_shard)).process_batch(batch)
    out = {c: v for c, v in out.items() if c != "image"}
    out.update(status=object_array(["ok"] * n), stage=object_array([""] * n), reason=object_array([""] * n))
    return out


def test_scale_bench_rows_same_decisions(tmp_path):
    rows = scale_rows(40_000)
    makes = {
        "exact": lambda: ExactDedupStage(ExactConfig()),
        "phash": lambda: PerceptualDedupStage(PhashConfig(hash_column="synthetic_phash")),
        "semantic": lambda: SemanticDedupStage(SemanticConfig(eps=0.002, n_clusters=20, kmeans_iters=10)),
    }
    for name, make in makes.items():
        done = map_stage(make(), rows)  # dedup_phash reads the planted hash column
        fit = {c: done[c] for c in make().fit_columns}
        want, info = assert_same_decisions(make, fit, tmp_path / name, width=4, parts=6)
        dropped = sum(1 for r in want["reason"] if r)
        print(name, dropped, "dropped;", info["components"])
        assert dropped > 400, name


@pytest.mark.slow
def test_through_ray_tasks_same_decisions(ray_local, tmp_path):
    from pairforge.pipeline.plan import RayLauncher

    rows = build_planted()
    make = lambda: ExactDedupStage(ExactConfig(buckets=8))  # noqa: E731
    fit = {c: rows[c] for c in make().fit_columns}
    _, info = assert_same_decisions(make, fit, tmp_path, width=2, launcher=RayLauncher(small_fit_shards=0))
    assert info["components"]["parts"] > 1
