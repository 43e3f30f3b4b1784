"""A global stage's fit never changes the stage (issue 27): what a step finds
it returns (``stages.fitting.Learned``, ``FitResult.rule``) and the next step
takes as an argument. Every global stage is fitted by the in-process fit
(``pipeline.local.fit_result``) and by the run's fit over fit files with the
in-process launcher (``pipeline.fit.run_fit``, the dedup stages' ``combine``
per partition of components too: there every step is handed the very stage
object the driver holds, so a step that kept state on it would show), and its
pickle is the same bytes before and after. Each fit must have
decided or counted something, so that a stage whose fit did nothing cannot
pass for one that changed nothing."""

import pickle

import numpy as np
import pytest

from pairforge.pipeline.fit import Launcher, run_fit
from pairforge.pipeline.local import fit_result
from pairforge.stages import stage_class
from pairforge.stages.base import GlobalStage, batch_len, object_array
from tests.confounder_kit import fit_rows
from tests.contract_stages import LinkConfig, LinkStage
from tests.global_stage_example import CaptionDedup
from tests.shardkit import lay_out
from tests.stages.test_dedup_exact import random_rows
from tests.stages.test_dedup_phash import synthetic
from tests.stages.test_dedup_semantic import embedded

N = 600


def _keys(n: int) -> np.ndarray:
    """Keys of ``n`` rows over shards of 100 (``shard_of`` with width 2)."""
    return object_array([f"{i // 100:04d}{i % 100:02d}" for i in range(n)])


def _rekeyed(rows: dict) -> dict:
    return {**rows, "key": _keys(batch_len(rows))}


def _scores() -> dict:
    rng = np.random.default_rng(1)
    return {"key": _keys(N), "clip_score": rng.normal(0.3, 0.05, N).astype(np.float32)}


def _entries() -> dict:
    rng = np.random.default_rng(2)
    ents = [np.array([0 if rng.random() < 0.5 else int(rng.integers(1, 40))], np.int32) for _ in range(N)]
    return {
        "key": _keys(N),
        "url": object_array([f"http://img.invalid/{i}.jpg" for i in range(N)]),
        "caption": object_array([f"thing {i}" for i in range(N)]),
        "metadata_entries": object_array(ents),
    }


def _captions() -> dict:
    words = ["red", "cup", "blue", "table", "dog", "coat", "green"]
    rng = np.random.default_rng(3)
    caps = [" ".join(rng.choice(words, size=int(rng.integers(2, 6)))) for _ in range(N)]
    caps[:40] = ["image"] * 40  # boilerplate, and a caption with too few words
    return {"key": _keys(N), "caption": object_array(caps)}


#: every global stage, as configured to fit (a learn step, a rule, side tables, components), and its fit rows
CASES = {
    "dedup_exact": (lambda: stage_class("dedup_exact")(), lambda: _rekeyed(random_rows(N, seed=1))),
    "dedup_phash": (lambda: stage_class("dedup_phash")(), lambda: _rekeyed(synthetic(N, seed=2))),
    "dedup_semantic": (
        lambda: stage_class("dedup_semantic")(n_clusters=4, eps=0.01),
        lambda: _rekeyed(embedded(N, dim=16)),
    ),
    "clip_score": (lambda: stage_class("clip_score")(pretrained="unused.pt", top_fraction=0.3), _scores),
    "confounders": (
        lambda: stage_class("confounders")(n_clusters=3, calibration_queries=50),
        lambda: _rekeyed(fit_rows(N, dim=16, seed=4)),
    ),
    "balance": (lambda: stage_class("balance")(t=50), _entries),
    "align_text": (lambda: stage_class("align_text")(rare_token_rank=3), _captions),
    "link_test": (lambda: LinkStage(LinkConfig()), lambda: {"key": _keys(N), "n_boxes": np.arange(N) % 3}),
    "caption_dedup": (lambda: CaptionDedup(buckets=3), _captions),
}


class ThreePartitions(Launcher):
    """The in-process launcher with the component passes on (``link_columns``)."""

    def partitions(self, spec, shards):
        return 3


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_in_process_fit_leaves_the_stage_as_it_was(name):
    make_stage, make_rows = CASES[name]
    stage = make_stage()
    assert isinstance(stage, GlobalStage) and stage.needs_fit()
    rows = make_rows()
    before = pickle.dumps(stage)
    result = fit_result(stage, {c: rows[c] for c in stage.fit_columns})
    assert batch_len(result.decisions) or any(map(batch_len, result.tables.values())) or result.counters, name
    assert pickle.dumps(stage) == before, sorted(stage.__dict__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_runs_fit_leaves_the_stage_as_it_was(name, tmp_path):
    make_stage, make_rows = CASES[name]
    stage = make_stage()
    spec, shard_ids = lay_out(make_rows(), tmp_path, stage, width=2)
    assert len(shard_ids) == N // 100
    before = pickle.dumps(stage)  # after lay_out: the run's schema (outputs()) is the driver's business
    info = run_fit(ThreePartitions(), spec, stage, shard_ids, N)
    assert info["decisions"] or any(info["tables"].values()) or info["counters"], (name, info)
    assert ("components" in info) == (stage.link_columns is not None), info
    assert pickle.dumps(stage) == before, sorted(stage.__dict__)
    if stage.sample_rows:
        assert info["sample_rows"] == min(N, stage.sample_rows)
