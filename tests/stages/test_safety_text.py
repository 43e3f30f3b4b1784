"""Text in images (stages/common/textdet.py) with PP-OCRv4's real detector
from the rapidocr-onnxruntime wheel: PIL-rendered labels of several sizes
pasted on photos are found, with the text area within 25% of the label's,
photos without text score near 0, and the threshold drops rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pairforge.pipeline.datasets import skimage_photos
from pairforge.stages.base import STATUS_OK, fresh_rows, object_array, run_stage_batch
from pairforge.stages.common import nets as _nets
from pairforge.stages.common import onnx as _onnx
from pairforge.stages.common import textdet as _text
from pairforge.stages.safety import Config, SafetyStage

#: (text, font size in px of a 256 px image, where it is drawn)
LABELS = (
    ("Limited offer: buy now", 12, (20, 200)),
    ("www.example.com", 18, (60, 20)),
    ("SALE 50% OFF", 28, (30, 110)),
    ("STOCK", 44, (60, 60)),
)
#: photos with text in them (the page, handwriting, a clock's numerals)
HAS_TEXT = ("page", "text", "clock")


@pytest.fixture(scope="module")
def detector():
    return _text.TextDetector(_nets.OrtNet(_onnx.resolve("", _text.PACKAGE, _text.MODEL_FILE), "cpu", 1), 256, 8)


@pytest.fixture(scope="module")
def photos():
    return {name: np.array(Image.fromarray(img).resize((256, 256), Image.BICUBIC)) for name, _, img in skimage_photos()}


def with_label(photo: np.ndarray, text: str, size: int, xy) -> tuple[np.ndarray, float]:
    """``photo`` with ``text`` in black on a white label 2 px larger than the
    ink on every side, and the label's share of the image."""
    im = Image.fromarray(photo)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    box = (left - 2, top - 2, right + 2, bottom + 2)
    draw.rectangle(box, fill=(255, 255, 255))
    draw.text(xy, text, font=font, fill=(0, 0, 0))
    share = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) / (photo.shape[0] * photo.shape[1])
    return np.array(im), share


def test_pasted_text_of_several_sizes_is_found(detector, photos):
    cases = [(name, *label, *with_label(photos[name], *label)) for name in ("coffee", "chelsea", "astronaut", "rocket")
             for label in LABELS]  # fmt: skip
    found = detector.detect([c[4] for c in cases])
    ratios = [area / c[5] for c, (_, area) in zip(cases, found)]
    print("\ntext area / label area:", [f"{c[0]} {c[2]}px {r:.2f}" for c, r in zip(cases, ratios)])
    for c, r, (quads, _) in zip(cases, ratios, found):
        assert 0.75 <= r <= 1.25, (c[:3], r)
        assert quads.shape == (1, 4, 2) and quads.dtype == np.float32


def test_photos_without_text_score_near_zero(detector, photos):
    plain = [n for n in photos if n not in HAS_TEXT]
    found = dict(zip(plain, (area for _, area in detector.detect([photos[n] for n in plain]))))
    print("\ntext_area of photos without text:", {n: round(a, 4) for n, a in found.items()})
    assert max(found.values()) < 0.01, found
    (_, page), = detector.detect([photos["page"]])  # fmt: skip
    assert page > 0.3  # a scanned page is mostly text


def test_boxes_are_clockwise_corners_normalised(detector, photos):
    img, _ = with_label(photos["coffee"], "SALE 50% OFF", 28, (30, 110))
    ((quads, area),) = detector.detect([img])
    (q,) = quads
    assert np.all((q >= 0) & (q <= 1))
    # top-left first, then top-right, bottom-right, bottom-left
    assert q[0, 0] < q[1, 0] and q[1, 1] < q[2, 1] and q[3, 0] < q[2, 0] and q[0, 1] < q[3, 1]
    assert area == pytest.approx(_text.area_share(quads, 256, 256))
    assert _text.area_share(np.array([[[0, 0], [1, 0], [1, 1], [0, 1]]], np.float32), 50, 70) == 1.0


def test_the_stage_keeps_boxes_and_drops_above_the_threshold(photos):
    images = []
    for img in (photos["chelsea"], with_label(photos["chelsea"], "STOCK", 44, (60, 60))[0], photos["page"]):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        images.append(buf.getvalue())
    rows = fresh_rows([f"00000{i:04d}" for i in range(3)], caption=object_array(["x"] * 3))
    rows["image"] = object_array(images)
    st = SafetyStage(Config(nsfw=False, text_boxes=True, text_threshold=0.2))
    out = run_stage_batch(st, rows)
    assert [len(b) for b in out["text_boxes"][:2]] == [0, 1] and out["text_boxes"][0].shape == (0, 4, 2)
    assert out["text_area"][0] == 0 and 0.05 < out["text_area"][1] < 0.2 and out["text_area"][2] > 0.2
    assert list(out["status"] == STATUS_OK) == [True, True, False]
    assert out["reason"][2] == "too_much_text"
    assert {c.name for c in st.outputs()} == {"text_area", "text_boxes"}


def test_a_missing_model_or_package_is_one_line_naming_the_key():
    assert SafetyStage(Config(blur_faces=True)).check({}) == []
    lines = SafetyStage(Config(nsfw_model="/nowhere/320n.onnx", text_model="/nowhere/det.onnx")).check({})
    assert [line.split(":")[0] for line in lines] == ["nsfw_model", "text_model"]
    assert "/nowhere/320n.onnx" in lines[0]
