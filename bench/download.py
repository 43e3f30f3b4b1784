"""Download throughput: pairforge (on Ray Data, manifest and per-row
accounting included) against plain img2dataset, same URL list, same
settings, same cores, in one run.

    python bench/download.py             # 3000 images, 3 timed passes per plan
    python bench/download.py --quick     # a smoke run (200 images, 1 pass)

Plans (goals in brackets):

    img2dataset            download alone (the baseline)
    pairforge              download + shard                  [>= 1.6x]
    pairforge+phash        download + dedup_phash + shard    [>= 1.3x]
    pairforge-impolite     pairforge without its politeness: no per-host
                           bound, no robots.txt (what politeness costs)

The URLs are spread round robin over ``--hosts`` loopback hosts (16 by
default: distinct 127.42.x.y addresses, each its own listening socket), as a
real URL list spreads over many hosts. With ``--hosts 1`` every URL names
127.0.0.1, and pairforge's default bound of 8 connections a host, not the
machinery, sets its pace (about 17 ms a request on 2 busy cores).

Each plan gets one untimed warm-up pass, then ``--passes`` timed passes; the
order of the plans rotates from pass to pass, so no plan always runs first.
The table gives the median and min-max images/s and the ratio of medians to
img2dataset's. Afterwards the images both tools stored for the same URLs are
compared: sizes must be identical, PSNR is printed (min and median).

The images are real photos (skimage), cropped and scaled to 256-512 px and
saved as JPEG, served from memory by ``pipeline.httpserver`` in server
processes of their own (one port each), so the network is loopback. Both
sides get the same processes/CPUs, threads, shard size, resize and encode
settings; img2dataset runs with ``extract_exif=False`` since pairforge does
not extract EXIF. Ray is started before the clock starts (a cluster is
normally up before a job); its start-up time is printed apart.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_images(n: int, seed: int = 0, sides: tuple[int, int] = (256, 512), quality: int = 90) -> list[bytes]:
    """``n`` distinct JPEGs, ``sides`` px a side, cut from skimage's photos."""
    import io

    from PIL import Image

    from pairforge.pipeline.datasets import skimage_photos

    photos = [Image.fromarray(a).convert("RGB") for _, _, a in skimage_photos()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(sides[0], sides[1] + 1)), int(rng.integers(sides[0], sides[1] + 1)))
        buf = io.BytesIO()
        im.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _serve(routes, hosts, ports) -> None:
    import threading

    from pairforge.pipeline.httpserver import LocalHTTPServer

    servers = [LocalHTTPServer(routes, host=h).start() for h in hosts]
    ports.put([(s.host, s.port) for s in servers])
    threading.Event().wait()


def host_addresses(n: int) -> list[str]:
    """``n`` distinct loopback addresses (127.0.0.1 alone when ``n`` is 1):
    each is a host of its own to the crawler's politeness, as the many hosts
    of a real URL list are."""
    return ["127.0.0.1"] if n == 1 else [f"127.42.{i // 250}.{1 + i % 250}" for i in range(n)]


def start_servers(images: list[bytes], count: int, hosts: int = 1) -> tuple[list, list[tuple[str, int]]]:
    """``count`` server processes (forked, so the images are shared, not
    copied) between them listening on ``hosts`` addresses, each address its
    own socket; every one serves every image. Returns the processes and the
    (address, port) of every host."""
    from pairforge.pipeline.httpserver import Route

    routes = {f"/img/{i}.jpg": Route(b, "image/jpeg") for i, b in enumerate(images)}
    addrs = host_addresses(max(hosts, count))
    ctx = mp.get_context("fork")
    ports = ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(routes, addrs[i::count], ports), daemon=True) for i in range(count)]
    for p in procs:
        p.start()
    return procs, [e for _ in procs for e in ports.get(timeout=60)]


def write_url_list(path: Path, n: int, hosts: list[tuple[str, int]]) -> None:
    urls = [f"http://{h}:{port}/img/{i}.jpg" for i in range(n) for h, port in [hosts[i % len(hosts)]]]
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(n)]}), path)


def run_pairforge(
    args, urls: Path, out: Path, per_shard: int, phash: bool = False, polite: bool = True
) -> tuple[float, int]:
    from pairforge.pipeline.config import load_job
    from pairforge.pipeline.job import run_job

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
                    "allow_networks": ["127.0.0.0/8"],
                    # the stage's default bound unless given (0: none)
                    **(
                        {"per_host_connections": args.per_host_connections or None}
                        if args.per_host_connections >= 0
                        else {}
                    ),
                    # politeness off: no bound, no robots.txt (what it costs)
                    **({} if polite else {"per_host_connections": None, "robots_txt": False}),
                },
                *([{"name": "dedup_phash"}] if phash else []),
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


PLANS = ("img2dataset", "pairforge", "pairforge+phash", "pairforge-impolite")


def one_pass(plan: str, args, urls: Path, out: Path, per_shard: int) -> tuple[float, int]:
    if plan == "img2dataset":
        return run_img2dataset(args, urls, out, per_shard)
    return run_pairforge(args, urls, out, per_shard, phash=plan.endswith("phash"), polite=plan != "pairforge-impolite")


def stored_images(folder: Path, pattern: str) -> dict[str, bytes]:
    """url -> stored image bytes, from a folder of .tar + .parquet shards."""
    import tarfile

    out = {}
    for tar in sorted(folder.glob(pattern)):
        table = pq.read_table(tar.with_suffix(".parquet"), columns=["key", "url"]).to_pydict()
        url_of = dict(zip(table["key"], table["url"]))
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if ext == "jpg" and key in url_of:
                    out[url_of[key]] = tf.extractfile(m).read()
    return out


def compare_outputs(ours: Path, theirs: Path) -> dict:
    """Sizes and PSNR of pairforge's stored images against img2dataset's."""
    import cv2

    a, b = stored_images(ours / "shards", "*.tar"), stored_images(theirs, "*.tar")
    same_size, psnr = 0, []
    for url in sorted(set(a) & set(b)):
        x = cv2.imdecode(np.frombuffer(a[url], np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float64)
        y = cv2.imdecode(np.frombuffer(b[url], np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float64)
        if x.shape != y.shape:
            continue
        same_size += 1
        mse = ((x - y) ** 2).mean()
        psnr.append(float("inf") if mse == 0 else 10 * math.log10(255**2 / mse))
    finite = [p for p in psnr if math.isfinite(p)]
    return {
        "compared": len(set(a) & set(b)),
        "same_size": same_size,
        "identical_pixels": len(psnr) - len(finite),
        "psnr_min": min(finite) if finite else float("inf"),
        "psnr_median": statistics.median(finite) if finite else float("inf"),
    }


def main(argv: list[str] | None = None) -> int:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="images in the URL list")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 images, 1 timed pass")
    p.add_argument("--passes", type=int, default=3, help="timed passes per plan (after 1 untimed warm-up)")
    p.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated subset of {','.join(PLANS)}")
    p.add_argument("--processes", type=int, default=cpus, help="img2dataset processes = Ray CPUs")
    p.add_argument("--threads", type=int, default=32, help="download threads per process/task")
    p.add_argument(
        "--per-host-connections", type=int, default=-1, help="pairforge's per-host bound (default: the stage's; 0: none)"
    )
    p.add_argument("--task-cpus", type=float, default=1.0, help="CPUs per pairforge download task (Ray's num_cpus)")
    p.add_argument("--server-procs", type=int, default=max(1, cpus // 4))
    p.add_argument(
        "--hosts", type=int, default=16, help="loopback hosts the URLs are spread over, round robin (1: 127.0.0.1 alone)"
    )
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--encode-format", default="jpg")
    p.add_argument("--encode-quality", type=int, default=95)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the output folders")
    args = p.parse_args(argv)
    n = 200 if args.quick else args.n
    passes = 1 if args.quick else args.passes
    plans = [x for x in args.plans.split(",") if x]
    bad = [x for x in plans if x not in PLANS]
    if bad:
        p.error(f"--plans: unknown {bad}; expected some of {PLANS}")
    # shards >= 2 per process, so neither side idles on a short tail
    per_shard = max(10, math.ceil(n / (2 * args.processes)))

    print(f"machine: {cpus} cores, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    print(f"making {n} JPEGs ...", flush=True)
    t0 = time.perf_counter()
    images = make_images(n)
    print(f"  {time.perf_counter() - t0:.1f}s, {sum(map(len, images)) / n / 1024:.0f} KiB mean", flush=True)
    servers, hosts = start_servers(images, args.server_procs, args.hosts)
    del images
    work = Path(tempfile.mkdtemp(prefix="pf-bench-download-"))
    urls = work / "urls.parquet"
    write_url_list(urls, n, hosts)
    print(
        f"{n} URLs on {len(hosts)} hosts served by {len(servers)} processes; {args.processes} processes/CPUs x {args.threads} threads, "
        f"{per_shard} per shard, {args.image_size}px {args.resize_mode} -> {args.encode_format}; "
        f"{passes} timed passes + 1 warm-up per plan, order rotated",
        flush=True,
    )
    rates: dict[str, list[float]] = {pl: [] for pl in plans}
    quality = None
    ray_up = False
    try:
        if any(pl.startswith("pairforge") for pl in plans):
            from pairforge.pipeline.raystart import init_local

            t0 = time.perf_counter()
            init_local(num_cpus=args.processes, log_to_driver=False)
            ray_up = True
            print(f"ray started in {time.perf_counter() - t0:.1f}s (not timed)", flush=True)
        for r in range(passes + 1):
            order = plans[r % len(plans) :] + plans[: r % len(plans)]
            for pl in order:
                out = work / f"{pl}-{r}"
                dt, ok = one_pass(pl, args, urls, out, per_shard)
                tag = "warm-up" if r == 0 else f"pass {r}"
                print(f"  {tag:8} {pl:16} {dt:7.2f}s {n / dt:7.1f} images/s  ({ok} stored)", flush=True)
                if r:
                    rates[pl].append(n / dt)
                if r == passes and {"pairforge", "img2dataset"} <= set(plans) and pl == order[-1]:
                    quality = compare_outputs(work / f"pairforge-{r}", work / f"img2dataset-{r}")
                if not (args.keep or r == passes):
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        for s in servers:
            s.terminate()
        if ray_up:
            import ray

            ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"outputs kept in {work}")

    print(f"\n{'plan':16} {'median':>8} {'min-max':>15} {'x img2dataset':>14}  passes (images/s)")
    base = statistics.median(rates["img2dataset"]) if rates.get("img2dataset") else None
    table = {}
    for pl in plans:
        v = rates[pl]
        m = statistics.median(v)
        ratio = m / base if base else float("nan")
        table[pl] = {"median": m, "min": min(v), "max": max(v), "passes": v, "x_img2dataset": ratio}
        spread = f"{min(v):.0f}-{max(v):.0f}"
        print(f"{pl:16} {m:8.1f} {spread:>15} {ratio:13.2f}x  {', '.join(f'{x:.0f}' for x in v)}")
    if quality:
        print(
            f"\nstored images, pairforge vs img2dataset: {quality['same_size']}/{quality['compared']} same size, "
            f"{quality['identical_pixels']} identical pixels, PSNR of the rest min {quality['psnr_min']:.1f} dB, "
            f"median {quality['psnr_median']:.1f} dB"
        )
    if args.json:
        args.json.write_text(json.dumps({"n": n, "cores": cpus, "plans": table, "quality": quality}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
