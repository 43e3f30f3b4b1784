"""How fast does the clip_score stage score pairs, against what the GPU can
do and what a user would write?

    python bench/clip_score.py --device cpu --n 512            # any machine
    python bench/clip_score.py --device cuda --n 30000          # one GPU

Corpus: ``--n`` 256x256 JPEGs (``--unique`` distinct random-ish images,
encoded by PIL in memory and cycled; decode work per row is the same) with
distinct captions of 5-15 words. Model: ``--model`` with random weights
(speed only), bf16 autocast on a GPU, fp32 on the CPU.

1. ceiling: both towers on ready tensors (no decode, no tokenising)
2. naive:   torch DataLoader (PIL + open_clip preprocess, every core a
            worker), tokenise in the loop, both towers
3. stage:   the clip_score stage from JPEG bytes to scores, in this process
            (what one actor does) and, where Ray is installed, through Ray
            Data as an actor pool (``--actors`` actors sharing the GPU)

Throughput is rows after the first batch over the time after it (start-up,
model load and warm-up excluded for every method alike). Ratios are against
the naive loop and the ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

WORDS = (
    "a photo of the red blue green small large dog cat bird car tree house on in with near under beside "
    "old new bright dark wooden metal street beach mountain city river sunset morning people child"
).split()


def corpus(n: int, unique: int, size: int = 256, seed: int = 0) -> tuple[list[bytes], list[str]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pool = []
    for _ in range(min(unique, n)):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1) * 80 + 128
        noisy = base + rng.normal(0, 12, base.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    images = [pool[i % len(pool)] for i in range(n)]
    captions = [" ".join(rng.choice(WORDS, int(rng.integers(5, 16)))) + f" {i}" for i in range(n)]
    return images, captions


class GpuBusy:
    """Samples the GPU's utilisation (NVML, the share of time a kernel ran)
    on a thread while a method runs: ``with GpuBusy() as g: ...; g.mean``."""

    def __init__(self, every: float = 0.1):
        self.every, self.samples, self._stop = every, [], None

    def __enter__(self):
        import threading

        import torch

        self._stop = threading.Event()

        def run():
            while not self._stop.wait(self.every):
                try:
                    self.samples.append(torch.cuda.utilization())
                except Exception:  # no NVML here: no figure
                    return

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        s = self.samples[len(self.samples) // 10 :]  # skip the start-up
        return float(np.mean(s)) if s else float("nan")


class Clock:
    """Rows per second after the first batch."""

    def __init__(self):
        self.t0 = None
        self.rows = 0
        self.batches = 0

    def tick(self, rows: int) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        else:
            self.rows += rows
            self.batches += 1

    def rate(self) -> float:
        return self.rows / max(time.perf_counter() - self.t0, 1e-9) if self.t0 else 0.0


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_model(model: str, device: str):
    import open_clip

    from stages.common import clip as _clip

    _clip.register_model_configs()
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None, device=device)
    return net.eval(), preprocess, open_clip.get_tokenizer(model)


def bench_ceiling(args, captions) -> dict[str, float]:
    """Image tower alone, text tower alone, then both per batch (pairs/s)."""
    import torch

    net, _, tokenizer = load_model(args.model, args.device)
    size = net.visual.image_size
    size = size if isinstance(size, int) else size[0]
    b = args.batch_size
    xs = [torch.randn(b, 3, size, size, device=args.device) for _ in range(2)]  # not zeros; two to rotate
    ts = [tokenizer(captions[i * b : (i + 1) * b]).to(args.device) for i in range(2)]
    steps = max(3, args.n // b)
    bf16 = args.device.startswith("cuda")
    out = {}
    with torch.inference_mode(), torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
        for name, fn in (
            ("image", lambda k: net.encode_image(xs[k % 2]).float().sum().item()),
            ("text", lambda k: net.encode_text(ts[k % 2]).float().sum().item()),
            (
                "pairs",
                lambda k: (net.encode_image(xs[k % 2]).float() * net.encode_text(ts[k % 2]).float()).sum().item(),
            ),
        ):
            clock = Clock()
            for k in range(steps):
                fn(k)  # .item() waits for the GPU
                clock.tick(b)
            out[name] = clock.rate()
    return out


def bench_parts(args, images, captions) -> dict[str, float]:
    """Rows/s of the stage's parts alone, as one actor runs them: PIL decode +
    open_clip transform on T threads, nvJPEG decode + GPU resize (a GPU
    only), and tokenising."""
    import torch

    from stages.common import clip as _clip

    ld = _clip.load(args.model, "random", args.device)
    n, b = min(len(images), args.parts_n), args.batch_size
    out = {}

    def rate(label, fn) -> None:
        """Rows/s after the first batch, and the cores this process kept busy."""
        clock, cpu0 = Clock(), None
        for a in range(0, n, b):
            fn(images[a : a + b], captions[a : a + b])
            clock.tick(min(b, n - a))
            cpu0 = time.process_time() if cpu0 is None else cpu0
        r = clock.rate()
        out[label] = r
        print(f"   part: {label}: {r:.0f} rows/s, {(time.process_time() - cpu0) / (time.perf_counter() - clock.t0):.1f} cores busy",
              flush=True)  # fmt: skip

    gpu = args.device.startswith("cuda")
    for t in sorted({1, args.cpus_per_actor, os.cpu_count() or 1}):
        rate(
            f"PIL decode+transform, {t} thread(s)",
            lambda im, _, t=t: torch.stack(_clip.decode_pil(im, ld.preprocess, t)[0]),
        )
        if gpu:
            rate(f"libjpeg decode on {t} thread(s) + GPU resize",
                 lambda im, _, t=t: _clip.normalize(_clip.resize_crop(_clip.decode_cpu(im, args.device, t)[0], ld.cfg), ld.cfg).sum().item())  # fmt: skip
    if gpu:
        rate("nvJPEG decode + GPU resize",
             lambda im, _: _clip.normalize(_clip.resize_crop(_clip.decode_tensors(im, args.device)[0], ld.cfg), ld.cfg).sum().item())  # fmt: skip
    rate("tokenise (1 thread)", lambda _, caps: ld.tokenizer(caps))
    return out


def decoder_agreement(args, images, captions) -> None:
    """Max |score difference| of each decoder against ``pil`` (open_clip's own
    transform) on the same rows and weights."""
    import torch

    from stages.base import run_stage_batch
    from stages.clip_score import ClipScoreStage

    n = min(len(images), args.batch_size)
    scores = {}
    for d in ("pil", "nvjpeg", "libjpeg"):
        torch.manual_seed(0)  # the same random weights for each decoder
        stage = ClipScoreStage(stage_config(args, decode=d, cpus=os.cpu_count()))
        stage.setup()
        scores[d] = run_stage_batch(stage, rows_batch(images[:n], captions[:n]))["clip_score"]
    for d in ("nvjpeg", "libjpeg"):
        print(f"   agreement: {d} vs pil: max |score diff| {np.abs(scores[d] - scores['pil']).max():.2e} "
              f"over {n} rows (scores span {np.ptp(scores['pil']):.3f})", flush=True)  # fmt: skip


class _Pairs:
    def __init__(self, images, captions, preprocess):
        self.images, self.captions, self.preprocess = images, captions, preprocess

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.preprocess(Image.open(io.BytesIO(self.images[i])).convert("RGB")), self.captions[i]


def bench_naive(args, images, captions) -> float:
    import torch
    import torch.nn.functional as F

    net, preprocess, tokenizer = load_model(args.model, args.device)
    loader = torch.utils.data.DataLoader(
        _Pairs(images, captions, preprocess), batch_size=args.batch_size, num_workers=args.workers
    )
    bf16 = args.device.startswith("cuda")
    clock = Clock()
    with torch.inference_mode(), torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
        for x, caps in loader:
            i = F.normalize(net.encode_image(x.to(args.device)).float(), dim=-1)
            t = F.normalize(net.encode_text(tokenizer(list(caps)).to(args.device)).float(), dim=-1)
            (i * t).sum(-1).cpu()
            clock.tick(len(caps))
    return clock.rate()


def stage_config(args, actors: int = 1, decode: str | None = None, cpus: int | None = None, gpus: int = 1):
    from stages.clip_score import Config

    gpu = args.device.startswith("cuda")
    return Config(
        pretrained="random",
        model=args.model,
        device=args.device,
        num_gpus=(gpus / actors) if gpu else 0.0,
        num_cpus=float(cpus or args.cpus_per_actor),
        concurrency=(actors, actors),
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        # "prefetch": libjpeg decode, resize and tokenising in CPU tasks ahead of the actors
        image_decode="libjpeg" if decode == "prefetch" else (decode or args.decode),
        cpu_prefetch=decode == "prefetch",
    )


def rows_batch(images, captions, start: int = 0):
    from stages.base import fresh_rows, object_array

    n = len(images)
    return fresh_rows(
        [f"{start + i:09d}" for i in range(n)],
        image=object_array(images),
        image_ext=object_array(["jpg"] * n),
        caption=object_array(captions),
    )


def bench_stage_inprocess(args, images, captions, decode: str) -> float:
    from stages.base import run_stage_batch
    from stages.clip_score import ClipScoreStage

    stage = ClipScoreStage(stage_config(args, decode=decode, cpus=os.cpu_count()))
    stage.setup()
    clock = Clock()
    b = args.batch_size
    with GpuBusy() as busy:
        for a in range(0, len(images), b):
            out = run_stage_batch(stage, rows_batch(images[a : a + b], captions[a : a + b], a))
            clock.tick(len(out["key"]))
    if args.device.startswith("cuda"):
        print(f"   3a in-process, {decode}: GPU busy {busy.mean:.0f}% of the time (NVML)", flush=True)
    return clock.rate()


def ray_plans(spec: str) -> list[tuple[int, str, int]]:
    """``"2:nvjpeg:2,4:pil:3"`` -> [(actors, decode, cpus per actor), ...];
    decode ``prefetch``: CPU tasks decode, resize and tokenise for the actors"""
    plans = []
    for item in filter(None, spec.split(",")):
        a, d, c = item.split(":")
        plans.append((int(a), d, int(c)))
    return plans


def bench_stage_ray(args, images, captions) -> dict[str, float | None]:
    """The stage as a Ray Data actor pool, for each plan of ``--ray``: actors
    share the GPU(s) (``num_gpus = gpus / actors``); one Ray instance."""
    try:
        import pyarrow as pa
        import ray
    except ImportError:
        return {}
    from pipeline.plan import map_on_actors
    from pipeline.raystart import init_local
    from stages.clip_score import ClipScoreStage

    gpus = args.gpus if args.device.startswith("cuda") else 0
    init_local(num_cpus=os.cpu_count(), num_gpus=gpus, log_to_driver=False)
    out: dict[str, float | None] = {}
    try:
        rows = rows_batch(images, captions)
        table = pa.table({c: pa.array(list(v)) if v.dtype == object else pa.array(v) for c, v in rows.items()})
        source = ray.data.from_arrow(table).repartition(max(1, len(images) // args.batch_size)).materialize()
        for actors, decode, cpus in ray_plans(args.ray):
            label = f"3b Ray Data, {actors} actor(s) x {cpus} CPU on {gpus or 'no'} GPU, {decode}"
            try:
                ds = map_on_actors(source, ClipScoreStage(stage_config(args, actors, decode, cpus, max(gpus, 1))))
                clock = Clock()
                with GpuBusy() as busy:
                    for batch in ds.select_columns(["key", "clip_score"]).iter_batches(
                        batch_format="numpy", batch_size=None
                    ):
                        clock.tick(len(batch["key"]))
                # batches of several actors arrive together: too few after the first give no rate
                out[label] = clock.rate() if clock.batches >= 8 else None
                if gpus:
                    print(f"   {label}: GPU busy {busy.mean:.0f}% of the time (NVML)", flush=True)
            except Exception as e:  # one failing plan must not hide the others
                print(f"{label}: failed: {type(e).__name__}: {e}", flush=True)
                out[label] = None
            print(f"{label}: {out[label] or 0:.0f} pairs/s", flush=True)
        return out
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--unique", type=int, default=1024)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument(
        "--decode",
        default="auto",
        choices=("auto", "pil", "nvjpeg", "libjpeg"),
        help="decoders of the in-process stage",
    )
    p.add_argument("--inprocess", default="", help="comma list of decoders for 3a (default: --decode)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the naive loop")
    p.add_argument("--cpus-per-actor", type=int, default=max(1, min(2, (os.cpu_count() or 2) - 1)))
    p.add_argument("--ray", default="", help="Ray plans actors:decode:cpus, comma separated (default 2:DECODE:CPUS)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the Ray plans share")
    p.add_argument("--parts-n", type=int, default=4096, help="rows for the per-part rates")
    p.add_argument("--skip", default="", help="comma list of: ceiling,parts,agreement,naive,inprocess,ray")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    args.ray = args.ray or f"2:{args.decode}:{args.cpus_per_actor}"
    skip = set(filter(None, args.skip.split(",")))

    import torch

    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    images, captions = corpus(args.n, args.unique)
    gpu = args.device.startswith("cuda")
    where = f"{torch.cuda.get_device_name()}, " if gpu else ""
    print(f"corpus: {args.n} JPEGs ({np.mean([len(b) for b in images[: args.unique]]) / 1024:.1f} KiB mean), "
          f"{time.perf_counter() - t:.1f}s; device {args.device} ({where}{os.cpu_count()} cores; torch {torch.__version__})",
          flush=True)  # fmt: skip

    rows: dict[str, float | None] = {}  # label -> pairs/s
    ceiling: dict[str, float] = {}
    parts: dict[str, float] = {}

    def attempt(label, fn):
        try:
            return fn()
        except Exception as e:  # one failing method must not hide the others
            print(f"{label}: failed: {type(e).__name__}: {e}", flush=True)
            return None

    if "ceiling" not in skip:
        ceiling = attempt("ceiling", lambda: bench_ceiling(args, captions)) or {}
        print("1 ceiling: " + ", ".join(f"{k} {v:.0f}/s" for k, v in ceiling.items()), flush=True)
        rows["1 both towers on ready tensors"] = ceiling.get("pairs")
    if "parts" not in skip:
        parts = attempt("parts", lambda: bench_parts(args, images, captions)) or {}
    if "agreement" not in skip:
        attempt("agreement", lambda: decoder_agreement(args, images, captions))
    naive_label = f"2 DataLoader+PIL, {args.workers} workers"
    if "naive" not in skip:
        rows[naive_label] = attempt(naive_label, lambda: bench_naive(args, images, captions))
        print(f"{naive_label}: {rows[naive_label] or 0:.0f} pairs/s", flush=True)
    if "inprocess" not in skip:
        for d in filter(None, (args.inprocess or args.decode).split(",")):
            label = f"3a stage in-process, {d}"
            rows[label] = attempt(label, lambda d=d: bench_stage_inprocess(args, images, captions, d))
            print(f"{label}: {rows[label] or 0:.0f} pairs/s", flush=True)
    if "ray" not in skip:
        rows.update(attempt("ray", lambda: bench_stage_ray(args, images, captions)) or {})

    base, top = rows.get(naive_label), rows.get("1 both towers on ready tensors")
    print(f"\n{'method':<58} {'pairs/s':>9} {'x naive':>8} {'of ceiling':>10}")
    for label, r in rows.items():
        if r is None:
            print(f"{label:<58} {'n/a':>9}")
            continue
        print(f"{label:<58} {r:>9.0f} {(r / base if base else float('nan')):>8.2f} "
              f"{(r / top if top else float('nan')):>10.1%}")  # fmt: skip
    if ceiling:
        print(f"ceiling towers alone: image {ceiling['image']:.0f} img/s, text {ceiling['text']:.0f} captions/s")
    ray_rates = [r for k, r in rows.items() if k.startswith("3b") and r]
    if ray_rates and base:
        best = max(ray_rates)
        print(f"best Ray Data plan: {best:.0f} pairs/s, {best / base:.2f}x naive "
              f"(goal on one H100: >= 8000 pairs/s and >= 2x naive)")  # fmt: skip
    if args.json:
        import json

        Path(args.json).write_text(
            json.dumps({"args": vars(args), "ceiling": ceiling, "parts": parts, "pairs_per_s": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
