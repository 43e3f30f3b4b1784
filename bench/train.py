"""Does ``pairforge train``'s data path keep the GPU busy? (issue 12: >= 0.95
of the model-only rate, median of 3)

    python bench/train.py --budget-s 200 --resize-list device,worker   # one GPU: ViT-B-32, batch 256, bf16
    python bench/train.py --loader-only --device cpu      # the loader alone, samples/s and per core
    python bench/train.py --profile --device cpu          # CPU us/sample of each step of a worker

Plans: ``model-only`` (training steps on ready uint8 tensors already on the
device: the ceiling) and ``data-path`` for each ``--workers-list`` x
``--resize-list`` (the same steps fed by ``trainer.data.train_loader``:
webdataset over local tar shards, decode, crop, tokenise in DataLoader
workers, pinned copies, the resize on the device or in the workers), each
with the eager step and with the step replayed as a CUDA graph (``graph``,
``trainer.graphstep``: what ``pairforge train`` runs on one GPU); a data path
is compared with the model-only plan of its own step. ``--probe`` adds the
eager step on ready tensors with the loader (``model+loader``), or the
loader and the device-side copies and resize (``model+prep``), running
beside it: what the data path costs the step when the step does not wait.

Each plan gets one untimed warm-up pass, then ``--passes`` timed passes; the
order of the plans rotates from pass to pass, so drift shows as spread and
no plan is always first. A data-path pass starts its own loader (fresh
workers) and runs ``--warmup`` untimed steps before its clock starts, so its
figure is the loader's steady state, not a prefetch queue filled while
another plan ran. The table gives the median and min-max samples/s, the
ratio of medians to model-only, the time spent waiting for data and the
cores the pass kept busy (CPU seconds of the trainer and its workers over
wall seconds). ``--budget-s`` sizes the timed passes from the warm-up so the
whole run (shards and model included) ends within it.

``--loader-only`` iterates the same loaders without a model (``--device-step``
adds the device-side resize, on ``--device``); samples per CPU second is the
per-core figure. The shards are written first with the pipeline's shard
writer: random crops of scikit-image's photos as ``--image-px`` JPEGs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.trainkit import cpu_seconds, header, profile, write_shards  # noqa: E402

GOAL = 0.95


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_fn, batches, steps: int, warmup: int, device, busy=None) -> dict:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones."""
    for _ in range(warmup):
        step_fn(next(batches))
    _sync(device)
    wait = 0.0
    c0, m0, t0 = cpu_seconds(), time.thread_time(), time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        step_fn(batch)
    _sync(device)
    t1 = time.perf_counter()
    wall = t1 - t0
    return {"wall_s": wall, "wait": wait / wall, "cpu_s": cpu_seconds() - c0, "main_cpu_s": time.thread_time() - m0,
            "gpu_busy": busy.mean(t0, t1) if busy is not None else float("nan")}  # fmt: skip


def plan_names(args) -> list[str]:
    """``model-only`` and the data path per worker count and resize, each per
    step mode (``graph``: trainer.graphstep); ``--probe`` adds the step on
    ready tensors with the loader (``model+loader``) or the loader and the
    device-side copies and resize (``model+prep``) running beside it."""
    modes = [""] if args.loader_only else ["" if m == "eager" else " graph" for m in args.graph_list]
    combos = [f"w={w} resize={r}" for w in args.workers_list for r in args.resize_list]
    data = [f"data-path {c}{m}" for m in modes for c in combos]
    if args.loader_only:
        return data
    probe = [f"{kind} {combos[0]}" for kind in ("model+loader", "model+prep")] if args.probe else []
    return [f"model-only{m}" for m in modes] + data + probe


def main(argv: list[str] | None = None) -> int:
    t_begin = time.perf_counter()
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--model", help="open_clip architecture (default: ViT-B-32 on CUDA or for --loader-only, else pf-tiny)"
    )
    p.add_argument("--batch-size", type=int, help="default: 256 on CUDA or for --loader-only, else 32")
    p.add_argument("--passes", type=int, default=3, help="timed passes per plan")
    p.add_argument("--steps", type=int, help="timed steps per pass (default: what fits --budget-s)")
    p.add_argument("--budget-s", type=float, default=200.0, help="seconds the whole run may take")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps at the start of every pass")
    p.add_argument("--samples", type=int, help="samples written to the bench shards (default: 1,000 a shard)")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--image-px", type=int, default=256)
    p.add_argument("--workers-list", default=str(min(8, max(1, (os.cpu_count() or 2) - 2))),
                   help="comma list of loader worker counts; the first is the headline")  # fmt: skip
    p.add_argument("--resize-list", default="device", help="comma list of device,worker (trainer.prep)")
    p.add_argument("--nice", type=int, default=10, help="loader workers' niceness (trainer.data.WORKER_NICENESS)")
    p.add_argument(
        "--graph-list",
        default="eager,graph" if cuda else "eager",
        help="comma list of eager,graph: the training step eager or as a CUDA graph (trainer.graphstep)",
    )
    p.add_argument("--probe", action="store_true", help="add the step beside the loader and the copies (plan_names)")
    p.add_argument("--loader-only", action="store_true", help="iterate the loaders without a model")
    p.add_argument("--device-step", action="store_true", help="with --loader-only: resize on --device too")
    p.add_argument("--profile", action="store_true", help="CPU us/sample of each step of a worker, then exit")
    p.add_argument("--shards", help="existing shards to read instead of writing new ones")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    args.workers_list = [int(v) for v in args.workers_list.split(",")]
    args.resize_list = args.resize_list.split(",")
    args.graph_list = args.graph_list.split(",")

    from pairforge.trainer import data as trainer_data
    from pairforge.trainer.data import Prep, find_shards, train_loader
    from pairforge.trainer.loop import TrainConfig, lr_at, train_step

    device = torch.device(args.device)
    big = device.type == "cuda" or args.loader_only or args.profile
    model_name = args.model or ("ViT-B-32" if big else "pf-tiny")
    bs = args.batch_size or (256 if big else 32)
    head = {
        **header(device),
        "model": model_name,
        "batch_size": bs,
        "precision": "bf16" if device.type == "cuda" else "fp32",
    }
    print("[bench] " + ", ".join(f"{k} {v}" for k, v in head.items() if v is not None), flush=True)

    tmp = None
    if args.shards:
        root = Path(args.shards)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pf-bench-train-")
        root = Path(tmp.name)
        samples = args.samples or args.per_shard * max(4, 2 * max(args.workers_list))
        t0 = time.perf_counter()
        n = write_shards(root, samples, args.per_shard, args.image_px)
        print(f"[bench] wrote {samples} samples in {n} shards of {args.image_px}px JPEGs "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip
    shards = find_shards([root])

    if args.loader_only or args.profile:
        import open_clip

        from pairforge.trainer.model import register_configs

        register_configs()
        size, model, spec = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"], None, None
    else:
        from pairforge.trainer.model import create_model, optimizer_for

        torch.manual_seed(0)
        model, spec = create_model(model_name, device=device)
        optimizer = optimizer_for(model, 1e-4, 0.1)
        size = spec.size
    if args.profile:
        res = profile(shards, model_name, size, bs)
        print(f"\n{'step (CPU us/sample, 1 thread)':34}" + "".join(f"{'resize=' + w:>16}" for w in res))
        for k in dict.fromkeys(k for w in res for k in res[w]):
            print(f"{k:34}" + "".join(f"{res[w].get(k, 0.0):16.1f}" for w in res))
        for w in res:
            print(f"{'total resize=' + w:34}{sum(v for k, v in res[w].items() if 'on this CPU' not in k):16.1f}")
        return 0

    cfg = TrainConfig(shards=(str(root),), out="", model=model_name, batch_size=bs, warmup=0, steps=10**9,
                      hard_negatives=False, eval_fraction=0.0, shuffle_buffer=1000)  # fmt: skip
    bf16 = device.type == "cuda"
    trainer_data.WORKER_NICENESS = args.nice  # read by each worker as it starts
    graphed = None
    if "graph" in args.graph_list and not args.loader_only:
        from pairforge.trainer.graphstep import GraphedStep

        torch.manual_seed(0)  # a model and optimizer of its own: the eager plans keep the eager optimizer
        g_model, _ = create_model(model_name, device=device)
        graphed = GraphedStep(g_model, optimizer_for(g_model, 1e-4, 0.1), spec, bf16, cfg.grad_clip)

    def step(batch):
        train_step(model, optimizer, batch, cfg, spec, device, 0, bf16)

    def graph_step(batch):
        graphed(batch, lr_at(cfg, 0))  # the eager plans' rate

    if args.loader_only:

        def step(batch):  # noqa: F811
            pass

    def feed(loader):
        """The data path's batches as the trainer takes them (trainer.loop)."""
        if args.loader_only and not args.device_step:
            return iter(loader)
        from pairforge.trainer.prep import device_batches

        return device_batches(iter(loader), size, device, cfg.hard_negatives)

    # ready tensors: random (not zero) images and real tokens, already on the device
    caps = [f"a photo of the astronaut number {i}" for i in range(bs)]
    ready = {
        "image": torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=device),
        "text": trainer_data.tokenizer(model_name)(caps).to(device),
        "neg_text": None,
    }

    def forever(batch):
        while True:
            yield batch

    def beside(batches):
        """The loader's batches taken and dropped; the step gets the ready tensors."""
        for _ in batches:
            yield ready

    def one_pass(name: str, steps: int) -> dict:
        t0 = time.perf_counter()
        words = name.split()
        fn = graph_step if words[-1] == "graph" else step
        if words[0] == "model-only":
            res = timed(fn, forever(ready), steps, min(args.warmup, 5), device, busy)
        else:
            w, r = (part.split("=")[1] for part in words[1:3])
            prep = Prep(model_name, size, resize=r)
            stream = replace(cfg, workers=int(w)).stream()
            loader = train_loader(shards, prep, stream, pin_memory=device.type == "cuda")
            batches = iter(loader) if words[0] == "model+loader" else feed(loader)
            if words[0] != "data-path":
                batches = beside(batches)
            res = timed(fn, batches, steps, args.warmup, device, busy)
            res["workers"] = loader.num_workers
            del loader
        res.update(rate=steps * bs / res["wall_s"], cores_busy=res["cpu_s"] / res["wall_s"], steps=steps,
                   main_ms=1e3 * res["main_cpu_s"] / steps, overhead_s=time.perf_counter() - t0 - res["wall_s"])  # fmt: skip
        return res

    plans = plan_names(args)
    from bench.clipbench import GpuBusy

    busy = GpuBusy(device.index or 0).start() if device.type == "cuda" else None
    warm = {pl: one_pass(pl, 10) for pl in plans}  # untimed: compiles, caches, page cache, a first rate
    for pl, r in warm.items():
        print(f"[bench] warm-up {pl}: {r['rate']:.0f} samples/s", flush=True)
    steps = args.steps
    if steps is None:
        left = args.budget_s * 0.85 - (time.perf_counter() - t_begin)  # a margin for drift
        fixed = sum(r["overhead_s"] for r in warm.values()) * args.passes
        per_step = sum(bs / r["rate"] for r in warm.values()) * args.passes
        steps = max(20, min(400, int((left - fixed) / per_step)))
    print(f"[bench] {args.passes} timed passes x {steps} steps per plan, order rotated "
          f"({time.perf_counter() - t_begin:.0f}s so far)", flush=True)  # fmt: skip
    runs: dict[str, list[dict]] = {pl: [] for pl in plans}
    for r in range(args.passes):
        for pl in plans[r % len(plans) :] + plans[: r % len(plans)]:
            res = one_pass(pl, steps)
            runs[pl].append(res)
            print(f"[bench] pass {r + 1} {pl}: {res['rate']:9.0f} samples/s, waiting {res['wait']:.0%}, "
                  f"{res['cores_busy']:.1f} cores busy", flush=True)  # fmt: skip

    if busy is not None:
        busy.stop()

    def base_of(pl: str) -> float | None:
        """The model-only median of the plan's step mode."""
        ref = "model-only graph" if pl.endswith(" graph") else "model-only"
        return statistics.median(x["rate"] for x in runs[ref]) if ref in runs else None

    table = {}
    for pl, rs in runs.items():
        rates = [x["rate"] for x in rs]
        m = statistics.median(rates)
        base = base_of(pl)
        table[pl] = {
            "median": m, "min": min(rates), "max": max(rates), "passes": rates,
            "ratio": m / base if base else None,
            "wait": statistics.median(x["wait"] for x in rs),
            "cores_busy": statistics.median(x["cores_busy"] for x in rs),
            "per_core": statistics.median(x["rate"] / x["cores_busy"] for x in rs),
            "gpu_busy": statistics.median(x["gpu_busy"] for x in rs),
            "main_ms_per_step": statistics.median(x["main_ms"] for x in rs),
        }  # fmt: skip
    print(f"\n{'plan':38}{'median/s':>10}{'min-max':>16}{'x model':>9}{'wait':>7}{'cores':>7}{'per core/s':>12}"
          f"{'GPU busy':>10}{'main ms/step':>14}")  # fmt: skip
    for pl, t in table.items():
        ratio = f"{t['ratio']:.3f}" if t["ratio"] else "-"
        gpu = f"{t['gpu_busy']:.0f}%" if t["gpu_busy"] == t["gpu_busy"] else "-"
        print(f"{pl:38}{t['median']:10.0f}{t['min']:8.0f}-{t['max']:<7.0f}{ratio:>9}{t['wait']:7.0%}"
              f"{t['cores_busy']:7.1f}{t['per_core']:12.0f}{gpu:>10}{t['main_ms_per_step']:14.1f}")  # fmt: skip
    # the headline: the data path as `pairforge train` runs it (a CUDA graph on CUDA when measured)
    data = [pl for pl in plans if pl.startswith("data-path")]
    headline = next((pl for pl in data if pl.endswith(" graph")), data[0])
    ratio = table[headline]["ratio"]
    if ratio:
        print(f"\n{headline} / its model-only = {ratio:.3f} (median of {args.passes}); goal >= {GOAL}: "
              f"{'met' if ratio >= GOAL else 'NOT met'}; {time.perf_counter() - t_begin:.0f}s in all")  # fmt: skip
    if args.json:
        result = {**head, "steps": steps, "warmup": args.warmup, "passes": args.passes, "shards": len(shards),
                  "image_px_on_disk": args.image_px, "plans": table, "runs": runs, "goal": GOAL, "headline": headline,
                  "seconds": time.perf_counter() - t_begin}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
