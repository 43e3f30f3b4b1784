"""The NSFW score (stages/common/nsfw.py) with NudeNet's real detector from
the nudenet wheel: its input is NudeNet's own, the score is the best
unsafe box NudeNet itself would report, ordinary photos and product shots
score below the default threshold, and the threshold drops rows with
reason ``nsfw`` (through the real detector, and through planted scores)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pairforge.pipeline.datasets import fashion_mnist, skimage_photos
from pairforge.stages.base import STATUS_OK, fresh_rows, object_array, run_stage_batch
from pairforge.stages.common import nets as _nets
from pairforge.stages.common import nsfw as _nsfw
from pairforge.stages.common import onnx as _onnx
from pairforge.stages.safety import Config, SafetyStage

THRESHOLD = Config().nsfw_threshold
#: scikit-image's synthetic colour wheel (a smooth disk, not a photo) is a known false
#: positive of NudeNet 3.4.2: BUTTOCKS_EXPOSED ~0.8; docs/safety.md says so
NOT_A_PHOTO = "colorwheel"


@pytest.fixture(scope="module")
def session():
    return _nets.OrtNet(_onnx.resolve("", _nsfw.PACKAGE, _nsfw.MODEL_FILE), "cpu", 1)


@pytest.fixture(scope="module")
def photos():
    return {name: img for name, _, img in skimage_photos()}


def jpeg(img: np.ndarray, side: int | None = 256) -> bytes:
    im = Image.fromarray(img).convert("RGB")
    if side:
        im = im.resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rows_of(images: list[bytes]):
    keys = [f"00000{i:04d}" for i in range(len(images))]
    rows = fresh_rows(keys, caption=object_array(["x"] * len(images)))
    rows["image"] = object_array(images)
    rows["image_ext"] = object_array(["jpg"] * len(images))
    return rows


def test_the_input_is_nudenets_own(photos):
    from nudenet.nudenet import _read_image

    for name in ("astronaut", "coffee"):
        img = photos[name]
        theirs = _read_image(img, 320)[0][0]  # given an array, NudeNet feeds its channels as they are
        assert np.array_equal(_nsfw.prepare(img, 320), theirs)


def test_the_score_is_the_best_unsafe_box_nudenet_reports(session, photos):
    from nudenet import NudeDetector

    det = _nsfw.NsfwDetector(session)
    theirs = NudeDetector()
    for name in (NOT_A_PHOTO, "coffee", "astronaut"):
        img = photos[name]
        (score,), (cls,) = det.scores([img])
        boxes = [d for d in theirs.detect(img) if d["class"] in _nsfw.UNSAFE]
        if score >= 0.25:  # NudeNet reports boxes from 0.25 (its NMS threshold)
            best = max(boxes, key=lambda d: d["score"])
            assert abs(best["score"] - score) < 1e-5 and best["class"] == cls
        else:
            assert not boxes or max(d["score"] for d in boxes) < 0.25


def test_rgb_not_nudenets_swapped_channels(session, photos):
    """NudeNet's detect(path) feeds BGR (module doc): with RGB the model is
    surer the astronaut's face is a woman's, as it is."""
    import cv2

    det = _nsfw.NsfwDetector(session, ("FACE_FEMALE", "FACE_MALE"))
    faces = _nsfw.NsfwDetector(session, ("FACE_MALE",))
    img = photos["astronaut"]
    (female,), _ = _nsfw.NsfwDetector(session, ("FACE_FEMALE",)).scores([img])
    (male,), _ = faces.scores([img])
    (male_bgr,), _ = faces.scores([img[..., ::-1].copy()])
    assert female > 0.75 and male < 0.25 < male_bgr
    assert det.scores([cv2.cvtColor(img, cv2.COLOR_RGB2BGR)])[1] == ["FACE_FEMALE"]


def test_photos_and_product_shots_score_below_the_default_threshold(photos):
    names = list(photos)
    fm, _ = fashion_mnist("t10k", 240)  # the demo's: dark product on white, 112 px
    shots = [jpeg(255 - x, 112) for x in fm]
    out = run_stage_batch(SafetyStage(Config(text=False)), rows_of([jpeg(photos[n]) for n in names] + shots))
    punsafe = out["punsafe"]
    assert punsafe.dtype == np.float32 and np.all((punsafe >= 0) & (punsafe <= 1))
    by_name = dict(zip(names, punsafe[: len(names)]))
    print("\npunsafe:", {n: round(float(s), 3) for n, s in by_name.items()},
          f"fashion-mnist max {punsafe[len(names):].max():.3f}")  # fmt: skip
    for name, score in by_name.items():
        if name != NOT_A_PHOTO:
            assert score < THRESHOLD, (name, score)
    assert punsafe[len(names) :].max() < THRESHOLD
    kept = out["status"] == STATUS_OK
    assert kept.sum() == len(kept) - 1 and out["reason"][names.index(NOT_A_PHOTO)] == "nsfw"


class PlantedScores(_nsfw.NsfwDetector):
    """The real detector, except that images whose top-left pixel is pure
    red get the score their top-right pixel's green channel says (0..255)."""

    def scores(self, images):
        real, classes = super().scores(images)
        for i, im in enumerate(images):
            if tuple(im[0, 0]) == (255, 0, 0):
                real[i], classes[i] = im[0, -1, 1] / 255.0, "BUTTOCKS_EXPOSED"
        return real, classes


def test_the_threshold_drops_planted_rows(session, photos):
    st = SafetyStage(Config(text=False, nsfw_threshold=0.6))
    st.setup()
    st._models["nsfw"] = PlantedScores(session, micro_batch=4)
    images = []
    for planted in (None, 250, 100, 160, None, 200):
        img = photos["chelsea"][:256, :256].copy()
        if planted is not None:
            img[:8, :8] = (255, 0, 0)
            img[:8, -8:] = (0, planted, 0)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")  # lossless: the planted pixels survive
        images.append(buf.getvalue())
    out = run_stage_batch(st, rows_of(images))
    assert list(out["status"] == STATUS_OK) == [True, False, True, False, True, False]
    assert set(out["reason"][[1, 3, 5]]) == {"nsfw"} and out["stage"][1] == "safety"
    import json

    detail = json.loads(out["detail"][1])
    assert detail["threshold"] == 0.6 and abs(detail["punsafe"] - 250 / 255) < 1e-6
    assert detail["class"] == "BUTTOCKS_EXPOSED" and len(detail["model"]["sha256"]) == 64


def test_a_batch_does_not_change_a_score(session, photos):
    det = _nsfw.NsfwDetector(session, micro_batch=4)
    imgs = [photos[n] for n in ("coffee", "chelsea", "rocket", "astronaut", "coins")]
    together, _ = det.scores(imgs)
    alone = [det.scores([im])[0][0] for im in imgs]
    assert np.array_equal(together, np.array(alone, np.float32))


def test_undecodable_images_fail_alone():
    out = run_stage_batch(SafetyStage(Config(text=False)), rows_of([b"not an image", jpeg(np.zeros((64, 64, 3), np.uint8))]))
    assert out["reason"][0] == "decode_error" and out["status"][0] == "failed" and np.isnan(out["punsafe"][0])
    assert out["status"][1] == STATUS_OK and out["punsafe"][1] < 0.1
