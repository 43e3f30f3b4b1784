"""The trainer's metrics on hand-made similarity matrices with known answers,
and the CLIP loss against open_clip's own ClipLoss."""

import itertools
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pairforge.trainer.evaluate import (
    _same_caption,
    chance_recall,
    matching_vs_shuffled,
    recall_at_k,
    roc_auc,
    same_meaning,
    winoground,
)
from pairforge.trainer.model import clip_loss


def test_recall_counts_rows_whose_match_ranks_within_k():
    sim = np.array([
        [0.9, 0.1, 0.2, 0.0],  # own caption first
        [0.5, 0.4, 0.1, 0.0],  # own caption second
        [0.3, 0.2, 0.1, 0.0],  # own caption third
        [0.7, 0.6, 0.5, 0.5],  # tied with a wrong one for last: counts against it
    ])  # fmt: skip
    same = np.eye(4, dtype=bool)
    assert recall_at_k(sim, same, (1, 2, 3, 4)) == {"r@1": 0.25, "r@2": 0.5, "r@3": 0.75, "r@4": 1.0}
    # a duplicate caption elsewhere is a correct match too
    same[1, 0] = True
    assert recall_at_k(sim, same, (1,))["r@1"] == 0.5


def test_chance_recall_matches_counting_every_ranking():
    same = np.eye(5, dtype=bool)
    same[0, 3] = True  # row 0 has two correct columns among five
    got = chance_recall(same, (1, 2))
    for k in (1, 2):
        per_row = []
        for row in same:
            hits = [any(row[list(top)]) for top in itertools.combinations(range(5), k)]
            per_row.append(np.mean(hits))  # a random ranking's top k is a random k-subset
        assert got[f"r@{k}"] == pytest.approx(np.mean(per_row))
    assert got["r@1"] == pytest.approx((2 / 5 + 4 * 1 / 5) / 5)
    assert chance_recall(np.eye(10, dtype=bool), (3,))["r@3"] == pytest.approx(1 - comb(9, 3) / comb(10, 3))


def test_roc_auc_is_the_pairwise_win_rate_with_ties_counted_half():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 5, 40).astype(float)
    neg = rng.integers(0, 4, 60).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(pos, neg) == pytest.approx(brute)
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0


def test_matching_vs_shuffled_leaves_out_captions_that_describe_the_image():
    sim = np.array([[0.9, 0.8, 0.1], [0.8, 0.9, 0.2], [0.0, 0.1, 0.5]])
    metas = [{"concept": "dress"}, {"concept": "dress"}, {"concept": "bag"}]
    same = same_meaning(["a dress", "a photo of a dress", "a bag"], metas)
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    got = matching_vs_shuffled(sim, same)
    assert got["auc"] == 1.0 and got["n_matching"] == 3 and got["n_shuffled"] == 4
    # counting the other dress caption as wrong costs the ranking its perfection
    assert matching_vs_shuffled(sim, _same_caption(["a dress", "a photo of a dress", "a bag"]))["auc"] < 1.0
    # without concepts only identical captions match
    assert same_meaning(["x", "y", "x"], [{}, {}, {}]).tolist() == _same_caption(["x", "y", "x"]).tolist()


def test_winoground_scores_on_a_known_case():
    # group (0, 1): both images pick their own caption, both captions their own image
    # group (2, 3): image 3 prefers caption 2, so the text score fails; captions pick their images
    sim = np.array([
        [0.9, 0.2, 0.0, 0.0],
        [0.1, 0.8, 0.0, 0.0],
        [0.0, 0.0, 0.7, 0.3],
        [0.0, 0.0, 0.6, 0.5],
    ])  # fmt: skip
    got = winoground(sim, [(0, 1), (2, 3)])
    assert got["groups"] == 2
    assert got["text"] == 0.5  # in group (2, 3) image 3 prefers caption 2 (0.6 > 0.5)
    assert got["image"] == 1.0  # caption 2: 0.7 > 0.6; caption 3: 0.5 > 0.3
    assert got["group"] == 0.5
    assert winoground(sim, []) == {"groups": 0}


def test_clip_loss_is_open_clips_loss_without_negatives():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(14.3)
    assert torch.allclose(clip_loss(img, txt, scale), ClipLoss()(img, txt, scale), atol=1e-6)


def test_hard_negatives_are_extra_wrong_texts_for_images_only():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    neg = F.normalize(torch.randn(2, 8), dim=-1)
    scale = torch.tensor(10.0)
    labels = torch.arange(4)
    i2t = F.cross_entropy(scale * img @ torch.cat([txt, neg]).T, labels)
    t2i = F.cross_entropy(scale * txt @ img.T, labels)
    assert torch.allclose(clip_loss(img, txt, scale, neg), (i2t + t2i) / 2, atol=1e-6)
    # a negative that looks like image 0's own caption makes the loss worse
    closer = torch.cat([txt[:1] * 0.99 + 0.01 * neg[:1], neg[1:]])
    assert clip_loss(img, txt, scale, F.normalize(closer, dim=-1)) > clip_loss(img, txt, scale, neg)
