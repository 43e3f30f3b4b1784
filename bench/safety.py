"""What each safety and quality signal costs on the CPU, next to what the
download pass itself costs per image, measured in one run; and with
``--gpu``, what NSFW and text cost on one GPU (:mod:`bench.safety_gpu`).

    python bench/safety.py             # 256 images, 20,000 captions, 3 timed passes
    python bench/safety.py --quick     # a smoke run (64 images, 1 pass)
    python bench/safety.py --gpu       # the GPU plans (4,096 images), next to the CPU engine

Plans, each on 256 px JPEGs (real photos, ``bench/download.py``'s) and
one CPU core (ONNX Runtime and torch with one thread), timed with the
process's CPU clock so that other work on a shared machine does not count:

    download+shard   the per-row pass of a job with only ``download`` and
                     ``shard`` (local runner, loopback server processes,
                     threads): URL list to tar, parquet and manifest
    language         the ``language`` stage over captions (captions/s)
    nsfw             ``safety`` with only ``nsfw`` (NudeNet at 320 px)
    text             ``safety`` with only ``text`` (PP-OCRv4 at ``text_size``)
    faces            ``safety`` with only ``blur_faces`` (MTCNN; a third of
                     the photos have a face, blurred and encoded again)
    all              ``safety`` with the three on one decode

Each plan gets an untimed warm-up, then ``--passes`` timed passes; the
table gives the median and min-max rate per core, and each image signal's
CPU cost per image as a multiple of the download pass's (the goal: NSFW
and text each <= 1x; language >= 20,000 captions/s per core). The load
average before and after is printed: on a shared machine it says how much
the numbers can be trusted (CPU time still grows with contention, through
caches and frequency, but less than wall time does).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.download import make_images, start_servers, write_url_list  # noqa: E402

WORDS = ("a photo of the red old small wooden house near the lake with mountains in the background at sunset, "
         "close up portrait of a young woman smiling, stock image, high quality, isolated on white").split()  # fmt: skip
FOREIGN = ("ein roter Apfel auf einem Holztisch", "une tasse de café sur une table", "一只猫坐在窗台上",
           "Кошка сидит на подоконнике", "窓辺に座っている猫", "un perro jugando en el parque")  # fmt: skip


def captions(n: int, seed: int = 0) -> list[str]:
    """LAION-like captions: 3 to 30 words, a sixth not English."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 6 == 5:
            out.append(FOREIGN[i % len(FOREIGN)])
        else:
            out.append(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 31)))))
    return out


def with_faces(images: list[bytes], every: int = 3) -> list[bytes]:
    """Every ``every``-th image replaced by scikit-image's astronaut at 256 px
    (a face for MTCNN to find and the blur to hide)."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return [buf.getvalue() if i % every == 0 else b for i, b in enumerate(images)]


def rows(images: list[bytes]):
    from pairforge.stages.base import fresh_rows, object_array

    r = fresh_rows([f"00000{i:04d}" for i in range(len(images))], caption=object_array(["x"] * len(images)))
    r["image"] = object_array(images)
    r["image_ext"] = object_array(["jpg"] * len(images))
    return r


def timed(fn) -> float:
    """CPU seconds of this process (all its threads) spent in ``fn()``."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def download_pass(urls: Path, work: Path, n: int, threads: int) -> float:
    from pairforge.pipeline.config import load_job
    from pairforge.pipeline.job import run_job

    out = work / f"dl-{time.monotonic_ns()}"
    job = load_job(
        {
            "input": {"paths": [str(urls)]},
            "output": {"dir": str(out), "samples_per_shard": n},
            "runner": "local",
            "stages": [{"name": "download", "image_size": 256, "resize_mode": "border", "encode_quality": 95,
                        "thread_count": threads, "batch_size": n, "allow_networks": ["127.0.0.1/32"]}, "shard"],
        },
        base_dir=work,
    )  # fmt: skip
    seconds = timed(lambda: run_job(job))
    ok = json.loads((out / "manifest.json").read_text())["counts"]["ok"]
    shutil.rmtree(out, ignore_errors=True)
    if ok != n:
        raise RuntimeError(f"download pass stored {ok} of {n} images")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="images per pass")
    p.add_argument("--captions", type=int, default=20000, help="captions per language pass")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="64 images, 2,000 captions, 1 timed pass")
    p.add_argument("--text-size", type=int, default=256, help="the text detector's input side")
    p.add_argument("--threads", type=int, default=16, help="download threads")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--gpu", action="store_true", help="the GPU plans instead, with their own options (bench/safety_gpu.py)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu" in argv:
        from bench.safety_gpu import main as gpu_main

        return gpu_main([a for a in argv if a != "--gpu"])
    args = p.parse_args(argv)
    n, n_cap, passes = (64, 2000, 1) if args.quick else (args.n, args.captions, args.passes)

    import torch

    torch.set_num_threads(1)
    from pairforge.stages.base import run_stage_batch
    from pairforge.stages.language import Config as LangConfig
    from pairforge.stages.language import LanguageStage
    from pairforge.stages.safety import Config, SafetyStage

    load_before = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.2f} {load_before[1]:.2f} at start", flush=True)
    images = make_images(n, sides=(256, 256))
    face_images = with_faces(images)
    caps = captions(n_cap)
    servers, ports = start_servers(images, 1)
    work = Path(tempfile.mkdtemp(prefix="pf-bench-safety-"))
    urls = work / "urls.parquet"
    write_url_list(urls, n, ports)

    def stage(**kw):
        st = SafetyStage(Config(nsfw_threshold=None, num_cpus=1, micro_batch=16, **kw))
        st.setup()
        return st

    lang = LanguageStage(LangConfig())
    lang.setup()
    plans = {
        "download+shard": (n, lambda: download_pass(urls, work, n, args.threads)),
        "language": (n_cap, lambda: timed(lambda: lang._lid.detect(caps))),
    }
    only = {"nsfw": dict(text=False), "text": dict(nsfw=False, text_size=args.text_size),
            "faces": dict(nsfw=False, text=False, blur_faces=True),
            "all": dict(text_size=args.text_size, blur_faces=True)}  # fmt: skip
    for name, kw in only.items():
        st = stage(**kw)
        batch = rows(face_images if kw.get("blur_faces") else images)
        plans[name] = (n, lambda st=st, batch=batch: timed(lambda: run_stage_batch(st, batch)))
    rates: dict[str, list[float]] = {k: [] for k in plans}
    try:
        for r in range(passes + 1):
            for name, (count, fn) in plans.items():
                seconds = fn()
                tag = "warm-up" if r == 0 else f"pass {r}"
                print(f"  {tag:8} {name:15} {seconds:7.2f} CPU s  {count / seconds:9.1f} /s per core", flush=True)
                if r:
                    rates[name].append(count / seconds)
    finally:
        for s in servers:
            s.terminate()
        shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()
    base = statistics.median(rates["download+shard"])
    print(f"\n{'plan':15} {'median per core':>24} {'min-max':>17} {'CPU/image vs download':>22}")
    table = {}
    for name, v in rates.items():
        m = statistics.median(v)
        cost = base / m if name not in ("language", "download+shard") else None
        table[name] = {"median": m, "min": min(v), "max": max(v), "passes": v, "cost_vs_download": cost}
        unit = "captions/s" if name == "language" else "images/s"
        ratio = f"{cost:.1f}x" if cost is not None else ("1.0x" if name == "download+shard" else "-")
        print(f"{name:15} {m:13.1f} {unit:>10} {min(v):8.1f}-{max(v):<8.1f} {ratio:>22}")
    goals = {
        "language >= 20,000 captions/s per core": table["language"]["median"] >= 20000,
        "nsfw <= download pass per image": table["nsfw"]["cost_vs_download"] <= 1.0,
        "text <= download pass per image": table["text"]["cost_vs_download"] <= 1.0,
    }
    for goal, met in goals.items():
        print(f"goal: {goal}: {'met' if met else 'NOT met'}")
    print(f"load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at end (1-minute)")
    if args.json:
        args.json.write_text(json.dumps({"plans": table, "goals": goals, "load": [load_before, load_after],
                                         "n": n, "captions": n_cap, "text_size": args.text_size}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
