"""pf-tiny-detector: its composites' and plain product photos' boxes are exact
and its splits disjoint (trainer/detection_data.py), the model is a plain torchvision detector that
survives save/load (stages/common/pfdet.py), the training loop learns and the
AP function agrees with pycocotools (scripts/build_detector.py), and the
shipped file, where there is one, detects what it should."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from pairforge.stages.common import pfdet
from pairforge.trainer.detection_data import (
    CATEGORIES,
    HELD_OUT_PHOTOS,
    CompositeConfig,
    CompositeDataset,
    Ingredients,
    _shape_mask,
    make_composite,
    make_empty,
    make_plain,
    mixed_kind,
    picks,
)

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "pipeline" / "assets" / "pf-tiny-detector.pt"
SMALL_CFG = CompositeConfig().scaled(128)
#: the shipped detector on 150 held-out plain product photos (its .json has the figures on 1,000)
PLAIN_MAP, PLAIN_RECALL = 0.8, 0.7


def _script():
    spec = importlib.util.spec_from_file_location("build_detector", ROOT / "scripts" / "build_detector.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def one_thread():
    """One torch thread: on a few shared cores more threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ingr():
    return Ingredients.from_sources(train_items=2000, t10k_items=2000)


@pytest.fixture(scope="module")
def script():
    return _script()


def test_boxes_are_the_tight_boxes_of_the_visible_pixels(ingr):
    n_objects = 0
    for split in ("train", "heldout"):
        for i in range(30):
            c = make_composite(ingr, split, i)
            inst, boxes, labels = c["instances"], c["boxes"], c["labels"]
            assert c["image"].shape == (256, 256, 3) and c["image"].dtype == np.uint8
            assert len(boxes) == len(labels) >= 1 and inst.max() == len(boxes)
            assert ((labels >= 1) & (labels < len(CATEGORIES))).all()
            # nothing was pasted outside the objects' pixels
            assert (c["image"][inst == 0] == c["background"][inst == 0]).all()
            for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
                mask = inst == k + 1
                assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
                assert mask.sum() == mask[y0:y1, x0:x1].sum() > 0, "a visible pixel outside the box"
                inner = mask[y0:y1, x0:x1]
                assert inner[0].any() and inner[-1].any() and inner[:, 0].any() and inner[:, -1].any()
                n_objects += 1
    assert n_objects > 100


def test_unrotated_shapes_fill_their_drawn_box():
    rng = np.random.default_rng(0)
    for side in (8, 24, 57, 110):
        assert _shape_mask("circle", side, rng).shape == (side, side)
        sq = [_shape_mask("square", side, rng) for _ in range(10)]
        assert any(m.shape == (side, side) and m.all() for m in sq)  # the axis-aligned ones


def test_composites_are_deterministic_per_seed(ingr):
    a, b = make_composite(ingr, "train", 7, seed=3), make_composite(ingr, "train", 7, seed=3)
    for k in ("image", "boxes", "labels", "instances"):
        assert np.array_equal(a[k], b[k])
    other = make_composite(ingr, "train", 7, seed=4)
    assert not np.array_equal(a["image"], other["image"])
    assert not np.array_equal(a["image"], make_composite(ingr, "heldout", 7, seed=3)["image"])


def test_splits_use_disjoint_fashion_items_and_photos(ingr):
    """Fake ingredients make the source visible: ``train`` items are labels 0-4
    and ``t10k`` items 5-9; held-out photos are black (black stays black under
    the colour jitter), the others white."""
    assert not set(ingr.photo_names("train")) & set(ingr.photo_names("heldout"))
    assert set(ingr.photo_names("heldout")) == set(HELD_OUT_PHOTOS)
    assert set(ingr.photo_names("train")) | set(HELD_OUT_PHOTOS) == set(ingr.photos)
    item = np.zeros((28, 28), np.uint8)
    item[4:24, 6:22] = 200
    items = np.stack([item] * 20)
    fake = Ingredients(
        {"train": (items, np.arange(20) % 5), "t10k": (items, 5 + np.arange(20) % 5)},
        {n: np.full((64, 64, 3), 0 if n in HELD_OUT_PHOTOS else 255, np.uint8) for n in ingr.photos},
    )
    fashion_labels = {"train": set(), "heldout": set()}
    for split in ("train", "heldout"):
        for i in range(40):
            c = make_composite(fake, split, i, cfg=SMALL_CFG)
            bg = c["background"]
            assert (bg == 0).all() if split == "heldout" else (bg > 0).any()
            fashion_labels[split] |= {int(x) - 1 for x in c["labels"] if x <= 10}
    assert fashion_labels["train"] <= set(range(5)) and fashion_labels["heldout"] <= set(range(5, 10))
    assert fashion_labels["train"] and fashion_labels["heldout"]


def test_plain_photos_box_the_item_on_a_plain_frame(ingr):
    """Drawn at full size without JPEG, a plain photo is its background
    everywhere but the item's pixels, and the box is the tight box of the
    pixels more than ``mask_threshold`` of the way from the background to the
    item's colour (give or take 3 levels: the rendering rounds). Both polarities occur."""
    cfg = dataclasses.replace(CompositeConfig(), plain_jpeg=0.0, plain_native=(1.0, 1.0))
    light = 0
    for split in ("train", "heldout"):
        for i in range(40):
            c = make_plain(ingr, split, i, cfg=cfg)
            img, bg = c["image"].astype(float), c["background"].astype(float)
            assert c["image"].shape == (256, 256, 3) and len(c["boxes"]) == len(c["labels"]) == 1
            assert 1 <= int(c["labels"][0]) <= 10  # a fashion class, never a shape
            ch = int(np.argmax(np.abs(c["foreground"] - bg[0, 0])))  # the channel of most contrast
            intensity = (img[..., ch] - bg[..., ch]) / (c["foreground"][ch] - bg[0, 0, ch])
            x0, y0, x1, y1 = c["boxes"][0]
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            assert max(x1 - x0, y1 - y0) > 0.4 * 256, "a plain photo's item spans most of the frame"
            # every pixel clearly above the threshold is inside; each edge holds one near it
            above, near = intensity > (cfg.mask_threshold + 3) / 255, intensity > (cfg.mask_threshold - 3) / 255
            x0, y0, x1, y1 = (int(round(float(v))) for v in c["boxes"][0])
            assert above.sum() == above[y0:y1, x0:x1].sum() > 0, "an item pixel outside the box"
            inner = near[y0:y1, x0:x1]
            assert inner[0].any() and inner[-1].any() and inner[:, 0].any() and inner[:, -1].any(), "a loose box"
            light += bg.mean() > 128
    assert 0.4 * 80 <= light <= 0.8 * 80  # plain_light 0.6: dark items on light frames, and the other way


def test_plain_photos_are_deterministic_and_keep_the_splits_apart(ingr):
    a, b = make_plain(ingr, "train", 5, seed=3), make_plain(ingr, "train", 5, seed=3)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["boxes"], b["boxes"])
    assert not np.array_equal(a["image"], make_plain(ingr, "heldout", 5, seed=3)["image"])
    item = np.zeros((28, 28), np.uint8)
    item[4:24, 6:22] = 200
    items = np.stack([item] * 20)
    fake = Ingredients({"train": (items, np.arange(20) % 5), "t10k": (items, 5 + np.arange(20) % 5)}, ingr.photos)
    train = {int(make_plain(fake, "train", i)["labels"][0]) - 1 for i in range(40)}
    held = {int(make_plain(fake, "heldout", i)["labels"][0]) - 1 for i in range(40)}
    assert train == set(range(5)) and held == set(range(5, 10))  # held-out plain photos: t10k items only


def test_mixed_data_holds_exactly_the_plain_and_empty_shares(ingr):
    cfg = CompositeConfig().scaled(128)
    assert sum(picks(i, 0.3) for i in range(1000)) == 300
    assert sum(picks(i, 0.3) for i in range(500, 510)) == 3  # spread evenly
    kinds = [mixed_kind(i, cfg) for i in range(1000)]
    assert (kinds.count("plain"), kinds.count("empty")) == (300, 100)
    assert {mixed_kind(i, cfg) for i in range(500, 520)} == {"plain", "empty", "composite"}
    make = {"composite": make_composite, "plain": make_plain, "empty": make_empty}
    data = CompositeDataset(ingr, "train", 20, cfg=cfg, kind="mixed")
    for i in range(20):
        image, target = data[i]
        want = make[mixed_kind(i, cfg)](ingr, "train", i, 0, cfg)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), want["image"])
        assert np.array_equal(target["boxes"].numpy(), want["boxes"])
    with pytest.raises(ValueError, match="kind: 'photos'"):
        CompositeDataset(ingr, "train", 1, kind="photos")


def test_recall_at_counts_each_box_once_by_class_and_score(script):
    t = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), "labels": np.array([1, 2])}]
    d = [{"boxes": np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30], [20, 20, 30, 30]], float),
          "scores": np.array([0.9, 0.8, 0.4, 0.9]), "labels": np.array([1, 1, 2, 1])}]  # fmt: skip
    # box 1 found (the duplicate finds nothing more); box 2's own-class box scores below 0.5, the other is class 1
    assert script.recall_at(d, t, 0.5) == 0.5
    assert script.recall_at(d, t, 0.3) == 1.0
    assert np.isnan(script.recall_at([], [], 0.5))


def test_ingredients_npz_round_trip(ingr, tmp_path):
    small = Ingredients({s: (x[:50], y[:50]) for s, (x, y) in ingr.fashion.items()}, ingr.photos)
    back = Ingredients.load(small.save(tmp_path / "ingredients.npz"))
    assert sorted(back.photos) == sorted(small.photos)
    for i in range(3):
        a, b = make_composite(small, "heldout", i), make_composite(back, "heldout", i)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["boxes"], b["boxes"])


def test_build_save_load_round_trip(script, tmp_path):
    cfg = {**script.SMALL_MODEL, "num_classes": len(CATEGORIES)}
    torch.manual_seed(0)
    model = pfdet.build(cfg).eval()
    path = pfdet.save(model, cfg, list(CATEGORIES), tmp_path / "det.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == pfdet.FORMAT and blob["categories"][0] == "__background__"
    assert all(v.dtype != torch.float32 for v in blob["state_dict"].values())
    loaded, categories, config = pfdet.load(path)
    assert categories == list(CATEGORIES) and config["fpn_channels"] == cfg["fpn_channels"]
    assert all(p.dtype == torch.float32 for p in loaded.parameters()) and not loaded.training
    model.half().float()  # what the file holds
    x = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        feats, feats2 = model.backbone(torch.stack(x)), loaded.backbone(torch.stack(x))
        assert list(feats) == ["0", "1", "2", "pool"] and loaded.backbone.out_channels == cfg["fpn_channels"]
        for k in feats:
            assert torch.equal(feats[k], feats2[k])
        out, out2 = model(x), loaded(x)
    assert len(out[0]["boxes"]) > 0
    for a, b in zip(out, out2):
        assert set(a) == {"boxes", "labels", "scores"}
        for k in a:
            assert torch.equal(a[k], b[k])


def test_a_short_cpu_run_lowers_the_loss(script, ingr):
    args = Namespace(device="cpu", seed=0, steps=24, max_steps=24, budget_s=0, batch_size=4, workers=0, lr=2e-3,
                     weight_decay=0.05, warmup=3, log_every=8, bf16=False)  # fmt: skip
    cfg = {**pfdet.DEFAULT_CONFIG, **script.SMALL_MODEL, "num_classes": len(CATEGORIES)}
    with one_thread():
        _, figures = script.train(args, ingr, cfg, SMALL_CFG)
    losses = [row["loss"] for row in figures["history"]]
    assert figures["steps"] == 24 and len(losses) == 3
    assert losses[-1] < 0.9 * losses[0], losses


def _coco_case():
    """Two classes, three images: hits, a duplicate, a poor overlap, a miss and
    a false alarm in an image without that class. Scores are all distinct."""
    gts = [
        {"boxes": np.array([[10, 10, 50, 50], [60, 60, 100, 120]], float), "labels": np.array([1, 2])},
        {"boxes": np.array([[0, 0, 30, 30], [40, 0, 90, 40]], float), "labels": np.array([1, 1])},
        {"boxes": np.array([[20, 20, 80, 70]], float), "labels": np.array([2])},
    ]
    dets = [
        {"boxes": np.array([[11, 11, 50, 52], [12, 10, 49, 50], [60, 62, 100, 118]], float),
         "scores": np.array([0.9, 0.6, 0.8]), "labels": np.array([1, 1, 2])},
        {"boxes": np.array([[1, 0, 30, 31], [70, 10, 120, 50]], float),
         "scores": np.array([0.7, 0.5]), "labels": np.array([1, 1])},
        {"boxes": np.array([[20, 20, 80, 70], [0, 0, 20, 20]], float),
         "scores": np.array([0.3, 0.4]), "labels": np.array([2, 1])},
    ]  # fmt: skip
    return dets, gts


def _coco_eval(dets, gts, categories):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]  # noqa: E731
    anns = []
    for i, g in enumerate(gts):
        for b, c in zip(g["boxes"], g["labels"]):
            area = float((b[2] - b[0]) * (b[3] - b[1]))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": xywh(b),
                         "iscrowd": 0, "area": area})  # fmt: skip
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(len(gts))], "annotations": anns,
                  "categories": [{"id": c} for c in range(1, len(categories))]}  # fmt: skip
    gt.createIndex()
    res = [{"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
           for i, d in enumerate(dets) for b, c, s in zip(d["boxes"], d["labels"], d["scores"])]  # fmt: skip
    ev = COCOeval(gt, gt.loadRes(res), "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # recall x class, all areas, 100 detections
    return {c: float(prec[:, k][prec[:, k] > -1].mean()) for k, c in enumerate(range(1, len(categories)))}


def test_ap_matches_pycocotools(script):
    """With COCO's 101-point interpolation our AP equals COCOeval's at IoU 0.5
    exactly; the default all-point AP differs from it by design (by less than
    1/101 per class here). In the hand-made case class ``a`` finds 2 of its 3
    boxes (and has a duplicate, a poor overlap and a false alarm in an image
    without ``a``): all-point AP 2/3, 101-point 67/101; class ``b`` is 1 in both."""
    pytest.importorskip("pycocotools")
    dets, gts = _coco_case()
    cats = ["__background__", "a", "b"]
    coco = _coco_eval(dets, gts, cats)
    ours = script.mean_ap(dets, gts, cats, recall_points=101)["per_class"]
    assert coco == pytest.approx({1: 67 / 101, 2: 1.0}, abs=1e-12)
    assert ours["a"]["ap"] == pytest.approx(coco[1], abs=1e-12) and ours["b"]["ap"] == pytest.approx(coco[2])
    all_point = script.mean_ap(dets, gts, cats)
    assert all_point["per_class"]["a"]["ap"] == pytest.approx(2 / 3) and all_point["mAP"] == pytest.approx(5 / 6)
    assert all_point["per_class"]["a"]["gt"] == 3
    # a case that tells the interpolations apart: hit, miss, hit, miss against 3 boxes
    g = [np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float)]
    d = [(np.array([[0, 0, 10, 10], [60, 60, 70, 70], [20, 20, 30, 30], [80, 80, 90, 90]], float),
          np.array([0.9, 0.8, 0.7, 0.6]))]  # fmt: skip
    assert script.average_precision(d, g) == pytest.approx(5 / 9)  # 1/3 * 1 + 1/3 * 2/3
    assert script.average_precision(d, g, recall_points=101) == pytest.approx((34 + 33 * 2 / 3) / 101)
    gd = [{"boxes": g[0], "labels": np.array([1, 1, 1])}]
    dd = [{"boxes": d[0][0], "scores": d[0][1], "labels": np.array([1, 1, 1, 1])}]
    assert _coco_eval(dd, gd, cats[:2])[1] == pytest.approx((34 + 33 * 2 / 3) / 101, abs=1e-12)


@pytest.mark.skipif(not ASSET.exists(), reason="pipeline/assets/pf-tiny-detector.pt not built yet")
def test_shipped_detector_finds_held_out_objects(script, ingr):
    model, categories, config = pfdet.load(ASSET, "cpu")
    assert categories == list(CATEGORIES) and ASSET.stat().st_size <= 10.5e6
    ccfg = CompositeConfig().scaled(config["min_size"])
    with one_thread():
        figures = script.evaluate(model, ingr, 150, 1000, ccfg, "cpu", workers=0)
        plain = script.evaluate(model, ingr, 150, 1000, ccfg, "cpu", workers=0, kind="plain")
    assert figures["mAP"] >= 0.6, json.dumps(figures["per_class"])
    # plain product photos (the demo's kind): found at the regions stage's default score threshold
    assert plain["mAP"] >= PLAIN_MAP and plain["recall_at_0.5"] >= PLAIN_RECALL, json.dumps(plain)
