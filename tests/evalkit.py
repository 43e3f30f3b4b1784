"""Labelled sets for the evaluation tests: Fashion-MNIST's *test* split
(Debian's dataset-fashion-mnist) written as an ImageFolder tree, a parquet
file and webdataset shards, the three layouts ``pairforge eval`` reads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pairforge.pipeline.datasets import FASHION_CLASSES, fashion_mnist


def fashion_png(img: np.ndarray, px: int = 56) -> bytes:
    """A Fashion-MNIST image as a catalogue photo: dark product on white, ``px`` square, PNG."""
    buf = io.BytesIO()
    Image.fromarray(255 - img).resize((px, px), Image.BICUBIC).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def fashion_test(n: int, offset: int = 0) -> tuple[list[bytes], np.ndarray]:
    images, labels = fashion_mnist("t10k")
    sl = slice(offset, offset + n)
    return [fashion_png(a) for a in images[sl]], labels[sl].astype(np.int64)


def write_image_folder(root: Path, images: list[bytes], labels: np.ndarray) -> Path:
    for i, (data, lab) in enumerate(zip(images, labels)):
        folder = root / FASHION_CLASSES[int(lab)].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(data)
    return root
