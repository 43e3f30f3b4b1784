"""The measuring kit of ``bench/clip_score.py``: the synthetic corpus, the
gauges (the pass clock, NVML's GPU busy sampler, /proc/stat's busy cores),
the reference plans the stage is compared against (the towers on ready
tensors, eager / CUDA graphs / compiled: the ceiling; a DataLoader + PIL
loop: what a user writes) and the checks printed before the table (score
agreement between decoders and tower modes, per-part rates).

It lives apart from the CLI so that ``bench/clip_score.py`` keeps to what
the run does (the stage's plans, the pass loop, the table); the method
(what a pass's rate means, how GPU busy is sampled) is in its docstring.
"""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time

import numpy as np

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


# ------------------------------------------------------------------ gauges


class GpuBusy:
    """Samples the GPU's utilisation every ``every`` s on a thread: NVML
    (``pynvml``) where it imports, else ``nvidia-smi -lms`` in a subprocess.
    ``mean(t0, t1)``: the mean of the samples taken in that window."""

    def __init__(self, index: int = 0, every: float = 0.1):
        self.index, self.every, self.samples = index, every, []
        self.source = None
        self._stop = threading.Event()
        self._proc = None

    def start(self) -> GpuBusy:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            pynvml.nvmlDeviceGetUtilizationRates(handle)
            self.source = "NVML"

            def run():
                while not self._stop.wait(self.every):
                    self.samples.append((time.perf_counter(), pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        except Exception:  # no NVML bindings: nvidia-smi's loop
            try:
                self._proc = subprocess.Popen(
                    ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     f"-lms={int(self.every * 1000)}"],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
            except OSError:
                return self
            self.source = "nvidia-smi"

            def run():
                for line in self._proc.stdout:
                    if line.strip().isdigit():
                        self.samples.append((time.perf_counter(), int(line)))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()

    def mean(self, t0: float, t1: float) -> float:
        s = [u for t, u in self.samples if t0 <= t <= t1]
        return float(np.mean(s)) if s else float("nan")


#: the candidate nvimgcodec_backends of the bench's mix plans and probe rows (docs/gpu.md):
#: the hardware engines take ~80% of each batch, adaptively, the hybrid decoder the rest
NVIMG_MIX = "HW_GPU_ONLY:0.8:adaptive,HYBRID_CPU_GPU"


def cpu_busy_seconds() -> np.ndarray:
    """(busy, stolen) CPU seconds of the whole machine so far (/proc/stat),
    or NaNs. Stolen time (a virtual machine's vCPUs waiting for the host)
    is not busy: a host that steals leaves the CPU work of a plan slower."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        steal = v[7] if len(v) > 7 else 0
        return np.array([sum(v[:8]) - idle - steal, steal], dtype=float) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return np.full(2, np.nan)


class Clock:
    """Rows after the first batch over the time after it; wall time of the pass.

    ``min_batches``: batches after the first below which the rate is NaN. A
    Ray plan with ``c`` batches in flight (actors x threads) delivers them in
    bursts of up to ``c``: a pass of few batches a burst long would time only
    the tail of one burst (one H100 run of 10 batches on 8 threads "measured"
    2.8x the towers' ceiling), so its plans ask for ``4 c``."""

    def __init__(self, min_batches: int = 3):
        self.start = time.perf_counter()
        self.min_batches = min_batches
        self.t0 = self.end = None
        self.rows = self.batches = 0
        self.cpu_t0 = self.cpu_end = None

    def tick(self, rows: int) -> None:
        if self.t0 is None:
            self.t0, self.cpu_t0 = time.perf_counter(), cpu_busy_seconds()
        else:
            self.rows += rows
            self.batches += 1

    def stop(self) -> Clock:
        self.end, self.cpu_end = time.perf_counter(), cpu_busy_seconds()
        return self

    @property
    def rate(self) -> float:
        """NaN from fewer than ``min_batches`` batches after the first (Ray delivers in bursts)."""
        return self.rows / max(self.end - self.t0, 1e-9) if self.batches >= self.min_batches else float("nan")

    @property
    def cores(self) -> float:
        """Busy cores over the timed window (stolen time excluded)."""
        return self._per_s(0)

    @property
    def stolen(self) -> float:
        """Cores' worth of time the host stole from this machine's vCPUs over the timed window."""
        return self._per_s(1)

    def _per_s(self, k: int) -> float:
        if self.t0 is None:
            return float("nan")
        return float((self.cpu_end[k] - self.cpu_t0[k]) / max(self.end - self.t0, 1e-9))


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------ plans


def load_model(model: str, device: str):
    import open_clip

    from pairforge.stages.common import clip as _clip

    _clip.register_model_configs()
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None, device=device)
    return net.eval(), preprocess, open_clip.get_tokenizer(model)


def stage_config(args, decode: str, actors: int = 1, cpus: int = 1, threads: int = 1, prefetch: bool = False, **kw):
    from pairforge.stages.clip_score import Config

    gpu = args.device.startswith("cuda")
    return Config(
        pretrained="random",
        model=args.model,
        device=args.device,
        num_gpus=(args.gpus / actors) if gpu else 0.0,
        num_cpus=float(cpus),
        concurrency=(actors, actors),
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        image_decode=decode,
        cpu_prefetch=prefetch,
        actor_threads=threads,
        **kw,
    )


def rows_batch(images, captions, start: int = 0):
    from pairforge.stages.base import fresh_rows, object_array

    n = len(images)
    return fresh_rows(
        [f"{start + i:09d}" for i in range(n)],
        image=object_array(images),
        image_ext=object_array(["jpg"] * n),
        caption=object_array(captions),
    )


class Plan:
    """``setup()`` once (untimed), then ``run()`` per pass -> a stopped :class:`Clock`."""

    label = ""

    def setup(self) -> None:
        pass

    def run(self) -> Clock:
        raise NotImplementedError


class Ceiling(Plan):
    """Both towers on ready device tensors, ``mode`` eager / graphs / compiled."""

    def __init__(self, args, images, captions, mode: str):
        self.args, self.mode = args, mode
        self.captions = captions
        self.label = {"eager": "ceiling: towers on ready tensors, eager",
                      "graphs": "ceiling: towers on ready tensors, CUDA graphs",
                      "compiled": "ceiling: towers on ready tensors, compiled+graphs"}[mode]  # fmt: skip
        self.label += f" (micro-batch {args.micro_batch}"
        self.label += f", {getattr(args, 'compile_numerics', 'eager')} numerics)" if mode == "compiled" else ")"

    def setup(self) -> None:
        import torch

        from pairforge.stages.common import clip as _clip
        from pairforge.stages.common.cuda_towers import CudaTowers

        a = self.args
        net, _, tokenizer = load_model(a.model, a.device)
        import open_clip

        cfg = dict(open_clip.get_model_preprocess_cfg(net))
        th, tw = _clip.size_hw(cfg["size"])
        b = a.batch_size
        g = torch.Generator(device=a.device).manual_seed(0)  # not zeros; two batches to rotate
        self.pix = [torch.randint(0, 256, (b, 3, th, tw), dtype=torch.uint8, device=a.device, generator=g) for _ in range(2)]  # fmt: skip
        self.tok = [tokenizer(self.captions[i * b : (i + 1) * b]).to(a.device) for i in range(2)]
        self.net, self.cfg = net, cfg
        if a.device.startswith("cuda"):
            # the compiled ceiling is measured whatever its difference from eager (printed); the stage
            # keeps compiled towers only within 1e-3
            self.towers = CudaTowers(net, cfg, a.device, a.micro_batch, tokenizer.context_length,
                                    graphs=self.mode != "eager", compile=self.mode == "compiled",
                                    compile_tolerance=float("inf"),
                                    numerics=getattr(a, "compile_numerics", "eager"))  # fmt: skip
            self.achieved = self.towers.mode
            print(f"   {self.label}: towers ran as {self.towers.mode}, check vs eager {self.towers.check}", flush=True)
        else:
            self.towers = None

    def run(self) -> Clock:
        from pairforge.stages.common import clip as _clip

        a = self.args
        clock = Clock()
        steps = max(3, a.n // a.batch_size)
        if self.towers is not None:
            pending = []
            for k in range(steps):
                pending.append(self.towers.enqueue(self.pix[k % 2], self.tok[k % 2]))
                if len(pending) > 2:  # two batches in flight, like an actor's two threads
                    pending.pop(0).wait()
                    clock.tick(a.batch_size)
            for p in pending:
                p.wait()
                clock.tick(a.batch_size)
        else:
            for k in range(steps):
                x = _clip.normalize(self.pix[k % 2], self.cfg)
                i = _clip.encode(self.net.encode_image, x, a.device, a.micro_batch, False)
                t = _clip.encode(self.net.encode_text, self.tok[k % 2], a.device, a.micro_batch, False)
                (i * t).sum(-1).cpu()
                clock.tick(a.batch_size)
        return clock.stop()


class _Pairs:
    def __init__(self, images, captions, preprocess):
        self.images, self.captions, self.preprocess = images, captions, preprocess

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.preprocess(Image.open(io.BytesIO(self.images[i])).convert("RGB")), self.captions[i]


class Naive(Plan):
    def __init__(self, args, images, captions):
        self.args = args
        n = min(len(images), args.naive_n)
        self.images, self.captions = images[:n], captions[:n]
        self.label = f"naive: DataLoader + PIL, {args.workers} workers, eager"

    def setup(self) -> None:
        self.net, self.preprocess, self.tokenizer = load_model(self.args.model, self.args.device)

    def run(self) -> Clock:
        import torch
        import torch.nn.functional as F

        a = self.args
        loader = torch.utils.data.DataLoader(
            _Pairs(self.images, self.captions, self.preprocess), batch_size=a.naive_batch, num_workers=a.workers
        )
        bf16 = a.device.startswith("cuda")
        clock = Clock()
        with torch.inference_mode(), torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=bf16):
            for x, caps in loader:
                i = F.normalize(self.net.encode_image(x.to(a.device)).float(), dim=-1)
                t = F.normalize(self.net.encode_text(self.tokenizer(list(caps)).to(a.device)).float(), dim=-1)
                (i * t).sum(-1).cpu()
                clock.tick(len(caps))
        return clock.stop()


# ------------------------------------------------------------------ checks


def agreement(args, images, captions) -> None:
    """Max |score difference| on the same rows and weights: nvJPEG (libjpeg
    on the CPU) against PIL, and the CUDA-graph towers against eager (the
    compiled towers are checked on random inputs as they are made)."""
    import torch

    from pairforge.stages.base import run_stage_batch
    from pairforge.stages.clip_score import ClipScoreStage

    n = min(len(images), args.batch_size)
    rows = rows_batch(images[:n], captions[:n])

    def scores(decode, **kw):
        torch.manual_seed(0)  # the same random weights for every variant
        st = ClipScoreStage(stage_config(args, decode, cpus=os.cpu_count(), **kw))
        st.setup()
        mode = st._towers.mode if st._towers is not None else "eager"
        return run_stage_batch(st, dict(rows))["clip_score"], mode

    gpu = args.device.startswith("cuda")
    ref, _ = scores("pil", cuda_graphs=False)
    fast = "nvjpeg" if gpu else "libjpeg"
    eager, _ = scores(fast, cuda_graphs=False)
    print(f"   agreement: {fast} (eager towers) vs pil: max |score diff| {np.abs(eager - ref).max():.2e} over {n} rows "
          f"(scores span {np.ptp(ref):.3f})", flush=True)  # fmt: skip
    if gpu:
        s, mode = scores(fast, cuda_graphs=True)
        print(f"   agreement: {fast} towers {mode} vs eager: max |score diff| {np.abs(s - eager).max():.2e} "
              f"over {n} rows", flush=True)  # fmt: skip


def parts(args, images, captions) -> None:
    """Rows/s of the stage's parts alone: nvJPEG + GPU resize, nvImageCodec +
    GPU resize (where installed), libjpeg on every core + GPU resize,
    tokenising on one thread."""
    from pairforge.stages.common import clip as _clip
    from pairforge.stages.common.cuda_towers import decode_cuda

    cfg = _clip.pixel_cfg(args.model)
    tok = _clip.tokenizer(args.model)
    n, b = min(len(images), args.parts_n), args.batch_size
    gpu = args.device.startswith("cuda")

    def rate(label, fn) -> None:
        fn(images[:b], captions[:b])  # warm-up
        t = time.perf_counter()
        for a in range(0, n, b):
            fn(images[a : a + b], captions[a : a + b])
        print(f"   part: {label}: {n / (time.perf_counter() - t):.0f} rows/s", flush=True)

    if gpu:
        rate("nvJPEG decode + GPU resize, one thread", lambda im, _: decode_cuda(im, args.device, cfg))
        try:
            from pairforge.stages.common import gpudecode

            gpudecode.load()
            rate("nvImageCodec (hardware engines) decode + GPU resize, one thread",
                 lambda im, _: decode_cuda(im, args.device, cfg, "nvimgcodec", 2))  # fmt: skip
        except ImportError as e:
            print(f"   part: nvImageCodec skipped ({e})", flush=True)
        cores = os.cpu_count() or 1
        rate(f"libjpeg decode on {cores} threads + GPU resize",
             lambda im, _: decode_cuda(im, args.device, cfg, "libjpeg", cores))  # fmt: skip
    rate("tokenise, one thread", lambda _, caps: tok(caps))
