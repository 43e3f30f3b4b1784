"""The regions stage with real offline detectors: the shipped pf-tiny
detector finds the objects of held-out composites through the stage (JPEG
bytes in, normalised boxes out), MTCNN's faces merge with its boxes and are
pooled on its feature map, and CLIP names and embeds the crops."""

import io

import numpy as np
import pytest
from PIL import Image

from pairforge.stages.base import fresh_rows, object_array, run_stage_batch
from pairforge.stages.regions import PF_TINY, Config, DetectorSpec, RegionsStage

SCORER = PF_TINY.parent / "pf-tiny-scorer.pt"
pytestmark = pytest.mark.skipif(not PF_TINY.exists(), reason="no shipped pf-tiny detector")
#: images a detector call where a test has one or two: a short call is still
#: padded with copies of its last image, without the default's (64) copies
#: of a 512 x 512 photo through MTCNN on the CPU
MICRO = 2


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _rows(arrays: list) -> dict:
    n = len(arrays)
    rows = fresh_rows([f"00000{i:04d}" for i in range(n)], caption=object_array(["a photo"] * n))
    rows["image"] = object_array([_jpeg(a) for a in arrays])
    return rows


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_pf_tiny_finds_the_objects_of_held_out_composites():
    from pairforge.trainer.detection_data import CATEGORIES, Ingredients, make_composite

    ingr = Ingredients.from_sources(train_items=1, t10k_items=500)
    comps = [make_composite(ingr, "heldout", i, seed=11) for i in range(24)]
    out = run_stage_batch(RegionsStage(Config(batch_size=32, micro_batch=8)), _rows([c["image"] for c in comps]))
    found = total = 0
    for c, boxes, labels in zip(comps, out["region_boxes"], out["region_labels"]):
        h, w = c["image"].shape[:2]
        px = boxes * np.array([w, h, w, h])
        for gt, lab in zip(c["boxes"], c["labels"]):
            total += 1
            found += any(lb == CATEGORIES[lab] and _iou(gt, b) >= 0.5 for b, lb in zip(px, labels))
    assert total > 50 and found / total >= 0.7, (found, total)


def test_faces_merge_with_pf_tiny_boxes_and_share_its_feature_map():
    from skimage import data

    cfg = Config(detectors=(DetectorSpec("pf-tiny"), DetectorSpec("mtcnn")), score_threshold=0.5, micro_batch=MICRO)
    st = RegionsStage(cfg)
    out = run_stage_batch(st, _rows([data.astronaut(), data.coffee()]))
    labels, feats = out["region_labels"], out["region_feats"]
    face = [i for i, lab in enumerate(labels[0]) if lab == "face"]
    assert len(face) == 1 and "face" not in list(labels[1])
    assert feats[0].shape == (len(labels[0]), 96) and np.abs(feats[0][face[0]].astype(np.float32)).sum() > 0
    assert np.all(np.diff(out["region_scores"][0]) <= 0)  # merged best first


@pytest.mark.skipif(not SCORER.exists(), reason="no shipped pf-tiny scorer")
def test_clip_names_class_agnostic_boxes_and_embeds_every_crop(tmp_path):
    from skimage import data

    vocab = tmp_path / "names.txt"
    vocab.write_text("astronaut\ncat\ncup of coffee\n")
    cfg = Config(
        detectors=(DetectorSpec("pf-tiny"), DetectorSpec("mtcnn", class_agnostic=True)),
        features=("roi", "clip"),
        clip_labels="agnostic",
        clip_model="pf-tiny",
        clip_pretrained=str(SCORER),
        vocabulary=str(vocab),
        micro_batch=MICRO,
    )
    st = RegionsStage(cfg)
    out = run_stage_batch(st, _rows([data.astronaut()]))
    labels, clip = list(out["region_labels"][0]), out["region_clip"][0]
    assert "face" not in labels and any(lab in ("astronaut", "cat", "cup of coffee") for lab in labels)
    assert clip.shape == (len(labels), dict((c.name, c) for c in st.outputs())["region_clip"].shape[0])
    norms = np.linalg.norm(clip.astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-2)  # L2-normalised embeddings, as clip_score's
