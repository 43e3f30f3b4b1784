"""The ``safety`` stage's NSFW and text signals on one GPU (the torch engine:
the ONNX files converted by onnx2torch), next to the same stage on the same
machine's CPU, measured in one run.

    python bench/safety.py --gpu                  # 4,096 images, 3 timed passes
    python bench/safety.py --gpu --quick          # a smoke run (256 images, 1 pass)
    python bench/safety_gpu.py --device cpu --quick   # the code path without a GPU (no figure)

Plans, each the stage's ``process_batch`` over 256 px JPEGs (``bench/download.py``'s
photos) in batches of ``--batch-size`` rows, timed on the wall clock
(``.cpu()`` of the last output waits for the GPU):

    cpu nsfw          the baseline: ``engine: auto`` on the CPU (ONNX Runtime where
                      installed, else torch), ``--threads`` threads, ``--cpu-n`` images
    gpu nsfw fp16     NSFW only, fp16; ``--threads`` threads decode and letterbox
    gpu nsfw fp32     the same in fp32 (TF32 off)
    gpu text fp16     text only (PP-OCRv4's detector at ``--text-size``), fp16
    gpu both fp16     NSFW and text on one decode
    gpu nsfw net      the network alone on letterboxed images (upload, forward,
                      download of the scores' rows): what the GPU could do if
                      decoding were free

Each plan: an untimed warm-up, then ``--passes`` timed passes; the table gives
the median and min-max images/s and the ratio to the CPU baseline. Then the
precision check: fp16 and bf16 against fp32 on the GPU, over every image
(max |diff| of ``punsafe`` and ``text_area``), and the GPU's fp32 against the
CPU baseline's scores. The header names the card; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.download import make_images  # noqa: E402
from bench.safety import rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="images per GPU pass")
    p.add_argument("--cpu-n", type=int, default=512, help="images per CPU pass (the baseline)")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="256 images, 64 on the CPU, 1 timed pass")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the stage (num_cpus)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per process_batch call")
    p.add_argument("--micro-batch", type=int, default=256, help="images per network call on the GPU")
    p.add_argument("--text-size", type=int, default=256)
    p.add_argument("--device", default="cuda", help="cuda (the figure), or cpu to try the code path")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    n, cpu_n, passes = (256, 64, 1) if args.quick else (args.n, args.cpu_n, args.passes)

    import torch

    from pairforge.stages.base import run_stage_batch
    from pairforge.stages.common import nets as _nets
    from pairforge.stages.common import nsfw as _nsfw
    from pairforge.stages.safety import Config, SafetyStage

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no GPU here: run with --device cpu to try the code path")
        return 2
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none (--device cpu: no GPU figure)"
    load_before = os.getloadavg()
    print(f"card: {card}; torch {torch.__version__}; {os.cpu_count()} cores, {args.threads} stage threads; "
          f"load average {load_before[0]:.2f} at start", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    images = make_images(n, sides=(256, 256))
    print(f"{n} JPEGs of 256 px made in {time.perf_counter() - t0:.1f} s; batch {args.batch_size} rows, "
          f"micro-batch {args.micro_batch}, text at {args.text_size} px", flush=True)  # fmt: skip

    def stage(**kw):
        if kw.get("device") == "cpu":  # --device cpu: the code path only; half precision is a GPU's
            kw.pop("precision", None)
        st = SafetyStage(Config(nsfw_threshold=None, num_cpus=args.threads, batch_size=args.batch_size, **kw))
        st.setup()
        return st

    def run(st, imgs) -> dict:
        outs = [run_stage_batch(st, rows(imgs[a : a + args.batch_size])) for a in range(0, len(imgs), args.batch_size)]
        return {k: np.concatenate([o[k] for o in outs]) for k in ("punsafe", "text_area") if k in outs[0]}

    gpu = dict(engine="torch", device=args.device, micro_batch=args.micro_batch)
    stages = {
        "cpu nsfw": (stage(text=False, device="cpu", micro_batch=16), images[:cpu_n]),
        "gpu nsfw fp16": (stage(text=False, precision="fp16", **gpu), images),
        "gpu nsfw fp32": (stage(text=False, precision="fp32", **gpu), images),
        "gpu text fp16": (stage(nsfw=False, precision="fp16", text_size=args.text_size, **gpu), images),
        "gpu both fp16": (stage(precision="fp16", text_size=args.text_size, **gpu), images),
    }
    print(
        "engines: "
        + "; ".join(
            f"{k}: {st._models['identity']}" for k, (st, _) in stages.items() if k in ("cpu nsfw", "gpu nsfw fp16")
        )
    )
    plans = {name: (len(imgs), lambda st=st, imgs=imgs: run(st, imgs)) for name, (st, imgs) in stages.items()}
    net = _nets.open_net(_nsfw_path(), "torch", args.device, args.threads, "fp16")
    rows_of = np.array([4 + _nsfw.LABELS.index(c) for c in _nsfw.UNSAFE])
    from pairforge.stages.safety import decode

    boxed = np.stack([_nsfw.letterbox(im, 320) for im in decode(images)[0]])

    def net_only():
        for a in range(0, n, args.micro_batch):
            _nsfw.score_rows(net(boxed[a : a + args.micro_batch], _nsfw.NORM, rows_of))

    plans["gpu nsfw net"] = (n, net_only)
    rates: dict[str, list[float]] = {k: [] for k in plans}
    last: dict[str, dict] = {}
    for r in range(passes + 1):
        for name, (count, fn) in plans.items():
            t = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - t
            last[name] = result
            tag = "warm-up" if r == 0 else f"pass {r}"
            print(f"  {tag:8} {name:14} {seconds:7.3f} s  {count / seconds:9.1f} images/s", flush=True)
            if r:
                rates[name].append(count / seconds)
    load_after = os.getloadavg()

    base = statistics.median(rates["cpu nsfw"])
    print(f"\n{'plan':14} {'median images/s':>16} {'min-max':>19} {'vs cpu nsfw':>12}")
    table = {}
    for name, v in rates.items():
        m = statistics.median(v)
        table[name] = {"median": m, "min": min(v), "max": max(v), "passes": v, "vs_cpu": m / base}
        print(f"{name:14} {m:16.1f} {min(v):9.1f}-{max(v):<9.1f} {m / base:11.1f}x")

    # precision: fp16 (timed above) and bf16 against fp32 on the GPU, and the GPU's fp32 against the CPU's
    accuracy = {}
    bf16 = stage(precision="bf16", text_size=args.text_size, **gpu)
    fp32 = stage(precision="fp32", text_size=args.text_size, **gpu)
    ref, half, brain = run(fp32, images), last["gpu both fp16"], run(bf16, images)
    for label, other in (("fp16", half), ("bf16", brain)):
        accuracy[label] = {k: float(np.abs(ref[k] - other[k]).max()) for k in ref}
    accuracy["gpu fp32 vs cpu"] = {"punsafe": float(np.abs(ref["punsafe"][:cpu_n] - last["cpu nsfw"]["punsafe"]).max())}
    for label, d in accuracy.items():
        print(f"precision {label:16} max |diff| over {n if 'cpu' not in label else cpu_n} images: "
              + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))  # fmt: skip
    print(f"punsafe above 0.5 (fp32): {int((ref['punsafe'] > 0.5).sum())} of {n}; "
          f"text_area above 0.1: {int((ref['text_area'] > 0.1).sum())}")  # fmt: skip
    goal = table["gpu nsfw fp16"]["median"] >= 2000
    print(f"goal: NSFW >= 2,000 images/s on one GPU ({card}): {'met' if goal else 'NOT met'}")
    print(f"load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at end (1-minute)")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "torch": torch.__version__, "cores": os.cpu_count(),
                                         "threads": args.threads, "n": n, "cpu_n": cpu_n, "plans": table,
                                         "precision": accuracy, "goal_met": goal,
                                         "load": [load_before, load_after]}, indent=1))  # fmt: skip
    return 0


def _nsfw_path() -> str:
    from pairforge.stages.common import nsfw as _nsfw
    from pairforge.stages.common import onnx as _onnx

    return _onnx.resolve("", _nsfw.PACKAGE, _nsfw.MODEL_FILE)


if __name__ == "__main__":
    raise SystemExit(main())
