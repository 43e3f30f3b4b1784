"""The noisy pool of ``bench/curation.py``: Fashion-MNIST's training split
served on a loopback server with captions gone wrong the way alt-text goes
wrong, the scorer's own training shards, and the test images as an
ImageFolder.

Splits of the 60,000 training images (a fixed permutation, seed 0): the
first ``scorer_images`` train the clip_score scorer and never enter the
pool (OpenAI's CLIP saw other web data than DataComp's pool); the next
``pool`` images are the pool's originals, drawn with a skewed class mix
(:data:`CLASS_MIX`, head 4x the tail, as web data's head outweighs its
tail). The 10,000 test images are only evaluated on, except the few
planted in the pool as contamination.

Each original gets one caption kind (:data:`CAPTION_MIX`); duplicates,
tiny and extreme-aspect images and test-set copies are extra rows
(:data:`EXTRA_MIX`, shares of the originals).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from pairforge.pipeline.datasets import FASHION_CLASSES, fashion_mnist
from pairforge.pipeline.httpserver import Route

#: share of the pool's originals per class (in FASHION_CLASSES order, shuffled by seed)
CLASS_MIX = (0.20, 0.16, 0.13, 0.11, 0.09, 0.08, 0.07, 0.06, 0.05, 0.05)
#: caption kind -> share of the originals
CAPTION_MIX = {"clean": 0.45, "wrong_class": 0.20, "boilerplate": 0.10, "file_name": 0.10, "other_language": 0.15}
#: extra rows -> share of the number of originals
EXTRA_MIX = {"exact_duplicate": 0.06, "reencoded_duplicate": 0.06, "tiny": 0.03, "extreme_aspect": 0.03,
             "test_copy": 0.02}  # fmt: skip
TEMPLATES = (
    "a photo of a {c}", "{c}", "product photo of a {c}", "a {c} on a white background", "studio shot of a {c}",
    "{c} for sale", "a picture of a {c}", "catalogue photo: {c}", "new {c}, front view", "online shop image of a {c}",
)  # fmt: skip
BOILERPLATE = ("click to enlarge", "image not available", "product image", "view larger image", "free shipping today")
TRANSLATIONS = {  # (Spanish, German, French): alt-text in languages the English prompts never ask about
    "t-shirt": ("camiseta", "T-Shirt", "tee-shirt"), "trouser": ("pantalón", "Hose", "pantalon"),
    "pullover": ("jersey", "Pullover", "pull"), "dress": ("vestido", "Kleid", "robe"),
    "coat": ("abrigo", "Mantel", "manteau"), "sandal": ("sandalia", "Sandale", "sandale"),
    "shirt": ("camisa", "Hemd", "chemise"), "sneaker": ("zapatilla", "Turnschuh", "basket"),
    "bag": ("bolso", "Tasche", "sac"), "ankle boot": ("botín", "Stiefelette", "bottine"),
}  # fmt: skip
LANG_TEMPLATES = ("foto de producto: {c}", "Produktfoto: {c}", "photo du produit : {c}")
#: synonyms for metadata_match: the entries a caption can name its class by
ENTRIES = {c: (c,) for c in FASHION_CLASSES} | {"trouser": ("trouser", "trousers"), "sneaker": ("sneaker", "sneakers")}


def render(img: np.ndarray, px: int = 56, aspect: float = 1.0) -> Image.Image:
    """A catalogue photo: dark product on white, ``px`` high (``aspect`` x as wide, padded white)."""
    im = Image.fromarray(255 - img).resize((px, px), Image.BICUBIC).convert("RGB")
    if aspect != 1.0:
        wide = Image.new("RGB", (round(px * aspect), px), (255, 255, 255))
        wide.paste(im, ((wide.width - px) // 2, 0))
        return wide
    return im


def encode(im: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def caption(kind: str, cls: str, rng: random.Random, i: int) -> str:
    if kind == "clean":
        return rng.choice(TEMPLATES).format(c=cls)
    if kind == "wrong_class":
        return rng.choice(TEMPLATES).format(c=rng.choice([c for c in FASHION_CLASSES if c != cls]))
    if kind == "boilerplate":
        return rng.choice(BOILERPLATE)
    if kind == "file_name":
        return rng.choice(("IMG_{:04d}.JPG", "DSC{:05d}.jpg", "product_{}_front.png", "{}.jpg")).format(i)
    j = rng.randrange(3)
    return LANG_TEMPLATES[j].format(c=TRANSLATIONS[cls][j])


def splits(scorer_images: int, pool: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scorer indices, pool indices, all train images, all train labels)."""
    images, labels = fashion_mnist("train")
    perm = np.random.default_rng(seed).permutation(len(labels))
    scorer, rest = perm[:scorer_images], perm[scorer_images:]
    order = np.random.default_rng(seed + 1).permutation(len(FASHION_CLASSES))  # which class is the head
    picked = []
    for rank, c in enumerate(order):
        want = round(pool * CLASS_MIX[rank])
        picked.append(rest[labels[rest] == c][:want])
    return scorer, np.sort(np.concatenate(picked)), images, labels


def build_pool(scorer_images: int, pool: int, test: tuple[np.ndarray, np.ndarray], seed: int = 0):
    """Routes to serve and URL-list rows (``path``, ``caption``, ``planted``)."""
    _, idx, images, labels = splits(scorer_images, pool, seed)
    rng = random.Random(seed)
    kinds = [k for k, share in CAPTION_MIX.items() for _ in range(round(share * len(idx)))]
    kinds = (kinds + ["clean"] * len(idx))[: len(idx)]
    rng.shuffle(kinds)
    routes: dict[str, Route] = {}
    rows: list[dict] = []
    originals = []
    for n, (i, kind) in enumerate(zip(idx, kinds)):
        cls = FASHION_CLASSES[int(labels[i])]
        path = f"/p/{i}.png"
        routes[path] = Route(encode(render(images[i])), "image/png")
        rows.append({"path": path, "caption": caption(kind, cls, rng, n), "planted": kind, "label": cls})
        originals.append((i, cls, rows[-1]["caption"]))
    extra = {k: round(share * len(idx)) for k, share in EXTRA_MIX.items()}
    for j in range(extra["exact_duplicate"]):  # the same bytes at another URL, the same caption
        i, cls, cap = rng.choice(originals)
        routes[f"/mirror/{j}.png"] = routes[f"/p/{i}.png"]
        rows.append({"path": f"/mirror/{j}.png", "caption": cap, "planted": "exact_duplicate", "label": cls})
    for j in range(extra["reencoded_duplicate"]):  # re-encoded as JPEG, a caption of its own
        i, cls, _ = rng.choice(originals)
        routes[f"/jpeg/{j}.jpg"] = Route(encode(render(images[i]), "JPEG", 60), "image/jpeg")
        rows.append({"path": f"/jpeg/{j}.jpg", "caption": caption("clean", cls, rng, j), "planted": "reencoded_duplicate",
                     "label": cls})  # fmt: skip
    for name, px, aspect in (("tiny", 16, 1.0), ("extreme_aspect", 40, 5.0)):
        for j in range(extra[name]):
            i, cls, _ = rng.choice(originals)
            routes[f"/{name}/{j}.png"] = Route(encode(render(images[i], px, aspect)), "image/png")
            rows.append(
                {"path": f"/{name}/{j}.png", "caption": caption("clean", cls, rng, j), "planted": name, "label": cls}
            )
    timgs, tlabs = test
    for j in range(extra["test_copy"]):  # contamination: test images, as the test set has them or re-encoded
        k = rng.randrange(len(tlabs))
        im = render(timgs[k])
        body = encode(im) if j % 2 == 0 else encode(im, "JPEG", 75)
        cls = FASHION_CLASSES[int(tlabs[k])]
        routes[f"/t/{j}"] = Route(body, "image/png" if j % 2 == 0 else "image/jpeg")
        rows.append({"path": f"/t/{j}", "caption": caption("clean", cls, rng, j), "planted": "test_copy", "label": cls})
    return routes, rows


def write_test_folder(root: Path, test: tuple[np.ndarray, np.ndarray]) -> Path:
    """The test images, rendered as the pool renders them, as an ImageFolder tree."""
    timgs, tlabs = test
    for k, (a, lab) in enumerate(zip(timgs, tlabs)):
        folder = root / FASHION_CLASSES[int(lab)].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:05d}.png").write_bytes(encode(render(a)))
    return root


def write_scorer_shards(out: Path, scorer_idx: np.ndarray, seed: int = 0, per_shard: int = 1000) -> int:
    """The scorer's training data: its held-out training images with clean
    template captions, in a run's shard layout (the pipeline's shard writer)."""
    from pairforge.manifests.manifest import write_sizes
    from pairforge.manifests.shards import write_shard
    from pairforge.stages.base import fresh_rows, object_array

    images, labels = fashion_mnist("train")
    rng = random.Random(seed + 7)
    stats = []
    for sid, lo in enumerate(range(0, len(scorer_idx), per_shard)):
        part = scorer_idx[lo : lo + per_shard]
        caps = [caption("clean", FASHION_CLASSES[int(labels[i])], rng, 0) for i in part]
        rows = fresh_rows(
            [f"s{sid:04d}{j:05d}" for j in range(len(part))], sid,
            image=object_array([encode(render(images[i], 32)) for i in part]),
            image_ext=object_array(["png"] * len(part)), caption=object_array(caps),
        )  # fmt: skip
        stats.append(write_shard(rows, out, sid))
    write_sizes(out, stats)
    return len(stats)
