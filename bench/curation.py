"""Does curation help? DataComp's measurement on a pool pairforge builds
offline (issue 26).

    nice -n 10 python bench/curation.py                 # the comparison (about an hour on 2 shared cores)
    python bench/curation.py --tiny                     # the same code on a few hundred rows, minutes

One noisy pool (``bench/curationkit.py``: Fashion-MNIST's training images on
a loopback server, captions gone wrong as alt-text goes wrong, duplicates,
tiny and extreme-aspect images, a few planted test images) is built by
pairforge with each recipe below; each build trains a CLIP-style model from
scratch with the project's trainer for the **same number of samples seen**
(``--steps`` x ``--batch``), once per seed; each model is evaluated
zero-shot (``trainer.zeroshot``, what ``pairforge eval`` runs) on
Fashion-MNIST's 10,000 test images. Every recipe, ``none`` included, starts
with decontamination against those test images (``pairforge eval-index``,
``dedup_exact``/``dedup_phash`` with ``eval_sets``), as DataComp's pool was
decontaminated before any recipe ran.

Recipes, each adding to the one before: ``none``; ``basic`` (fastText
English, caption of 2+ words, image 24+ px, aspect <= 3: DataComp's basic
filter); ``+dedup`` (exact and pHash within the pool); ``+clip_score`` (the
top 30% by a scorer trained on training images kept out of the pool);
``+balance`` (MetaCLIP: class names as metadata entries, ``t`` per entry);
``all`` (+ semantic dedup on the scorer's embeddings, which also drops test
images' near-copies by embedding). The table gives top-1 accuracy, mean and
standard error over seeds, and rows kept; ``--json`` keeps everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench import curationkit as kit  # noqa: E402

RECIPES = ("none", "basic", "+dedup", "+clip_score", "+balance", "all")
MODEL = "pf-micro"


def say(msg: str) -> None:
    print(f"[curation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipe_stages(name: str, scorer: str, index: str, entries: str, t: int) -> list:
    from pairforge.stages import (
        Balance,
        BasicFilter,
        ClipScore,
        DedupExact,
        DedupPhash,
        DedupSemantic,
        Download,
        Language,
        MetadataMatch,
        Shard,
    )  # fmt: skip

    upto = RECIPES.index(name)
    dedup = upto >= RECIPES.index("+dedup")  # before it: the dedup stages only decontaminate
    stages = [
        Download(
            image_size=32,
            timeout=20.0,
            retries=2,
            allow_networks=["127.0.0.1/32"],
            robots_txt=False,
            per_host_connections=16,
            thread_count=16,
        ),  # fmt: skip
        DedupExact(eval_sets=[index], within_run=dedup),
        DedupPhash(eval_sets=[index], within_run=dedup),
    ]
    if upto >= RECIPES.index("basic"):
        stages[1:1] = [
            Language(),
            BasicFilter(languages=["en"], min_caption_words=2, min_image_size=24, max_aspect_ratio=3.0),
        ]
    if upto >= RECIPES.index("+clip_score"):
        stages.append(ClipScore(model=MODEL, pretrained=scorer, device="cpu", batch_size=1024, top_fraction=0.3))
    if upto >= RECIPES.index("all"):
        # eps: a small model puts same-class look-alikes close (pf-tiny-scorer: re-encodes above 0.998, most
        # look-alikes below, tests/pipeline/test_decontaminate.py); this 32 px scorer is smaller still, so tighter
        stages.append(DedupSemantic(eps=0.0005, n_clusters=20, eval_sets=[index]))
    if upto >= RECIPES.index("+balance"):
        stages += [MetadataMatch(entries=entries, word_boundaries=True), Balance(t=t)]
    return [*stages, Shard()]


def build(name: str, stages: list, urls: Path, out: Path) -> dict:
    from pairforge.pipeline.config import InputConfig, JobConfig, OutputConfig
    from pairforge.pipeline.job import run_job

    t0 = time.perf_counter()
    job = JobConfig(input=InputConfig(paths=[str(urls)]), output=OutputConfig(dir=str(out), samples_per_shard=1000),
                    runner="local", stages=stages)  # fmt: skip
    man = run_job(job)
    dropped = {}
    for st in man["stages"]:
        for reason, n in (st.get("dropped") or {}).items():
            dropped[reason] = dropped.get(reason, 0) + int(n)
    planted: dict[str, int] = {}
    for f in sorted((out / "shards").glob("*.parquet")):
        for p in pq.read_table(f, columns=["planted"]).column("planted").to_pylist():
            planted[p] = planted.get(p, 0) + 1
    return {"recipe": name, "kept": int(man["counts"]["ok"]), "input": int(man["counts"]["input"]),
            "dropped": dropped, "kept_by_kind": planted, "seconds": time.perf_counter() - t0}  # fmt: skip


def train_and_eval(shards: str, out: Path, seed: int, args, test, templates) -> dict:
    from pairforge.trainer.loop import TrainConfig, train

    cfg = TrainConfig(model=MODEL, shards=(shards,), out=str(out), steps=args.steps, batch_size=args.batch, lr=args.lr,
                      warmup=max(1, args.steps // 10), eval_fraction=0.02, eval_limit=200, eval_every=args.steps,
                      log_every=max(1, args.steps // 4), shuffle_buffer=2000, workers=1, seed=seed, device="cpu")  # fmt: skip
    t0 = time.perf_counter()
    report = train(cfg)
    t1 = time.perf_counter()
    result = zero_shot(out / "checkpoint.pt", test, templates)
    c = result["classification"]
    return {"seed": seed, "top1": c["top1"]["value"], "top1_ci95": c["top1"]["ci95"], "top5": c["top5"]["value"],
            "mean_per_class": c["mean_per_class"], "samples_seen": report["data"]["samples_seen"],
            "epochs": report["data"]["epochs"], "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}  # fmt: skip


def zero_shot(checkpoint, test, templates) -> dict:
    from pairforge.trainer.model import create_model
    from pairforge.trainer.prep import Prep
    from pairforge.trainer.zeroshot import zero_shot as run

    model, spec = create_model(MODEL, str(checkpoint), "cpu")
    return run(model.eval(), spec, Prep(MODEL, spec.size), test, templates, "cpu")


def mean_se(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return (xs[0] if xs else float("nan")), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) / len(xs) ** 0.5


def table(results: dict, pool_rows: int) -> str:
    lines = ["| recipe | rows kept | of the pool | zero-shot top-1 (mean ± SE) | seeds | vs none |",
             "|---|---:|---:|---:|---|---:|"]  # fmt: skip
    base_m, base_se = mean_se([r["top1"] for r in results["none"]["runs"]]) if "none" in results else (None, None)
    for name, r in results.items():
        if not r["runs"]:
            lines.append(f"| {name} | {r['build']['kept']} | {r['build']['kept'] / pool_rows:.0%} | too few rows | | |")
            continue
        m, se = mean_se([x["top1"] for x in r["runs"]])
        seeds = ", ".join(f"{x['top1']:.3f}" for x in r["runs"])
        delta = ""
        if base_m is not None and name != "none":
            pooled = (se**2 + base_se**2) ** 0.5
            delta = f"{m - base_m:+.3f} ({(m - base_m) / pooled:+.1f} SE)" if pooled > 0 else f"{m - base_m:+.3f}"
        kept = r["build"]["kept"]
        lines.append(f"| {name} | {kept} | {kept / pool_rows:.0%} | {m:.3f} ± {se:.3f} | {seeds} | {delta} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pool", type=int, default=5000, help="the pool's original images (before extra rows)")
    p.add_argument("--scorer-images", type=int, default=5000, help="training images the scorer learns from")
    p.add_argument("--scorer-steps", type=int, default=160)
    p.add_argument("--steps", type=int, default=80, help="training steps of every recipe's model")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--test", type=int, default=10000, help="test images evaluated on (Fashion-MNIST has 10,000)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--tiny", action="store_true", help="a few hundred rows and steps: checks the code, not the claim")
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    if args.tiny:
        args.pool, args.scorer_images, args.scorer_steps, args.steps, args.test, args.batch = 400, 400, 10, 6, 300, 16
    import torch

    from pairforge.pipeline.datasets import fashion_mnist
    from pairforge.pipeline.httpserver import LocalHTTPServer
    from pairforge.trainer.labelled import read_labelled
    from pairforge.trainer.zeroshot import DEFAULT_TEMPLATES

    t_start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="pf-curation-"))
    work.mkdir(parents=True, exist_ok=True)
    header = {"load_average_at_start": os.getloadavg(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "args": vars(args), "caption_mix": kit.CAPTION_MIX, "extra_mix": kit.EXTRA_MIX, "class_mix": kit.CLASS_MIX}  # fmt: skip
    say(f"work folder {work}; load average {header['load_average_at_start']}")
    timgs, tlabs = fashion_mnist("t10k", args.test)
    kit.write_test_folder(work / "test", (timgs, tlabs))
    test = read_labelled(work / "test")
    templates = list(DEFAULT_TEMPLATES)

    say(f"scorer: {args.scorer_images} held-out training images, {args.scorer_steps} steps")
    scorer_idx, _, _, _ = kit.splits(args.scorer_images, args.pool)
    kit.write_scorer_shards(work / "scorer_data", scorer_idx)
    from pairforge.trainer.loop import TrainConfig, train

    train(TrainConfig(model=MODEL, shards=(str(work / "scorer_data"),), out=str(work / "scorer"), steps=args.scorer_steps,
                      batch_size=args.batch, lr=args.lr, warmup=max(1, args.scorer_steps // 10), eval_fraction=0.05,
                      eval_limit=300, eval_every=args.scorer_steps, log_every=max(1, args.scorer_steps // 5),
                      workers=1, device="cpu"))  # fmt: skip
    scorer = str(work / "scorer" / "checkpoint.pt")
    scorer_zs = zero_shot(scorer, test, templates)["classification"]["top1"]
    say(f"scorer zero-shot top-1 {scorer_zs['value']:.3f}")
    from pairforge.evalindex import write_eval_index

    write_eval_index(str(work / "test"), work / "test_index", MODEL, scorer)

    routes, rows = kit.build_pool(args.scorer_images, args.pool, (timgs, tlabs))
    (work / "entries.txt").write_text("\n".join(e for v in kit.ENTRIES.values() for e in v) + "\n")
    t_balance = max(5, round(args.pool * 0.02))
    results: dict[str, dict] = {}
    with LocalHTTPServer(routes) as server:
        urls = work / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(r["path"]) for r in rows], "caption": [r["caption"] for r in rows],
                                 "planted": [r["planted"] for r in rows]}), urls)  # fmt: skip
        say(f"pool: {len(rows)} rows on {server.url('/')}")
        for name in args.recipes.split(","):
            stages = recipe_stages(name, scorer, str(work / "test_index"), str(work / "entries.txt"), t_balance)
            b = build(name, stages, urls, work / "runs" / name.strip("+"))
            say(f"{name}: kept {b['kept']} of {b['input']} in {b['seconds']:.0f}s; dropped {b['dropped']}")
            results[name] = {"build": b, "runs": []}
    for name in results:
        for seed in range(args.seeds):
            if results[name]["build"]["kept"] < 2 * args.batch:  # the trainer needs a batch besides its held-out pairs
                say(f"{name}: {results[name]['build']['kept']} rows kept: too few to train on; no figure")
                break
            r = train_and_eval(str(work / "runs" / name.strip("+")), work / "models" / f"{name.strip('+')}-{seed}",
                               seed, args, test, templates)  # fmt: skip
            results[name]["runs"].append(r)
            say(f"{name} seed {seed}: top-1 {r['top1']:.3f} (train {r['train_s']:.0f}s, eval {r['eval_s']:.0f}s)")
    wall = time.perf_counter() - t_start
    text = table(results, len(rows))
    print(text)
    print(f"\npool {len(rows)} rows ({args.pool} originals + extras); {args.steps} steps x {args.batch} = "
          f"{args.steps * args.batch} samples seen per model; {args.seeds} seeds; test {len(test)} images; "
          f"scorer zero-shot top-1 {scorer_zs['value']:.3f}; wall {wall / 60:.1f} min; load average at start "
          f"{header['load_average_at_start'][0]:.2f}, at end {os.getloadavg()[0]:.2f} (a shared 2-core machine)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results, "scorer_top1": scorer_zs,
                                               "pool_rows": len(rows), "wall_s": wall, "table": text,
                                               "load_average_at_end": os.getloadavg()}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
