"""``pairforge eval``: zero-shot accuracy of a model on a labelled image set,
and retrieval recall on a build's held-out pairs.

    pairforge eval SET [--pretrained CKPT|TAG|FILE] [--model NAME] [--classes FILE] [--templates FILE]
                   [--label-column C] [--pairs OUT] [--limit N] [--device D] [--json FILE|-] [--run OUT [--name N]]

``SET`` is an ImageFolder tree, a parquet file or folder (image + label
columns), or webdataset shards (a ``.cls`` member or a JSON label field).
The model is the trainer's ``checkpoint.pt`` (its architecture is read from
it), or any open_clip architecture (``--model``) with a pretrained tag or
weights file; without ``--pretrained`` it is randomly initialised (chance's
own baseline). The line a person reads goes to stderr; ``--json`` writes the
figures; ``--run OUT`` files them under ``OUT/eval/NAME.json``, where
``pairforge report OUT`` shows them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pairforge.pipeline.outcome import EXIT_CONFIG

DESCRIPTION = (
    "Zero-shot classification of a model on a labelled image set (top-1/top-5 with 95% Wilson intervals, "
    "per-class accuracy) and image-text retrieval recall on held-out pairs. The model is a pairforge train "
    "checkpoint, or any open_clip model with a pretrained tag or file."
)
EXAMPLES = """examples:
  pairforge eval fashion_test/ --pretrained train/checkpoint.pt
  pairforge eval test.parquet --classes classes.txt --pretrained train/checkpoint.pt --json eval.json
  pairforge eval imagenet_val/ --model ViT-B-32 --pretrained laion2b_s34b_b79k --templates clip_templates.txt
  pairforge eval fashion_test/ --pretrained train/checkpoint.pt --pairs out/ --run out/ --name fashion
"""
#: a name filed under OUT/eval/ is a plain file name, nothing a path could climb out with
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pairforge eval",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "set", help="ImageFolder tree, .parquet file/folder, or webdataset shards (run folder, .tar, brace pattern)"
    )
    p.add_argument(
        "--pretrained", help="weights: a pairforge train checkpoint, a file, pf-tiny-scorer or an open_clip tag"
    )
    p.add_argument("--model", help="open_clip architecture (default: the checkpoint's, else pf-tiny)")
    p.add_argument("--classes", metavar="FILE", help="class names, one a line, in label order")
    p.add_argument("--templates", metavar="FILE", help="prompt templates, one a line with {} for the class name "
                   "(default: 8 of CLIP's)")  # fmt: skip
    p.add_argument("--label-column", help="the label column (parquet) or JSON field (webdataset); default: label/cls")
    p.add_argument("--pairs", metavar="OUT", help="also retrieval recall on the held-out pairs of this build's shards")
    p.add_argument(
        "--eval-fraction", type=float, help="held-out share for --pairs (default: the checkpoint's, else 0.1)"
    )
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N images (default: all)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE ('-': to stdout)")
    p.add_argument("--run", metavar="OUT", help="file the figures as OUT/eval/NAME.json for pairforge report OUT")
    p.add_argument("--name", help="the name under OUT/eval/ (default: the set's folder or file name)")
    return p


def _error(msg: str) -> int:
    print(f"pairforge eval: error: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def checkpoint_info(pretrained: str | None) -> dict:
    """The model name and training config a pairforge checkpoint carries (empty for anything else)."""
    from pairforge.stages.common.assets import resolve

    path = resolve(pretrained)
    if not path or not Path(path).is_file():
        return {}
    from pairforge.trainer.model import load_checkpoint

    try:
        state = load_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a torch file we can read safely: open_clip says what it is
        return {}
    return {k: state.get(k) for k in ("model_name", "train_config", "step")} if isinstance(state, dict) else {}


def evaluate_model(args) -> dict:
    import torch

    from pairforge.trainer.labelled import read_class_names, read_labelled
    from pairforge.trainer.loop import _device
    from pairforge.trainer.model import create_model
    from pairforge.trainer.prep import Prep
    from pairforge.trainer.zeroshot import DEFAULT_TEMPLATES, read_templates, zero_shot

    info = checkpoint_info(args.pretrained)
    name = args.model or info.get("model_name") or "pf-tiny"
    classes = read_class_names(args.classes) if args.classes else None
    templates = read_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    data = read_labelled(args.set, args.label_column, classes, args.limit)
    device = _device(args.device)
    torch.manual_seed(0)  # a random model (no --pretrained) is the same random model every time
    model, spec = create_model(name, args.pretrained, device)
    model.eval()
    prep = Prep(name, spec.size, resize="worker")
    result = {"model": {"name": name, "pretrained": args.pretrained, "step": info.get("step")}}
    result.update(zero_shot(model, spec, prep, data, templates, device))
    if args.pairs:
        result["held_out_pairs"] = held_out_pairs(model, spec, prep, args.pairs, info, args.eval_fraction, device)
    return result


def held_out_pairs(model, spec, prep, pairs: str, info: dict, fraction: float | None, device) -> dict:
    """Recall on the pairs of a build the trainer held out (by the hash of
    each sample's key, with the checkpoint's own fraction and seed, so they
    are the very pairs it never trained on)."""
    from pairforge.trainer.data import NoHeldOut, StreamConfig, find_shards, load_eval_set
    from pairforge.trainer.evaluate import evaluate

    tc = info.get("train_config") or {}
    cfg = StreamConfig(eval_fraction=fraction if fraction is not None else tc.get("eval_fraction", 0.1),
                       seed=int(tc.get("seed", 0)))  # fmt: skip
    try:
        evalset = load_eval_set(find_shards([pairs]), prep, cfg, int(tc.get("eval_limit", 1000)))
    except NoHeldOut as e:
        return {"n": 0, "note": str(e)}
    m = evaluate(model, evalset, spec, prep, device)
    keep = ("n", "image_to_text", "text_to_image", "chance", "distinct_captions")
    return {**{k: m[k] for k in keep}, "eval_fraction": cfg.eval_fraction, "seed": cfg.seed, "shards": pairs}


def main(argv: list[str] | None = None) -> int:
    from pairforge.trainer.labelled import LabelledSetError
    from pairforge.trainer.zeroshot import summary_line

    args = parser().parse_args(argv)
    if args.name and not NAME_RE.fullmatch(args.name):
        return _error(f"--name {args.name!r}: letters, digits, '_', '.', '-' only (a file name under OUT/eval/)")
    if args.run and not Path(args.run).is_dir():
        return _error(f"--run {args.run}: not a folder")
    try:
        result = evaluate_model(args)
    except (LabelledSetError, FileNotFoundError, ValueError) as e:
        return _error(str(e))
    result["summary"] = summary_line(result)
    print(f"[eval] {result['summary']}", file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.json == "-":
        print(text)
    elif args.json:
        Path(args.json).write_text(text)
    if args.run:
        from pairforge.manifests import layout

        name = args.name or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(args.set.rstrip("/")).stem)[:64] or "eval"
        dest = Path(args.run) / "eval" / f"{name.lstrip('.') or 'eval'}.json"
        dest.parent.mkdir(exist_ok=True)
        layout.atomic_write_bytes(dest, text.encode("utf-8"))
        print(f"[eval] filed under {dest} (pairforge report {args.run} shows it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
