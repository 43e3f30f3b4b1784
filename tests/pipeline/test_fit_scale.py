"""Issue 30, the fit's parts that grew with the dataset, in process:

* centroids as data: ``learn`` returns ``dedup_semantic``'s centroids
  (``Learned.arrays``), which the fit writes to files in the work folder,
  read by each task; the stage and what was learnt, as every later step
  gets them (its arguments), stay small, and the decisions are those of the
  in-process fit, which hands the centroids over in memory;
* two-level assignment: probing every coarse cell is the exact nearest
  cell, and with the default probes the decisions stay within the recall
  ``docs/scale.md`` states of assigning every row to every centroid."""

import pickle

import numpy as np

from pairforge.manifests import layout
from pairforge.pipeline.fit import Launcher
from pairforge.pipeline.local import fit_global
from pairforge.stages.base import GlobalStage, object_array
from pairforge.stages.common.knn import coarse_cells, nearest_cells, nearest_cells_two_level, spherical_kmeans
from pairforge.stages.dedup_semantic import TWO_LEVEL_CELLS, Config, SemanticDedupStage
from tests.shardkit import fit_on_ray
from tests.stages.test_dedup_semantic import embedded


class RecordingLauncher(Launcher):
    """The in-process launcher, noting the pickled size of the stage each
    step is handed, and of what was learnt (``learned``)."""

    def __init__(self):
        self.stage_bytes: list[tuple[str, int]] = []
        self.learned_bytes: list[tuple[str, int]] = []

    def _note(self, fn, args, kwargs):
        stage = next((a for a in (*args, *kwargs.values()) if isinstance(a, GlobalStage)), None)
        if stage is not None:
            self.stage_bytes.append((fn.__name__, len(pickle.dumps(stage))))
        if "learned" in kwargs or len(args) > 2:
            self.learned_bytes.append((fn.__name__, len(pickle.dumps(kwargs.get("learned", args[2:])))))

    def map(self, fn, items, **kwargs):
        self._note(fn, (), kwargs)
        return super().map(fn, items, **kwargs)

    def call(self, fn, *args, **kwargs):
        self._note(fn, args, kwargs)
        return super().call(fn, *args, **kwargs)

    def shuffle(self, emit, reduce, items, **kwargs):
        self._note(emit, (), kwargs)
        return super().shuffle(emit, reduce, items, **kwargs)


def _shard_keys(rows: dict, per_shard: int = 1000) -> dict:
    n = len(rows["key"])
    order = np.argsort(rows["key"].astype(str), kind="stable")
    rows = {c: np.asarray(v)[order] for c, v in rows.items()}
    rows["key"] = object_array([f"{i // per_shard:05d}{i % per_shard:03d}" for i in range(n)])
    return rows


def test_centroids_are_files_read_by_tasks_not_carried_by_the_stage(tmp_path):
    rows = _shard_keys(embedded(n=6000, dim=32, seed=3))
    cfg = Config(eps=0.01, n_clusters=300, kmeans_iters=5)  # >= TWO_LEVEL_CELLS: coarse cells too
    launcher = RecordingLauncher()
    got = fit_on_ray(SemanticDedupStage(cfg), rows, tmp_path, width=3, launcher=launcher)
    want = fit_global(SemanticDedupStage(cfg), rows)  # the centroids in memory there
    assert len(want["key"]) > 100
    assert list(got["key"]) == list(want["key"]) and list(got["duplicate_of"]) == list(want["duplicate_of"])

    learned = list((layout.fit_dir(tmp_path, "dedup_semantic") / "learned").glob("*/centroids.npy"))
    assert len(learned) == 1
    centroids = np.load(learned[0], allow_pickle=False)
    assert centroids.shape == (300, 32)
    after = [(fn, size) for fn, size in launcher.stage_bytes if fn not in ("_sample_shard", "_learn")]
    assert {fn for fn, _ in after} >= {"_emit_shard", "_combine"}, launcher.stage_bytes
    assert all(size < centroids.nbytes / 10 for _, size in after), (launcher.stage_bytes, centroids.nbytes)
    assert {fn for fn, _ in launcher.learned_bytes} >= {"_emit_shard", "_combine"}, launcher.learned_bytes
    assert all(size < 1000 for _, size in launcher.learned_bytes), launcher.learned_bytes


def test_two_level_probing_every_coarse_cell_is_the_exact_nearest_cell():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = spherical_kmeans(x, TWO_LEVEL_CELLS, 5, 0)
    coarse, owner = coarse_cells(c)
    assert len(coarse) == 16 and owner.shape == (TWO_LEVEL_CELLS,)
    for probes in (1, 3):
        exact_ids, exact_sims = nearest_cells(x, c, probes)
        ids, sims = nearest_cells_two_level(x, c, coarse, owner, probes, coarse_probes=len(coarse))
        assert np.array_equal(ids, exact_ids) and np.allclose(sims, exact_sims)
    few, _ = nearest_cells_two_level(x, c, coarse, owner, 1, coarse_probes=1)
    assert 0.2 < np.mean(few[:, 0] == exact_ids[:, 0]) < 1.0  # one coarse cell: an approximation


def test_two_level_decisions_within_the_stated_recall_of_every_centroid():
    rows = embedded(n=20000, dim=32, seed=1, copies=0.3, noise=0.01)
    exact = fit_global(SemanticDedupStage(Config(eps=0.01, n_clusters=400, kmeans_iters=5, coarse_probes=0)), rows)
    two = fit_global(SemanticDedupStage(Config(eps=0.01, n_clusters=400, kmeans_iters=5)), rows)
    a, b = set(exact["key"]), set(two["key"])
    assert len(a) > 1000
    recall = len(a & b) / len(a)
    print(f"two-level: {len(b)} dropped, exact {len(a)}, recall {recall:.4f}, extra {len(b - a)}")
    assert recall >= 0.98 and len(b - a) <= 0.02 * len(a)
