"""balance: MetaCLIP's sampling on a synthetic corpus whose entries follow a
Zipf law (the head entry in 30% of the captions). Every entry over ``t``
keeps a count within a 99.9% binomial interval of ``t`` (one entry a row)
or of the expected count (several entries a row); every entry at or under
``t`` keeps every row; the kept rows do not depend on how the rows are cut
into shards nor on their keys. The fit runs here as the runners run it
(``bucket_rows`` per shard, ``reduce_bucket`` per bucket, ``combine``,
``decide_rows`` per shard), on in-memory shards."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from pairforge.stages.balance import BalanceStage, Config
from pairforge.stages.base import Learned, batch_len, concat, object_array, take
from pairforge.stages.common import balancing as bal

N, ENTRIES, T = 100_000, 2000, 1000
Z999 = stats.norm.ppf(0.9995)


def zipf_probabilities() -> np.ndarray:
    """The head entry in 30% of the captions, the rest Zipf(1) over the others."""
    rest = 1.0 / np.arange(2, ENTRIES + 1)
    return np.concatenate([[0.3], 0.7 * rest / rest.sum()])


def corpus(per_row: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p = zipf_probabilities()
    if per_row == 1:
        ents = [np.array([e], np.int32) for e in rng.choice(ENTRIES, size=N, p=p)]
    else:
        k = rng.integers(1, per_row + 1, size=N)
        draws = rng.choice(ENTRIES, size=(N, per_row), p=p)
        ents = [np.unique(d[:j]).astype(np.int32) for d, j in zip(draws, k)]
    return {
        "key": object_array([f"{i:09d}" for i in range(N)]),
        "url": object_array([f"http://img.invalid/{i}.jpg" for i in range(N)]),
        "caption": object_array([" ".join(f"e{e}" for e in x) + f" #{i % 7}" for i, x in enumerate(ents)]),
        "metadata_entries": object_array(ents),
    }


def fit_rule(stage: BalanceStage, rows: dict, shards: int) -> tuple[set, dict, Learned]:
    """The fit's steps over ``shards`` in-memory shards: (kept keys, summed
    counters, the rule ``combine`` returned)."""
    parts = [take(rows, idx) for idx in np.array_split(np.arange(batch_len(rows)), shards)]
    emitted = concat([stage.bucket_rows(p, Learned()) for p in parts])
    order = np.argsort(emitted["bucket"], kind="stable")
    emitted = take(emitted, order)
    cuts = np.flatnonzero(np.diff(emitted["bucket"])) + 1
    reduced = concat([stage.reduce_bucket(take(emitted, g), Learned()) for g in np.split(np.arange(len(order)), cuts)])
    result = stage.combine(reduced, Learned())
    counters = dict(result.counters)
    dropped = set()
    for p in parts:
        res = stage.decide_rows(p, result.rule)
        dropped |= set(res.decisions["key"].tolist()) if batch_len(res.decisions) else set()
        for k, v in res.counters.items():
            counters[k] = counters.get(k, 0) + v
    return set(rows["key"].tolist()) - dropped, counters, result.rule


def fit(stage: BalanceStage, rows: dict, shards: int) -> tuple[set, dict]:
    """:func:`fit_rule`'s kept keys and counters."""
    kept, counters, _ = fit_rule(stage, rows, shards)
    return kept, counters


def per_entry(rows: dict, keys: set | None = None) -> np.ndarray:
    counts = np.zeros(ENTRIES, np.int64)
    for k, ents in zip(rows["key"], rows["metadata_entries"]):
        if keys is None or k in keys:
            counts[ents] += 1
    return counts


@pytest.fixture(scope="module")
def single():
    rows = corpus(per_row=1)
    stage = BalanceStage(Config(t=T))
    kept, counters = fit(stage, rows, shards=7)
    return rows, kept, counters


def test_each_entry_over_t_keeps_a_binomial_t_and_the_rest_keep_all(single):
    rows, kept, counters = single
    before, after = per_entry(rows), per_entry(rows, kept)
    assert before[0] > 0.29 * N  # the head entry holds 30% of the captions
    over = np.flatnonzero(before > T)
    assert len(over) >= 8
    for e in over:  # one entry a row: kept ~ Binomial(c, t / c)
        lo, hi = stats.binom.interval(0.999, before[e], T / before[e])
        assert lo <= after[e] <= hi, (e, before[e], after[e], lo, hi)
    under = before <= T
    assert np.array_equal(after[under], before[under])  # an entry at or under t keeps every row
    assert counters["kept"] == len(kept) and counters["rows"] == N and counters["entries_over_t"] == len(over)


def test_rows_with_several_entries_keep_the_expected_count():
    rows = corpus(per_row=3, seed=1)
    kept, _ = fit(BalanceStage(Config(t=T)), rows, shards=5)
    before, after = per_entry(rows), per_entry(rows, kept)
    p = np.minimum(1.0, T / np.maximum(before, 1))
    mean, var = np.zeros(ENTRIES), np.zeros(ENTRIES)
    for ents in rows["metadata_entries"]:
        q = 1.0 - np.prod(1.0 - p[ents])  # kept if any of its entries selects it
        mean[ents] += q
        var[ents] += q * (1 - q)
    over = np.flatnonzero(before > T)
    assert len(over) >= 8
    for e in over:
        assert abs(after[e] - mean[e]) <= Z999 * math.sqrt(var[e]) + 1, (e, before[e], after[e], mean[e])
        assert after[e] > T  # rows kept by a rarer entry of theirs come on top of t
    under = before <= T
    assert np.array_equal(after[under], before[under])


def test_kept_rows_depend_on_neither_shards_nor_keys(single):
    rows, kept, _ = single
    again, _ = fit(BalanceStage(Config(t=T)), rows, shards=13)
    assert again == kept
    # other keys (another samples_per_shard numbers rows anew): the same URLs are kept
    perm = np.random.default_rng(5).permutation(N)
    renamed = dict(rows, key=object_array([f"{j:09d}" for j in perm]))
    kept2, _ = fit(BalanceStage(Config(t=T)), renamed, shards=3)
    url_of = dict(zip(renamed["key"].tolist(), renamed["url"].tolist()))
    first = dict(zip(rows["key"].tolist(), rows["url"].tolist()))
    assert {url_of[k] for k in kept2} == {first[k] for k in kept}
    other_seed, _ = fit(BalanceStage(Config(t=T, seed=1)), rows, shards=7)
    assert other_seed != kept and abs(len(other_seed) - len(kept)) < 0.05 * len(kept)


def test_decisions_say_which_entries_over_t_failed_to_select_the_row():
    rows = corpus(per_row=1, seed=2)
    stage = BalanceStage(Config(t=T))
    _, _, rule = fit_rule(stage, take(rows, np.arange(20_000)), shards=2)
    res = stage.decide_rows(take(rows, np.arange(200)), rule)
    assert set(res.decisions["reason"]) == {"balance_not_sampled"}
    d = json.loads(res.decisions["detail"][0])
    head_ids, head_counts = rule.arrays["head_ids"], rule.arrays["head_counts"]
    assert d["t"] == T and d["entries"] and all(c > T for c in d["counts"])
    assert dict(zip(head_ids.tolist(), head_counts.tolist()))[d["entries"][0]] == d["counts"][0]


def test_rows_without_entries_are_dropped_or_kept_as_asked():
    rows = corpus(per_row=1, seed=3)
    rows = take(rows, np.arange(3000))
    rows["metadata_entries"] = object_array(
        [np.zeros(0, np.int32) if i % 10 == 0 else x for i, x in enumerate(rows["metadata_entries"])]
    )
    stage = BalanceStage(Config(t=100))
    kept, counters, rule = fit_rule(stage, rows, shards=2)
    empty = {k for i, k in enumerate(rows["key"]) if i % 10 == 0}
    assert not (empty & kept) and counters["rows_without_entries"] == 300
    res = stage.decide_rows(take(rows, np.arange(10)), rule)
    assert dict(zip(res.decisions["key"], res.decisions["reason"]))[rows["key"][0]] == "no_metadata_match"
    kept_all, _ = fit(BalanceStage(Config(t=100, keep_unmatched=True)), rows, shards=2)
    assert empty <= kept_all and kept_all - empty == kept


def test_counters_give_counts_before_and_after_and_the_figure(single):
    rows, kept, counters = single
    before, after = per_entry(rows), per_entry(rows, kept)
    s = bal.summary({"stage": "balance", "counters": counters})
    assert s["t"] == T and s["rows"] == N and s["kept"] == len(kept) and s["exact_after"]
    assert s["entries_used"] == int((before > 0).sum())
    top = np.lexsort((np.arange(ENTRIES), -before))[:20]
    assert s["top"] == [(int(e), int(before[e]), int(after[e])) for e in top]
    want_b = dict(zip(*np.unique(bal.log_bin(before[before > 0]), return_counts=True)))
    want_a = dict(zip(*np.unique(bal.log_bin(after[after > 0]), return_counts=True)))
    assert s["hist_before"] == {int(k): int(v) for k, v in want_b.items()}
    assert s["hist_after"] == {int(k): int(v) for k, v in want_a.items()}
    x, y = bal.rank_curve(s["hist_before"])
    assert x[0] == 1 and x[-1] == s["entries_used"] and np.all(np.diff(x) >= 0) and np.all(np.diff(y) <= 0)
    assert y[0] <= before.max() < 10**0.1 * y[0]  # the top entry's bin
    from pairforge.manifests import report_plots

    png = report_plots.entry_counts(bal.rank_curve(s["hist_before"]), bal.rank_curve(s["hist_after"]), T)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_log_bins_hold_their_counts():
    c = np.arange(1, 200_001)
    b = bal.log_bin(c)
    assert np.all(10 ** (b / 10) <= c + 1e-9) and np.all(c < 10 ** ((b + 1) / 10))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^t: expected >= 1, got 0"):
        Config(t=0)
    with pytest.raises(ValueError, match=r"^top_entries: "):
        Config(top_entries=-1)
