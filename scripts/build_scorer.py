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

from trainer.corpus import CorpusConfig, build_corpus
from trainer.loop import CHECKPOINT, TrainConfig, train


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


def check_with_open_clip(path: Path, shards: str, cfg: TrainConfig) -> dict:
    """Load the exported file with open_clip's loader and score the held-out
    split with it (its preprocess, its tokenizer): the figures a user gets."""
    import numpy as np
    import open_clip
    import torch

    from trainer.data import Prep, find_shards, load_eval_set
    from trainer.evaluate import _same_caption, matching_vs_shuffled
    from trainer.model import register_configs

    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=str(path))
    tok = open_clip.get_tokenizer(cfg.model)
    model.eval()
    shard_list = find_shards([shards])
    evalset = load_eval_set(
        shard_list, Prep(cfg.model, model.visual.preprocess_cfg["size"][0]), cfg.stream(), cfg.eval_limit
    )
    from PIL import Image

    with torch.no_grad():
        images = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in evalset.images])
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tok(evalset.captions), normalize=True)
    sim = (img @ txt.T).numpy()
    out = {"all": matching_vs_shuffled(sim, _same_caption(evalset.captions))}
    sources = [m.get("source", "") for m in evalset.metas]
    for src in sorted(set(sources)):
        idx = [i for i, s in enumerate(sources) if s == src]
        sub = sim[idx][:, idx]
        out[src] = matching_vs_shuffled(sub, _same_caption([evalset.captions[i] for i in idx]))
        if src == "fashion":  # a shuffled caption naming the same class also describes the image
            labels = np.array([evalset.metas[i].get("label") for i in idx])
            out["fashion_other_class"] = matching_vs_shuffled(sub, labels[:, None] == labels[None, :])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "pipeline" / "assets" / "pf-tiny-scorer.pt"))
    p.add_argument("--work", default=str(ROOT / "build" / "scorer"), help="corpus and training folder")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.add_argument("--processes", type=int, default=2, help="processes writing the corpus")
    p.add_argument("--small", action="store_true", help="a tiny corpus and few steps: a smoke test of this script")
    args = p.parse_args(argv)

    work = Path(args.work)
    ccfg = (
        CorpusConfig(
            fashion=600, scenes_one=100, scenes_count=100, scene_pairs=100, photo_variants=4, samples_per_shard=300
        )
        if args.small
        else CorpusConfig()
    )
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
        eval_every=max(10, steps // 10),
        log_every=max(1, steps // 60),
        checkpoint_every=max(10, steps // 10),
        shuffle_buffer=5000,
        workers=args.workers,
        device=args.device,
    )
    t0 = time.perf_counter()
    report = train(cfg)
    train_s = time.perf_counter() - t0

    from trainer.model import export_scorer

    m = report["metrics"]
    summary = {
        "model": cfg.model,
        "corpus": corpus,
        "train": {"config": asdict(cfg), "seconds": train_s, "device": report["device"], "data": report["data"]},
        "held_out": {
            k: m[k]
            for k in (
                "n",
                "image_to_text",
                "text_to_image",
                "chance",
                "matching_vs_shuffled",
                "winoground",
                "hard_negative",
            )
            if k in m
        },
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
