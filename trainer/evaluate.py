"""What a trained model says about the data: retrieval recall next to chance,
how well it separates matching from shuffled captions, and Winoground-style
scores on confounder pairs.

The metric functions take plain similarity matrices (images in rows, texts in
columns) so they are checked on hand-made numbers; :func:`evaluate` embeds a
held-out set and calls them.
"""

from __future__ import annotations

from math import comb

import numpy as np
import torch

from pairforge.trainer.confounders import WORD_ORDER_CAPTION, WORD_ORDER_PARTNER
from pairforge.trainer.data import CONFOUNDER_OF, NEGATIVE_CAPTION, EvalSet, Prep
from pairforge.trainer.model import ImageSpec, normalize_images, unwrap

KS = (1, 5, 10)
#: held-out pairs below which a recall is reported but called too few to judge
FEW_PAIRS = 50
#: optional metadata field naming what a caption says without its wording
#: (a product class, a scene's content): captions of the same concept describe
#: each other's images, so neither is a wrong caption for the other
CONCEPT = "concept"


def _same_caption(captions: list[str]) -> np.ndarray:
    """``[n, n]`` True where two samples have the very same caption: a text
    cannot tell those images apart, so either counts as a correct match."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    arr = np.array([ids[c] for c in captions])
    return arr[:, None] == arr[None, :]


def same_meaning(captions: list[str], metas: list[dict]) -> np.ndarray:
    """``[n, n]`` True where sample j's caption also describes image i: the
    same caption, or the same :data:`CONCEPT` where both samples name one."""
    same = _same_caption(captions)
    concepts = [m.get(CONCEPT) for m in metas]
    if any(concepts):
        named = np.array([c is not None and c != "" for c in concepts])
        same |= _same_caption([str(c) for c in concepts]) & named[:, None] & named[None, :]
    return same


def meaningful_ks(n: int, ks=KS) -> tuple[int, ...]:
    """The k of recall@k that say something among ``n`` candidates: k < n
    (with k >= n every ranking finds the match: recall and chance are 1)."""
    return tuple(k for k in ks if k < n)


def recall_at_k(sim: np.ndarray, correct: np.ndarray, ks=KS) -> dict[str, float]:
    """Fraction of rows whose best correct column ranks within the top k;
    ties with a wrong column count against the row."""
    best_correct = np.where(correct, sim, -np.inf).max(axis=1)
    above = (np.where(correct, -np.inf, sim) >= best_correct[:, None]).sum(axis=1)
    return {f"r@{k}": float(np.mean(above < k)) for k in ks}


def chance_recall(correct: np.ndarray, ks=KS) -> dict[str, float]:
    """Expected recall@k of a random ranking: with m correct among n columns,
    1 - C(n - m, k) / C(n, k); 1 when k >= n (every ranking has them all)."""
    n = correct.shape[1]
    m = correct.sum(axis=1)
    return {
        f"r@{k}": 1.0 if k >= n else float(np.mean([1 - comb(n - int(mi), k) / comb(n, k) for mi in m])) for k in ks
    }


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative
    (ties count half): the Mann-Whitney U statistic over both counts."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average rank within each run of ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def matching_vs_shuffled(sim: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """Scores of each image with its own caption against its scores with every
    other sample's (different) caption: every shuffle of the captions at once."""
    pos = np.diag(sim)
    neg = sim[~same]
    return {
        "auc": roc_auc(pos, neg) if len(pos) and len(neg) else None,  # no shuffled caption: no AUC
        "mean_matching": float(pos.mean()),
        "mean_shuffled": float(neg.mean()) if len(neg) else None,
        "n_matching": len(pos),
        "n_shuffled": len(neg),
    }


def winoground(sim: np.ndarray, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """Winoground's scores over groups (image 0, caption 0, image 1, caption 1)
    where caption 1 rearranges caption 0's words. Text score: each image
    prefers its own caption; image score: each caption prefers its own image;
    group score: both. Chance: 1/4, 1/4 and 1/6."""
    if not pairs:
        return {"groups": 0}
    a, b = np.array(pairs).T
    s00, s01, s10, s11 = sim[a, a], sim[a, b], sim[b, a], sim[b, b]
    text = (s00 > s01) & (s11 > s10)
    image = (s00 > s10) & (s11 > s01)
    return {
        "groups": len(pairs),
        "text": float(text.mean()),
        "image": float(image.mean()),
        "group": float((text & image).mean()),
        "chance": {"text": 0.25, "image": 0.25, "group": 1 / 6},
    }


def confounder_pairs(evalset: EvalSet) -> list[tuple[int, int]]:
    """Winoground groups among the held-out samples: a corpus's
    ``confounder_of`` pairs, and ``word_order`` partners from a run's
    confounders table (each unordered pair once, in index order)."""
    index = {k: i for i, k in enumerate(evalset.keys)}
    pairs = set()
    for i, m in enumerate(evalset.metas):
        for field in (CONFOUNDER_OF, WORD_ORDER_PARTNER):
            j = index.get(m.get(field))
            if j is not None and j != i and evalset.captions[i] != evalset.captions[j]:
                pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


@torch.no_grad()
def embed_images(model, images: torch.Tensor, spec: ImageSpec, device, batch: int = 256) -> torch.Tensor:
    """Unit-norm image features (float32, on the CPU) of uint8 images."""
    return _in_eval_mode(model, lambda m: torch.cat([
        m.encode_image(normalize_images(images[i : i + batch].to(device), spec), normalize=True).float().cpu()
        for i in range(0, len(images), batch)
    ]))  # fmt: skip


@torch.no_grad()
def embed_texts(model, tokens: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Unit-norm text features (float32, on the CPU) of token rows."""
    return _in_eval_mode(model, lambda m: torch.cat([
        m.encode_text(tokens[i : i + batch].to(device), normalize=True).float().cpu()
        for i in range(0, len(tokens), batch)
    ]))  # fmt: skip


def _in_eval_mode(model, fn):
    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        return fn(m)
    finally:
        m.train(was_training)


def evaluate(model, evalset: EvalSet, spec: ImageSpec, prep: Prep, device="cpu") -> dict:
    """Every metric on the held-out set."""
    img = embed_images(model, evalset.images, spec, device)
    txt = embed_texts(model, evalset.texts, device)
    sim = (img @ txt.T).numpy()
    same = same_meaning(evalset.captions, evalset.metas)
    ks = meaningful_ks(len(evalset))  # recall@k for k >= n is 1 for any model: not reported
    out = {
        "n": len(evalset),
        "image_to_text": recall_at_k(sim, same, ks),
        "text_to_image": recall_at_k(sim.T, same.T, ks),
        "chance": chance_recall(same, ks),
        "distinct_captions": len(set(evalset.captions)),
        "matching_vs_shuffled": matching_vs_shuffled(sim, same),
        "winoground": winoground(sim, confounder_pairs(evalset)),
    }
    exact = _same_caption(evalset.captions)
    if (exact != same).any():  # the figures when only the very same caption counts as a match
        out["exact_caption"] = {
            "image_to_text": recall_at_k(sim, exact, ks),
            "text_to_image": recall_at_k(sim.T, exact.T, ks),
            "chance": chance_recall(exact, ks),
            "auc": matching_vs_shuffled(sim, exact)["auc"],
        }
    sources = [str(m.get("source", "")) for m in evalset.metas]
    if len(set(sources)) > 1:  # the same figures within each source (shuffles stay inside it)
        out["by_source"] = {}
        for src in sorted(set(sources)):
            idx = np.array([i for i, x in enumerate(sources) if x == src])
            sub, sub_same = sim[np.ix_(idx, idx)], same[np.ix_(idx, idx)]
            out["by_source"][src] = {
                "n": len(idx),
                "image_to_text_r@1": recall_at_k(sub, sub_same, meaningful_ks(len(idx), (1,))).get("r@1"),
                "chance_r@1": chance_recall(sub_same, meaningful_ks(len(idx), (1,))).get("r@1"),
                "auc": matching_vs_shuffled(sub, sub_same)["auc"] if len(idx) > 1 else None,
            }
    # each image against its own caption and a caption that does not fit it
    for name, field in (("hard_negative", NEGATIVE_CAPTION), ("word_order", WORD_ORDER_CAPTION)):
        negs = [(i, m[field]) for i, m in enumerate(evalset.metas) if m.get(field)]
        if negs:
            idx = torch.tensor([i for i, _ in negs])
            neg_txt = embed_texts(model, prep.tokens([c for _, c in negs]), device)
            own = (img[idx] * txt[idx]).sum(-1)
            wrong = (img[idx] * neg_txt).sum(-1)
            out[name] = {"n": len(negs), "accuracy": float((own > wrong).float().mean()), "chance": 0.5}
    return out


def verdict(metrics: dict | None, eval_fraction: float = 0.1) -> str:
    """One line a person reads: image-to-text recall@1 next to chance on
    the held-out pairs, or why there is none."""
    if not metrics or not metrics.get("n"):
        return (
            f"no held-out pairs (eval fraction {eval_fraction}): recall not measured; the run is too small "
            "for a held-out split (raise --eval-fraction, or train on more samples)"
        )
    n = metrics["n"]
    i2t, chance = metrics["image_to_text"], metrics["chance"]
    if "r@1" not in i2t:
        return f"{n} held-out pair: recall needs at least 2 (a single candidate is always found)"
    line = f"recall@1 {i2t['r@1']:.2f} vs chance {chance['r@1']:.2f} on {n} held-out pairs"
    t2i = metrics.get("text_to_image", {}).get("r@1")
    if t2i is not None:
        line += f" (image to text; text to image {t2i:.2f})"
    if n < FEW_PAIRS:
        line += f"; too few pairs to judge (under {FEW_PAIRS})"
    return line
