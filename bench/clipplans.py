"""The clip_score stage's own plans for ``bench/clip_score.py``: the stage
in this process (``inprocN``, ``inprocN-libjpeg``) and through Ray Data as a
job runs it (``ray-*``, ``map_on_actors``), with ``--ray-windows``'s one
execution cut into passes. Apart from the CLI so that ``bench/clip_score.py``
keeps to the run (the plan list, the pass loop, the table); the reference
plans (ceilings, the naive loop) and the gauges are :mod:`bench.clipbench`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bench.clipbench import Clock, Plan, rows_batch, stage_config


class InProcess(Plan):
    """The stage from JPEG bytes in this process, ``threads`` batches at once;
    ``decode``: nvJPEG on a GPU (PIL on the CPU) or ``libjpeg`` on
    ``--actor-cpus`` threads."""

    def __init__(self, args, images, captions, threads: int, decode: str = ""):
        self.args, self.threads = args, threads
        self.decode = decode or ("nvjpeg" if args.device.startswith("cuda") else "pil")
        self.cpus = args.actor_cpus if decode == "libjpeg" else os.cpu_count()
        b = args.batch_size
        self.batches = [rows_batch(images[i : i + b], captions[i : i + b], i) for i in range(0, len(images), b)]
        self.label = f"stage in process, {self.decode}"
        self.label += f" on {self.cpus} threads" if decode == "libjpeg" else ""
        self.label += f", {threads} batch(es) at once" + (", tokens ahead" if args.device.startswith("cuda") else "")

    def setup(self) -> None:
        from pairforge.stages.clip_score import TOKENS, ClipScoreStage
        from pairforge.stages.common.clip import tokenizer

        self.stage = ClipScoreStage(stage_config(self.args, self.decode, cpus=self.cpus, threads=self.threads))
        self.stage.setup()
        # on a GPU, tokens made ahead as the CPU tasks of a Ray plan do (untimed: other cores there)

        tok = tokenizer(self.args.model)
        gpu = self.args.device.startswith("cuda")
        self.ready = (
            [dict(b, **{TOKENS: tok(list(b["caption"])).numpy()}) for b in self.batches] if gpu else self.batches
        )

    def run(self) -> Clock:
        from concurrent.futures import ThreadPoolExecutor

        from pairforge.stages.base import run_stage_batch

        clock = Clock()
        if self.threads == 1:
            for batch in self.ready:
                clock.tick(len(run_stage_batch(self.stage, dict(batch))["key"]))
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                for out in pool.map(lambda b: run_stage_batch(self.stage, dict(b)), self.ready):
                    clock.tick(len(out["key"]))
        return clock.stop()


class RayPlan(Plan):
    """The stage through Ray Data as a job runs it (``map_on_actors``)."""

    def __init__(self, args, source, name: str):
        self.args, self.source, self.name = args, source, name
        a = args
        name, _, extra = name.partition("+")
        if extra not in ("", "compiled", "eager"):
            raise ValueError(f"unknown Ray plan {self.name!r} (suffixes: +compiled, +eager)")
        decoder, _, shape = name.removeprefix("ray-").partition("-")
        grid = re.fullmatch(r"(\d+)a(\d+)t", shape)
        if decoder in ("nvjpeg", "nvimgcodec", "nvimgmix") and (shape in ("", "2a", "1t", "noprefetch") or grid):
            if grid:
                actors, threads = int(grid[1]), int(grid[2])
            else:
                actors, threads = (2 if shape == "2a" else 1), (1 if shape == "1t" else a.actor_threads)
            prefetch = shape != "noprefetch"
            self.cfg = dict(decode=decoder, actors=actors, cpus=1, threads=threads, prefetch=prefetch)
            dec = {"nvjpeg": "nvJPEG", "nvimgcodec": "nvImageCodec (hardware JPEG engines)",
                   "nvimgmix": f"nvImageCodec {a.nvimg_mix} on {a.nvimg_threads} host threads per actor thread"}[decoder]
            if decoder == "nvimgmix":  # the engines with a share of each batch on another backend
                self.cfg.update(decode="nvimgcodec", nvimgcodec_backends=tuple(a.nvimg_mix.split(",")),
                                decode_threads=a.nvimg_threads)  # fmt: skip
            what = (f"{actors} actor{'s' * (actors > 1)} x {threads} thread{'s' * (threads > 1)}"
                    + (f" ({a.gpus}/{actors} GPU each)" if actors > 1 else "") + f", {dec} in the actor"
                    + (", tokens in CPU tasks" if prefetch else ", tokens in the actor too"))  # fmt: skip
        elif name == "ray-libjpeg":
            self.cfg = dict(decode="libjpeg", actors=a.prefetch_actors, cpus=1, threads=1, prefetch=True)
            what = f"{a.prefetch_actors} actors x 1 CPU, libjpeg decode + resize + tokens in CPU tasks"
        else:
            raise ValueError(f"unknown Ray plan {name!r}")
        # the stage's default towers unless a suffix says (+compiled: compile: true, +eager: compile: false)
        from pairforge.stages.clip_score import Config

        compile = {"compiled": True, "eager": False}.get(extra, Config(pretrained="random").compile)
        self.cfg["compile"] = compile
        what += f", compiled towers ({a.compile_numerics} numerics)" if compile else ", eager towers (graphs)"
        what += "" if extra else " [the default]"
        if compile:
            self.cfg["compile_numerics"] = a.compile_numerics
        self.label = f"Ray Data: {what}"
        # batches a rate needs: 4 per batch in flight (see Clock)
        self.min_batches = max(3, 4 * self.cfg["actors"] * self.cfg["threads"])
        self._windows: list[Clock] = []  # --ray-windows: the passes the warm-up's execution measured

    def _scored(self, source):
        """``source`` through the stage as a job runs it, keys and scores out."""
        from pairforge.pipeline.plan import map_on_actors
        from pairforge.stages.clip_score import ClipScoreStage

        ds = map_on_actors(source, ClipScoreStage(stage_config(self.args, **self.cfg)))
        return ds.select_columns(["key", "clip_score"])

    def run(self) -> Clock:
        if self.args.ray_windows:
            if not self._windows:  # the warm-up call runs them all
                self._windows = self._run_windows()
            return self._windows.pop(0)
        ds = self._scored(self.source)
        clock = Clock(min_batches=self.min_batches)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            clock.tick(len(batch["key"]))
        clock.stop()
        if self.args.ray_stats:  # Ray Data's per-operator timings of this pass
            with open(Path(self.args.ray_stats) / f"{self.name}.txt", "a") as f:
                f.write(f"--- {self.label}\n{ds.stats()}\n\n")
        return clock

    def _run_windows(self) -> list[Clock]:
        """``--ray-windows``: one Ray execution over the corpus ``1 + --passes``
        times, cut into windows of ``--n`` rows as they reach the driver (the
        first is the warm-up): one actor start for all the passes. A window's
        rate is its rows over the time from the last batch of the window
        before to its own last batch, so no start-up is in any of them."""
        a = self.args
        src = self.source
        for _ in range(a.passes):
            src = src.union(self.source)
        windows, clock, seen = [], Clock(min_batches=self.min_batches), 0
        for batch in self._scored(src).iter_batches(batch_format="numpy", batch_size=None):
            clock.tick(len(batch["key"]))
            seen += len(batch["key"])
            if seen >= (len(windows) + 1) * a.n:  # this window ends here, the next starts
                windows.append(clock.stop())
                clock = Clock(min_batches=self.min_batches)
                clock.t0, clock.cpu_t0 = windows[-1].end, windows[-1].cpu_end
        if clock.rows:
            windows.append(clock.stop())
        return windows
