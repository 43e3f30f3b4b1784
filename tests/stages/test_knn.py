"""The confounders stage's nearest-neighbour search (``stages.common.knn``,
``stages.common.exact_search``):
the blocked search is the float64 brute force (bounds, groups, ties; on the
GPU's float16-then-float32 steps too, run here on the CPU), cells are the
stable order, and the calibrated margin reaches its recall on CLIP-shaped
data where a fixed cell or two do not; the stage sizes its cells by the
dataset, not the sample."""

import numpy as np
import pytest

from bench import cliplike
from pairforge.stages.common import exact_search, knn
from pairforge.stages.confounders import Config, ConfounderStage, key_hashes
from tests.confounder_kit import brute, clustered, fit_rows


def test_blocked_search_is_the_float64_brute_force_with_bounds_groups_and_ties():
    p, _ = knn.unit_rows(clustered(700, 24, 10, 0.6, 0))
    s, _ = knn.unit_rows(clustered(700, 24, 10, 0.6, 1))
    p[40] = p[50] = p[30]  # exact ties: the smaller index wins
    group = np.arange(700) // 3  # rows of one group never pair
    for bound in (np.inf, 0.3):
        want, want_sim = brute(p, s if bound < np.inf else None, bound, group)
        got, got_sim, got_s = knn.best_partners(
            p, np.arange(700), s if bound < np.inf else None, bound, group, block_elems=5000
        )
        assert np.array_equal(got, want)
        assert np.allclose(got_sim[got >= 0], want_sim[want >= 0])
        if bound < np.inf:
            assert (got_s[got >= 0] < bound).all()
    got = knn.best_partners(p, np.array([30, 40, 50, 2]), group=group)[0]
    assert list(got[:3]) == [40, 30, 30] and got[3] == brute(p, group=group)[0][2]


def _exact(p, s, bound, top, queries):
    return np.array([exact_search._exact_one(int(i), p, s, bound, np.arange(len(p)), top)[0] for i in queries])


@pytest.mark.parametrize("bound,top", [(np.inf, np.inf), (0.75, np.inf), (0.75, 0.75)])
def test_float16_products_narrowed_in_float32_give_the_float64_answer(monkeypatch, bound, top):
    """The GPU's steps (float16 products, the band narrowed in float32, then
    float64) on the CPU's torch; a bound at a dense similarity (swap_text's
    top) fills the uncertain strip with pairs, and the answer must still be
    the float64 one without falling back to a whole-block scan."""
    pytest.importorskip("torch")
    img, txt, _ = cliplike.pairs(2000, 32, seed=3)
    p, s = knn.unit_rows(img)[0], knn.unit_rows(txt)[0]
    sec = s if bound < np.inf else None
    q = np.arange(0, 2000, 4)
    want = _exact(p, sec, bound, top, q)
    scans, exact_one = [], exact_search._exact_one
    monkeypatch.setattr(exact_search, "_exact_one", lambda *a: scans.append(a) or exact_one(*a))
    for half, device in ((False, "cpu"), (True, "cpu:0")):
        monkeypatch.setattr(exact_search, "HALF_ON", ("cuda", "cpu") if half else ("cuda",))
        got = knn.best_partners(p, q, sec, bound, device=device, max_primary=top, block_elems=1 << 18)[0]
        assert np.array_equal(got, want), (half, np.mean(got != want))
    assert len(scans) <= 2  # the band starts at the best surely allowed pair


def test_nearest_cells_are_the_stable_order_with_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    c = np.round(rng.normal(size=(40, 8)), 0).astype(np.float32)
    c[7] = c[3]  # a tie: the smaller cell first
    sims = x.astype(np.float64) @ c.astype(np.float64).T
    for k in (1, 3, 40):
        ids, got = knn.nearest_cells(x, c, k)
        assert np.array_equal(ids, np.argsort(-sims, axis=1, kind="stable")[:, :k])
        assert np.array_equal(got, np.take_along_axis(sims, ids, axis=1))
    joined = knn.members(got, 0.05, query_probes=2)
    assert joined[:, :2].all() and np.array_equal(joined[:, 2:], got[:, 2:] >= got[:, :1] - 0.05)


def test_a_calibrated_margin_reaches_the_recall_one_or_two_cells_miss():
    """On CLIP-shaped rows (groups cut by cells, a 24-d local structure) one
    cell a row finds about half the neighbours, two about 70%; the margin
    calibrated on a sample finds >= 95% at a fraction of brute force's work."""
    img, txt, _ = cliplike.pairs(10_000, 32, seed=0)
    p, s = knn.unit_rows(img)[0], knn.unit_rows(txt)[0]
    sample = np.sort(np.random.default_rng(1).permutation(len(p))[:5000])
    cells = knn.spherical_kmeans(p[sample], 40, 20, 0)
    q = np.sort(np.random.default_rng(2).permutation(len(p))[:1000])
    want, want_sim, _ = knn.best_partners(p, q, s, 0.75)

    def recall(probes, margin):
        stats = {}
        got, sim, _ = knn.ivf_search(p, cells, probes, s, 0.75, margin=margin, stats=stats)
        assert not (sim[q][want >= 0] > want_sim[want >= 0] + 1e-9).any()  # never better than the truth
        return np.mean(np.where(want >= 0, sim[q] >= want_sim - 1e-6, got[q] < 0)), stats

    assert recall(1, np.inf)[0] < 0.7 and recall(2, np.inf)[0] < 0.85
    cal = knn.calibrate(p[sample], cells, 16, 0.97, secondary=s[sample], bound=0.75)
    got, stats = recall(16, cal.margin)
    assert cal.recall >= 0.97 and got >= 0.95, (cal, got)
    assert stats["pairs"] < 0.3 * len(p) ** 2 and stats["cells_per_row"] < 10, stats


def test_cells_follow_the_dataset_rows_not_the_sample():
    """The runner's sample holds the smallest key hashes: 2,000 of 40,000 rows
    say about 40,000, so 1,000 rows a cell make ~40 cells, not 2."""
    rows = fit_rows(40_000, dim=8, seed=1)
    pick = np.sort(np.argsort(key_hashes(rows["key"]), kind="stable")[:2000])
    st = ConfounderStage(Config(fit_sample=2000, rows_per_cell=1000, kinds=("swap_image",), calibration_queries=200))
    learned = st.learn({k: v[pick] for k, v in rows.items()})
    assert 36 <= len(learned.arrays["cells_image"]) <= 44
    cal = learned.values["calibration"]["image"]
    assert cal["recall"] >= 0.97 and 1.0 <= cal["cells_per_row"] <= 16
