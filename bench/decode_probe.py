"""Which JPEG decoder should clip_score use on a GPU, and does it leave the
SMs to the towers? (issue 12)

    python bench/decode_probe.py                                  # one GPU, < 3 min
    python bench/decode_probe.py --json $OUT/decode_probe.json    # also write the figures

Corpus: ``--n`` 256x256 JPEGs from :func:`bench.clipbench.corpus` (``--unique``
distinct images, cycled), decoded in batches of ``--batch`` rows on one
thread and a high-priority CUDA stream of its own, as an actor does.

Decoders:

* ``torchvision``: :func:`stages.common.clip.decode_tensors` on cuda
  (``torchvision.io.decode_jpeg``, nvJPEG's CUDA decoder, on the SMs): the
  stage's ``nvjpeg``
* ``nvimgcodec-hw``: nvImageCodec with the hardware backend only
  (``HW_GPU_ONLY``, the NVJPG engines); ``-planar``: planar RGB output (no
  permute); ``-fancy``: ``:fancy_upsampling=1`` (PIL-like chroma upsampling);
  ``-reuse``: each call decodes into the previous call's buffers (no allocation)
* ``nvimgcodec``: the stage's backend list (hardware, CUDA, hybrid)
* ``nvimgcodec-gpu`` (CUDA decoder, GPU Huffman), ``nvimgcodec-hybrid`` (CPU Huffman)
* ``nvimgcodec-mix``: ``--mix`` as the backends (by default the engines take
  ~80% of each batch, adaptively, and the hybrid decoder the rest): the
  candidate ``nvimgcodec_backends`` for 90% of the compiled ceiling (docs/gpu.md)
* ``pil``: PIL on ``--cpu-threads`` threads to host arrays, the CPU reference
* ``stage:nvjpeg``, ``stage:nvimgcodec``: :func:`stages.common.cuda_towers.decode_cuda`,
  decode plus the GPU resize and crop to 224 px, what an actor runs per chunk

The nvImageCodec rows time CodeStream parsing, the batched decode and the
hand-over to torch, and count the images the backend declined (the stage
decodes those with PIL). If the hardware backend decodes nothing (no NVJPG
engine is visible, as can happen in a gVisor sandbox), the probe says so and
skips the hardware-only rows.

Method: per decoder, one untimed warm-up pass, then ``--passes`` timed passes
over all ``--n`` images (the clock stops after ``torch.cuda.synchronize``):
images/s as median [min-max]. Then the same passes while another thread runs
bf16 8192x8192 matmuls in a loop on a normal-priority stream (a stand-in for
the towers): the decode rate under that load, and the matmuls' TFLOP/s
during it against the matmuls alone. A decoder that runs off the SMs keeps
both rates. Pixels: max and mean |difference| from PIL's decode on the first
50 images (hardware decoders may upsample chroma or do the IDCT a little
differently). The last line is the JSON of it all.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from bench.clipbench import NVIMG_MIX, corpus  # noqa: E402

HW_ONLY = ("nvimgcodec-hw", "nvimgcodec-hw-planar", "nvimgcodec-hw-fancy", "nvimgcodec-hw-reuse")
#: decoders timed again under the matmul load (the CPU reference uses no SMs)
UNDER_LOAD = ("torchvision", "nvimgcodec-hw", "nvimgcodec-mix", "nvimgcodec-hybrid", "nvimgcodec", "nvimgcodec-gpu",
              "stage:nvjpeg", "stage:nvimgcodec")  # fmt: skip


def fmt(rates: list[float]) -> str:
    if not rates:
        return "-"
    return f"{statistics.median(rates):,.0f} [{min(rates):,.0f}-{max(rates):,.0f}]"


def nvimgcodec_log(device: str) -> list[str]:
    """What nvImageCodec says (at INFO) while it loads its extensions and makes
    a Decoder, in a child process: the nvJPEG it found, whether it registered
    the hardware decoder, and why not."""
    code = f"from nvidia import nvimgcodec; nvimgcodec.Decoder(device_id={int(device.partition(':')[2] or 0)})"
    env = dict(os.environ, PYNVIMGCODEC_VERBOSITY="3")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except Exception as e:  # report and carry on
        return [f"(could not run: {type(e).__name__}: {e})"]
    keep = ("nvjpeg", "hw ", "hw_", "hardware", "failed", "error", "cuda version")
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if any(k in ln.lower() for k in keep)]
    return lines[:25] + ([f"(exit {out.returncode})"] if out.returncode else [])


def loaded_libs(word: str) -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            return sorted({ln.split()[-1] for ln in f if word in ln and "/" in ln})
    except OSError:
        return []


class MatmulLoad(threading.Thread):
    """bf16 ``size``-square matmuls in a loop on a normal-priority stream;
    :meth:`tflops` gives their rate over a window of wall time."""

    def __init__(self, device: str, size: int = 8192):
        import torch

        super().__init__(daemon=True)
        self.size, self.stop, self.marks = size, threading.Event(), [(time.perf_counter(), 0)]
        self.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self.stream):
            self.a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
            self.b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
            self.c = torch.empty_like(self.a)
        self.stream.synchronize()

    def run(self) -> None:
        import torch

        done = 0
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                for _ in range(4):
                    torch.matmul(self.a, self.b, out=self.c)
                self.stream.synchronize()  # releases the GIL while it waits
                done += 4
                self.marks.append((time.perf_counter(), done))

    def tflops(self, t0: float, t1: float) -> float:
        inside = [m for m in self.marks if t0 <= m[0] <= t1]
        if len(inside) < 2:
            return float("nan")
        (a, ca), (b, cb) = inside[0], inside[-1]
        return (cb - ca) * 2 * self.size**3 / (b - a) / 1e12


def make_decoders(args, failed: dict) -> dict:
    """name -> a function decoding a list of JPEG bytes on the current stream
    (returning per image a CHW tensor, a host array or None)."""
    from PIL import Image

    from pairforge.stages.common import clip

    device = args.device
    out = {"torchvision": lambda batch: clip.decode_tensors(batch, device)[0]}
    try:
        from pairforge.stages.common import gpudecode

        gpudecode.load()
    except ImportError as e:
        have_nvimgcodec = False
        print(f"nvimgcodec: NOT AVAILABLE ({e}); its rows are skipped", flush=True)
    else:
        have_nvimgcodec = True
        variants = {
            "nvimgcodec-hw": dict(backends=("HW_GPU_ONLY",)),
            "nvimgcodec-hw-planar": dict(backends=("HW_GPU_ONLY",), planar=True),
            "nvimgcodec-hw-fancy": dict(backends=("HW_GPU_ONLY",), options=":fancy_upsampling=1"),
            "nvimgcodec-hw-reuse": dict(backends=("HW_GPU_ONLY",)),
            "nvimgcodec": dict(),
            "nvimgcodec-gpu": dict(backends=("GPU_ONLY",)),
            "nvimgcodec-hybrid": dict(backends=("HYBRID_CPU_GPU",)),
            "nvimgcodec-mix": dict(backends=tuple(args.mix.split(","))),
        }
        for name, kw in variants.items():
            if args.decoders and name not in args.decoders:
                continue
            dec = gpudecode.NvImgDecoder(device, cpu_threads=args.nv_threads, **kw)

            def fn(batch, dec=dec, name=name, last: dict = {}):  # noqa: B006 (one dict per variant, by design)
                reuse = last.pop("imgs", None)
                imgs = dec.decode_streams([dec.nv.CodeStream(b) for b in batch], reuse=reuse)
                if name.endswith("-reuse"):  # safe here: every call's tensors are dropped before the next
                    last["imgs"] = imgs
                ts = [dec.tensor(i) for i in imgs]
                failed[name] = failed.get(name, 0) + sum(t is None for t in ts)
                return ts

            fn.dec = dec  # its .via: how the pixels reached torch
            out[name] = fn
    pool = ThreadPoolExecutor(args.cpu_threads)

    def pil(b):
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)

    out["pil"] = lambda batch: list(pool.map(pil, batch))
    try:
        from pairforge.stages.common.clip import pixel_cfg
        from pairforge.stages.common.cuda_towers import decode_cuda

        cfg = pixel_cfg("ViT-B-32")
        out["stage:nvjpeg"] = lambda batch: decode_cuda(batch, device, cfg, "nvjpeg")[0]
        if have_nvimgcodec:
            out["stage:nvimgcodec"] = lambda batch: decode_cuda(batch, device, cfg, "nvimgcodec", args.nv_threads)[0]
    except Exception as e:  # open_clip missing, say: the decode rows still run
        print(f"stage rows skipped ({type(e).__name__}: {e})", flush=True)
    return {k: v for k, v in out.items() if k in args.decoders} if args.decoders else out


def pixel_check(fn, images: list) -> dict:
    """Max / mean |difference| from PIL's pixels (CHW uint8) on ``images``."""
    from PIL import Image

    got = fn(images)
    diffs, missing = [], 0
    for b, t in zip(images, got):
        if t is None:
            missing += 1
            continue
        with Image.open(io.BytesIO(b)) as im:
            ref = np.asarray(im.convert("RGB")).transpose(2, 0, 1).astype(np.int16)
        arr = np.asarray(t.cpu() if hasattr(t, "cpu") else t).astype(np.int16)
        if arr.shape != ref.shape:
            return {"error": f"shape {arr.shape} vs PIL's {ref.shape}"}
        diffs.append(np.abs(arr - ref))
    if not diffs:
        return {"undecoded": missing}
    d = np.stack(diffs)
    return {"max": int(d.max()), "mean": round(float(d.mean()), 3), "undecoded": missing}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=20480)
    p.add_argument("--unique", type=int, default=1024)
    p.add_argument("--batch", type=int, default=512, help="images per decode call (the stage's DECODE_ROWS)")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--cpu-threads", type=int, default=16, help="threads of the PIL reference")
    p.add_argument("--nv-threads", type=int, default=2, help="host threads of each nvImageCodec Decoder")
    p.add_argument("--budget-s", type=float, default=150, help="start no new decoder's passes after this")
    p.add_argument("--mix", default=NVIMG_MIX, help="backends of nvimgcodec-mix")
    p.add_argument("--decoders", default="", help="comma list: only these rows (default: all)")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    args.decoders = set(filter(None, args.decoders.split(",")))
    t_start = time.perf_counter()

    import torch

    dev = args.device
    try:  # before torchvision: its bundled libnvjpeg.so.13, once loaded, would serve nvImageCodec too
        from pairforge.stages.common import gpudecode

        info = gpudecode.check(dev)
    except ImportError as e:
        info = {"version": None, "hw": False, "hw_error": str(e)}
    import torchvision

    props = torch.cuda.get_device_properties(dev)
    kernel = platform.release()
    sandbox = " (gVisor: its 4.4.0 kernel)" if kernel.startswith("4.4.0") else ""
    print(f"GPU: {props.name}, {props.multi_processor_count} SMs; kernel {kernel}{sandbox}; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, CUDA {torch.version.cuda}", flush=True)  # fmt: skip
    report: dict = {"probe": "decode", "gpu": props.name, "kernel": kernel, "n": args.n, "batch": args.batch,
                    "nv_threads": args.nv_threads, "nvimgcodec": info, "decoders": {}}  # fmt: skip
    print(f"nvimgcodec: {info}; libnvjpeg loaded so far: {loaded_libs('libnvjpeg.')}", flush=True)
    if info.get("version"):
        print("nvimgcodec at INFO, loading its extensions:\n   " + "\n   ".join(nvimgcodec_log(dev)), flush=True)
    if not info["hw"]:  # the hardware-only rows still try, and stop if they decode nothing
        print(f"*** HARDWARE JPEG BACKEND UNAVAILABLE: {info['hw_error']} ***", flush=True)

    images, _ = corpus(args.n, args.unique)
    print(f"corpus: {len(images)} JPEGs, {np.mean([len(b) for b in images[: args.unique]]) / 1024:.1f} KiB mean, "
          f"{args.unique} distinct; batch {args.batch}", flush=True)  # fmt: skip
    failed: dict = {}
    decoders = make_decoders(args, failed)
    stream = torch.cuda.Stream(dev, priority=-1)

    def one_pass(fn) -> float:
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            for a in range(0, len(images), args.batch):
                fn(images[a : a + args.batch])
        torch.cuda.synchronize(dev)
        return len(images) / (time.perf_counter() - t)

    res = report["decoders"]
    print(f"\ndecode alone, images/s median [min-max] of {args.passes} passes:", flush=True)
    for name, fn in list(decoders.items()):
        if time.perf_counter() - t_start > args.budget_s:
            print(f"   {name:22s} skipped: past --budget-s", flush=True)
            del decoders[name]
            continue
        try:
            one_pass(fn)  # warm-up: handles, buffers, kernels
            if failed.pop(name, 0) >= len(images) and name in HW_ONLY:
                print(f"   {name:22s} HARDWARE BACKEND UNAVAILABLE: it declined every image; skipped", flush=True)
                res[name] = {"error": "declined every image"}
                del decoders[name]
                continue
            rates = [one_pass(fn) for _ in range(args.passes)]
        except Exception as e:  # report and carry on with the others
            print(f"   {name:22s} FAILED: {type(e).__name__}: {e}", flush=True)
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            del decoders[name]
            continue
        miss = failed.get(name, 0) // max(1, args.passes)
        res[name] = {"rate": rates, "declined_per_pass": miss}
        print(f"   {name:22s} {fmt(rates)}" + (f"   ({miss} of {len(images)} declined per pass)" if miss else ""),
              flush=True)  # fmt: skip

    load = MatmulLoad(dev)
    load.start()
    time.sleep(2.0)
    now = time.perf_counter()
    alone = load.tflops(now - 1.5, now)
    report["matmul_tflops_alone"] = alone
    print(f"\nwith bf16 8192^3 matmuls on another thread (alone: {alone:.0f} TFLOP/s): decode images/s | matmul TFLOP/s",
          flush=True)  # fmt: skip
    for name in [x for x in UNDER_LOAD if x in decoders]:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"   {name:22s} skipped: past --budget-s", flush=True)
            continue
        rates, tf = [], []
        for _ in range(args.passes):
            t0 = time.perf_counter()
            rates.append(one_pass(decoders[name]))
            tf.append(load.tflops(t0, time.perf_counter()))
        res[name].update(under_load=rates, matmul_tflops_under_load=tf)
        print(f"   {name:22s} {fmt(rates)} | {fmt(tf)}", flush=True)
    load.stop.set()
    load.join()

    print("\npixels vs PIL on the first 50 images (max / mean |diff|, undecoded):", flush=True)
    sample = images[: min(50, args.unique)]
    for name, fn in decoders.items():
        if name.startswith("stage:"):
            continue  # resized pixels: not comparable with a plain decode
        with torch.cuda.stream(stream):
            px = pixel_check(fn, sample)
        torch.cuda.synchronize(dev)
        res[name]["pixels"] = px
        print(f"   {name:22s} {px}", flush=True)
    report["nvimgcodec_via"] = {k: fn.dec.via for k, fn in decoders.items() if hasattr(fn, "dec")}
    print(f"nvimgcodec images reached torch via: {report['nvimgcodec_via']}", flush=True)
    report["libnvjpeg"] = loaded_libs("libnvjpeg.")
    print(f"\nlibnvjpeg loaded: {report['libnvjpeg']}", flush=True)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    line = json.dumps(report, default=str)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
