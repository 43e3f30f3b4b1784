"""How fast does the regions stage turn JPEG bytes into boxes and region
features, against a naive per-image loop in the same run?

    python bench/regions.py --device cuda                    # one GPU (~6 min on an H200)
    python bench/regions.py --device cpu --n 64 --passes 1   # any machine (smoke)

Corpus: ``--n`` 256x256 JPEGs (``bench/clipbench.corpus``). Models
(``--models``): torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn``
(MobileNetV3-Large FPN at torchvision's own low-resolution sizes, 320/640)
and ``fasterrcnn_resnet50_fpn_v2`` (at ``--r50-min-size``, default its own
800), random weights, except that the box classifier's weights are scaled
x ``--logit-scale`` so that proposals score like a trained model's: each
image keeps the full ``K = 36`` boxes after the score threshold and
class-aware NMS, and every box gets its RoI feature (with plain random
weights no box passes 0.5 and the feature path would do no work). The
scaled model is saved as a checkpoint file, which the stage loads as a user's.

Plans per model:

* ``naive``: what a user writes: per image, PIL decode, the model on one
  image (fp16 autocast on a GPU), then the backbone again on the resized
  image for the RoI features, ``roi_align`` and a float16 copy on the host;
* ``inproc``: the stage in this process, ``--threads`` batches at once;
* ``unbatched``: ``inproc`` with torchvision's own forward and per-image
  post-processing (the stage before ``stages/common/rcnn_batched.py``);
* ``ray``: the stage through Ray Data (``pipeline.plan.map_on_actors``, the
  plan a job runs), ``--actors`` actors sharing the GPU x ``--threads``
  batches each, the rows with their features delivered to the driver;
  ``ray-<A>a<T>t`` (``ray-1a2t``, ``ray-2a2t``): ``A`` actors x ``T`` threads.

Every Ray plan of a model gets at least 16 batches per actor thread a pass
(so a pass measures steady state, not its first waves): the model's batch
size (and micro-batch, which a batch must fill) is halved until the
largest plan has them, down to 8 rows; the header says what each got.

Method as ``bench/clip_score.py``: each plan is set up and runs one untimed
warm-up pass, then ``--passes`` timed passes in rotated order; a pass's rate
is images after its first batch over the time from that batch to the last;
GPU busy is NVML's utilisation over the same window. The table gives the
median and min-max, and the ratio of medians to ``naive``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.clip_score import header as _header  # noqa: E402
from bench.clipbench import Clock, GpuBusy, Plan, corpus, rows_batch  # noqa: E402


def header(args) -> str:
    """The machine, the card and the software (``bench/clip_score.py``'s header, without its run line)."""
    ns = argparse.Namespace(**{**vars(args), "model": args.models, "micro_batch": args.micro_batch})
    return "\n".join(_header(ns).splitlines()[:-1])


MODELS = {"mobilenet": "fasterrcnn_mobilenet_v3_large_320_fpn", "r50": "fasterrcnn_resnet50_fpn_v2"}


def confident_checkpoint(name: str, scale: float, path: Path, min_size: int) -> None:
    """Random weights with the class logits scaled (see the module doc)."""
    import torch
    from torchvision.models import get_model

    torch.manual_seed(0)
    kw = {"min_size": min_size} if min_size else {}
    model = get_model(name, weights=None, weights_backbone=None, num_classes=91, **kw)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(scale)
    torch.save({"model": model.state_dict()}, path)


def stage_config(args, key: str, ckpt: Path, actors: int, threads: int):
    from pairforge.stages.regions import Config, DetectorSpec

    gpu = args.device.startswith("cuda")
    min_size = args.r50_min_size if key == "r50" else 0
    return Config(
        detectors=(DetectorSpec(MODELS[key], str(ckpt), min_size=min_size),),
        device=args.device,
        num_gpus=(1.0 / actors) if gpu else 0.0,
        num_cpus=2.0 if gpu else 1.0,
        concurrency=(actors, actors),
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        actor_threads=threads,
    )


class Naive(Plan):
    def __init__(self, args, images, key, ckpt):
        self.args, self.images, self.key, self.ckpt = args, images[: args.naive_n], key, ckpt
        self.label = f"{key}: naive per-image loop (PIL, model, backbone again, roi_align)"

    def setup(self):
        import torch
        from torchvision.models import get_model

        kw = {"min_size": self.args.r50_min_size} if self.key == "r50" and self.args.r50_min_size else {}
        m = get_model(MODELS[self.key], weights=None, weights_backbone=None, num_classes=91, **kw)
        m.load_state_dict(torch.load(self.ckpt, weights_only=True)["model"])
        self.model = m.eval().to(self.args.device)

    def run(self) -> Clock:
        import io

        import torch
        from PIL import Image
        from torchvision.ops import roi_align
        from torchvision.transforms.functional import pil_to_tensor

        dev, clock, m = self.args.device, Clock(), self.model
        half = dev.startswith("cuda")
        for data in self.images:
            x = pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB")).to(dev).float() / 255
            with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=half):
                det = m([x])[0]
                batch, _ = m.transform([x])
                fmap = m.backbone(batch.tensors)["0"]
            (rh, rw), (h, w) = batch.image_sizes[0], x.shape[-2:]
            boxes = det["boxes"][:36].float() * torch.tensor([rw / w, rh / h, rw / w, rh / h], device=dev)
            scale = fmap.shape[-1] / batch.tensors.shape[-1]
            feats = roi_align(fmap.float(), [boxes], 7, spatial_scale=scale, sampling_ratio=2).mean((2, 3))
            feats.half().cpu().numpy()
            clock.tick(1)
        return clock.stop()


class InProcess(Plan):
    def __init__(self, args, images, key, ckpt):
        self.args, self.key, self.ckpt = args, key, ckpt
        b = args.batch_size
        self.batches = [
            rows_batch(images[i : i + b], [""] * len(images[i : i + b]), i) for i in range(0, len(images), b)
        ]
        self.label = f"{key}: stage in process, {args.threads} batches at once"

    def setup(self):
        from pairforge.stages.regions import RegionsStage

        self.stage = RegionsStage(stage_config(self.args, self.key, self.ckpt, 1, self.args.threads))
        self.stage.setup()

    def run(self) -> Clock:
        from concurrent.futures import ThreadPoolExecutor

        from pairforge.stages.base import run_stage_batch

        clock = Clock()
        with ThreadPoolExecutor(self.args.threads) as pool:
            for out in pool.map(lambda b: run_stage_batch(self.stage, dict(b)), self.batches):
                clock.tick(len(out["key"]))
                self.k = float(np.mean(out["num_regions"]))
        clock.stop()
        if self.args.device.startswith("cuda"):  # a job's driver holds no GPU memory: nor does this one between passes
            import torch

            torch.cuda.empty_cache()
        slots = self.stage._slots
        self.note = f"; one detector call peaks at {(slots.peak or 0) / 2**30:.1f} GiB, {slots.slots} at once"
        return clock


class Unbatched(InProcess):
    """``inproc`` with each detector on the model's own forward (per-image
    post-processing, :func:`stages.common.detectors.keep_best`): the path
    before ``stages/common/rcnn_batched.py``."""

    def __init__(self, args, images, key, ckpt):
        super().__init__(args, images, key, ckpt)
        self.label = f"{key}: stage in process, model's own forward, {args.threads} batches at once"

    def setup(self):
        super().setup()
        for d in self.stage._detectors:
            d.batched = False


def ray_shape(name: str, args) -> tuple[int, int] | None:
    """(actors, threads) of a Ray plan's name, None for another plan."""
    if name == "ray":
        return args.actors, args.threads
    m = re.fullmatch(r"ray-(\d+)a(\d+)t", name)
    return (int(m[1]), int(m[2])) if m else None


class RayPlan(Plan):
    def __init__(self, args, source, key, ckpt, shape):
        self.args, self.source, self.key, self.ckpt = args, source, key, ckpt
        self.actors, self.threads = shape
        self.label = f"{key}: Ray Data, {self.actors} actor(s) x {self.threads} threads, nvJPEG in the actor"

    def run(self) -> Clock:
        from pairforge.pipeline.plan import map_on_actors
        from pairforge.stages.regions import RegionsStage

        st = RegionsStage(stage_config(self.args, self.key, self.ckpt, self.actors, self.threads))
        ds = map_on_actors(self.source, st).select_columns(["key", "num_regions", "region_feats"])
        clock = Clock()
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            clock.tick(len(batch["key"]))
            self.k = float(np.mean(batch["num_regions"]))
        clock.stop()
        if self.args.device.startswith("cuda"):
            gpu_released()
        return clock


def gpu_released(timeout: float = 120.0) -> None:
    """Wait until the actors of a finished Ray Data execution have let go of
    the GPU: its actor pool shuts down after the last batch reaches the
    driver, and a plan started meanwhile would find their memory taken (an
    R50 actor holds ~51 GiB: the next in-process pass ran out of memory on an
    H100 before this wait)."""
    import torch

    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        free, total = torch.cuda.mem_get_info()
        if free >= total - torch.cuda.memory_reserved() - (2 << 30):
            return
        time.sleep(0.5)
    print(f"[bench] note: GPU memory not released {timeout:.0f}s after a Ray pass", flush=True)


def summary(values):
    v = [x for x in values if x == x]
    return (statistics.median(v), min(v), max(v)) if v else (float("nan"),) * 3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=None, help="images per pass (default 16384 on a GPU, 64 on the CPU)")
    p.add_argument("--naive-n", type=int, default=None, help="images per naive pass (default 1024; 32 on the CPU)")
    p.add_argument("--models", default="mobilenet,r50")
    p.add_argument("--plans", default="naive,inproc,ray")
    p.add_argument("--batch-size", type=int, default=None, help="rows per stage call (default 512; 32 on the CPU)")
    p.add_argument("--micro-batch", type=int, default=128)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--logit-scale", type=float, default=1000.0)
    p.add_argument("--r50-min-size", type=int, default=0, help="R50's min_size (0: its own 800)")
    p.add_argument("--r50-share", type=float, default=0.25, help="R50 runs on this share of the images (it is slower)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.n = args.n or (16384 if gpu else 64)
    args.naive_n = args.naive_n or (1024 if gpu else 32)
    args.batch_size = args.batch_size or (512 if gpu else 32)
    images, _ = corpus(args.n, 1024)
    print(header(args), flush=True)
    print(
        f"corpus: {args.n} JPEGs of 256x256, {np.mean([len(b) for b in images[:1024]]) / 1024:.1f} KiB mean", flush=True
    )
    names = args.plans.split(",")
    source = None
    if any(ray_shape(x, args) for x in names):
        import pyarrow as pa
        import ray

        from pairforge.pipeline.raystart import init_local

        init_local(num_cpus=os.cpu_count(), num_gpus=1 if gpu else 0, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.op_resource_reservation_enabled, ctx.enable_progress_bars, ctx.wait_for_min_actors_s = False, False, 600
        rows = rows_batch(images, [""] * len(images))
        table = pa.table({c: pa.array(list(v)) if v.dtype == object else pa.array(v) for c, v in rows.items()})
        source = ray.data.from_arrow(table).materialize()
    tmp = Path(tempfile.mkdtemp(prefix="pf-regions-bench-"))
    plans: list[Plan] = []
    for key in args.models.split(","):
        ckpt = tmp / f"{key}.pt"
        confident_checkpoint(MODELS[key], args.logit_scale, ckpt, args.r50_min_size if key == "r50" else 0)
        share = args.r50_share if key == "r50" else 1.0
        mine, src = images[: max(1, int(len(images) * share))], source
        # a pass's rate needs >= 3 batches after its first (bench.clipbench.Clock): keep >= 8, and
        # >= 16 per actor thread of the largest Ray plan (fewer: a pass is a few waves, start-up)
        calls = max([a * t for a, t in filter(None, (ray_shape(x, args) for x in names))] or [1])
        batch = args.batch_size
        while batch > 8 and len(mine) // batch < max(8, 16 * calls):
            batch //= 2
        a = argparse.Namespace(**{**vars(args), "naive_n": max(1, int(args.naive_n * share)), "batch_size": batch,
                                  "micro_batch": min(args.micro_batch, batch)})  # fmt: skip
        per_thread = len(mine) // batch / calls
        print(f"[bench] {key}: {len(mine)} images a pass, batch {batch}, micro-batch {a.micro_batch}, "
              f"{per_thread:.1f} batches per actor thread of the largest Ray plan ({calls} calls at once)", flush=True)  # fmt: skip
        if calls > 1 and per_thread < 16:
            print(f"[bench] note: not steady state below 16 batches per actor thread (--n {int(16 * calls * 8 / share)}"
                  " or more)", flush=True)  # fmt: skip
        if src is not None:
            src = source.limit(len(mine)).repartition(max(1, len(mine) // a.batch_size)).materialize()
        for name in names:
            pl = {"naive": Naive, "inproc": InProcess, "unbatched": Unbatched}.get(name)
            shape = ray_shape(name, args)
            if pl is None and shape is None:
                raise SystemExit(f"--plans: unknown plan {name!r} (naive, inproc, unbatched, ray, ray-<A>a<T>t)")
            pl = pl(a, mine, key, ckpt) if pl else RayPlan(a, src, key, ckpt, shape)
            pl.name = f"{key}-{name}"
            plans.append(pl)
    busy = GpuBusy().start() if gpu else None
    results: dict[str, list] = {pl.name: [] for pl in plans}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still prints the passes that ran
    try:
        passes(args, plans, results, busy)
    finally:
        if busy:
            busy.stop()
        print_table(args, plans, results)


def passes(args, plans, results, busy) -> None:
    live = []
    for pl in plans:
        t = time.perf_counter()
        pl.setup()
        warm = pl.run()
        note = getattr(pl, "note", "")
        print(f"warm-up: {pl.label}: {warm.rate:.0f} images/s ({time.perf_counter() - t:.1f}s){note}", flush=True)
        live.append(pl)
    for r in range(args.passes):
        for pl in live[r % len(live) :] + live[: r % len(live)]:
            c = pl.run()
            c.busy = busy.mean(c.t0, c.end) if busy else float("nan")
            results[pl.name].append(c)
            k = getattr(pl, "k", float("nan"))
            print(
                f"pass {r + 1}: {pl.label}: {c.rate:.0f} images/s, GPU busy {c.busy:.0f}%, mean K {k:.1f}", flush=True
            )


def print_table(args, plans, results) -> None:
    print("\n" + header(args))
    print(f"\n{'plan':<80} {'images/s median [min-max]':>28} {'GPU busy':>9} {'x naive':>8} {'of inproc':>9}")
    for pl in plans:
        med, lo, hi = summary([c.rate for c in results[pl.name]])
        key = pl.name.split("-")[0]
        base = summary([c.rate for c in results.get(f"{key}-naive", [])])[0]
        inproc = summary([c.rate for c in results.get(f"{key}-inproc", [])])[0]
        gb = summary([c.busy for c in results[pl.name]])[0]
        print(f"{pl.label:<80} {med:>10.0f} [{lo:.0f}-{hi:.0f}] {gb:>8.0f}% {med / base:>7.1f}x {med / inproc:>8.0%}")


if __name__ == "__main__":
    main()
