"""The MTCNN backend (stages/common/faces.py) on real photos: it finds the
astronaut's face where a person sees it, nothing in photos without faces,
and never raises on images too small or grey for MTCNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pairforge.stages.common.detectors import Limits
from pairforge.stages.common.faces import LABEL, load_faces, weights_sha256

#: data.astronaut() (512 x 512): Eileen Collins' face, forehead below the
#: fringe to the chin, cheek to cheek (ears out), set by eye on a 5x crop
#: with a 10-pixel grid; MTCNN's box reaches higher up the forehead
ASTRONAUT_FACE = (180.0, 78.0, 268.0, 178.0)


@pytest.fixture(scope="module")
def det():
    return load_faces("cpu", Limits())


def chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous()


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def test_finds_the_astronauts_face(det):
    (r,) = det.detect([chw(data.astronaut())])
    assert r.boxes.shape == (1, 4) and r.boxes.dtype == np.float32
    assert list(r.labels) == [LABEL] and r.features is None
    assert r.scores[0] > 0.99
    assert iou(r.boxes[0].tolist(), ASTRONAUT_FACE) >= 0.5


def test_the_same_face_when_grey_or_one_channel(det):
    grey = np.array(Image.fromarray(data.astronaut()).convert("L"))
    as_rgb = chw(np.asarray(Image.fromarray(grey).convert("RGB")))
    for r in det.detect([as_rgb, torch.from_numpy(grey)[None], torch.from_numpy(grey)]):
        assert len(r.scores) == 1 and iou(r.boxes[0].tolist(), ASTRONAUT_FACE) >= 0.5


def test_no_face_in_photos_without_one(det):
    images = [chw(data.coffee()), chw(data.chelsea()), torch.full((3, 256, 256), 128, dtype=torch.uint8)]
    for r in det.detect(images):
        assert r.boxes.shape == (0, 4) and len(r.labels) == 0 and len(r.scores) == 0


def test_tiny_images_give_empty_regions(det):
    rng = np.random.default_rng(0)
    images = [
        torch.zeros((3, 1, 1), dtype=torch.uint8),
        torch.from_numpy(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)),
        torch.full((1, 8, 8), 200, dtype=torch.uint8),
        torch.from_numpy(rng.integers(0, 256, (3, 19, 300), dtype=np.uint8)),  # short side < min_face_size
        torch.from_numpy(rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)),  # one pyramid level
    ]
    out = det.detect(images)
    assert len(out) == len(images)
    for r in out[:4]:
        assert r.boxes.shape == (0, 4) and len(r.scores) == 0
    assert det.detect([]) == []


def test_a_batch_of_mixed_sizes_keeps_order_and_matches_one_by_one(det):
    ast, cat = chw(data.astronaut()), chw(data.chelsea())
    small = chw(np.asarray(Image.fromarray(data.astronaut()).resize((256, 256))))
    images = [cat, ast, small, torch.zeros((3, 4, 4), dtype=torch.uint8), ast]
    batched = det.detect(images)
    alone = [det.detect([t])[0] for t in images]
    assert [len(r.scores) for r in batched] == [0, 1, 1, 0, 1]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3)
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
    half = np.array(ASTRONAUT_FACE) / 2  # the 256 x 256 copy
    assert iou(batched[2].boxes[0].tolist(), half.tolist()) >= 0.5


def test_boxes_are_clipped_to_the_image(det):
    # the face cut by the crop's left and top edges: MTCNN's own box starts at about (-43, -26)
    crop = data.astronaut()[70:270, 190:390]
    (r,) = det.detect([chw(crop)])
    assert r.boxes.shape == (1, 4)
    x0, y0, x1, y1 = r.boxes[0]
    assert x0 == 0 and y0 == 0 and 0 < x1 <= crop.shape[1] and 0 < y1 <= crop.shape[0]


def test_limits_apply(det):
    assert det.detect([chw(data.astronaut())])[0].scores.size == 1
    strict = load_faces("cpu", Limits(score_threshold=1.01))
    assert strict.detect([chw(data.astronaut())])[0].scores.size == 0
    none = load_faces("cpu", Limits(max_regions=0))
    assert none.detect([chw(data.astronaut())])[0].scores.size == 0


def test_identity_and_declared_shape(det):
    assert det.categories == ("face",) and det.feature_dim == 0
    ident = det.identity
    assert ident["backend"] == "mtcnn" and ident["package"] == "facenet-pytorch"
    assert ident["version"] == "2.5.3" and ident["sha256"] == weights_sha256() and len(ident["sha256"]) == 64
    with pytest.raises(ValueError, match="thresholds"):
        load_faces("cpu", Limits(), thresholds=(0.6, 0.7))
