"""Images with exact boxes: the training and held-out data of the project's
offline detector (``pf-tiny-detector``, ``scripts/build_detector.py``).

No detection data set with boxes ships with a package here, so we make one
whose labels are true by construction: Fashion-MNIST product photos and
generated shapes pasted onto crops of scikit-image's photos. Every object is
pasted through a hard (binary) mask and an instance map records which object
owns each pixel, so an object's box is the tight box of the pixels of it that
are visible in the final image: fashion items and shapes follow one rule, and
for an unrotated circle or square it is the drawn geometry itself.

Composites alone teach a detector objects that cover at most ~40% of a busy
frame, so it found nothing on a plain catalogue shot, where one product fills
the frame on a white or black background (the demo's product photos: boxes on
1 of 216 kept). :func:`make_plain` makes those: one Fashion-MNIST item, either
polarity, filling most of a plain frame, drawn at a smaller native size and
often JPEG re-encoded before it is resized, as a small web photo reaches the
detector. A share ``plain_fraction`` of the training images are plain ones,
and a share ``empty_fraction`` photo crops with no object (a cat filling the
frame is no product); held-out figures are reported for each kind apart
(:class:`CompositeDataset`'s ``kind``; on empty crops: the share of images
with a false box).

The GPU machine that trains the detector has neither scikit-image nor Debian's
Fashion-MNIST, so :func:`save_ingredients` writes everything the generator
needs into one ``.npz`` (built here) and :class:`Ingredients` works from that
file alone (numpy + PIL; torch only for :class:`CompositeDataset`).

Held-out images share nothing with training ones: they use Fashion-MNIST's
``t10k`` items (training uses ``train``), the photos in :data:`HELD_OUT_PHOTOS`
(training uses the others) and other seed streams. An image is a function
of ``(seed, split, kind, index)`` only, so any number of loader workers in any order
produce the same data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pairforge.pipeline.datasets import FASHION_CLASSES

SHAPES = ("circle", "square", "triangle")
#: label 0 is the background, as in torchvision's weight enums' ``categories``
CATEGORIES = ("__background__", *FASHION_CLASSES, *SHAPES)
#: background photos only held-out composites use
HELD_OUT_PHOTOS = ("chelsea", "coins", "grass", "page")
#: split -> (Fashion-MNIST split, which photos)
SPLITS = {"train": "train", "heldout": "t10k"}
_SPLIT_CODE = {"train": 1, "heldout": 2}
#: the plain and empty images' own seed streams
_PLAIN_CODE = {"train": 3, "heldout": 4}
_EMPTY_CODE = {"train": 5, "heldout": 6}
#: what :class:`CompositeDataset` serves
KINDS = ("composite", "plain", "empty", "mixed")
_MAX_PHOTO_SIDE = 512


@dataclass(frozen=True)
class CompositeConfig:
    """How composites look. Object sizes are in pixels of the ``size`` image."""

    size: int = 256
    min_object: int = 24
    max_object: int = 110
    min_objects: int = 1
    max_objects: int = 6
    #: a new box may cover at most this share of an existing box (and vice versa)
    max_overlap: float = 0.15
    shape_fraction: float = 0.3
    #: a Fashion-MNIST pixel belongs to the item above this intensity (0-255)
    mask_threshold: int = 40
    #: the share of ``mixed`` (training) images that are plain product photos
    plain_fraction: float = 0.3
    #: a plain photo's item (its 28 px tile) spans this share of the frame's side
    plain_fill: tuple[float, float] = (0.55, 1.0)
    #: a plain photo is drawn at this share of ``size`` (the demo's 112 px of 256: 0.44), then resized
    plain_native: tuple[float, float] = (0.25, 1.0)
    #: the share of plain photos that are dark items on a light background (catalogue style)
    plain_light: float = 0.6
    #: the share of plain photos JPEG re-encoded (quality 50-95) at their native size
    plain_jpeg: float = 0.6
    #: the share of ``mixed`` images that are a background crop with no object: a large
    #: object-like thing in a photo (a cat, a cup) is no product
    empty_fraction: float = 0.1

    def scaled(self, size: int) -> CompositeConfig:
        """The same layout at another image size (``--small`` runs)."""
        f = size / self.size
        return replace(self, size=size, min_object=max(8, round(self.min_object * f)),
                       max_object=max(12, round(self.max_object * f)))  # fmt: skip


class Ingredients:
    """Fashion-MNIST arrays per split and the background photos by name."""

    def __init__(self, fashion: dict[str, tuple[np.ndarray, np.ndarray]], photos: dict[str, np.ndarray]):
        self.fashion = fashion
        self.photos = photos

    def photo_names(self, split: str) -> list[str]:
        held = split == "heldout"
        return sorted(n for n in self.photos if (n in HELD_OUT_PHOTOS) == held)

    @classmethod
    def from_sources(cls, train_items: int | None = 40000, t10k_items: int | None = None) -> Ingredients:
        """Read them from Debian's Fashion-MNIST and scikit-image (this machine)."""
        from pairforge.pipeline.datasets import fashion_mnist, skimage_photos

        fashion = {"train": fashion_mnist("train", train_items), "t10k": fashion_mnist("t10k", t10k_items)}
        photos = {}
        for name, _, img in skimage_photos():
            im = Image.fromarray(img)
            if max(im.size) > _MAX_PHOTO_SIDE:
                im.thumbnail((_MAX_PHOTO_SIDE, _MAX_PHOTO_SIDE), Image.BILINEAR)
            photos[name] = np.asarray(im)
        return cls(fashion, photos)

    @classmethod
    def load(cls, path: str | Path) -> Ingredients:
        with np.load(path, allow_pickle=False) as z:
            fashion = {s: (z[f"fashion_{s}_images"], z[f"fashion_{s}_labels"]) for s in ("train", "t10k")}
            photos = {k[len("photo_") :]: z[k] for k in z.files if k.startswith("photo_")}
        return cls(fashion, photos)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"photo_{n}": a for n, a in self.photos.items()}
        for s, (x, y) in self.fashion.items():
            arrays[f"fashion_{s}_images"], arrays[f"fashion_{s}_labels"] = x, y
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        return path


def save_ingredients(path: str | Path, train_items: int | None = 40000) -> Path:
    """Write the generator's ingredients (Fashion-MNIST ``train`` [first
    ``train_items``] and ``t10k`` items with labels, the skimage photos) to one npz."""
    return Ingredients.from_sources(train_items).save(path)


def _background(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo``, resized, flipped and colour-jittered (uint8 HxWx3)."""
    h, w = photo.shape[:2]
    side = rng.uniform(0.35, 1.0) * min(h, w)
    aspect = np.exp(rng.uniform(-0.25, 0.25))
    ch, cw = min(h, int(side * aspect)), min(w, int(side / aspect))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.2:
        im = im.transpose(Image.FLIP_TOP_BOTTOM)
    # channel shuffle, saturation, contrast and brightness: one affine map of the colours
    m = np.eye(3)[rng.permutation(3)] if rng.random() < 0.3 else np.eye(3)
    s = rng.uniform(0.3, 1.5)
    contrast, brightness = rng.uniform(0.6, 1.3), rng.uniform(0.6, 1.4)
    m = contrast * (s * np.eye(3) + (1 - s) / 3) @ m
    offset = float(np.asarray(im).mean()) * (brightness - contrast)
    matrix = np.concatenate([m, np.full((3, 1), offset)], 1)
    return np.asarray(im.convert("RGB", tuple(float(v) for v in matrix.ravel())))


def _shape_mask(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A binary mask of a shape ``side`` pixels across, cropped to its pixels."""
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    if kind == "circle":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
    elif kind == "square" and rng.random() < 0.6:
        draw.rectangle([0, 0, side - 1, side - 1], fill=255)
    else:  # a rotated square (a diamond at 45 degrees) or a triangle
        corners = 4 if kind == "square" else 3
        r = (side - 1) / 2 / (1.0 if corners == 3 else np.sqrt(2))
        t = rng.uniform(0, 2 * np.pi) + np.arange(corners) * 2 * np.pi / corners
        draw.polygon([((side - 1) / 2 + r * np.cos(a), (side - 1) / 2 + r * np.sin(a)) for a in t], fill=255)
    return _crop(np.asarray(im) > 0)


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _fashion_item(item: np.ndarray, size: int, cfg: CompositeConfig, rng: np.random.Generator):
    """(mask, intensity 0-1) of a Fashion-MNIST item resized to about ``size``."""
    aspect = np.exp(rng.uniform(-0.2, 0.2))
    wh = (max(4, round(size * aspect)), max(4, round(size / aspect)))
    v = np.asarray(Image.fromarray(item).resize(wh, Image.BILINEAR), dtype=np.float32)
    mask = v > cfg.mask_threshold
    ys, xs = np.nonzero(mask)
    sl = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return mask[sl], v[sl] / 255.0


def _overlaps(box, boxes, limit: float) -> bool:
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for b in boxes:
        iw, ih = min(x1, b[2]) - max(x0, b[0]), min(y1, b[3]) - max(y0, b[1])
        if iw > 0 and ih > 0 and iw * ih > limit * min(area, (b[2] - b[0]) * (b[3] - b[1])):
            return True
    return False


def _colour(region: np.ndarray, shade: np.ndarray, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """The colour of a pasted object (Kx3 for its K pixels): of a few random
    tints (and plain grey for fashion items), the one that differs most from
    the background under it, so that no object is invisible."""
    candidates = [rng.uniform(0, 255, 3) for _ in range(3)] + ([np.full(3, 255.0)] if grey else [])
    lo = 0.0 if grey else 0.25
    gain = lo + (1 - lo) * shade  # rendered = colour * gain, so its mean is colour * mean(gain)
    mean = region.mean(0)
    best = max(candidates, key=lambda c: float(np.linalg.norm(c * gain.mean() - mean)))
    return best[None] * gain[:, None]


def make_composite(ingr: Ingredients, split: str, index: int, seed: int = 0, cfg: CompositeConfig | None = None):
    """One composite: ``{"image": HxWx3 uint8, "boxes": Kx4 float32 (x0, y0, x1, y1),
    "labels": K int64 (indices into CATEGORIES), "instances": HxW uint8 (0 = background,
    k + 1 = object k), "background": the image before pasting}``."""
    cfg = cfg or CompositeConfig()
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    names = ingr.photo_names(split)
    bg = _background(ingr.photos[names[int(rng.integers(len(names)))]], cfg.size, rng)
    image, instances = bg.copy(), np.zeros(bg.shape[:2], np.uint8)
    items, item_labels = ingr.fashion[SPLITS[split]]
    placed, labels = [], []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        side = int(round(np.exp(rng.uniform(np.log(cfg.min_object), np.log(cfg.max_object)))))
        if rng.random() < cfg.shape_fraction:
            k = int(rng.integers(len(SHAPES)))
            mask, label, grey = _shape_mask(SHAPES[k], side, rng), 1 + len(FASHION_CLASSES) + k, False
            shade = np.ones(int(mask.sum()), np.float32)
        else:
            j = int(rng.integers(len(items)))
            mask, v = _fashion_item(items[j], side, cfg, rng)
            label, grey, shade = 1 + int(item_labels[j]), True, v[mask]
        h, w = mask.shape
        if h > cfg.size or w > cfg.size:
            continue
        for _try in range(20):
            y, x = int(rng.integers(0, cfg.size - h + 1)), int(rng.integers(0, cfg.size - w + 1))
            if not _overlaps((x, y, x + w, y + h), placed, cfg.max_overlap):
                break
        else:
            continue
        window = np.s_[y : y + h, x : x + w]
        image[window][mask] = np.clip(_colour(bg[window][mask].astype(np.float32), shade, rng, grey), 0, 255)
        instances[window][mask] = len(placed) + 1
        placed.append((x, y, x + w, y + h))
        labels.append(label)
    boxes = np.zeros((len(placed), 4), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(placed):  # what later objects left visible of each
        ys, xs = np.nonzero(instances[y0:y1, x0:x1] == k + 1)
        boxes[k] = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
    return {
        "image": image, "boxes": boxes, "labels": np.asarray(labels, np.int64),
        "instances": instances, "background": bg,
    }  # fmt: skip


def make_plain(ingr: Ingredients, split: str, index: int, seed: int = 0, cfg: CompositeConfig | None = None):
    """One plain product photo: a single Fashion-MNIST item filling most of a
    plain light or dark frame. ``{"image": HxWx3 uint8, "boxes": Kx4 float32,
    "labels": K int64, "background": the plain frame, "foreground": the item's
    colour at full intensity (3 floats)}`` with K = 1 (0 if the
    item has no pixel above ``mask_threshold``). The box is the tight box of the
    item's pixels above ``mask_threshold`` where it was drawn, scaled to ``size``."""
    cfg = cfg or CompositeConfig()
    rng = np.random.default_rng([seed, _PLAIN_CODE[split], index])
    items, item_labels = ingr.fashion[SPLITS[split]]
    j = int(rng.integers(len(items)))
    item = items[j][:, ::-1] if rng.random() < 0.5 else items[j]
    native = max(16, round(cfg.size * rng.uniform(*cfg.plain_native)))
    fill, aspect = rng.uniform(*cfg.plain_fill), np.exp(rng.uniform(-0.15, 0.15))
    tw, th = (min(native, max(8, round(native * fill * s))) for s in (aspect, 1 / aspect))
    resample = Image.BICUBIC if rng.random() < 0.5 else Image.BILINEAR  # the demo's is bicubic
    v = np.asarray(Image.fromarray(np.ascontiguousarray(item)).resize((tw, th), resample), np.float32)
    y, x = int(rng.integers(0, native - th + 1)), int(rng.integers(0, native - tw + 1))
    if rng.random() < cfg.plain_light:  # dark item on a light background
        paper, ink = rng.uniform(205, 255), rng.uniform(0, 70)
    else:  # Fashion-MNIST's own polarity: a light item on a dark background
        paper, ink = rng.uniform(0, 50), rng.uniform(185, 255)
    bg = np.clip(paper + rng.uniform(-12, 12, 3), 0, 255)
    fg = np.clip(ink + rng.uniform(-12, 12, 3), 0, 255)
    alpha = np.zeros((native, native), np.float32)
    alpha[y : y + th, x : x + tw] = v / 255.0
    im = Image.fromarray(np.round(bg + (fg - bg) * alpha[..., None]).astype(np.uint8))
    if rng.random() < cfg.plain_jpeg:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
        im = Image.open(buf).convert("RGB")
    image = np.asarray(im.resize((cfg.size, cfg.size), Image.BILINEAR))
    ys, xs = np.nonzero(v > cfg.mask_threshold)
    f = cfg.size / native
    boxes = np.zeros((0, 4), np.float32) if len(ys) == 0 else np.asarray(
        [[(x + xs.min()) * f, (y + ys.min()) * f, (x + xs.max() + 1) * f, (y + ys.max() + 1) * f]], np.float32)  # fmt: skip
    labels = np.full(len(boxes), 1 + int(item_labels[j]), np.int64)
    background = np.broadcast_to(np.round(bg).astype(np.uint8), image.shape).copy()
    return {"image": image, "boxes": boxes, "labels": labels, "background": background, "foreground": fg}


def make_empty(ingr: Ingredients, split: str, index: int, seed: int = 0, cfg: CompositeConfig | None = None):
    """A background crop with no object (``make_composite``'s keys, K = 0)."""
    cfg = cfg or CompositeConfig()
    rng = np.random.default_rng([seed, _EMPTY_CODE[split], index])
    names = ingr.photo_names(split)
    bg = _background(ingr.photos[names[int(rng.integers(len(names)))]], cfg.size, rng)
    return {"image": bg, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
            "instances": np.zeros(bg.shape[:2], np.uint8), "background": bg}  # fmt: skip


def picks(index: int, fraction: float) -> bool:
    """Whether item ``index`` is one of a share ``fraction``: exactly that share
    of every run of items, evenly spread (no draw: any order of loader workers
    gives the same data)."""
    return int((index + 1) * fraction) > int(index * fraction)


def mixed_kind(index: int, cfg: CompositeConfig) -> str:
    """What item ``index`` of a ``mixed`` dataset is: ``plain`` for a share
    ``plain_fraction``, ``empty`` for ``empty_fraction``, else ``composite``."""
    if picks(index, cfg.plain_fraction):
        return "plain"
    rest = index - int(index * cfg.plain_fraction)  # its place among the items that are not plain
    return "empty" if picks(rest, cfg.empty_fraction / max(1e-9, 1 - cfg.plain_fraction)) else "composite"


class CompositeDataset:
    """A map-style torch dataset of ``n`` images: ``(CHW uint8 tensor,
    {"boxes", "labels"})``. ``kind``: ``composite`` (item ``i`` is
    ``make_composite(..., index=i)``), ``plain`` (``make_plain``) or ``mixed``
    ``empty`` (``make_empty``) or ``mixed`` (each as :func:`mixed_kind` says)."""

    def __init__(self, ingr: Ingredients, split: str, n: int, seed: int = 0, cfg: CompositeConfig | None = None,
                 kind: str = "composite"):  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
        self.ingr, self.split, self.n, self.seed, self.cfg = ingr, split, n, seed, cfg or CompositeConfig()
        self.kind = kind

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        kind = mixed_kind(i, self.cfg) if self.kind == "mixed" else self.kind
        make = {"composite": make_composite, "plain": make_plain, "empty": make_empty}[kind]
        c = make(self.ingr, self.split, i, self.seed, self.cfg)
        image = torch.from_numpy(np.ascontiguousarray(c["image"].transpose(2, 0, 1)))
        return image, {"boxes": torch.from_numpy(c["boxes"]), "labels": torch.from_numpy(c["labels"])}


def collate(batch):
    """Stack the images (all one size), keep the targets as a list."""
    import torch

    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
