"""Real images that ship with registry packages, for the demo and tests:
skimage's photos (scikit-image) and Debian's Fashion-MNIST product photos."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

#: skimage photo name -> a caption a web page might carry
SKIMAGE_CAPTIONS = {
    "astronaut": "portrait of an astronaut in a white space suit in front of a flag",
    "chelsea": "a ginger tabby cat looking to the side",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "rocket": "a rocket on the launch pad before take off",
    "camera": "black and white photo of a man with a camera on a tripod",
    "coins": "old coins laid out in rows on a dark table",
    "moon": "close up of the cratered surface of the moon",
    "clock": "a wall clock photographed at an angle",
    "brick": "a red brick wall texture",
    "grass": "close up of green grass",
    "gravel": "grey gravel stones on the ground",
    "colorwheel": "a rainbow colour wheel",
    "retina": "a medical photograph of the retina of an eye",
    "page": "a scanned page of printed text",
    "text": "hand written text on paper",
}


def skimage_photos() -> list[tuple[str, str, np.ndarray]]:
    """(name, caption, RGB uint8 array) for each skimage photo we caption."""
    import skimage.data

    out = []
    for name, caption in SKIMAGE_CAPTIONS.items():
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append((name, caption, img[..., :3].astype(np.uint8)))
    return out


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "t10k", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 28, 28] uint8, labels [n])`` from Debian's dataset-fashion-mnist
    (``apt-get install dataset-fashion-mnist``). ``split`` is ``train`` or ``t10k``."""
    img_path = FASHION_DIR / f"{split}-images-idx3-ubyte.gz"
    if not img_path.exists():
        raise FileNotFoundError(f"{img_path} not found: install Debian's dataset-fashion-mnist package")
    images = _read_idx(img_path)
    labels = _read_idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz")
    return (images[:n], labels[:n]) if n else (images, labels)
