"""Thumbnails for ``pairforge report``: image bytes read from a run's
``shards/*.tar`` by key, decoded, shrunk, and drawn on with their regions.

Why apart from the report's reader: this is the only part that touches
image bytes and the tar members' names (``{key}.{jpg,png,webp}``, see
``manifests/FORMAT.md``), and the only part that needs PIL's drawing; the
reader passes keys in and gets bytes for files back.
"""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pairforge.manifests import layout

THUMB = 192  # longest side of a thumbnail, pixels
REGION_SIDE = 320  # images with boxes are drawn this large so labels stay legible
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324")


def read_images(out, wanted: dict[str, int]) -> dict[str, bytes]:
    """Image bytes of the keys in ``wanted`` (key -> shard id) from their tars."""
    by_shard: dict[int, set[str]] = {}
    for key, sid in wanted.items():
        by_shard.setdefault(int(sid), set()).add(str(key))
    found = {}
    for sid, keys in sorted(by_shard.items()):
        path = layout.shard_tar(out, sid)
        if not path.exists():
            continue
        try:
            with tarfile.open(path) as tf:
                for m in tf:
                    key, _, ext = m.name.partition(".")
                    if m.isfile() and key in keys and ext.lower() in IMAGE_EXTS:
                        found[key] = tf.extractfile(m).read()
        except tarfile.TarError as e:
            raise ValueError(f"{path} is not a readable tar: {e}") from e
    return found


def decode(data: bytes | None) -> Image.Image | None:
    if not data:
        return None
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.convert("RGB")
    except (OSError, ValueError):
        return None


def safe_name(key) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(key))


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_regions(im: Image.Image, boxes: np.ndarray, labels, scores, colours: dict) -> Image.Image:
    """The image scaled to ``REGION_SIDE`` with its boxes (normalised xyxy)
    and ``label score`` tags drawn on it."""
    s = REGION_SIDE / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)
    draw, font = ImageDraw.Draw(im), _font(12)
    for (x0, y0, x1, y1), lab, sc in zip(np.asarray(boxes, np.float64).reshape(-1, 4), labels, scores):
        x0, x1 = sorted((x0 * im.width, x1 * im.width))
        y0, y1 = sorted((y0 * im.height, y1 * im.height))
        colour = colours.get(str(lab), PALETTE[0])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        tag = f"{lab} {float(sc):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tw, th = right - left, bottom - top
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0  # above the box, or inside it at the image's top
        draw.rectangle((x0, ty, x0 + tw + 4, ty + th + 4), fill=colour)
        draw.text((x0 + 2 - left, ty + 2 - top), tag, fill="white", font=font)
    return im


def thumbnail(data: bytes | None) -> bytes | None:
    """A JPEG of the image at most ``THUMB`` pixels on its longest side (``None``: unreadable)."""
    im = decode(data)
    if im is None:
        return None
    im.thumbnail((THUMB, THUMB))
    return jpeg_bytes(im)


def regions_png(data: bytes | None, boxes, labels, scores, colours: dict) -> bytes | None:
    """A PNG of the image with its boxes drawn (``None``: unreadable)."""
    im = decode(data)
    return None if im is None else png_bytes(draw_regions(im, boxes, labels, scores, colours))


def colours_for(labels) -> dict:
    """Label -> colour, the most frequent label first (``labels``: a Counter)."""
    return {lab: PALETTE[i % len(PALETTE)] for i, (lab, _) in enumerate(labels.most_common())}
