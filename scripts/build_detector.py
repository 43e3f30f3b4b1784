"""Build the project's offline detector, ``pf-tiny-detector`` (stages/common/pfdet.py):
a torchvision FCOS trained from scratch on composites and plain product photos
with exact boxes (trainer/detection_data.py), shipped as ``pipeline/assets/pf-tiny-detector.pt``
with its figures in the ``.json`` beside it.

    python scripts/build_detector.py --ingredients build/detector/ingredients.npz
    python scripts/build_detector.py --train --ingredients build/detector/ingredients.npz --device cuda \\
        --out pipeline/assets/pf-tiny-detector.pt

The first line runs where scikit-image and Debian's Fashion-MNIST are (this
project's machine) and writes everything the composites need into one npz;
the second needs only torch, torchvision, numpy and PIL, so it runs on a bare
GPU machine. Training makes composites on the fly in loader workers (item i
is a function of the seed and i alone), and by default runs as many steps as
fit in ``--budget-s`` seconds (330): it times steps 20-60, then fixes the
schedule's length, so a run takes about 6 minutes on one H200 whatever its
speed (a step costs ~2-3 ms of Python and kernel launches per image in
torchvision's per-image loss and transform code, more than its arithmetic);
``--steps N`` fixes the length instead. The held-out figures come from the
saved float16 file loaded back with ``pfdet.load``: the model users get,
on held-out composites and, apart, held-out plain product photos (the kind of
photo the demo serves), each with the share of objects found at the
``regions`` stage's default score threshold (0.5).
``--evaluate FILE`` measures a saved file again (``--eval-images``
each kind) and writes the figures into the ``.json`` beside it.
``--small`` is a CPU smoke test (a 0.2M-parameter model at 128 px, 40 steps).

AP here is VOC's all-point interpolated AP at IoU 0.5 (``average_precision``),
with COCO's matching (each detection, best score first, takes the unmatched
ground-truth box it overlaps most); ``recall_points=101`` gives COCO's
interpolation, which tests/stages/test_pfdet.py checks against pycocotools.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

#: ``--small``: a CPU smoke test of this script in well under a minute
SMALL_MODEL = {"widths": [16, 24, 32, 48, 64], "blocks": [0, 0, 1, 1, 0], "fpn_channels": 32, "head_convs": 1,
               "min_size": 128, "max_size": 256}  # fmt: skip
#: one torch thread: on a few shared cores more threads spin against each other (20x slower here)
SMALL_RUN = {"steps": 40, "batch_size": 8, "eval_images": 40, "warmup": 5, "workers": 1, "threads": 1}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (Nx4) with every box in ``b`` (Mx4), x0 y0 x1 y1."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def average_precision(dets, gts, iou: float = 0.5, recall_points: int | None = None) -> float:
    """AP of one class. ``dets``: per image ``(boxes Nx4, scores N)``; ``gts``: per
    image boxes Mx4. All-point interpolation (VOC 2010 on), or the mean precision
    at ``recall_points`` evenly spaced recalls (COCO: 101). NaN without ground truth."""
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return float("nan")
    scores, hits = [], []
    for (boxes, sc), g in zip(dets, gts):
        order = np.argsort(-np.asarray(sc), kind="mergesort")
        ious = box_iou(np.asarray(boxes, np.float64)[order], np.asarray(g, np.float64).reshape(-1, 4))
        taken = np.zeros(len(g), bool)
        for d in range(len(order)):
            cand = np.where(taken, -1.0, ious[d]) if len(g) else np.zeros(0)
            j = int(np.argmax(cand)) if len(g) else -1
            hit = j >= 0 and cand[j] >= iou
            if hit:
                taken[j] = True
            hits.append(hit)
        scores.extend(np.asarray(sc)[order])
    if not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    tp = np.cumsum(np.asarray(hits)[order])
    recall, precision = tp / n_gt, tp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    if recall_points is None:
        return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * envelope))
    at = np.searchsorted(recall, np.linspace(0, 1, recall_points), side="left")
    return float(np.mean([envelope[i] if i < len(envelope) else 0.0 for i in at]))


def mean_ap(detections, targets, categories, iou: float = 0.5, recall_points: int | None = None) -> dict:
    """``{"mAP": ..., "per_class": {name: {"ap", "gt"}}}`` over the classes with ground
    truth; ``detections`` / ``targets``: per image dicts of numpy boxes, labels (, scores)."""
    per_class = {}
    for c, name in enumerate(categories):
        if c == 0:
            continue
        dets = [(d["boxes"][d["labels"] == c], d["scores"][d["labels"] == c]) for d in detections]
        gts = [t["boxes"][t["labels"] == c] for t in targets]
        ap = average_precision(dets, gts, iou, recall_points)
        per_class[name] = {"ap": ap, "gt": int(sum(len(g) for g in gts))}
    aps = [v["ap"] for v in per_class.values() if not math.isnan(v["ap"])]
    return {"mAP": float(np.mean(aps)) if aps else float("nan"), "per_class": per_class}


def recall_at(detections, targets, score: float = 0.5, iou: float = 0.5) -> float:
    """The share of ground-truth boxes that a detection of their class scoring
    at least ``score`` overlaps at IoU >= ``iou`` (each detection matches one box)."""
    found = total = 0
    for d, t in zip(detections, targets):
        total += len(t["boxes"])
        keep = d["scores"] >= score
        boxes, labels = d["boxes"][keep], d["labels"][keep]
        if not len(boxes) or not len(t["boxes"]):
            continue
        ious = box_iou(np.asarray(t["boxes"], np.float64), np.asarray(boxes, np.float64))
        ious[t["labels"][:, None] != labels[None, :]] = 0.0
        taken = np.zeros(len(boxes), bool)
        for g in np.argsort(-ious.max(1), kind="mergesort"):
            cand = np.where(taken, -1.0, ious[g])
            j = int(np.argmax(cand))
            if cand[j] >= iou:
                taken[j], found = True, found + 1
    return found / total if total else float("nan")


def predict(model, loader, device) -> tuple[list, list]:
    """Detections and targets (numpy) for every image of ``loader``."""
    import torch

    dets, tgts = [], []
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            out = model(list(images.to(device).float().div_(255)))
            dets += [
                {k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in o.items()} for o in out
            ]
            tgts += [{k: v.numpy() for k, v in t.items()} for t in targets]
    return dets, tgts


def evaluate(model, ingr, n: int, seed: int, ccfg, device, workers: int, batch_size: int = 50,
             kind: str = "composite") -> dict:  # fmt: skip
    """Held-out mAP@0.5 (all-point and COCO's 101-point) on ``n`` images of
    ``kind`` (``composite`` or ``plain``), the share of objects found at score
    0.5 (``recall_at_0.5``) and of images with any box at 0.5 (``images_with_a_box``);
    for ``empty`` photo crops (no object) only the last: false alarms."""
    from torch.utils.data import DataLoader

    from pairforge.trainer.detection_data import CATEGORIES, CompositeDataset, collate

    data = CompositeDataset(ingr, "heldout", n, seed, ccfg, kind=kind)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    t0 = time.perf_counter()
    dets, tgts = predict(model, loader, device)
    seconds = time.perf_counter() - t0
    with_a_box = float(np.mean([bool((d["scores"] >= 0.5).any()) for d in dets])) if dets else 0.0
    if kind == "empty":  # no object: only false boxes to count
        return {"kind": kind, "images": n, "images_with_a_box": with_a_box, "seed": seed, "seconds": seconds}
    out = mean_ap(dets, tgts, CATEGORIES)
    out["mAP_coco101"] = mean_ap(dets, tgts, CATEGORIES, recall_points=101)["mAP"]
    out["recall_at_0.5"] = recall_at(dets, tgts, 0.5)
    out["images_with_a_box"] = with_a_box
    out.update(kind=kind, images=n, objects=int(sum(len(t["labels"]) for t in tgts)), seed=seed, seconds=seconds)
    return out


def held_out_figures(model, ingr, args, ccfg) -> dict:
    """``held_out`` (composites), ``held_out_plain`` and ``held_out_empty``
    on ``--eval-images`` each, printed as they come."""
    found = {}
    for key, kind in (("held_out", "composite"), ("held_out_plain", "plain"), ("held_out_empty", "empty")):
        h = found[key] = evaluate(model, ingr, args.eval_images, args.seed + 1000, ccfg, args.device, args.workers,
                                  kind=kind)  # fmt: skip
        if kind == "empty":
            print(f"[detector] held-out empty photo crops: a box at score 0.5 on {h['images_with_a_box']:.3f} "
                  f"of {h['images']}", flush=True)  # fmt: skip
            continue
        per_class = " ".join(f"{k}={v['ap']:.2f}" for k, v in h["per_class"].items() if v["gt"])
        print(f"[detector] held-out {kind}: mAP@0.5 {h['mAP']:.3f} (COCO 101-point {h['mAP_coco101']:.3f}), "
              f"found at score 0.5 {h['recall_at_0.5']:.3f}, images with a box {h['images_with_a_box']:.3f} "
              f"on {h['images']} images, {h['objects']} objects: {per_class}", flush=True)  # fmt: skip
    return found


def train(args, ingr, mcfg: dict, ccfg) -> tuple:
    """Train a fresh model (or fine-tune ``--init``); returns (model, figures)."""
    import torch
    from torch.utils.data import DataLoader

    from pairforge.stages.common import pfdet
    from pairforge.trainer.detection_data import CATEGORIES, CompositeDataset, collate

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    model = pfdet.build(mcfg)
    if getattr(args, "init", ""):  # fine-tune a saved detector of the same config (its float16 weights, as shipped)
        start, categories, config = pfdet.load(args.init, "cpu")
        if categories != list(CATEGORIES) or any(config.get(k) != v for k, v in mcfg.items()):
            raise SystemExit(f"[detector] --init {args.init}: another config or categories than this build's")
        model.load_state_dict(start.state_dict())
    model = model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=args.lr, betas=(0.9, 0.999))  # fmt: skip
    max_steps = args.steps or args.max_steps
    data = CompositeDataset(ingr, "train", max_steps * args.batch_size, args.seed, ccfg, kind="mixed")
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", drop_last=True,
                        prefetch_factor=4 if args.workers else None, persistent_workers=False)  # fmt: skip
    total, probe = args.steps or max_steps, (20, 60)  # steps timed to size the run
    log_every, history, t_probe = max(1, args.log_every), [], None
    t0 = time.perf_counter()
    t_log, window, steps = t0, [], 0
    for step, (images, targets) in enumerate(loader):
        if step >= total:
            break
        if not args.steps and time.perf_counter() - t0 > 1.25 * args.budget_s:
            print(f"[detector] stopping at step {step}: past 1.25 x --budget-s (slower than timed)", flush=True)
            break
        if not args.steps and step == probe[0]:
            t_probe = time.perf_counter()
        if not args.steps and step == probe[1]:
            rate = (probe[1] - probe[0]) / (time.perf_counter() - t_probe)
            left = args.budget_s - (time.perf_counter() - t0)
            total = int(min(max_steps, max(probe[1] + 1, probe[1] + left * rate)))
            print(f"[detector] {rate:.2f} steps/s: {total} steps fit in --budget-s {args.budget_s:.0f}", flush=True)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step >= args.warmup:
            lr = args.lr * (
                0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, total - args.warmup)))
            )
        for g in opt.param_groups:
            g["lr"] = lr
        images = list(images.to(device, non_blocking=True).float().div_(255))
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        steps = step + 1
        window.append(torch.stack([loss.detach(), *[v.detach() for v in losses.values()]]))
        if (step + 1) % log_every == 0 or step + 1 == total:
            parts = torch.stack(window).float().mean(0).tolist()
            now = time.perf_counter()
            sps = len(window) / (now - t_log)
            row = {"step": step + 1, "loss": parts[0], **dict(zip(losses, parts[1:])), "lr": lr,
                   "steps_per_s": sps, "seconds": now - t0}  # fmt: skip
            history.append(row)
            if not math.isfinite(parts[0]):
                raise SystemExit(f"[detector] loss is {parts[0]} at step {step + 1}: try a lower --lr")
            print(f"[detector] step {step + 1}/{total} loss {parts[0]:.3f} "
                  f"(cls {parts[1]:.3f} box {parts[2]:.3f} ctr {parts[3]:.3f}) lr {lr:.2e} "
                  f"{sps:.2f} steps/s {sps * args.batch_size:.0f} img/s {now - t0:.0f}s", flush=True)  # fmt: skip
            t_log, window = now, []
    seconds = time.perf_counter() - t0
    figures = {"steps": steps, "batch_size": args.batch_size, "images_seen": steps * args.batch_size, "lr": args.lr,
               "weight_decay": args.weight_decay, "warmup": args.warmup, "seconds": seconds,
               "steps_per_s": steps / seconds, "device": str(device), "bf16": args.bf16, "seed": args.seed,
               "torch": torch.__version__, "history": history}  # fmt: skip
    if getattr(args, "init", ""):
        import hashlib

        blob = Path(args.init).read_bytes()
        figures["init"] = {"file": Path(args.init).name, "sha256": hashlib.sha256(blob).hexdigest()}
        earlier = Path(args.init).with_suffix(".json")
        if earlier.exists():  # what the starting point was trained on, for the record
            old = json.loads(earlier.read_text())
            figures["init"].update({k: old["train"][k] for k in ("steps", "batch_size", "images_seen", "seconds",
                                                                  "device") if k in old.get("train", {})})  # fmt: skip
            figures["init"]["held_out"] = {k: old.get("held_out", {}).get(k) for k in ("mAP", "mAP_coco101")}
    return model, figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ingredients", required=True, help="the npz: written (without --train) or read (with it)")
    p.add_argument("--train", action="store_true")
    p.add_argument("--train-items", type=int, default=40000, help="Fashion-MNIST train items in the npz")
    p.add_argument("--out", default=str(ROOT / "pipeline" / "assets" / "pf-tiny-detector.pt"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=0, help="0: as many as fit in --budget-s")
    p.add_argument("--budget-s", type=float, default=330.0, help="training seconds when --steps is 0")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--workers", type=int, default=12, help="loader workers making composites")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--init", default="", help="a pf-tiny-detector file to fine-tune (same config) instead of training from scratch"
    )
    p.add_argument(
        "--evaluate",
        default="",
        metavar="FILE",
        help="only the held-out figures of a saved detector (written into the .json beside it)",
    )
    p.add_argument("--small", action="store_true", help="a tiny model, 128 px, 40 steps: a CPU smoke test")
    args = p.parse_args(argv)

    from pairforge.trainer.detection_data import CATEGORIES, CompositeConfig, Ingredients, save_ingredients

    if args.evaluate:  # the held-out figures of a saved detector, into the .json beside it
        from pairforge.stages.common import pfdet

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        model, _, config = pfdet.load(args.evaluate, args.device)
        figures = held_out_figures(model, Ingredients.load(args.ingredients), args,
                                   CompositeConfig().scaled(config["min_size"]))  # fmt: skip
        card = Path(args.evaluate).with_suffix(".json")
        if card.exists():
            summary = json.loads(card.read_text())
            summary.update(figures, held_out_device=args.device)
            card.write_text(json.dumps(summary, indent=1))
            print(f"[detector] wrote the held-out figures into {card}")
        return 0
    if not args.train:
        t0 = time.perf_counter()
        path = save_ingredients(args.ingredients, args.train_items)
        print(f"[detector] wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f}s")
        return 0
    if args.small:
        for k, v in SMALL_RUN.items():
            setattr(args, k, v)
        args.log_every = 10
    from pairforge.stages.common import pfdet

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ingr = Ingredients.load(args.ingredients)
    mcfg = {**pfdet.DEFAULT_CONFIG, "num_classes": len(CATEGORIES), **(SMALL_MODEL if args.small else {})}
    ccfg = CompositeConfig().scaled(mcfg["min_size"])
    model, figures = train(args, ingr, mcfg, ccfg)
    out = pfdet.save(model, mcfg, list(CATEGORIES), args.out)
    loaded, categories, config = pfdet.load(out, args.device)
    summary = {
        "model": "pf-tiny-detector", "file": out.name, "bytes": out.stat().st_size,
        "parameters": pfdet.parameter_count(loaded), "architecture": "torchvision FCOS, tiny residual CNN + FPN",
        "config": config, "categories": categories, "composites": asdict(ccfg),
        "ingredients": {"file": Path(args.ingredients).name, "fashion_train": int(len(ingr.fashion["train"][1])),
                        "fashion_t10k": int(len(ingr.fashion["t10k"][1])),
                        "photos_train": ingr.photo_names("train"), "photos_heldout": ingr.photo_names("heldout")},
        "train": figures, **held_out_figures(loaded, ingr, args, ccfg), "wall_seconds": time.perf_counter() - t_start,
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"[detector] wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {summary['parameters']:,} parameters) "
          f"and {out.with_suffix('.json')} in {summary['wall_seconds']:.0f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
