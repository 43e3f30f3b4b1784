"""Build the project's offline scorer: the ``pf-tiny`` CLIP checkpoint the
demo's ``clip_score`` stage uses where no pretrained CLIP can be fetched.

    python scripts/build_scorer.py [--out pipeline/assets/pf-tiny-scorer.pt] [--work DIR] [--steps N]

1. writes the corpus (Fashion-MNIST train split, skimage photos, generated
   compositional scenes with confounder pairs) as shards, see trainer.corpus;
2. trains pf-tiny on it with ``trainer.loop.train`` (the ``pairforge train`` loop);
3. exports a float16 copy, checks that open_clip's own loader loads it, scores
   the held-out split with the loaded copy, and writes the figures to a JSON
   file beside the checkpoint.

Deterministic for a given machine and thread count (seeded data order and init).
The shipped file came from the defaults on 2 CPU cores: 90,800 samples written
in 43 s, 1000 steps of 128 in 20 min of wall time while other jobs shared the
cores (23 CPU-minutes; about 2 steps/s, so ~10 min in all, on idle cores).
``--device cuda`` trains the same recipe in bf16 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pairforge.trainer.corpus import CorpusConfig, build_corpus
from pairforge.trainer.loop import CHECKPOINT, TrainConfig, train

#: ``--small``: a smoke test of this script in seconds
SMALL = CorpusConfig(
    fashion=600, scenes_one=100, scenes_count=100, scene_pairs=100, photo_variants=4, samples_per_shard=300
)


def _corpus(work: Path, cfg: CorpusConfig, processes: int) -> dict:
    """Build the corpus unless ``work`` already holds one from this config."""
    marker = work / "corpus.json"
    if marker.exists() and json.loads(marker.read_text())["config"] == asdict(cfg):
        return json.loads(marker.read_text())
    t0 = time.perf_counter()
    summary = build_corpus(work, cfg, processes=processes)
    summary["seconds"] = time.perf_counter() - t0
    marker.write_text(json.dumps(summary, indent=1))
    return summary


def _figures(sim, same, exact) -> dict:
    from pairforge.trainer.evaluate import chance_recall, matching_vs_shuffled, recall_at_k

    ms = matching_vs_shuffled(sim, same)
    return {
        "n": len(sim),
        "auc": ms["auc"],
        "auc_exact_caption": matching_vs_shuffled(sim, exact)["auc"],
        "mean_matching": ms["mean_matching"],
        "mean_shuffled": ms["mean_shuffled"],
        "image_to_text": recall_at_k(sim, same),
        "text_to_image": recall_at_k(sim.T, same.T),
        "chance": chance_recall(same),
    }


def check_with_open_clip(path: Path, shards: str, cfg: TrainConfig) -> dict:
    """Load the exported file with open_clip's loader and score the held-out
    split with it (its preprocess, its tokenizer): the figures a user gets.
    A shuffled caption that says the same thing (same product class, same
    scene content) is not counted as a wrong one; ``auc_exact_caption`` is
    the stricter figure where only the very same caption matches."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from pairforge.trainer.data import Prep, find_shards, load_eval_set
    from pairforge.trainer.evaluate import _same_caption, same_meaning
    from pairforge.trainer.model import register_configs

    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=str(path))
    tok = open_clip.get_tokenizer(cfg.model)
    model.eval()
    size = model.visual.preprocess_cfg["size"][0]
    evalset = load_eval_set(find_shards([shards]), Prep(cfg.model, size), cfg.stream(), cfg.eval_limit)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in evalset.images])
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tok(evalset.captions), normalize=True)
    sim = (img @ txt.T).numpy()
    same, exact = same_meaning(evalset.captions, evalset.metas), _same_caption(evalset.captions)
    out = {"all": _figures(sim, same, exact)}
    sources = [m.get("source", "") for m in evalset.metas]
    for src in sorted(set(sources)):
        idx = np.array([i for i, s in enumerate(sources) if s == src])
        out[src] = _figures(*(a[np.ix_(idx, idx)] for a in (sim, same, exact)))
    out["demo_fashion"] = demo_fashion_check(model, preprocess, tok)
    return out


def demo_fashion_check(model, preprocess, tok, n: int = 2000, seed: int = 0) -> dict:
    """What the demo asks of the scorer, on photos it never trained on:
    Fashion-MNIST *test* images rendered as the demo renders them, each scored
    against a caption in one of the demo's templates (which differ from the
    corpus's) naming its class, and the same template naming another class."""
    import io
    import random

    import numpy as np
    import torch
    from PIL import Image

    from pairforge.demo import FASHION_TEMPLATES
    from pairforge.pipeline.datasets import FASHION_CLASSES, fashion_mnist
    from pairforge.trainer.evaluate import roc_auc

    rng = random.Random(seed)
    images, labels = fashion_mnist("t10k", n)
    ims, own, other = [], [], []
    for arr, lab in zip(images, labels):
        buf = io.BytesIO()
        Image.fromarray(255 - arr).resize((112, 112), Image.BICUBIC).convert("RGB").save(buf, "JPEG", quality=90)
        ims.append(preprocess(Image.open(buf)))
        cls = FASHION_CLASSES[lab]
        wrong = rng.choice([c for c in FASHION_CLASSES if c != cls and cls not in c and c not in cls])
        template = rng.choice(FASHION_TEMPLATES)
        own.append(template.format(c=cls))
        other.append(template.format(c=wrong))
    with torch.no_grad():
        img = model.encode_image(torch.stack(ims), normalize=True)
        pos = (img * model.encode_text(tok(own), normalize=True)).sum(-1).numpy()
        neg = (img * model.encode_text(tok(other), normalize=True)).sum(-1).numpy()
    cuts = np.unique(np.concatenate([pos, neg]))
    accuracy = [((pos >= c).sum() + (neg < c).sum()) / (len(pos) + len(neg)) for c in cuts]
    return {
        "n": int(n),
        "auc_own_vs_other_class": roc_auc(pos, neg),
        "own_beats_other": float((pos > neg).mean()),
        "mean_own": float(pos.mean()),
        "mean_other": float(neg.mean()),
        "best_threshold": float(cuts[int(np.argmax(accuracy))]),
        "best_threshold_accuracy": float(max(accuracy)),
        "kept_at_0.2": {"own": float((pos >= 0.2).mean()), "other": float((neg >= 0.2).mean())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "pipeline" / "assets" / "pf-tiny-scorer.pt"))
    p.add_argument("--work", default=str(ROOT / "build" / "scorer"), help="corpus and training folder")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="data loader workers")
    p.add_argument("--processes", type=int, default=2, help="processes writing the corpus")
    p.add_argument("--small", action="store_true", help="a tiny corpus and few steps: a smoke test of this script")
    args = p.parse_args(argv)

    work = Path(args.work)
    ccfg = SMALL if args.small else CorpusConfig()
    corpus = _corpus(work / "corpus", ccfg, args.processes)
    print(f"[scorer] corpus: {corpus['samples']} samples in {corpus['shards']} shards", flush=True)

    steps = 30 if args.small else args.steps
    cfg = TrainConfig(
        shards=(str(work / "corpus"),),
        out=str(work / "train"),
        model="pf-tiny",
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=min(200, steps // 10),
        weight_decay=0.1,
        eval_fraction=0.05,
        eval_limit=2000,
        eval_every=max(10, steps // 5),
        log_every=max(1, steps // 60),
        checkpoint_every=max(10, steps // 10),
        shuffle_buffer=5000,
        workers=args.workers,
        device=args.device,
    )
    t0 = time.perf_counter()
    report = train(cfg)
    train_s = time.perf_counter() - t0

    from pairforge.trainer.model import export_scorer

    m = report["metrics"]
    summary = {
        "model": cfg.model,
        "corpus": corpus,
        "train": {"config": asdict(cfg), "seconds": train_s, "device": report["device"], "data": report["data"]},
        "held_out": m,
    }
    out = export_scorer(Path(cfg.out) / CHECKPOINT, args.out, extra={"summary_json": json.dumps(summary)})
    summary["open_clip_check"] = check_with_open_clip(out, cfg.shards[0], cfg)
    summary["bytes"] = out.stat().st_size
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("held_out", "open_clip_check", "bytes")}, indent=1))
    print(f"[scorer] wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
