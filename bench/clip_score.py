"""How fast does the clip_score stage score pairs, against what the GPU can
do and what a user would write?

    python bench/clip_score.py --device cuda --compile       # the table in docs/benchmarks.md (one GPU, ~8 min)
    python bench/clip_score.py --device cpu --n 2048         # any machine (smoke)

Corpus: ``--n`` 256x256 JPEGs (``--unique`` distinct random-ish images,
encoded by PIL in memory and cycled; decode work per row is the same) with
distinct captions of 5-15 words. Model: ``--model`` with random weights
(speed only), bf16 autocast on a GPU, fp32 on the CPU.

Plans (``--plans``, comma separated; default: all that apply):

* ``eager``, ``graphs``, ``compiled``: the ceilings, both towers on ready
  tensors on the device (uint8 pixels and tokens), at ``--micro-batch``:
  eagerly, replayed from CUDA graphs, ``torch.compile`` + graphs
* ``naive``: torch DataLoader (PIL + open_clip's preprocess, ``--workers``
  workers), tokenise in the loop, both towers eagerly: what a user writes
* ``inproc1``, ``inproc2``, ``inprocN``: the stage in this process from JPEG
  bytes (nvJPEG on a GPU), N batches at once on N threads (what one actor
  does, without Ray; on a GPU the tokens are made ahead, untimed, as a Ray
  plan's CPU tasks do); ``inprocN-libjpeg``: libjpeg on ``--actor-cpus``
  threads
* ``ray-*``: the stage through Ray Data (``pipeline.plan.map_on_actors``, the
  plan a job runs) from JPEG bytes in the object store: ``ray-nvjpeg`` one
  actor, ``--actor-threads`` batches at once, nvJPEG in the actor, CPU tasks
  tokenise ahead of it; ``ray-nvjpeg-2a`` two such actors sharing the GPU
  (``pipeline/example_job.yaml``; the headline); ``ray-nvjpeg-1t`` one actor, one batch at a time;
  ``ray-nvimgcodec``, ``ray-nvimgcodec-2a``, ``-1t``: the same with ``image_decode: nvimgcodec``
  (the hardware JPEG engines; needs nvidia-nvimgcodec-cu13); ``ray-nvimgmix-*``: nvImageCodec with
  ``--nvimg-mix`` as its backends (the engines with a share of each batch on the
  hybrid decoder, CPU Huffman on ``--nvimg-threads`` threads); ``ray-libjpeg``
  ``--prefetch-actors`` actors with CPU tasks decoding (libjpeg), resizing
  and tokenising ahead of them; a ``+compiled`` suffix (``ray-nvjpeg-2a+compiled``)
  runs that plan with the stage's ``compile: true``

Method: every plan is set up (models loaded, graphs captured; untimed), runs
one untimed warm-up pass, then ``--passes`` timed passes; pass ``r`` runs the
plans in the order rotated by ``r``, so no plan is always first. A pass's
rate is the rows after its first batch over the time from that batch to the
last (the start of a Ray execution, actors included, and the DataLoader's
workers stay out of it; the table shows the wall time of the whole pass
too). A Ray pass starts its CPU tasks only once its actors are up
(``wait_for_min_actors_s``): no plan gets CPU work done outside its timed
window while its actors start. ``--ray-windows``: a Ray plan runs once over
the corpus 1 + ``--passes`` times instead, and its passes are consecutive
windows of ``--n`` rows of that one execution (the first the warm-up; each
from the last batch of the window before to its own last): one actor start
(~30-40 s on a lent GPU) instead of one a pass, but the plan's passes run
back to back rather than between the other plans'. GPU busy is NVML's utilisation (the share of time a kernel ran),
sampled every 0.1 s over the same window; CPU busy is /proc/stat's busy
cores over it, and "stolen" the cores' worth of time the host of a virtual
machine took from its vCPUs (a lent GPU machine is one: a host that steals
slows every plan's CPU work, not the ceilings). The table gives the median and min-max over the timed passes
and the ratios of the medians to ``naive`` and to ``eager``, all from this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.clipbench import (  # noqa: E402
    NVIMG_MIX,
    Ceiling,
    Clock,
    GpuBusy,
    Naive,
    Plan,
    agreement,
    corpus,
    parts,
    rows_batch,
)
from bench.clipplans import InProcess, RayPlan  # noqa: E402

# ------------------------------------------------------------------ main


def header(args) -> str:
    import torch

    lines = []
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    lines.append(f"machine: {cores} cores ({usable} usable), {cpu}, {platform.platform()}")
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                     f"{p.multi_processor_count} SMs; driver {torch_driver()}; CUDA {torch.version.cuda}")  # fmt: skip
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("torchvision", "open_clip", "ray", "pyarrow"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # absent: say so
            versions.append(f"{mod} -")
    lines.append("software: " + ", ".join(versions))
    lines.append(f"run: model {args.model} (random weights), n {args.n}, batch {args.batch_size}, micro-batch "
                 f"{args.micro_batch}, {args.passes} timed passes + 1 warm-up per plan, order rotated")  # fmt: skip
    return "\n".join(lines)


def torch_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi
        return "?"


def summary(values: list[float]) -> tuple[float, float, float]:
    v = [x for x in values if x == x]
    return (statistics.median(v), min(v), max(v)) if v else (float("nan"),) * 3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=None, help="rows per pass (default: 40960 on a GPU, 512 on the CPU)")
    p.add_argument("--naive-n", type=int, default=12288, help="rows per pass of the naive loop (it is slow)")
    p.add_argument("--naive-batch", type=int, default=256, help="the naive loop's batch size")
    p.add_argument("--unique", type=int, default=1024)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=None, help="rows per Ray batch / stage call (default 2048; 256 on the CPU)")  # fmt: skip
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--passes", type=int, default=3, help="timed passes per plan (after one warm-up)")
    p.add_argument("--plans", default="", help="comma list (see above); default: every plan for the device")
    p.add_argument("--compile", action="store_true", help="also the compiled ceiling (and its agreement check)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the naive loop")
    p.add_argument("--actor-threads", type=int, default=2)
    p.add_argument("--compile-numerics", default="eager", help="compile_numerics of the compiled ceiling and plans")
    p.add_argument("--actor-cpus", type=int, default=8, help="decode threads of inprocN-libjpeg")
    p.add_argument("--prefetch-actors", type=int, default=None, help="actors of ray-libjpeg (default 3; 1 on the CPU)")
    p.add_argument("--nvimg-mix", default=NVIMG_MIX, help="nvimgcodec_backends of the ray-nvimgmix plans")
    p.add_argument("--nvimg-threads", type=int, default=3, help="decode_threads of the ray-nvimgmix plans")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the Ray plans share")
    p.add_argument("--parts-n", type=int, default=8192, help="rows for the per-part rates")
    p.add_argument("--skip", default="", help="comma list of: parts,agreement")
    p.add_argument(
        "--ray-windows",
        action="store_true",
        help="each Ray plan runs once over the corpus 1 + --passes times, cut into passes (one actor start)",
    )
    p.add_argument("--ray-stats", metavar="DIR", help="write Ray Data's operator stats of every Ray pass here")
    p.add_argument("--budget-s", type=float, default=0, help="start no timed pass after this many seconds (0: none)")
    p.add_argument("--headline", default="ray-nvjpeg-2a", help="the plan the last line reports")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.n = args.n or (40960 if gpu else 512)
    args.batch_size = args.batch_size or (2048 if gpu else 256)
    args.prefetch_actors = args.prefetch_actors or (3 if gpu else 1)
    skip = set(filter(None, args.skip.split(",")))

    import signal

    import torch

    # a timeout's SIGTERM still prints the table of the passes that ran
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    print(header(args), flush=True)
    t = time.perf_counter()
    images, captions = corpus(args.n, args.unique)
    print(f"corpus: {args.n} JPEGs ({np.mean([len(b) for b in images[: args.unique]]) / 1024:.1f} KiB mean), "
          f"{time.perf_counter() - t:.1f}s", flush=True)  # fmt: skip

    default = ["eager", "graphs"] if gpu else ["eager"]
    default += ["compiled"] if gpu and args.compile else []
    default += ["naive", "inproc2"] if gpu else ["naive", "inproc1"]
    default += ["ray-nvjpeg", "ray-nvjpeg-2a", "ray-libjpeg"] if gpu else ["ray-libjpeg"]
    names = [x for x in args.plans.split(",") if x] or default

    if "parts" not in skip:
        parts(args, images, captions)
    if "agreement" not in skip:
        agreement(args, images, captions)

    ray_started = False
    if any(x.startswith("ray") for x in names):
        try:
            import pyarrow as pa
            import ray

            from pairforge.pipeline.raystart import init_local

            init_local(num_cpus=os.cpu_count(), num_gpus=args.gpus if gpu else 0, log_to_driver=False)
            ray_started = True
            # as pipeline.plan.run_rows runs a job
            ray.data.DataContext.get_current().op_resource_reservation_enabled = False
            ray.data.DataContext.get_current().enable_progress_bars = False
            # the actors first, then the CPU tasks (see the module doc)
            ray.data.DataContext.get_current().wait_for_min_actors_s = 600
            rows = rows_batch(images, captions)
            table = pa.table({c: pa.array(list(v)) if v.dtype == object else pa.array(v) for c, v in rows.items()})
            source = ray.data.from_arrow(table).repartition(max(1, len(images) // args.batch_size)).materialize()
        except ImportError as e:
            print(f"Ray plans skipped: {e}", flush=True)
            names = [x for x in names if not x.startswith("ray")]

    plans: list[Plan] = []
    for name in names:
        if name in ("eager", "graphs", "compiled"):
            plans.append(Ceiling(args, images, captions, name))
        elif name == "naive":
            plans.append(Naive(args, images, captions))
        elif name.startswith("inproc"):  # inproc2, inproc4-libjpeg
            threads, _, decode = name[len("inproc") :].partition("-")
            plans.append(InProcess(args, images, captions, int(threads or 1), decode))
        else:
            plans.append(RayPlan(args, source, name))
        plans[-1].name = name

    t_begin = time.perf_counter()
    busy = GpuBusy().start() if gpu else None
    results: dict[str, list[Clock]] = {p.name: [] for p in plans}
    live = []
    try:
        for pl in plans:  # set-up and the untimed warm-up pass
            try:
                t = time.perf_counter()
                pl.setup()
                warm = pl.run()
                print(f"warm-up: {pl.label}: {warm.rate:.0f} pairs/s (set-up + pass {time.perf_counter() - t:.1f}s)",
                      flush=True)  # fmt: skip
                live.append(pl)
            except Exception as e:  # one failing plan must not hide the others
                print(f"{pl.label}: failed: {type(e).__name__}: {e}", flush=True)
        for r in range(args.passes):
            if args.budget_s and time.perf_counter() - t_begin > args.budget_s:
                print(f"time budget of {args.budget_s:.0f}s spent: {r} timed passes, not {args.passes}", flush=True)
                break
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            for pl in order:
                try:
                    c = pl.run()
                except Exception as e:
                    print(f"pass {r + 1}: {pl.label}: failed: {type(e).__name__}: {e}", flush=True)
                    continue
                c.busy = busy.mean(c.t0, c.end) if busy else float("nan")
                results[pl.name].append(c)
                print(f"pass {r + 1}: {pl.label}: {c.rate:.0f} pairs/s, GPU busy {c.busy:.0f}%, "
                      f"{c.cores:.1f} cores busy, {c.stolen:.1f} stolen, wall {c.end - c.start:.1f}s", flush=True)  # fmt: skip
                if c.batches < c.min_batches:
                    print(f"   ({c.batches} batches after the first, {c.min_batches} needed for a rate at this "
                          f"plan's concurrency: raise --n or lower --batch-size)", flush=True)  # fmt: skip
    finally:
        if busy:
            busy.stop()
        report(args, plans, results, busy)
        if ray_started:
            import ray

            ray.shutdown()


def report(args, plans: list[Plan], results: dict, busy) -> None:
    """The table of every plan over the passes that ran, and the headline."""
    med = {k: summary([c.rate for c in v])[0] for k, v in results.items()}
    base, top, comp = med.get("naive"), med.get("eager"), med.get("compiled")
    print("\n" + header(args))
    print(f"GPU busy from {busy.source if busy else '-'}; ratios are of medians, all measured in this run\n")
    w = max([len(p.label) for p in plans] + [10])
    print(f"{'plan':<{w}} {'median':>8} {'min-max':>13} {'passes':>6} {'x naive':>8} {'of eager':>8} {'of comp.':>8} "
          f"{'GPU busy':>8} {'cores':>6} {'stolen':>6} {'wall s':>7}")  # fmt: skip
    table = {}
    for pl in plans:
        cs = results[pl.name]
        if not cs:
            print(f"{pl.label:<{w}} {'n/a':>8}")
            continue
        m, lo, hi = summary([c.rate for c in cs])
        b = summary([c.busy for c in cs])[0]
        cores = summary([c.cores for c in cs])[0]
        stolen = summary([c.stolen for c in cs])[0]
        wall = summary([c.end - c.start for c in cs])[0]
        xn = m / base if base else float("nan")
        xc = m / top if top else float("nan")
        xk = m / comp if comp else float("nan")
        print(f"{pl.label:<{w}} {m:>8.0f} {f'{lo:.0f}-{hi:.0f}':>13} {len(cs):>6} {xn:>8.2f} {xc:>8.1%} {xk:>8.1%} "
              f"{b:>7.0f}% {cores:>6.1f} {stolen:>6.1f} {wall:>7.1f}")  # fmt: skip
        table[pl.name] = {"label": pl.label, "median": m, "min": lo, "max": hi, "passes": [c.rate for c in cs],
                          "gpu_busy": b, "cores": cores, "stolen": stolen, "wall_s": wall}  # fmt: skip
    head = table.get(args.headline)
    if head:
        m, b = head["median"], head["gpu_busy"]
        ratios = [f"{m / base:.2f}x naive"] if base else []  # only the baselines this run measured
        ratios += [f"{m / top:.1%} of the eager ceiling"] if top else []
        ratios += [f"{m / comp:.1%} of the compiled ceiling"] if comp else []
        print(f"\nheadline ({args.headline}): {head['label']}: {m:.0f} pairs/s, median of {len(head['passes'])}; "
              f"{', '.join(ratios + [f'GPU busy {b:.0f}%'])} (goals: >= 90% of the compiled ceiling, >= 90% busy)")  # fmt: skip
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"args": vars(args), "header": header(args), "plans": table}, indent=1))


if __name__ == "__main__":
    main()
