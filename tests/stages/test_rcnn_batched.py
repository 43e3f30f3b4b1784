"""The batched Faster R-CNN path (``stages/common/rcnn_batched.py``) against
torchvision: its dense NMS keeps exactly the boxes ``torchvision.ops``'s
NMS keeps, per image and group, and the whole detector gives the same
boxes, labels, scores and RoI features as the model's own forward followed
by ``keep_best``, independently of the other images of a call."""

import copy

import numpy as np
import pytest
import torch
from skimage import data

from pairforge.stages.common import detectors as _det
from pairforge.stages.common import rcnn_batched

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _clustered_boxes(rng, m: int, clusters: int):
    """Boxes in a few tight clusters, so suppression chains run deep."""
    centres = rng.uniform(20, 200, (clusters, 2))
    c = centres[rng.integers(0, clusters, m)] + rng.normal(0, 6, (m, 2))
    wh = rng.uniform(10, 40, (m, 2))
    return torch.tensor(np.concatenate([c - wh / 2, c + wh / 2], 1), dtype=torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_nms_keeps_what_torchvision_keeps(seed):
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(seed)
    b, m, groups, keep_top = 4, 300, 3, 40
    boxes = torch.stack([_clustered_boxes(rng, m, 6) for _ in range(b)])
    scores = torch.tensor(rng.permutation(b * m).reshape(b, m) / (b * m), dtype=torch.float32)  # distinct
    labels = torch.tensor(rng.integers(0, groups, (b, m)))
    valid = torch.tensor(rng.random((b, m)) > 0.2)
    kept = rcnn_batched.nms_keep(boxes, scores, valid, 0.5, groups=labels)
    order = rcnn_batched.score_order(scores, kept)
    total_suppressed = 0
    for i in range(b):
        idx = torch.nonzero(valid[i]).flatten()
        want = idx[batched_nms(boxes[i, idx], scores[i, idx], labels[i, idx], 0.5)][:keep_top]
        got = order[i][kept[i][order[i]]][:keep_top]
        assert got.tolist() == want.tolist()
        total_suppressed += int(valid[i].sum()) - len(batched_nms(boxes[i, idx], scores[i, idx], labels[i, idx], 0.5))
    assert total_suppressed > 100  # the clusters made NMS do work


def test_dense_nms_of_nothing():
    kept = rcnn_batched.nms_keep(torch.zeros(2, 5, 4), torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool), 0.5)
    assert kept.shape == (2, 5) and not kept.any()


@pytest.fixture(scope="module")
def models():
    """A random MobileNetV3 Faster R-CNN whose class logits are scaled up,
    so boxes pass a 0.5 threshold (at 0.05, of two labels)."""
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(MODEL, weights=None, weights_backbone=None, num_classes=91)
    with torch.no_grad():
        w = model.roi_heads.box_predictor.cls_score.weight
        w.copy_(torch.randn_like(w) * 10)
    return model


@pytest.fixture(scope="module")
def photos():
    out = []
    for f in (data.astronaut, data.chelsea, data.coffee, data.rocket):
        arr = np.ascontiguousarray(f()[:300, :400])
        out.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
    return out


def _detectors(model, limits):
    cats = _det.torchvision_categories(MODEL)
    fast = _det.TorchvisionDetector(copy.deepcopy(model), cats, "cpu", limits, {}, batched=True)
    slow = _det.TorchvisionDetector(copy.deepcopy(model), cats, "cpu", limits, {}, batched=False)
    assert fast.batched and not slow.batched
    return fast, slow


@pytest.mark.parametrize("limits", [_det.Limits(36, 0.5, 0.5), _det.Limits(100, 0.05, 0.3)], ids=["k36", "k100"])
def test_detector_matches_torchvision_forward(models, photos, limits):
    fast, slow = _detectors(models, limits)
    got, want = fast.detect(photos), slow.detect(photos)
    labels = set()
    for g, w in zip(got, want):
        assert len(g.scores) == len(w.scores) > 0
        np.testing.assert_allclose(g.boxes, w.boxes, atol=1e-3)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-6)
        assert g.labels.tolist() == w.labels.tolist()
        np.testing.assert_allclose(g.features, w.features, atol=1e-5)
        labels.update(g.labels.tolist())
    assert len(labels) >= (2 if limits.score_threshold < 0.1 else 1)


def test_an_image_gets_the_same_regions_alone_or_in_a_batch(models, photos):
    fast, _ = _detectors(models, _det.Limits(36, 0.05, 0.5))
    together = fast.detect(photos)
    alone = fast.detect([photos[2]] * len(photos))  # the stage pads a call with copies
    for a in alone:
        np.testing.assert_array_equal(a.boxes, together[2].boxes)
        np.testing.assert_array_equal(a.features, together[2].features)


def test_pool_last_after_a_batched_call_pools_on_its_map(models, photos):
    fast, _ = _detectors(models, _det.Limits(36, 0.5, 0.5))
    found = fast.detect(photos)
    again = fast.pool_last(1, torch.as_tensor(found[1].boxes))
    np.testing.assert_allclose(again, found[1].features, atol=1e-5)


def test_images_of_several_sizes_take_the_models_own_forward(models, photos):
    fast, slow = _detectors(models, _det.Limits(36, 0.5, 0.5))
    mixed = [photos[0], photos[1][:, :200, :250].contiguous()]
    for g, w in zip(fast.detect(mixed), slow.detect(mixed)):
        np.testing.assert_array_equal(g.boxes, w.boxes)
