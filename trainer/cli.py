"""``pairforge train``: does this data teach image-text alignment?

    pairforge train OUT_DIR_OR_SHARDS [...] --out DIR [--steps N] [--model CONFIG]
                    [--pretrained PATH] [--resume] [--ray [--num-workers N]] [--json FILE|-]

Trains a CLIP-style model on the shards and writes ``DIR/checkpoint.pt``
(loadable by ``open_clip.create_model_and_transforms(name, pretrained=...)``),
``DIR/report.json`` and ``DIR/curves.png``. Progress goes to stderr and ends
with a verdict a person reads (``recall@1 0.41 vs chance 0.04 on 120
held-out pairs``); stdout stays empty unless ``--json -`` asks for the
summary there, so ``--json r.json`` or ``--json - > r.json`` is JSON.
Exit codes as ``pairforge run``'s (``pipeline.outcome``): 2 for a wrong
flag, 4 when the shards hold nothing to train on, 5 when ``--ray
--address`` names a cluster that does not answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from pairforge.pipeline.outcome import EXIT_CONFIG, EXIT_EMPTY_INPUT, EXIT_UNREACHABLE
from pairforge.trainer.loop import CHECKPOINT, REPORT, TrainConfig

#: TrainConfig fields offered as ``--flag`` (the rest keep their defaults)
FLAGS = (
    "steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "eval_fraction", "eval_every",
    "eval_limit", "log_every", "checkpoint_every", "shuffle_buffer", "workers", "seed", "device", "precision", "resize",
)  # fmt: skip
#: the flags whose values are a fixed set, listed in ``--help`` and checked by argparse
CHOICES = {"precision": ("auto", "bf16", "fp32"), "resize": ("auto", "device", "worker")}
HELP = {
    "steps": "optimisation steps",
    "batch_size": "pairs per step (per worker with --ray)",
    "lr": "peak learning rate, reached after --warmup steps",
    "warmup": "steps of linear warm-up before the cosine decay",
    "eval_fraction": "share of the samples held out for evaluation (by a hash of the key)",
    "eval_every": "steps between evaluations of the held-out pairs",
    "eval_limit": "held-out pairs evaluated at most",
    "device": "auto (the GPU when there is one), cpu, cuda or cuda:N",
    "precision": "auto: bf16 autocast on CUDA, fp32 elsewhere",
    "resize": "where images are resized: auto (the training step on CUDA, the loader on CPU), device or worker",
}
DESCRIPTION = (
    "Train a small CLIP-style model on a run's shards and say whether it learnt to match images with their "
    "captions: recall@1 on held-out pairs next to chance. Writes DIR/checkpoint.pt (open_clip loads it), "
    "DIR/report.json and DIR/curves.png; progress and the verdict go to stderr."
)
EXAMPLES = """examples:
  pairforge train out/ --out train/ --steps 500
  pairforge train out/shards/{00000..00009}.tar --out train/ --device cuda --json train/summary.json
  pairforge train out/ --out train/ --pretrained pf-tiny-scorer --steps 200 --json - > summary.json
  pairforge train out/ --out train/ --resume
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pairforge train",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="run folders, shard folders, .tar files or brace patterns")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt, report.json and curves.png")
    p.add_argument(
        "--model", default="pf-tiny", help="open_clip architecture, e.g. ViT-B-32 (default: the repo's pf-tiny)"
    )
    p.add_argument(
        "--pretrained", help="weights to fine-tune: a checkpoint path, pf-tiny-scorer (shipped) or an open_clip tag"
    )
    p.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {CHECKPOINT}")
    p.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                   help="ignore confounder captions")  # fmt: skip
    p.add_argument("--augment", action="store_true", help="seeded random crops of 90-100%% of each image")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run every training step eagerly (default on one GPU: replay it as a CUDA graph)")  # fmt: skip
    p.add_argument("--ray", action="store_true", help="train with Ray Train (DDP), one worker per GPU")
    p.add_argument("--num-workers", type=int, default=0, help="Ray Train workers (default: every GPU in the cluster)")
    p.add_argument("--address", help="Ray cluster address for --ray (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE ('-': to stdout)")
    types = {f.name: f for f in fields(TrainConfig)}
    for name in FLAGS:
        default = types[name].default
        text = f"{HELP[name]} (default: %(default)s)" if name in HELP else "(default: %(default)s)"
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       choices=CHOICES.get(name), help=text)  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {name: getattr(args, name) for name in FLAGS}
    return TrainConfig(
        shards=tuple(args.inputs),
        out=args.out,
        model=args.model,
        pretrained=args.pretrained,
        hard_negatives=args.hard_negatives,
        augment=args.augment,
        cuda_graph=args.cuda_graph,
        **values,
    )


def _error(msg: str, code: int) -> int:
    print(f"pairforge train: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    from pairforge.trainer.loop import NothingToTrain, count_samples

    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.resume:
        from pairforge.trainer.loop import resume_config

        if not (Path(cfg.out) / CHECKPOINT).exists():
            return _error(f"nothing to resume: no {CHECKPOINT} in {cfg.out}", EXIT_CONFIG)
        cfg = resume_config(cfg)
    if cfg.steps < cfg.warmup:
        print(
            f"pairforge train: warning: --steps {cfg.steps} < --warmup {cfg.warmup}: the learning rate stops "
            f"at {cfg.lr * cfg.steps / max(cfg.warmup, 1):.2g}, short of --lr {cfg.lr:g}, and never decays "
            "(lower --warmup)",
            file=sys.stderr,
        )
    try:
        count_samples(cfg)  # an empty run stops here, before a model or Ray starts
        if args.ray:
            from pairforge.pipeline.checks import check_ray_address

            unreachable = check_ray_address(args.address) if args.address else None
            if unreachable:  # before Ray is imported or started
                return _error(unreachable, EXIT_UNREACHABLE)
            from pairforge.trainer.distributed import train_with_ray

            report = train_with_ray(cfg, num_workers=args.num_workers or None, address=args.address)
        else:
            from pairforge.trainer.loop import train

            report = train(cfg)
    except NothingToTrain as e:
        return _error(str(e), EXIT_EMPTY_INPUT)
    except FileNotFoundError as e:
        return _error(str(e), EXIT_CONFIG)
    m = report.get("metrics") or {}
    summary = {
        "out": cfg.out,
        "steps": report.get("steps"),
        "verdict": report.get("verdict"),
        "image_to_text": m.get("image_to_text"),
        "text_to_image": m.get("text_to_image"),
        "chance": m.get("chance"),
        "auc_matching_vs_shuffled": (m.get("matching_vs_shuffled") or {}).get("auc"),
        "winoground": m.get("winoground"),
    }
    print(f"[train] {report.get('verdict')}", file=sys.stderr)
    print(f"[train] report: {Path(cfg.out) / REPORT}", file=sys.stderr)
    if args.json == "-":
        print(json.dumps(summary, indent=1))
    elif args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
