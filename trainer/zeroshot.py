"""Zero-shot classification and held-out retrieval: what a model trained on a
build can do on images it never saw.

Why: ``pairforge train``'s recall on a held-out slice of the *same* build
says the shards are readable, not whether the recipe made a better dataset.
DataComp judges a dataset by its model's zero-shot accuracy on fixed
evaluation sets; this module is that measurement for any open_clip model
(the trainer's checkpoint, or an open_clip architecture with a pretrained
tag or file).

* The classifier is CLIP's: each class's text embedding is the mean of the
  unit embeddings of its name in every prompt template, normalised again;
  an image's class is its most similar one.
* Accuracies carry a 95% **Wilson score** interval (a binomial proportion
  over independent test images: honest near 0 and 1 and at small n, where
  the normal approximation is not), and chance (``k / classes`` for top-k).
* Retrieval recall on held-out pairs reuses :mod:`trainer.evaluate`'s
  metrics, so the figures match ``pairforge train``'s own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pairforge.trainer.evaluate import (
    chance_recall,
    embed_images,
    embed_texts,
    meaningful_ks,
    recall_at_k,
    same_meaning,
)
from pairforge.trainer.labelled import LabelledSet
from pairforge.trainer.prep import Prep, canvas, model_images

#: a short ensemble (a subset of CLIP's 80 ImageNet templates); CLIP's full list goes in a file (--templates)
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a black and white photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "itap of a {}.",
)
#: z of a two-sided 95% interval
Z95 = 1.959963984540054
CHUNK = 256


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 and n successes the bounds are exactly 0 and 1 (rounding would leave 1 - 1e-16)
    return (0.0 if successes <= 0 else max(0.0, centre - half)), (1.0 if successes >= n else min(1.0, centre + half))


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one a line, each with one ``{}`` (or ``{c}``) where the class name goes."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        t = t.replace("{c}", "{}")
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise ValueError(f"{path}:{n}: a template needs exactly one {{}} for the class name, got {t!r}")
        out.append(t)
    if not out:
        raise ValueError(f"{path}: no templates")
    return out


@dataclass
class Embedded:
    """Unit image features of the images that decoded, and which those were."""

    features: torch.Tensor  # float32 [m, d]
    index: np.ndarray  # int64 [m]: positions in the set
    undecodable: int


def embed_set(model, spec, prep: Prep, images: Sequence[bytes], device="cpu") -> Embedded:
    """Decode, crop and resize as the trainer's evaluation does (open_clip's
    eval preprocess), a chunk at a time, and embed. An image that fails to
    decode is counted, not fatal."""
    plain = replace(prep, augment=False, resize="worker")
    feats, index, bad = [], [], 0
    for lo in range(0, len(images), CHUNK):
        ok_idx, squares = [], []
        for i in range(lo, min(lo + CHUNK, len(images))):
            try:
                squares.append(plain.square(images[i]))
                ok_idx.append(i)
            except Exception:  # noqa: BLE001 - any decoder error: a per-image outcome
                bad += 1
        if not squares:
            continue
        batch = model_images(canvas(squares), plain.image_size, "cpu")
        feats.append(embed_images(model, batch, spec, device))
        index.extend(ok_idx)
    dim = int(feats[0].shape[1]) if feats else 0
    return Embedded(torch.cat(feats) if feats else torch.zeros((0, dim)), np.array(index, dtype=np.int64), bad)


def class_weights(model, prep: Prep, classes: Sequence[str], templates: Sequence[str], device="cpu") -> torch.Tensor:
    """``[classes, d]`` unit vectors: each class's mean template embedding, renormalised (CLIP's ensemble)."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = embed_texts(model, prep.tokens(texts), device).view(len(classes), len(templates), -1).mean(1)
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _interval(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"value": k / n if n else None, "correct": k, "n": n, "ci95": [lo, hi]}


def classify(image_features: torch.Tensor, weights: torch.Tensor, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Top-1/top-5 accuracy with Wilson intervals, per-class accuracy, and the confusion matrix."""
    n, c = len(labels), len(classes)
    logits = (image_features @ weights.T).numpy()
    k = min(5, c)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    hit1 = top[:, 0] == labels
    hitk = (top == labels[:, None]).any(axis=1)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, top[:, 0]), 1)
    per_class = {}
    for j, name in enumerate(classes):
        m = labels == j
        if m.any():
            per_class[name] = _interval(int(hit1[m].sum()), int(m.sum()))
    accs = [v["value"] for v in per_class.values()]
    return {
        "n": n,
        "classes": c,
        "top1": _interval(int(hit1.sum()), n),
        f"top{k}": _interval(int(hitk.sum()), n),
        "chance": {"top1": 1 / c, f"top{k}": k / c},
        "mean_per_class": float(np.mean(accs)) if accs else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "predicted_share": (np.bincount(top[:, 0], minlength=c) / max(1, n)).tolist(),
    }


def retrieval(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str]) -> dict:
    """Image-to-text and text-to-image recall@k on pairs, next to chance
    (:mod:`trainer.evaluate`'s metrics: the same caption counts as a match)."""
    sim = (image_features @ text_features.T).numpy()
    same = same_meaning(captions, [{} for _ in captions])
    ks = meaningful_ks(len(captions))
    return {
        "n": len(captions),
        "image_to_text": recall_at_k(sim, same, ks),
        "text_to_image": recall_at_k(sim.T, same.T, ks),
        "chance": chance_recall(same, ks),
        "distinct_captions": len(set(captions)),
    }


def zero_shot(model, spec, prep: Prep, data: LabelledSet, templates: Sequence[str], device="cpu") -> dict:
    """Every figure on one labelled set (retrieval too when it has captions)."""
    emb = embed_set(model, spec, prep, data.images, device)
    labels = np.asarray(data.labels, dtype=np.int64)[emb.index]
    weights = class_weights(model, prep, data.classes, templates, device)
    out = {
        "set": data.source,
        "images": len(data),
        "undecodable": emb.undecodable,
        "templates": list(templates),
        "classification": classify(emb.features, weights, labels, data.classes),
    }
    if data.captions and len(emb.index) > 1:
        caps = [data.captions[i] for i in emb.index]
        out["retrieval"] = retrieval(emb.features, embed_texts(model, prep.tokens(caps), device), caps)
    return out


def summary_line(result: dict) -> str:
    """One line a person reads: top-1 with its interval next to chance, top-5, and retrieval when measured."""
    c = result["classification"]
    t1 = c["top1"]
    lo, hi = t1["ci95"]
    line = (
        f"zero-shot top-1 {t1['value']:.3f} (95% CI {lo:.3f}-{hi:.3f}, Wilson) vs chance {c['chance']['top1']:.3f} "
        f"on {c['n']} images of {c['classes']} classes"
    )
    k5 = next((k for k in c if k.startswith("top") and k != "top1"), None)
    if k5:
        line += f"; {k5} {c[k5]['value']:.3f}"
    verdict = (
        "above chance"
        if lo > c["chance"]["top1"]
        else "below chance"
        if hi < c["chance"]["top1"]
        else "not distinguishable from chance"
    )
    line += f": {verdict}"
    for name, r in (("held-out", result.get("held_out_pairs")), ("set", result.get("retrieval"))):
        if r and "r@1" in r.get("image_to_text", {}):
            line += f"; {name} pairs recall@1 {r['image_to_text']['r@1']:.3f} vs chance {r['chance']['r@1']:.3f} (n={r['n']})"
    if result.get("undecodable"):
        line += f"; {result['undecodable']} image(s) did not decode (left out)"
    return line
