"""The offline scorer's training corpus, written as a run's shards.

No CLIP weights can be fetched here, so the project trains its own scorer on
real data it can reach offline, plus scenes it generates:

* Fashion-MNIST's training split (Debian's dataset-fashion-mnist): real
  product photos of 10 classes, captioned from varied templates and rendered
  at varied sizes, polarities and tints. (The demo draws from the *test*
  split, so the demo's photos are never trained on.)
* scikit-image's photos, each as many random crops with varied captions.
* generated compositional scenes (:mod:`trainer.scenes`), including
  Winoground-style confounder pairs.

Everything is written in the layout a pipeline run produces
(``OUT/shards/NNNNN.tar`` + ``.parquet`` + ``sizes.json``) through the
pipeline's own shard writer, so the scorer is trained by the very code path
``pairforge train`` uses on real runs.
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from pairforge.trainer import scenes
from pairforge.trainer.data import CONFOUNDER_OF, NEGATIVE_CAPTION
from pairforge.trainer.evaluate import CONCEPT

FASHION_NAMES = {  # class -> names a caption may use (the first is the canonical one)
    "t-shirt": ("t-shirt", "t-shirt", "top", "tee shirt"),
    "trouser": ("trouser", "trousers", "pair of trousers", "pants"),
    "pullover": ("pullover", "pullover", "sweater", "jumper"),
    "dress": ("dress", "dress", "summer dress"),
    "coat": ("coat", "coat", "jacket"),
    "sandal": ("sandal", "sandal", "summer sandal"),
    "shirt": ("shirt", "shirt", "button-up shirt"),
    "sneaker": ("sneaker", "sneaker", "running shoe", "trainer shoe"),
    "bag": ("bag", "bag", "handbag"),
    "ankle boot": ("ankle boot", "ankle boot", "boot"),
}
FASHION_TEMPLATES = (
    "a photo of a {c}", "a {c}", "product photo of a {c}", "a {c} on a white background", "studio shot of a {c}",
    "a black and white photo of a {c}", "{c} for sale", "a picture of a {c}", "catalogue photo: {c}",
    "a small image of a {c}", "new {c}, photographed from the front", "online shop image of a {c}",
)  # fmt: skip
#: extra skimage photos beyond those the demo captions, with a caption each
EXTRA_PHOTOS = {
    "hubble_deep_field": "a deep field photo of distant galaxies in space",
    "immunohistochemistry": "a microscope image of stained tissue",
    "cell": "a microscope photo of a cell",
    "logo": "the scikit-image logo with a snake",
    "cat": "a cat sitting and looking at the camera",
}
PHOTO_TEMPLATES = ("{c}", "a photo of {c}", "{c}, photograph", "image: {c}")


@dataclass(frozen=True)
class CorpusConfig:
    fashion: int = 60000
    scenes_one: int = 8000
    scenes_count: int = 6000
    scene_pairs: int = 8000
    photo_variants: int = 40
    samples_per_shard: int = 5000
    seed: int = 0


def _encode(im: Image.Image, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=rng.randint(75, 95))
    return buf.getvalue()


def _fashion(
    images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], i: int, rng: random.Random
) -> list[dict]:
    arr = images[i]
    if rng.random() < 0.7:  # dark product on white, like a catalogue
        arr = 255 - arr
    im = Image.fromarray(arr).convert("RGB")
    if rng.random() < 0.3:  # a colour tint
        tint = np.array([rng.uniform(0.6, 1.0) for _ in range(3)])
        im = Image.fromarray((np.asarray(im) * tint).astype(np.uint8))
    size = rng.randint(56, 128)
    im = im.resize((size, size), Image.BICUBIC)
    cls = classes[int(labels[i])]
    names = FASHION_NAMES[cls]
    name = names[0] if rng.random() < 0.6 else rng.choice(names)
    return [
        {
            "image": _encode(im, rng),
            "caption": rng.choice(FASHION_TEMPLATES).format(c=name),
            "source": "fashion",
            "label": cls,
            CONCEPT: f"fashion:{cls}",
        }
    ]


def _photo(photos: list[tuple[str, str, np.ndarray]], i: int, rng: random.Random) -> list[dict]:
    name, caption, arr = photos[i]
    im = Image.fromarray(arr)
    frac = rng.uniform(0.7, 1.0)
    w, h = int(im.width * frac), int(im.height * frac)
    x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
    im = im.crop((x, y, x + w, y + h))
    im.thumbnail((rng.randint(96, 384),) * 2)
    return [
        {
            "image": _encode(im, rng),
            "caption": rng.choice(PHOTO_TEMPLATES).format(c=caption),
            "source": "photo",
            "label": name,
            CONCEPT: f"photo:{name}",
        }
    ]


def _scene(kind: str, rng: random.Random) -> list[dict]:
    if kind == "pair":
        made = scenes.confounder_pair(rng)
    else:
        made = (scenes.one_object(rng) if kind == "one" else scenes.counted(rng),)
    return [
        {
            "image": _encode(s.image, rng),
            "caption": s.caption,
            "source": "scene",
            "label": s.kind,
            CONCEPT: f"scene:{s.concept}",
        }
        for s in made
    ]


def _photos() -> list[tuple[str, str, np.ndarray]]:
    import skimage.data

    from pairforge.pipeline.datasets import skimage_photos

    photos = list(skimage_photos())
    for name, caption in EXTRA_PHOTOS.items():
        arr = np.asarray(getattr(skimage.data, name)())
        arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
        photos.append((name, caption, arr.astype(np.uint8)))
    return photos


def _units(cfg: CorpusConfig) -> list[tuple[str, int]]:
    """What to make, as (source, index), in a seeded random order."""
    units = [("fashion", i) for i in range(cfg.fashion)]
    units += [("photo", i) for i in range(len(_photos()) * cfg.photo_variants)] if cfg.photo_variants else []
    units += [("one", i) for i in range(cfg.scenes_one)]
    units += [("count", i) for i in range(cfg.scenes_count)]
    units += [("pair", i) for i in range(cfg.scene_pairs)]
    random.Random(f"{cfg.seed}:order").shuffle(units)
    return units


def _make_shard(cfg: CorpusConfig, out: str, job: tuple[int, list[tuple[str, int]]]) -> dict:
    from pairforge.manifests.shards import write_shard
    from pairforge.pipeline.datasets import FASHION_CLASSES, fashion_mnist
    from pairforge.stages.base import fresh_rows, object_array

    shard_id, units = job
    fashion = fashion_mnist("train") if any(s == "fashion" for s, _ in units) else None
    photos = _photos() if any(s == "photo" for s, _ in units) else []
    items: list[dict] = []
    for source, i in units:
        rng = random.Random(f"{cfg.seed}:{source}:{i}")  # each sample depends only on its own seed
        if source == "fashion":
            made = _fashion(fashion[0], fashion[1], FASHION_CLASSES, i, rng)
        elif source == "photo":
            made = _photo(photos, i % len(photos), rng)
        else:
            made = _scene(source, rng)
        start = len(items)
        for j, item in enumerate(made):
            item["key"] = f"{shard_id:05d}{start + j:05d}"
            item[CONFOUNDER_OF] = made[0]["key"] if j else None
            item[NEGATIVE_CAPTION] = made[1 - j]["caption"] if len(made) == 2 else None
            items.append(item)
    n = len(items)
    rows = fresh_rows(
        [it["key"] for it in items],
        shard_id,
        image=object_array([it["image"] for it in items]),
        image_ext=object_array(["jpg"] * n),
    )
    for col in ("caption", "source", "label", CONCEPT, CONFOUNDER_OF, NEGATIVE_CAPTION):
        rows[col] = object_array([it[col] for it in items])
    return write_shard(rows, out, shard_id)


def build_corpus(out: str | Path, cfg: CorpusConfig = CorpusConfig(), processes: int = 1) -> dict:
    """Write the corpus under ``out`` (``out/shards/...``); returns a summary.
    Deterministic: the same config writes the same bytes."""
    from pairforge.manifests.manifest import write_sizes

    units = _units(cfg)
    per = cfg.samples_per_shard
    jobs = list(enumerate(units[i : i + per] for i in range(0, len(units), per)))
    make = partial(_make_shard, cfg, str(out))
    if processes > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(processes) as pool:
            stats = pool.map(make, jobs)
    else:
        stats = [make(j) for j in jobs]
    sizes = write_sizes(out, stats)
    return {"config": asdict(cfg), "shards": len(stats), "samples": sum(sizes.values())}
