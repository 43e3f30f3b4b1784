"""The clip_score stage as a filter, on a pf-tiny checkpoint trained to tell
the planted colours apart: a threshold drops the rows with shuffled captions
and says with what score, threshold and model; top_fraction keeps exactly
the top share (ties broken by key), is exact from a sample of the fit rows
and says when a sample misled it, and its fit sends histograms, not rows,
outside the window around the cut. The scores themselves:
tests/stages/test_clip_score.py."""

import hashlib
import json
import logging
from collections import defaultdict

import numpy as np

from pairforge.pipeline.local import fit_global, join_result, map_stage
from pairforge.stages.base import STATUS_OK, batch_len, concat, fresh_rows, object_array, take
from pairforge.stages.clip_score import BINS, ClipScoreStage, Config
from tests import clipkit
from tests.clipkit import ok_rows, planted, run_top_fraction, stage

trained_ckpt = clipkit.trained_ckpt  # this module's own checkpoint (module scope)


# --------------------------------------------------------------- filtering


def test_trained_scorer_separates_planted_matches(trained_ckpt):
    rows, match = planted()
    s = map_stage(stage(trained_ckpt), rows)["clip_score"]
    assert s[match].min() > s[~match].max() + 0.02


def test_threshold_keeps_matches_drops_shuffled_with_score_threshold_and_model(trained_ckpt):
    rows, match = planted()
    s = map_stage(stage(trained_ckpt), dict(rows))["clip_score"]
    t = float(s[match].min() + s[~match].max()) / 2
    out = map_stage(stage(trained_ckpt, threshold=t), rows)
    assert np.array_equal(ok_rows(out), match)
    assert set(out["reason"][~match]) == {"clip_score_below_threshold"}
    d = json.loads(out["detail"][1])
    sha = hashlib.sha256(open(trained_ckpt, "rb").read()).hexdigest()
    assert d["model"] == {"name": "pf-tiny", "pretrained": trained_ckpt, "sha256": sha}
    assert d["threshold"] == t and abs(d["clip_score"] - s[1]) < 1e-6 and d["clip_score"] < t


def finalize(st, rule, batch):
    """Apply the rule ``combine`` returned (``decide_rows``) to the ok rows of
    ``batch``, with the run's own join."""
    ok = np.flatnonzero(ok_rows(batch))
    decided = st.decide_rows({"key": batch["key"][ok], "clip_score": batch["clip_score"][ok]}, rule)
    return join_result(st, batch, decided)


def test_top_fraction_keeps_exactly_the_top_share(trained_ckpt):
    rows, match = planted()
    out = run_top_fraction(stage(trained_ckpt, top_fraction=0.5), rows)
    assert np.array_equal(ok_rows(out), match)
    n = len(match)
    for f in (0.0, 0.13, 0.37, 0.9, 1.0):
        st = stage(trained_ckpt, top_fraction=f)
        out = run_top_fraction(st, dict(rows))
        keep = ok_rows(out)
        assert keep.sum() == int(np.floor(f * n + 0.5))
        if 0 < keep.sum() < n:
            assert out["clip_score"][keep].min() > out["clip_score"][~keep].max()
            d = json.loads(out["detail"][np.flatnonzero(~keep)[0]])
            assert d["top_fraction"] == f and d["exact"] and d["model"]["name"] == "pf-tiny"
            assert set(out["reason"][~keep]) == {"clip_score_below_top_fraction"}


def test_top_fraction_breaks_ties_by_key(trained_ckpt):
    rows, _ = planted(n_per_colour=2)
    twins = take(rows, np.zeros(6, dtype=np.int64))  # six copies of one pair: equal scores
    twins["key"] = object_array([f"00000{i:04d}" for i in (90, 91, 92, 93, 94, 95)])
    both = concat([rows, twins])
    s = map_stage(stage(trained_ckpt), dict(both))["clip_score"]
    rank = int(np.sum(s > s[0]))  # rows strictly above the twins
    f = (rank + 3 + 0.2) / len(s)  # the cut falls among the twins (row 0 is one of them)
    out = run_top_fraction(stage(trained_ckpt, top_fraction=f), both)
    keep = ok_rows(out)
    assert keep.sum() == rank + 3
    tied = np.flatnonzero(s == s[0])
    assert list(out["key"][tied][keep[tied]]) == sorted(out["key"][tied])[:3]


def fit_with_sample(st, rows, sample, size=10):
    """The fit steps with ``learn`` fed a chosen sample (a run samples by key
    hash); returns the rule ``combine`` returned."""
    learned = st.learn(sample)
    n = batch_len(rows)
    cands = concat([st.bucket_rows(take(rows, np.arange(i, min(i + size, n))), learned) for i in range(0, n, size)])
    groups = defaultdict(list)
    for i, g in enumerate(cands["bucket"]):
        groups[int(g)].append(i)
    reduced = concat([st.reduce_bucket(take(cands, np.asarray(ix)), learned) for _, ix in sorted(groups.items())])
    return st.combine(reduced, learned).rule


def test_top_fraction_is_exact_from_a_sample_and_says_when_a_sample_misled(trained_ckpt, caplog):
    rows, _ = planted(n_per_colour=10)
    st = stage(trained_ckpt, top_fraction=0.3)
    scored = map_stage(st, rows)
    fit = {"key": scored["key"], "clip_score": scored["clip_score"]}
    k = int(np.floor(0.3 * len(rows["key"]) + 0.5))
    rule = fit_with_sample(st, fit, take(fit, np.arange(0, len(fit["key"]), 3)))
    assert rule.values["cut"]["exact"] and ok_rows(finalize(st, rule, dict(scored))).sum() == k
    low = take(fit, np.argsort(fit["clip_score"])[:10])  # a sample of the worst rows only
    with caplog.at_level(logging.WARNING):
        rule = fit_with_sample(st, fit, low)
    out = finalize(st, rule, dict(scored))
    assert not rule.values["cut"]["exact"] and "outside the sampled window" in caplog.text
    assert ok_rows(out).sum() >= k and json.loads(out["detail"][~ok_rows(out)][0])["exact"] is False


def test_fit_sends_histograms_not_rows_outside_the_window():
    rng = np.random.default_rng(0)
    n = 20000
    fit = {
        "key": object_array([f"{i:09d}" for i in range(n)]),
        "clip_score": rng.normal(0.3, 0.05, n).astype(np.float32),
    }
    st = ClipScoreStage(Config(pretrained="unused.pt", top_fraction=0.3))
    learned = st.learn(take(fit, np.arange(0, n, 4)))  # a sample, as a run gives
    c = st.bucket_rows(fit, learned)
    windowed = c["bucket"] >= BINS
    assert 0 < windowed.sum() < n / 5  # per-row data only near the cut
    assert c["count"][~windowed].sum() == n  # every row in the histogram
    red = st.reduce_bucket(take(c, np.flatnonzero(c["bucket"] == c["bucket"][0])), learned)
    assert batch_len(red) == 1 and red["count"][0] == c["count"][0]
    rule = st.combine(concat([c]), learned).rule  # a single batch's candidates need no reduction to be exact
    keep = finalize(st, rule, fresh_rows(fit["key"], **{c: v for c, v in fit.items() if c != "key"}))
    kept = np.sort(fit["clip_score"][keep["status"] == STATUS_OK])
    assert len(kept) == 6000 and kept[0] == np.sort(fit["clip_score"])[-6000]
    assert not fit_global(ClipScoreStage(Config(pretrained="unused.pt")), fit)  # no top_fraction: no fit
