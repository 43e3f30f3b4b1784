"""Download throughput: pairforge (download + shard on Ray Data, manifest and
per-row accounting included) against plain img2dataset, same URL list, same
settings, in one run.

    python bench/download.py             # 3000 images
    python bench/download.py --quick     # a smoke run (200 images)

The images are real photos (skimage), cropped and scaled to 256-512 px and
saved as JPEG, served from memory by ``pipeline.httpserver`` in a few
server processes (one port each), so the network is loopback and the
servers are not the bottleneck of either side. Both sides get the same
processes/CPUs, threads, shard size, resize and encode settings; img2dataset
runs with ``extract_exif=False`` since pairforge does not extract EXIF.

Ray is started before the clock starts (a cluster is normally up before a
job); its start-up time is printed apart. Timings on a shared or small
machine are not figures to quote.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs, 256-512 px a side, cut from skimage's photos."""
    import io

    from PIL import Image

    from pipeline.datasets import skimage_photos

    photos = [Image.fromarray(a).convert("RGB") for _, _, a in skimage_photos()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(256, 513)), int(rng.integers(256, 513)))
        buf = io.BytesIO()
        im.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _serve(routes, ports) -> None:
    from pipeline.httpserver import LocalHTTPServer

    server = LocalHTTPServer(routes)
    ports.put(server.port)
    server.serve_forever()


def start_servers(images: list[bytes], count: int) -> tuple[list, list[int]]:
    """``count`` server processes, each serving every image on its own port
    (forked, so the images are shared, not copied)."""
    from pipeline.httpserver import Route

    routes = {f"/img/{i}.jpg": Route(b, "image/jpeg") for i, b in enumerate(images)}
    ctx = mp.get_context("fork")
    ports = ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(routes, ports), daemon=True) for _ in range(count)]
    for p in procs:
        p.start()
    return procs, [ports.get(timeout=60) for _ in procs]


def write_url_list(path: Path, n: int, ports: list[int]) -> None:
    urls = [f"http://127.0.0.1:{ports[i % len(ports)]}/img/{i}.jpg" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(n)]}), path)


def run_pairforge(args, urls: Path, out: Path, per_shard: int) -> tuple[float, int]:
    from pipeline.config import load_job
    from pipeline.job import run_job

    job = load_job(
        {
            "input": {"paths": [str(urls)]},
            "output": {"dir": str(out), "samples_per_shard": per_shard},
            "ray": {"num_cpus": args.processes},
            "stages": [
                {
                    "name": "download",
                    "image_size": args.image_size,
                    "resize_mode": args.resize_mode,
                    "encode_format": args.encode_format,
                    "encode_quality": args.encode_quality,
                    "timeout": args.timeout,
                    "thread_count": args.threads,
                    "num_cpus": args.task_cpus,
                    # one task per input shard, as img2dataset has one per shard
                    "batch_size": per_shard,
                    "allow_networks": ["127.0.0.1/32"],
                },
                {"name": "shard"},
            ],
        },
        base_dir=out.parent,
    )
    t0 = time.perf_counter()
    manifest = run_job(job)
    return time.perf_counter() - t0, int(manifest["counts"]["ok"])


def run_img2dataset(args, urls: Path, out: Path, per_shard: int) -> tuple[float, int]:
    from img2dataset import download

    t0 = time.perf_counter()
    download(
        url_list=str(urls),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(out),
        processes_count=args.processes,
        thread_count=args.threads,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        encode_format=args.encode_format,
        encode_quality=args.encode_quality,
        number_sample_per_shard=per_shard,
        timeout=math.ceil(args.timeout),
        retries=0,
        extract_exif=False,
        compute_hash="sha256",
        distributor="multiprocessing",
        enable_wandb=False,
    )
    dt = time.perf_counter() - t0
    ok = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return dt, ok


def main(argv: list[str] | None = None) -> int:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="images in the URL list")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 images")
    p.add_argument("--processes", type=int, default=cpus, help="img2dataset processes = Ray CPUs")
    p.add_argument("--threads", type=int, default=32, help="download threads per process/task")
    p.add_argument("--task-cpus", type=float, default=1.0, help="CPUs per pairforge download task (Ray's num_cpus)")
    p.add_argument("--server-procs", type=int, default=max(1, cpus // 4))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--encode-format", default="jpg")
    p.add_argument("--encode-quality", type=int, default=95)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--only", choices=("pairforge", "img2dataset"), help="run one side only")
    p.add_argument("--keep", action="store_true", help="keep the output folders")
    args = p.parse_args(argv)
    n = 200 if args.quick else args.n
    # shards >= 2 per process, so neither side idles on a short tail
    per_shard = max(10, math.ceil(n / (2 * args.processes)))

    print(f"making {n} JPEGs ...", flush=True)
    t0 = time.perf_counter()
    images = make_images(n)
    print(f"  {time.perf_counter() - t0:.1f}s, {sum(map(len, images)) / n / 1024:.0f} KiB mean", flush=True)
    servers, ports = start_servers(images, args.server_procs)
    del images
    work = Path(tempfile.mkdtemp(prefix="pf-bench-download-"))
    urls = work / "urls.parquet"
    write_url_list(urls, n, ports)
    print(
        f"{n} URLs on {len(ports)} server processes; {args.processes} processes/CPUs x {args.threads} threads, "
        f"{per_shard} per shard, {args.image_size}px {args.resize_mode} -> {args.encode_format}",
        flush=True,
    )
    results = {}
    try:
        if args.only != "img2dataset":
            import ray

            from pipeline.raystart import init_local

            t0 = time.perf_counter()
            init_local(num_cpus=args.processes, log_to_driver=False)
            print(f"ray started in {time.perf_counter() - t0:.1f}s (not timed)", flush=True)
            try:
                results["pairforge"] = run_pairforge(args, urls, work / "pairforge", per_shard)
            finally:
                ray.shutdown()
        if args.only != "pairforge":
            results["img2dataset"] = run_img2dataset(args, urls, work / "img2dataset", per_shard)
    finally:
        for s in servers:
            s.terminate()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"outputs kept in {work}")

    print()
    print(f"{'':12} {'seconds':>8} {'ok':>6} {'images/s':>9}")
    for name, (dt, ok) in results.items():
        print(f"{name:12} {dt:8.2f} {ok:6d} {n / dt:9.1f}")
        if ok != n:
            print(f"  warning: {name} saved {ok} of {n} images", file=sys.stderr)
    if len(results) == 2:
        ratio = results["img2dataset"][0] / results["pairforge"][0]
        print(f"pairforge / img2dataset throughput: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
