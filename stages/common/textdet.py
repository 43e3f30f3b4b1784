"""Text in an image: the share of its area that PP-OCRv4's text detector
covers with text boxes (DataComp's and T-MARS's text signal, and a proxy
for watermarks, screenshots and slides).

The model is ``ch_PP-OCRv4_det_infer.onnx`` from the rapidocr-onnxruntime
wheel (1.4.4; PaddleOCR's multilingual DBNet detector, Apache-2.0). Only the
detector runs: the share needs no recognition. The file is opened directly
(``stages.common.onnx``): rapidocr itself is not imported, because it is
installed without its dependencies (its ``opencv-python`` would clash with
our headless OpenCV) and its post-processing needs pyclipper and shapely.

What this module does, and where it differs from rapidocr's ``TextDetector``:

* **input**: BGR scaled to -1..1 (rapidocr's mean and std of 0.5), like
  rapidocr; but the image is resized so its longer side is ``size`` (a
  multiple of 32) and padded at the bottom and right to ``size`` x ``size``,
  so every image of a batch has one shape. rapidocr instead scales the
  *shorter* side up to 736 px, which for a 256 px image is 8x the pixels
  and 8x the time (``bench/safety.py`` measures the sizes);
* **boxes**: Differentiable Binarization's post-processing as rapidocr has it
  (probability > ``thresh``, a 2 x 2 dilation, contours, their minimum-area
  rectangles, the mean probability inside each >= ``box_thresh``, then the
  rectangle grown by ``area * unclip_ratio / perimeter`` on every side).
  rapidocr grows the rectangle with pyclipper's rounded offset and takes the
  minimum-area rectangle again; for a rectangle that is the rectangle grown
  by the same distance on every side, which is computed here directly;
* **the share** (``text_area``): the boxes filled into a mask of the image's
  own size, overlaps counted once, divided by its area.

Both engines (:mod:`stages.common.nets`: ONNX Runtime, or the file converted
to torch) get the same letterboxed ``uint8`` images and their probability
maps go through the same :func:`boxes_from_map`.

Boxes are four corners (clockwise from the top-left one, x then y),
normalised to the image's width and height; rotated text gives rotated
quadrilaterals, not axis-aligned boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pairforge.stages.common.nets import Normalise, fixed_batch

PACKAGE, MODEL_FILE = "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"
PIP = "--no-deps rapidocr-onnxruntime==1.4.4 (with onnxruntime==1.32.0)"


@dataclass(frozen=True)
class DBParams:
    """rapidocr 1.4.4's defaults (its ``config.yaml``, section ``Det``)."""

    thresh: float = 0.3
    box_thresh: float = 0.5
    unclip_ratio: float = 1.6
    max_candidates: int = 1000
    #: boxes whose shorter side is below this (px of the network's input) are noise
    min_side: float = 3.0


#: rapidocr's mean and std of 0.5: pixels to -1..1
NORM = Normalise(1.0 / 127.5, -1.0)


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``H x W x 3`` uint8 RGB -> ``size x size x 3`` uint8 **BGR**, the
    image resized so its longer side is ``size`` and padded with black at the
    bottom and right, and the image's ``(h, w)`` inside it."""
    import cv2

    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    rh, rw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    canvas = np.zeros((size, size, 3), dtype=np.uint8)  # black padding: -1 once normalised
    canvas[:rh, :rw] = cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    return canvas, (rh, rw)


def prepare(rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``H x W x 3`` uint8 RGB -> the network's ``[3, size, size]`` float32
    input (see the module doc) and the image's ``(h, w)`` inside it."""
    canvas, inside = letterbox(rgb, size)
    return NORM.numpy(canvas[None])[0], inside


def boxes_from_map(prob: np.ndarray, p: DBParams = DBParams()) -> np.ndarray:
    """DB post-processing of one probability map ``[h, w]``: ``K x 4 x 2``
    float32 corners in the map's pixels (see the module doc)."""
    import cv2

    bitmap = cv2.dilate((prob > p.thresh).astype(np.uint8), np.ones((2, 2), np.uint8))
    contours = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)[-2]
    out = []
    for contour in contours[: p.max_candidates]:
        (cx, cy), (bw, bh), angle = cv2.minAreaRect(contour)
        if min(bw, bh) < p.min_side:
            continue
        corners = cv2.boxPoints(((cx, cy), (bw, bh), angle))
        if _mean_inside(prob, corners) < p.box_thresh:
            continue
        grow = bw * bh * p.unclip_ratio / (2.0 * (bw + bh))
        bw, bh = bw + 2 * grow, bh + 2 * grow
        if min(bw, bh) < p.min_side + 2:
            continue
        out.append(_clockwise(cv2.boxPoints(((cx, cy), (bw, bh), angle))))
    return np.asarray(out, dtype=np.float32).reshape(-1, 4, 2)


def _mean_inside(prob: np.ndarray, corners: np.ndarray) -> float:
    """Mean probability inside a quadrilateral (rapidocr's ``box_score_fast``)."""
    import cv2

    h, w = prob.shape
    x0, x1 = int(np.clip(np.floor(corners[:, 0].min()), 0, w - 1)), int(np.clip(np.ceil(corners[:, 0].max()), 0, w - 1))
    y0, y1 = int(np.clip(np.floor(corners[:, 1].min()), 0, h - 1)), int(np.clip(np.ceil(corners[:, 1].max()), 0, h - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    cv2.fillPoly(mask, [(corners - [x0, y0]).astype(np.int32)], 1)
    return float(cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0])


def _clockwise(pts: np.ndarray) -> np.ndarray:
    """Four corners from the top-left one, clockwise (image coordinates)."""
    centre = pts.mean(axis=0)
    order = np.argsort(np.arctan2(pts[:, 1] - centre[1], pts[:, 0] - centre[0]))
    pts = pts[order]
    start = int(np.argmin(pts[:, 0] + pts[:, 1]))
    return np.roll(pts, -start, axis=0)


def area_share(quads: np.ndarray, h: int, w: int) -> float:
    """The share of an ``h x w`` image inside any of ``quads`` (normalised
    corners), each pixel counted once."""
    import cv2

    if not len(quads):
        return 0.0
    mask = np.zeros((h, w), dtype=np.uint8)
    pts = np.round(np.asarray(quads, np.float64) * [w, h] * 4).astype(np.int32)  # 2 fractional bits
    cv2.fillPoly(mask, list(pts), 1, lineType=cv2.LINE_8, shift=2)
    return float(mask.mean())


class TextDetector:
    """PP-OCRv4's detector on any engine's net (:mod:`stages.common.nets`;
    see the module doc). ``pool``: an executor whose ``map`` letterboxes and
    post-processes images in threads (default: in this thread)."""

    def __init__(self, net, size: int = 320, micro_batch: int = 16, params: DBParams = DBParams(), pool=None):
        if size < 32 or size % 32:
            raise ValueError(f"text_size: expected a multiple of 32, >= 32, got {size!r}")
        self.net, self.size, self.micro_batch, self.params, self.pool = net, int(size), int(micro_batch), params, pool

    def detect(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Per ``H x W x 3`` uint8 RGB image: its text boxes (``K x 4 x 2``
        float32, normalised) and the share of its area they cover."""
        pmap = self.pool.map if self.pool is not None else map
        boxed = pmap(lambda im: letterbox(im, self.size), images)
        out: list[tuple[np.ndarray, float]] = []
        for a in range(0, len(images), self.micro_batch):
            chunk = images[a : a + self.micro_batch]
            prepared = [next(boxed) for _ in chunk]  # the pool letterboxes the next chunk meanwhile
            pred = self.net(fixed_batch(np.stack([p[0] for p in prepared]), self.micro_batch), NORM)
            out.extend(pmap(self._boxes, chunk, [p[1] for p in prepared], pred[:, 0]))
        return out

    def _boxes(self, image: np.ndarray, inside: tuple[int, int], prob: np.ndarray) -> tuple[np.ndarray, float]:
        rh, rw = inside
        quads = boxes_from_map(prob[:rh, :rw], self.params)
        quads = np.clip(quads / np.array([rw, rh], np.float32), 0.0, 1.0).astype(np.float32)
        return quads, area_share(quads, *image.shape[:2])
