"""Parts of ``bench/train.py`` that are not the timed passes: the bench
shards, the machine header, CPU-time accounting of the loader's processes,
and the per-step CPU profile of a loader worker.

The profile runs each step of a worker's work on the same samples in one
thread and takes the least CPU time (``time.thread_time``) of a few
repetitions, so a shared, busy machine inflates it less than wall time.
"""

from __future__ import annotations

import io
import itertools
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

WORDS = ("photo", "picture", "close up", "view", "detail", "image", "shot", "crop")


# ------------------------------------------------------------------ the shards


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

    from pairforge.manifests.shards import write_shard
    from pairforge.stages.base import fresh_rows, object_array

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
    """Random crops of skimage's photos as ``px``-square JPEGs (what a
    download stage resizing to ``px`` stores), in shards written by one
    process per core."""
    from concurrent.futures import ProcessPoolExecutor

    from pairforge.manifests.manifest import write_sizes

    jobs = [
        (str(out), sid, a, min(per_shard, samples - a), px, seed) for sid, a in enumerate(range(0, samples, per_shard))
    ]
    with ProcessPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        stats = list(pool.map(_write_one, jobs))
    write_sizes(out, stats)
    return len(stats)


# ------------------------------------------------------------- the machine


def header(device: torch.device) -> dict:
    """What the figures depend on: cores, GPU, library versions."""
    import PIL

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "load_average_1m": os.getloadavg()[0],
    }


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live children
    (the DataLoader's workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # a worker that just exited
            pass
    return total


# ------------------------------------------------------------- the profile


def _least(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def profile(shards: list[str], model_name: str, size: int, batch: int, n: int = 512, reps: int = 5) -> dict:
    """CPU microseconds per sample of each step of a loader worker (and of
    the device-side resize when run on the CPU), from ``n`` samples."""
    import webdataset as wds

    import pairforge.trainer.data as td

    torch.set_num_threads(1)
    urls = [{"url": s} for s in shards]

    def read():
        return list(itertools.islice(wds.tarfile_samples(urls, handler=wds.warn_and_continue), n))

    raw = read()
    n = len(raw)
    table = td._confounders(shards)
    parsed = [td.annotate(td._parse(s), table) for s in raw]
    batches = [parsed[i : i + batch] for i in range(0, n, batch)]
    us: dict[str, float] = {"tar read (webdataset)": _least(read, reps)}

    def split():
        kept = (p for p in (td.annotate(td._parse(s), table) for s in raw)
                if not td.is_held_out(td.sample_group(p["key"], p["meta"]), 0.1))  # fmt: skip
        return list(td.wds.shuffle(1000, 250, rng=random.Random(0))(kept))

    us["parse + split + shuffle"] = _least(split, reps)
    out = {}
    for where in ("worker", "device"):
        steps = {**us, **_prep_steps(td.Prep(model_name, size, resize=where), parsed, batches, size, reps)}
        out[where] = {k: 1e6 * v / n for k, v in steps.items()}
    return out


def _prep_steps(prep, parsed: list[dict], batches: list[list[dict]], size: int, reps: int) -> dict[str, float]:
    from pairforge.trainer.prep import canvas, model_images

    decode = "decode + crop (+ PIL resize: worker)"
    steps = {decode: _least(lambda: [prep.square(p["image_bytes"], p["key"]) for p in parsed], reps)}
    squares = [[prep.square(p["image_bytes"], p["key"]) for p in b] for b in batches]
    steps["canvas (collation)"] = _least(lambda: [canvas(sq) for sq in squares], reps)
    steps["tokenise (per batch)"] = _least(lambda: [prep.tokens([p["caption"] for p in b]) for b in batches], reps)
    full = [prep.batch(b, [0] * len(b)) for b in batches]
    steps["pin memory (copy)"] = _least(lambda: [_pin(f["image"]) for f in full], reps)
    steps["device resize (on this CPU)"] = _least(lambda: [model_images(f, size, "cpu") for f in full], reps)
    return steps


def _pin(t: torch.Tensor) -> torch.Tensor:
    """What the pin-memory thread does to a batch; a plain copy without CUDA."""
    return t.pin_memory() if torch.cuda.is_available() else t.clone()
