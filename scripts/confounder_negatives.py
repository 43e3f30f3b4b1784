"""Do the confounders stage's hard negatives help? Fine-tune pf-tiny with and
without them and compare Winoground scores on held-out word-order pairs.

    python scripts/confounder_negatives.py [--work build/confounder_negatives] [--pairs 1500] [--steps 300]
    python scripts/confounder_negatives.py --seeds 0,1,2,3,4    # the paired comparison over 5 seeds

1. Generated compositional scenes (``trainer.scenes``): ``--pairs``
   Winoground pairs (two shapes; the partner's caption is the same words in
   another order and its image is what that caption says) and as many one-
   and counted-object scenes, served from a local HTTP server with nothing
   but their captions: nothing tells the pipeline which scenes are pairs.
2. A pairforge job (runner ``local``): ``download``, ``clip_score`` with the
   shipped scorer (embeddings only, no threshold), ``confounders``,
   ``shard``. The ``word_order`` rows find each pair by an exact caption
   join and put both halves in one group and one split.
3. From the shipped scorer, two fine-tuning runs of ``--steps`` steps, same
   seed and data order: with the table's hard negatives
   (``trainer.confounders``: the word-order rewrite, else the ``swap_text``
   caption) and without (``hard_negatives=False``).
4. Winoground text / image / group scores on the held-out pairs (groups from
   the table's ``word_order`` partners) and word-order accuracy (the image
   prefers its own caption to the rewrite), for the scorer before and each
   run after. Writes ``WORK/results.json``.
5. With ``--seeds``, step 3 runs once per training seed: the seed sets the
   data order, the trainer's randomness and which groups are held out, so
   each seed is another split, shared by its two runs; the summary gives the
   mean with and without, and the mean paired difference with its standard
   error over the seeds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.demo import SCORER_CHECKPOINT
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.trainer import scenes


def _scene_routes(pairs: int, seed: int) -> tuple[dict[str, Route], list[tuple[str, str]]]:
    rng = random.Random(seed)
    made: list[scenes.Scene] = []
    for _ in range(pairs):
        made.extend(scenes.confounder_pair(rng))
    for i in range(pairs):
        made.append(scenes.one_object(rng) if i % 2 else scenes.counted(rng))
    random.Random(seed + 1).shuffle(made)
    routes, rows = {}, []
    for i, s in enumerate(made):
        buf = io.BytesIO()
        s.image.save(buf, format="JPEG", quality=92)
        routes[f"/scene/{i}.jpg"] = Route(buf.getvalue(), "image/jpeg")
        rows.append((f"/scene/{i}.jpg", s.caption))
    return routes, rows


def build_run(work: Path, pairs: int, seed: int) -> dict:
    from pairforge.pipeline.config import load_job
    from pairforge.pipeline.job import run_job

    routes, rows = _scene_routes(pairs, seed)
    with LocalHTTPServer(routes) as server:
        urls = work / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(p) for p, _ in rows], "caption": [c for _, c in rows]}), urls)
        job = load_job(
            {
                "input": {"paths": [str(urls)]},
                "output": {"dir": str(work / "run"), "samples_per_shard": 1000},
                "runner": "local",
                "stages": [
                    {"name": "download", "image_size": 96, "timeout": 5.0, "allow_networks": ["127.0.0.1/32"]},
                    {"name": "clip_score", "model": "pf-tiny", "pretrained": str(SCORER_CHECKPOINT)},
                    {"name": "confounders"},
                    "shard",
                ],
            }
        )
        return run_job(job)


def _scores(metrics: dict) -> dict:
    w = metrics["winoground"]
    return {
        "groups": w["groups"],
        "text": w.get("text"),
        "image": w.get("image"),
        "group": w.get("group"),
        "word_order_accuracy": (metrics.get("word_order") or {}).get("accuracy"),
        "word_order_n": (metrics.get("word_order") or {}).get("n"),
        "i2t_r@1": metrics["image_to_text"]["r@1"],
    }


def _paired(results: dict, seeds: list[int]) -> dict:
    """Per score: the mean with and without over the seeds, and the mean of
    the per-seed differences with its standard error and sign count."""
    import statistics

    out = {}
    for score in ("group", "text", "image", "word_order_accuracy"):
        w = [results[f"with-seed{s}"].get(score) for s in seeds]
        wo = [results[f"without-seed{s}"].get(score) for s in seeds]
        if None in w or None in wo:
            continue
        d = [a - b for a, b in zip(w, wo)]
        out[score] = {
            "with": round(statistics.mean(w), 4),
            "without": round(statistics.mean(wo), 4),
            "diff": round(statistics.mean(d), 4),
            "se": round(statistics.stdev(d) / len(d) ** 0.5, 4),
            "seeds_higher_with": sum(x > 0 for x in d),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="build/confounder_negatives")
    p.add_argument("--pairs", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="the scenes' seed")
    p.add_argument("--seeds", default="", help="comma list of training seeds (default: --seed)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if not (work / "run" / "manifest.json").exists():
        man = build_run(work, args.pairs, args.seed)
    else:
        man = json.loads((work / "run" / "manifest.json").read_text())
    fit = next(f for f in man["fits"] if f["stage"] == "confounders")
    print(f"[negatives] run: {man['counts']}, confounder tables {fit['tables']} ({time.perf_counter() - t0:.0f} s)")

    from pairforge.trainer.data import Prep, find_shards, load_eval_set
    from pairforge.trainer.evaluate import evaluate
    from pairforge.trainer.loop import TrainConfig, train
    from pairforge.trainer.model import create_model

    common = {
        "shards": (str(work / "run"),),
        "model": "pf-tiny",
        "pretrained": str(SCORER_CHECKPOINT),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": max(1, args.steps // 10),
        "eval_fraction": args.eval_fraction,
        "eval_limit": 5000,
        "eval_every": args.steps,
        "log_every": max(1, args.steps // 10),
        "workers": 1,
        "seed": args.seed,
        "device": args.device,
    }
    cfg = TrainConfig(out=str(work / "before"), **common)
    model, spec = create_model(cfg.model, cfg.pretrained, args.device)
    prep = Prep(cfg.model, spec.size)
    evalset = load_eval_set(find_shards(cfg.shards), prep, cfg.stream(), cfg.eval_limit)
    results = {"config": vars(args), "run": {"counts": man["counts"], "confounders": fit["tables"]}}
    results["before"] = _scores(evaluate(model, evalset, spec, prep, args.device))
    print(f"[negatives] scorer before fine-tuning: {results['before']}", flush=True)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [args.seed]
    for seed in seeds:
        for name, hard in (("without", False), ("with", True)):
            t = time.perf_counter()
            run = dict(common, seed=seed)
            tag = name if len(seeds) == 1 else f"{name}-seed{seed}"
            report = train(TrainConfig(out=str(work / tag), hard_negatives=hard, **run))
            results[tag] = {**_scores(report["metrics"]), "train_s": round(time.perf_counter() - t, 1)}
            print(f"[negatives] seed {seed}: fine-tuned {name} hard negatives: {results[tag]}", flush=True)
    if len(seeds) > 1:
        results["paired"] = _paired(results, seeds)
        print(f"[negatives] over {len(seeds)} seeds: {json.dumps(results['paired'])}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("config", "run")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
