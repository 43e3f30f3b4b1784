"""A planted near-duplicate set from real photos, and the precision/recall of
each dedup kind on it.

Originals: skimage's photos (the stereo pair's two views count as two
different photos), LFW face crops and Fashion-MNIST product photos (28x28,
upscaled; several items of each class, so same-class look-alikes abound), and
generated smooth random images in look-alike pairs (one base, two different
overlays). Every original gets planted copies, one row each:

    copy        the same bytes (half with the same caption, some under a
                re-spelled URL)
    reencode    JPEG at quality 50, 70, 90 (one of them under the original's URL)
    resize      0.5x, 0.75x, 1.5x
    crop        3% off the top-left, 5% off every side
    brightness  x0.9, x1.1

Truth: two rows are duplicates iff they share ``origin``.

    python -m tests.planted --report   # the table the defaults were chosen from
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json

import numpy as np
from PIL import Image, ImageEnhance

from pairforge.pipeline.datasets import fashion_mnist
from pairforge.stages.base import Batch, object_array

SKIMAGE = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
           "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text", "cell",
           "microaneurysms", "horse")
FAMILIES = ("original", "copy", "reencode", "resize", "crop", "brightness")


def _skimage() -> list[tuple[str, Image.Image]]:
    import skimage.data

    out = []
    for name in SKIMAGE:
        a = np.asarray(getattr(skimage.data, name)())
        out.append((name, _to_image(a)))
    left, right = skimage.data.stereo_motorcycle()[:2]
    out += [("motorcycle_left", _to_image(left)), ("motorcycle_right", _to_image(right))]
    faces = skimage.data.lfw_subset()[:10]
    out += [(f"face_{i}", _to_image(f).resize((100, 100), Image.BICUBIC)) for i, f in enumerate(faces)]
    return out


def _to_image(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    if a.ndim == 3:
        a = a[..., :3]
    im = Image.fromarray(a)
    scale = 384 / max(im.size)
    return im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS) if scale < 1 else im


def _fashion(per_class: int) -> list[tuple[str, Image.Image]]:
    images, labels = fashion_mnist("t10k")
    out = []
    for c in range(10):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            out.append((f"fashion_{c}_{j}", Image.fromarray(images[i]).resize((112, 112), Image.BICUBIC)))
    return out


def _generated(pairs: int, seed: int) -> list[tuple[str, Image.Image]]:
    """Look-alike pairs: one smooth random base, two different overlays."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(pairs):
        base = rng.normal(size=(6, 6, 3))
        for v in range(2):
            over = np.zeros((6, 6, 3))
            over[rng.integers(6), rng.integers(6)] = rng.normal(scale=3.0, size=3)
            small = base + over
            small = (255 * (small - small.min()) / (small.max() - small.min())).astype(np.uint8)
            out.append((f"gen_{p}_{v}", Image.fromarray(small).resize((160, 160), Image.BICUBIC)))
    return out


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _variants(im: Image.Image) -> list[tuple[str, str, Image.Image | None, int]]:
    """(family, transform, image or None for a byte copy, JPEG quality)."""
    w, h = im.size
    out: list[tuple[str, str, Image.Image | None, int]] = [("copy", "copy", None, 0)]
    out += [("reencode", f"q{q}", im, q) for q in (50, 70, 90)]
    out += [("resize", f"x{s}", im.resize((max(8, round(w * s)), max(8, round(h * s))), Image.LANCZOS), 90)
            for s in (0.5, 0.75, 1.5)]
    out += [("crop", "crop3_tl", im.crop((round(0.03 * w), round(0.03 * h), w, h)), 90),
            ("crop", "crop5_all", im.crop((round(0.05 * w), round(0.05 * h), round(0.95 * w), round(0.95 * h))), 90)]
    out += [("brightness", f"b{f}", ImageEnhance.Brightness(im).enhance(f), 90) for f in (0.9, 1.1)]
    return out


@functools.lru_cache(maxsize=4)
def _build(fashion_per_class: int, generated_pairs: int, seed: int) -> tuple:
    originals = _skimage() + _fashion(fashion_per_class) + _generated(generated_pairs, seed)
    rows: dict[str, list] = {c: [] for c in ("image", "url", "caption", "origin", "family", "transform",
                                            "original_width", "original_height")}

    def add(data, url, caption, origin, family, transform, size):
        for c, v in zip(rows, (data, url, caption, origin, family, transform, size[0], size[1])):
            rows[c].append(v)

    for o, (name, im) in enumerate(originals):
        url = f"https://img.example.com/{name}.jpg"
        caption = f"photo {name.replace('_', ' ')}"
        data = _jpeg(im, 95)
        add(data, url, caption, o, "original", "original", im.size)
        for k, (family, transform, var, q) in enumerate(_variants(im)):
            if var is None:  # a byte copy: half keep the caption, a third re-spell the URL
                cap = caption if o % 2 == 0 else f"{caption} (reposted)"
                vurl = f"HTTP://IMG.example.com:80/{name}.jpg?utm_source=x#top" if o % 3 == 0 else \
                    f"https://mirror.example.org/{name}/{k}.jpg"
                add(data, vurl, cap, o, family, transform, im.size)
                continue
            vurl = url if transform == "q70" and o % 4 == 1 else f"https://cdn{k}.example.net/{name}_{transform}.jpg"
            add(_jpeg(var, q), vurl, f"{caption} {transform}", o, family, transform, var.size)
    n = len(rows["image"])
    perm = np.random.default_rng(seed).permutation(n)  # keys in no particular order of origin/family
    batch: Batch = {"key": object_array([f"{i:09d}" for i in range(n)])}
    for c, vals in rows.items():
        arr = object_array(vals) if c in ("image", "url", "caption", "family", "transform") else np.asarray(vals)
        batch[c] = arr[perm]
    batch["sha256"] = object_array([hashlib.sha256(b).hexdigest() for b in batch["image"]])
    batch["image_ext"] = object_array(["jpg"] * n)
    for c, v in (("shard_id", 0), ("status", "ok"), ("stage", ""), ("reason", ""), ("detail", "")):
        batch[c] = np.zeros(n, dtype=np.int64) if c == "shard_id" else object_array([v] * n)
    return tuple(batch.items())


def build_planted(fashion_per_class: int = 4, generated_pairs: int = 6, seed: int = 0) -> Batch:
    """The planted set as a batch with the download stage's columns (key,
    image, url, caption, sha256, original_width/height, status...) plus the
    truth: ``origin``, ``family`` and ``transform``. Cached; returns a copy."""
    return {c: v.copy() for c, v in _build(fashion_per_class, generated_pairs, seed)}


def pixel_embedding(data: bytes, side: int = 16) -> np.ndarray:
    """A stand-in image embedding (no CLIP weights here): the zero-mean
    ``side x side`` gray thumbnail. Enough to exercise ``dedup_semantic``."""
    with Image.open(io.BytesIO(data)) as im:
        v = np.asarray(im.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    return v - v.mean()


# ------------------------------------------------------------ evaluation


def cluster_labels(keys: np.ndarray, decisions: Batch) -> np.ndarray:
    """Each row's cluster: its own key if it survived, else its ``duplicate_of``."""
    dup = dict(zip(decisions.get("key", []), decisions.get("duplicate_of", [])))
    return np.array([dup.get(k, k) for k in keys], dtype=object)


def evaluate(rows: Batch, decisions: Batch) -> dict:
    """Pairwise precision (predicted same-cluster pairs that share an origin)
    overall and per family, recall per family (pairs original-variant that
    ended in one cluster), and how many drops point at another origin."""
    label = cluster_labels(rows["key"], decisions)
    origin, family = np.asarray(rows["origin"]), np.asarray(rows["family"])
    same_pred = label[:, None] == label[None, :]
    same_true = origin[:, None] == origin[None, :]
    upper = np.triu(np.ones_like(same_pred), 1)
    out = {"dropped": len(decisions.get("key", []))}
    pred = same_pred & upper
    out["precision"] = float((pred & same_true).sum() / max(pred.sum(), 1))
    is_orig = family == "original"
    for fam in FAMILIES[1:]:
        pair = same_true & (is_orig[:, None] & (family == fam)[None, :])
        out[f"recall_{fam}"] = float((pair & same_pred).sum() / max(pair.sum(), 1))
        sub = np.isin(family, ("original", fam))
        p = pred & sub[:, None] & sub[None, :]
        out[f"precision_{fam}"] = float((p & same_true).sum() / max(p.sum(), 1)) if p.sum() else 1.0
    key_origin = dict(zip(rows["key"], origin))
    wrong = [k for k, d in zip(decisions.get("key", []), decisions.get("duplicate_of", []))
             if key_origin[k] != key_origin.get(d)]
    out["wrong_drops"] = len(wrong)
    return out


def run_kind(stage, rows: Batch) -> Batch:
    """Hash (``process_batch``) then fit in process; returns the decisions."""
    from pairforge.pipeline.local import fit_global, map_stage

    done = map_stage(stage, rows)
    return fit_global(stage, {c: done[c] for c in stage.fit_columns}) or {}


def report() -> list[dict]:
    from pairforge.stages.dedup_exact import Config as ExactConfig
    from pairforge.stages.dedup_exact import ExactDedupStage
    from pairforge.stages.dedup_phash import Config as PConfig
    from pairforge.stages.dedup_phash import PerceptualDedupStage
    from pairforge.stages.dedup_semantic import Config as SConfig
    from pairforge.stages.dedup_semantic import SemanticDedupStage

    rows = build_planted()
    print(f"planted set: {len(rows['key'])} rows, {len(set(rows['origin']))} originals")
    table = []
    for kind in ("sha256", "url", "pair"):
        table.append({"kind": kind, **evaluate(rows, run_kind(ExactDedupStage(ExactConfig(kinds=(kind,))), rows))})
    for algo in ("phash", "dhash"):
        stage = PerceptualDedupStage(PConfig(algorithm=algo, max_distance=0))
        hashed = stage.process_batch(dict(rows))
        for d in range(13):
            st = PerceptualDedupStage(PConfig(algorithm=algo, max_distance=d))
            from pairforge.pipeline.local import fit_global

            dec = fit_global(st, {c: hashed[c] for c in st.fit_columns}) or {}
            table.append({"kind": f"{algo} d={d}", **evaluate(rows, dec)})
    emb = np.stack([pixel_embedding(b) for b in rows["image"]])
    with_emb = {**rows, "img_emb": emb}
    for eps in (0.005, 0.01, 0.02, 0.05, 0.1):
        st = SemanticDedupStage(SConfig(eps=eps, n_clusters=8))
        table.append({"kind": f"semantic(pixels) eps={eps}", **evaluate(rows, run_kind(st, with_emb))})
    cols = ["precision", *(f"recall_{f}" for f in FAMILIES[1:]), "precision_reencode", "precision_resize",
            "wrong_drops", "dropped"]
    print(f"{'kind':28s}" + "".join(f"{c.replace('recall_', 'R_').replace('precision', 'P'):>13s}" for c in cols))
    for r in table:
        print(f"{r['kind']:28s}" + "".join(f"{r[c]:13.3f}" if isinstance(r[c], float) else f"{r[c]:13d}"
                                           for c in cols))
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="print precision/recall of every dedup kind")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    if args.report:
        t = report()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(t, f, indent=1)
