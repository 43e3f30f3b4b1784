"""Does the data path keep the GPU busy?

    python bench/train.py                               # GPU: ViT-B-32, batch 256
    python bench/train.py --device cpu --steps 20       # a small CPU run

In one run: the training step rate on ready tensors already on the device
(model only: the ceiling), then the rate of the same steps fed by
``pairforge train``'s data path (webdataset over local tar shards, JPEG
decode, resize, tokenize in DataLoader workers), then the model-only rate
again so clock drift shows. Prints samples/s of each and their ratio; the
goal is a ratio >= 0.90.

The shards are written first with the pipeline's shard writer: random crops
of scikit-image's photos as ``--image-px`` JPEGs (what a download stage that
resizes to 256 writes), with captions.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

WORDS = ("photo", "picture", "close up", "view", "detail", "image", "shot", "crop")


def _photos() -> list[tuple[str, np.ndarray]]:
    import skimage.data

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
             "camera", "coins", "moon", "brick", "grass", "gravel", "colorwheel", "cat", "clock")  # fmt: skip
    photos = []
    for n in names:
        a = np.asarray(getattr(skimage.data, n)())
        photos.append((n, np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]))
    return photos


def _write_one(job: tuple[str, int, int, int, int, int]) -> dict:
    """One shard of random crops (its own seeded RNG, so shards can be written in parallel)."""
    from PIL import Image

    from manifests.shards import write_shard
    from stages.base import fresh_rows, object_array

    out, shard_id, start, n, px, seed = job
    photos = _photos()
    rng = random.Random(f"{seed}:{shard_id}")
    images, captions = [], []
    for _ in range(n):
        name, arr = rng.choice(photos)
        h, w = arr.shape[:2]
        side = rng.randint(min(h, w) // 3, min(h, w))
        y, x = rng.randint(0, h - side), rng.randint(0, w - side)
        im = Image.fromarray(arr[y : y + side, x : x + side]).resize((px, px), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        captions.append(f"a {rng.choice(WORDS)} of the {name.replace('_', ' ')} number {rng.randint(0, 999)}")
    rows = fresh_rows(
        [f"{shard_id:05d}{i:05d}" for i in range(n)],
        shard_id,
        image=object_array(images),
        image_ext=object_array(["jpg"] * n),
        caption=object_array(captions),
    )
    return write_shard(rows, Path(out), shard_id)


def write_shards(out: Path, samples: int, per_shard: int, px: int, seed: int = 0) -> int:
    """Random crops of skimage's photos as ``px``-square JPEGs, in shards
    written by one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    from manifests.manifest import write_sizes

    jobs = [
        (str(out), sid, a, min(per_shard, samples - a), px, seed) for sid, a in enumerate(range(0, samples, per_shard))
    ]
    with ProcessPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        stats = list(pool.map(_write_one, jobs))
    write_sizes(out, stats)
    return len(stats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, batches, steps: int, warmup: int, device) -> tuple[float, float]:
    """(seconds for ``steps`` steps after ``warmup``, seconds of those spent
    waiting for a batch)."""
    for _ in range(warmup):
        step_fn(next(batches))
    _sync(device)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        step_fn(batch)
    _sync(device)
    return time.perf_counter() - t0, wait


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--model", help="open_clip architecture (default: ViT-B-32 on CUDA, pf-tiny on CPU)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--samples", type=int, help="samples written to the bench shards")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--workers-list", help="comma list of loader worker counts to try (the best is reported)")
    p.add_argument("--nice", default=str(10), help="comma list of loader worker niceness values to try")
    p.add_argument("--shards", help="existing shards to read instead of writing new ones")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)

    from trainer.data import Prep, find_shards, tokenizer, train_loader
    from trainer.loop import TrainConfig, train_step
    from trainer.model import create_model, optimizer_for

    device = torch.device(args.device)
    model_name = args.model or ("ViT-B-32" if device.type == "cuda" else "pf-tiny")
    bs = args.batch_size or (256 if device.type == "cuda" else 32)
    samples = args.samples or max(
        bs * (args.steps + args.warmup) // 2, 4 * args.per_shard if device.type == "cuda" else bs * 8
    )
    per_shard = min(args.per_shard, max(bs, samples // max(2, args.workers)))

    tmp = None
    if args.shards:
        root = Path(args.shards)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pf-bench-train-")
        root = Path(tmp.name)
        t0 = time.perf_counter()
        n = write_shards(root, samples, per_shard, args.image_px)
        print(
            f"[bench] wrote {samples} samples in {n} shards of {args.image_px}px JPEGs in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
    shards = find_shards([root])

    torch.manual_seed(0)
    model, spec = create_model(model_name, device=device)
    optimizer = optimizer_for(model, 1e-4, 0.1)
    cfg = TrainConfig(shards=(str(root),), out="", model=model_name, batch_size=bs, warmup=0, steps=10**9,
                      hard_negatives=False, eval_fraction=0.0, shuffle_buffer=1000, workers=args.workers)  # fmt: skip
    bf16 = device.type == "cuda"

    def step(batch):
        train_step(model, optimizer, batch, cfg, spec, device, 0, bf16)

    # ready tensors: random (not zero) images and real tokens, already on the device
    caps = [f"a photo of the astronaut number {i}" for i in range(bs)]
    ready = {
        "image": torch.randint(0, 256, (bs, 3, spec.size, spec.size), dtype=torch.uint8, device=device),
        "text": tokenizer(model_name)(caps).to(device),
        "neg_text": torch.zeros((bs, 1), dtype=torch.long),
        "has_neg": torch.zeros(bs, dtype=torch.bool),
    }

    def forever(batch):
        while True:
            yield batch

    rates = {}
    s, _ = time_steps(step, forever(ready), args.steps, args.warmup, device)
    rates["model_only_before"] = args.steps * bs / s
    print(f"[bench] model only:  {rates['model_only_before']:9.0f} samples/s", flush=True)

    import trainer.data

    runs = []  # (workers, niceness, samples/s, wait fraction)
    for nice in [int(v) for v in args.nice.split(",")]:
        trainer.data.WORKER_NICENESS = nice  # read by each worker as it starts
        for w in [int(v) for v in args.workers_list.split(",")] if args.workers_list else [args.workers]:
            stream = replace(cfg, workers=w).stream()
            loader = train_loader(shards, Prep(model_name, spec.size), stream, pin_memory=device.type == "cuda")
            s, wait = time_steps(step, iter(loader), args.steps, args.warmup, device)
            runs.append((loader.num_workers, nice, args.steps * bs / s, wait / s))
            print(f"[bench] streaming, {loader.num_workers} workers at nice {nice}: {runs[-1][2]:9.0f} samples/s "
                  f"({runs[-1][3]:.0%} of the time waiting for data)", flush=True)  # fmt: skip
            del loader
    workers, _, rates["streaming"], wait_fraction = max(runs, key=lambda r: r[2])

    s, _ = time_steps(step, forever(ready), args.steps, args.warmup, device)
    rates["model_only_after"] = args.steps * bs / s
    print(f"[bench] model only:  {rates['model_only_after']:9.0f} samples/s (again)", flush=True)

    model_only = (rates["model_only_before"] + rates["model_only_after"]) / 2
    ratio = rates["streaming"] / model_only
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": model_name, "batch_size": bs, "image_size": spec.size, "image_px_on_disk": args.image_px,
        "steps": args.steps, "warmup": args.warmup, "loader_workers": workers, "cpus": os.cpu_count(),
        "shards": len(shards), "samples_per_s": rates, "data_wait_fraction": wait_fraction,
        "ratio_streaming_to_model_only": ratio, "goal": 0.90,
        "streaming_runs": [dict(zip(("workers", "nice", "samples_per_s", "wait_fraction"), r)) for r in runs],
    }  # fmt: skip
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'device':<12}{'model':<12}{'batch':>6}{'workers':>8}{'model-only/s':>14}{'streaming/s':>13}{'ratio':>8}")
    print(f"{result['device'][:11]:<12}{model_name:<12}{bs:>6}{workers:>8}{model_only:>14.0f}{rates['streaming']:>13.0f}{ratio:>8.2f}"
          f"   goal >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
