"""Blur faces in an image and encode it again: DataComp's release rule (every
face in the published pool blurred), applied to the bytes a run stores.

How a face is blurred: the face box is grown by ``margin`` of its size on
every side (MTCNN's box stops at the brow and the chin; hair and ears
identify too), the grown box is Gaussian-blurred with a sigma of
``strength`` times the face's longer side (scaled with the face, so a
large face is as unreadable as a small one), and the blurred pixels are
blended in through a mask that is 1 over the face box and falls linearly
to 0 across the margin (no hard seam for a detector to key on). Blurring
reads the original pixels for every box, so overlapping faces do not blur
each other twice. ``tests/stages/test_safety_faces.py`` checks that MTCNN, which
found the faces before, finds none after.

The image is encoded again in its own format (``image_ext``) with OpenCV,
as the download stage encodes (JPEG and WebP at ``quality``); an image with
no face keeps its bytes untouched.
"""

from __future__ import annotations

import math

import numpy as np

#: grow each face box by this share of its width/height on every side
MARGIN = 0.25
#: Gaussian sigma as a share of the face's longer side
STRENGTH = 0.15


def blur_faces(rgb: np.ndarray, boxes: np.ndarray, margin: float = MARGIN, strength: float = STRENGTH) -> np.ndarray:
    """A copy of ``rgb`` (``H x W x C`` uint8) with every box of ``boxes``
    (``K x 4`` xyxy in pixels) blurred as the module doc says."""
    import cv2

    out = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        mx, my = margin * bw, margin * bh
        gx0, gy0 = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
        gx1, gy1 = min(w, math.ceil(x1 + mx)), min(h, math.ceil(y1 + my))
        if gx1 <= gx0 or gy1 <= gy0:
            continue
        sigma = max(1.0, strength * max(bw, bh))
        pad = int(math.ceil(3 * sigma))  # blur with the surroundings, not a mirrored copy of the crop
        px0, py0, px1, py1 = max(0, gx0 - pad), max(0, gy0 - pad), min(w, gx1 + pad), min(h, gy1 + pad)
        blurred = cv2.GaussianBlur(rgb[py0:py1, px0:px1].astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        blurred = blurred[gy0 - py0 : gy1 - py0, gx0 - px0 : gx1 - px0]
        if blurred.ndim == 2:
            blurred = blurred[:, :, None]
        ys = np.arange(gy0, gy1, dtype=np.float32) + 0.5
        xs = np.arange(gx0, gx1, dtype=np.float32) + 0.5
        wy = _ramp(ys, y0, y1, my)
        wx = _ramp(xs, x0, x1, mx)
        alpha = (wy[:, None] * wx[None, :])[:, :, None]
        region = out[gy0:gy1, gx0:gx1].reshape(gy1 - gy0, gx1 - gx0, -1)
        blended = region * (1 - alpha) + blurred * alpha
        out[gy0:gy1, gx0:gx1] = blended.reshape(out[gy0:gy1, gx0:gx1].shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _ramp(t: np.ndarray, lo: float, hi: float, margin: float) -> np.ndarray:
    """1 on ``[lo, hi]``, falling linearly to 0 at ``margin`` outside it."""
    if margin <= 0:
        return ((t >= lo) & (t <= hi)).astype(np.float32)
    outside = np.maximum(lo - t, 0) + np.maximum(t - hi, 0)
    return np.clip(1.0 - outside / margin, 0.0, 1.0).astype(np.float32)


def encode(rgb: np.ndarray, ext: str, quality: int) -> bytes:
    """``rgb`` as ``ext`` (``jpg``, ``png`` or ``webp``) bytes, with OpenCV."""
    import cv2

    ext = (ext or "jpg").lower().lstrip(".")
    params = {"jpg": [cv2.IMWRITE_JPEG_QUALITY, quality], "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
              "webp": [cv2.IMWRITE_WEBP_QUALITY, quality]}.get(ext, [])  # fmt: skip
    arr = rgb[:, :, ::-1] if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    ok, buf = cv2.imencode(f".{ext}", np.ascontiguousarray(arr), params)
    if not ok:
        raise ValueError(f"cannot encode an image as {ext!r}")
    return buf.tobytes()
