"""Where does a detector's GPU time go, in process and on Ray Data's actors?

    python bench/regions_profile.py --device cuda --plans inproc,ray-1a2t,ray-2a2t   # one GPU, ~2 min
    python bench/regions_profile.py --device cpu --model mobilenet --n 96 --batch-size 16 --micro-batch 8  # smoke

Why it exists: ``bench/regions.py`` measured R50-FPN v2 at 257 images/s in
process and 94 through Ray Data (2 actors x 2 threads sharing the GPU), the
GPU 95% busy in both, so the Ray path spends ~2.7x the GPU time per image.
This runs the regions stage under ``torch.profiler`` in every process that
runs it (the driver in process; each actor on Ray) over a window of batches
after a warm-up, and prints per process:

* the device time of every kernel, summed, per image of the window, and the
  kernels that take most of it (the same kernels taking longer on the Ray
  path means the GPU is shared worse, more kernels means more work);
* host waits on the GPU (synchronize, device-to-host copies, events) and
  ``cudaMalloc``/``cudaFree`` calls with the time spent in them;
* the caching allocator's counters (retries after a failed allocation,
  out-of-memory errors, device allocations, the peak reserved);
* the sizes of the detector calls (images, shape), so padded or split
  calls show, and how many calls fell back to one image.

A plan is ``inproc`` (``--threads`` batches at once in this process) or
``ray-<A>a<T>t`` (``A`` actors sharing the GPU, ``T`` batches each).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.clipbench import corpus, rows_batch  # noqa: E402
from bench.regions import MODELS, confident_checkpoint, stage_config  # noqa: E402
from pairforge.stages.regions import Config, RegionsStage  # noqa: E402

#: host calls that wait for the GPU (the CUDA runtime's names, as the profiler records them)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")
ALLOCS = ("cudaMalloc", "cudaFree")


class ProfiledRegions(RegionsStage):
    """The regions stage, profiled from its ``skip``-th finished batch in this
    process to its ``skip + count``-th; the summary is written to
    ``out/<pid>.json``. Pickled to Ray's actors like the stage itself."""

    out, skip, count, _state = "", 2, 6, None

    def window(self, out: str, skip: int, count: int) -> ProfiledRegions:
        self.out, self.skip, self.count = out, skip, count
        return self

    def __getstate__(self):
        state = super().__getstate__()
        state["_state"] = None
        return state

    def setup(self) -> None:
        first = self._detectors is None
        super().setup()
        if first:
            self._state = {"lock": threading.Lock(), "done": 0, "prof": None, "rows": 0, "t0": 0.0,
                           "calls": collections.Counter(), "lat": []}  # fmt: skip
            for d in self._detectors:
                d.detect = self._counted(d.detect)

    def _counted(self, detect):
        def run(images):
            shapes = {tuple(t.shape[-2:]) for t in images}
            self._state["calls"][f"{len(images)} x {sorted(shapes)}"] += 1
            return detect(images)

        return run

    def process_batch(self, batch):
        import torch

        self.setup()
        s = self._state
        t = time.perf_counter()
        out = super().process_batch(batch)
        with s["lock"]:
            s["done"] += 1
            if s["prof"] is not None:
                s["rows"] += len(out["key"])
                s["lat"].append(time.perf_counter() - t)
            if s["done"] == self.skip:
                torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
                s["calls"].clear()
                acts = [torch.profiler.ProfilerActivity.CPU]
                acts += [torch.profiler.ProfilerActivity.CUDA] if self._device.startswith("cuda") else []
                s["prof"] = torch.profiler.profile(activities=acts)
                s["prof"].__enter__()
                s["t0"] = time.perf_counter()
            elif s["done"] == self.skip + self.count and s["prof"] is not None:
                wall = time.perf_counter() - s["t0"]
                s["prof"].__exit__(None, None, None)
                self._write(s["prof"], wall)
                s["prof"] = None
        return out

    def _write(self, prof, wall: float) -> None:
        import torch

        rows = max(1, self._state["rows"])
        on_device, timed, host = [], [], collections.defaultdict(lambda: [0, 0.0])
        for ev in prof.key_averages():
            dev = getattr(ev, "self_device_time_total", None)
            if dev is None:
                dev = getattr(ev, "self_cuda_time_total", 0.0)
            if dev:  # a kernel's time is some event's self device time, once
                timed.append((ev.key, int(ev.count), float(dev)))
                if str(getattr(ev, "device_type", "")).endswith("CUDA"):
                    on_device.append(timed[-1])
            if ev.key.startswith(WAITS + ALLOCS):
                h = host[ev.key]
                h[0] += int(ev.count)
                h[1] += float(ev.cpu_time_total)
        kernels = sorted(on_device or timed, key=lambda k: -k[2])
        total = sum(k[2] for k in kernels)
        mem = torch.cuda.memory_stats() if self._device.startswith("cuda") else {}
        summary = {
            "pid": os.getpid(),
            "rows": rows,
            "wall_s": wall,
            "images_per_s": rows / wall,
            "kernel_ms_total": total / 1e3,
            "kernel_us_per_image": total / rows,
            "kernels": len(kernels),
            "kernel_launches_per_image": sum(k[1] for k in kernels) / rows,
            "top": [
                {"kernel": k[0][:90], "launches": k[1], "us_per_image": k[2] / rows, "share": k[2] / max(total, 1)}
                for k in kernels[:12]
            ],  # fmt: skip
            "host": {k: {"calls_per_image": v[0] / rows, "ms_total": v[1] / 1e3} for k, v in sorted(host.items())},
            "alloc": {
                k: mem.get(k)
                for k in (
                    "num_alloc_retries",
                    "num_ooms",
                    "num_device_alloc",
                    "num_device_free",
                    "reserved_bytes.all.peak",
                    "allocated_bytes.all.peak",
                )
            },  # fmt: skip
            "detect_calls": dict(self._state["calls"]),
            "batch_latency_s": float(np.median(self._state["lat"])) if self._state["lat"] else None,
        }
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"{os.getpid()}.json").write_text(json.dumps(summary, indent=1))


def config(args, ckpt: Path, actors: int, threads: int) -> Config:
    """The stage as ``bench/regions.py`` configures it (the model at its own size)."""
    return stage_config(argparse.Namespace(**{**vars(args), "r50_min_size": 0}), args.model, ckpt, actors, threads)


def run_plan(args, name: str, images, ckpt: Path, out: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pairforge.stages.base import run_stage_batch

    m = re.fullmatch(r"ray-(\d+)a(\d+)t", name)
    actors, threads = (int(m[1]), int(m[2])) if m else (1, args.threads)
    n = actors * (args.skip + args.count + 2 * threads + 2) * args.batch_size  # every process passes its window
    rows = rows_batch([images[i % len(images)] for i in range(n)], [""] * n)
    stage = ProfiledRegions(config(args, ckpt, actors, threads)).window(str(out), args.skip, args.count)
    t = time.perf_counter()
    if m is None:
        stage.setup()
        b = args.batch_size
        parts = [{k: v[i : i + b] for k, v in rows.items()} for i in range(0, n, b)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: run_stage_batch(stage, p), parts))
        stage.teardown()
        if args.device.startswith("cuda"):  # the actors of the next plans get the whole GPU, as in a job
            import torch

            torch.cuda.empty_cache()
    else:
        import pyarrow as pa
        import ray

        from pairforge.pipeline.plan import map_on_actors

        table = pa.table({c: pa.array(list(v)) if v.dtype == object else pa.array(v) for c, v in rows.items()})
        src = ray.data.from_arrow(table).repartition(n // args.batch_size).materialize()
        for _ in map_on_actors(src, stage).select_columns(["key"]).iter_batches(batch_size=None):
            pass
    print(f"{name}: {n} images in {time.perf_counter() - t:.1f}s (set-up included)", flush=True)


def report(name: str, out: Path) -> None:
    for f in sorted(out.glob("*.json")):
        s = json.loads(f.read_text())
        print(f"\n== {name}, process {s['pid']}: {s['rows']} images in the window, {s['images_per_s']:.0f} images/s "
              f"in this process, batch latency {s['batch_latency_s'] or 0:.2f}s")  # fmt: skip
        print(f"   kernel time {s['kernel_us_per_image']:.0f} us/image ({s['kernel_ms_total']:.0f} ms over "
              f"{s['wall_s']:.1f}s), {s['kernels']} kernels, {s['kernel_launches_per_image']:.0f} launches/image")  # fmt: skip
        for k in s["top"]:
            print(f"   {k['us_per_image']:>9.1f} us/image {k['share']:>6.1%} {k['launches']:>7} x {k['kernel']}")
        for k, v in s["host"].items():
            print(f"   host {k}: {v['calls_per_image']:.2f} calls/image, {v['ms_total']:.0f} ms")
        print(f"   allocator: {s['alloc']}")
        print(f"   detector calls (images x shapes): {s['detect_calls']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="r50", choices=sorted(MODELS))
    p.add_argument("--plans", default="inproc,ray-1a2t,ray-2a2t")
    p.add_argument("--threads", type=int, default=2, help="batches at once in process")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=128)
    p.add_argument("--skip", type=int, default=2, help="finished batches per process before the window")
    p.add_argument("--count", type=int, default=6, help="finished batches per process in the window")
    p.add_argument("--n", type=int, default=256, help="distinct JPEGs (cycled)")
    p.add_argument("--logit-scale", type=float, default=1000.0)
    p.add_argument("--out", default=None, help="keep the per-process JSON here")
    args = p.parse_args(argv)
    images, _ = corpus(args.n, args.n)
    tmp = Path(tempfile.mkdtemp(prefix="pf-regions-prof-"))
    ckpt = tmp / f"{args.model}.pt"
    confident_checkpoint(MODELS[args.model], args.logit_scale, ckpt, 0)
    names = args.plans.split(",")
    if any(x.startswith("ray") for x in names):
        import ray

        from pairforge.pipeline.raystart import init_local

        init_local(num_cpus=os.cpu_count(), num_gpus=1 if args.device.startswith("cuda") else 0, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.op_resource_reservation_enabled, ctx.enable_progress_bars, ctx.wait_for_min_actors_s = False, False, 600
    base = Path(args.out) if args.out else tmp
    for name in names:
        out = base / name
        run_plan(args, name, images, ckpt, out)
        report(name, out)


if __name__ == "__main__":
    main()
