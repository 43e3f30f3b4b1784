"""``pairforge train``: does this data teach image-text alignment?

    pairforge train OUT_DIR_OR_SHARDS [...] --out DIR [--steps N] [--model CONFIG]
                    [--pretrained PATH] [--resume] [--ray [--num-workers N]]

Trains a CLIP-style model on the shards and writes ``DIR/checkpoint.pt``
(loadable by ``open_clip.create_model_and_transforms(name, pretrained=...)``),
``DIR/report.json`` and ``DIR/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from pairforge.trainer.loop import CHECKPOINT, TrainConfig

#: TrainConfig fields offered as ``--flag`` (the rest keep their defaults)
FLAGS = (
    "steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "eval_fraction", "eval_every",
    "eval_limit", "log_every", "checkpoint_every", "shuffle_buffer", "workers", "seed", "device", "precision", "resize",
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pairforge train", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="run folders, shard folders, .tar files or brace patterns")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt, report.json and curves.png")
    p.add_argument("--model", default="pf-tiny", help="open_clip architecture (default: the repo's pf-tiny)")
    p.add_argument("--pretrained", help="weights to fine-tune: a checkpoint path or an open_clip pretrained tag")
    p.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {CHECKPOINT}")
    p.add_argument("--no-hard-negatives", dest="hard_negatives", action="store_false",
                   help="ignore confounder captions")  # fmt: skip
    p.add_argument("--augment", action="store_true", help="seeded random crops of 90-100%% of each image")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run every training step eagerly (default on one GPU: replay it as a CUDA graph)")  # fmt: skip
    p.add_argument("--ray", action="store_true", help="train with Ray Train (DDP), one worker per GPU")
    p.add_argument("--num-workers", type=int, default=0, help="Ray Train workers (default: every GPU in the cluster)")
    p.add_argument("--address", help="Ray cluster address for --ray (default: $RAY_ADDRESS or a local Ray)")
    types = {f.name: f for f in fields(TrainConfig)}
    for name in FLAGS:
        default = types[name].default
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=f"(default: {default})")
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.resume:
        from pairforge.trainer.loop import resume_config

        if not (Path(cfg.out) / CHECKPOINT).exists():
            print(f"pairforge train: error: nothing to resume: no {CHECKPOINT} in {cfg.out}", file=sys.stderr)
            return 2
        cfg = resume_config(cfg)
    if args.ray:
        from pairforge.trainer.distributed import train_with_ray

        report = train_with_ray(cfg, num_workers=args.num_workers or None, address=args.address)
    else:
        from pairforge.trainer.loop import train

        report = train(cfg)
    m = report.get("metrics") or {}
    summary = {
        "out": cfg.out,
        "steps": report.get("steps"),
        "image_to_text": m.get("image_to_text"),
        "text_to_image": m.get("text_to_image"),
        "chance": m.get("chance"),
        "auc_matching_vs_shuffled": (m.get("matching_vs_shuffled") or {}).get("auc"),
        "winoground": m.get("winoground"),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
