"""Detector calls in flight per process (``stages/common/gpu_slots.py``): the
bound holds, an exclusive call waits for every other, out of memory is
retried once alone and then named; and the regions stage's results do not
depend on how many of its calls share the device (what the Ray plan of a
heavy detector now changes: boxes, labels, scores and features bit for bit)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pairforge.stages.base import run_stage_batch
from pairforge.stages.common.gpu_slots import GpuMemoryError, GpuSlots, is_out_of_memory
from pairforge.stages.regions import Config, RegionsStage
from tests.stages.test_regions import _jpeg, _rows


def test_no_more_calls_at_once_than_slots():
    slots = GpuSlots("cpu", 1.0, threads=6, fixed=2)
    now, most, lock = [0], [0], threading.Lock()

    def call(_):
        with slots.call():
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            time.sleep(0.02)
            with lock:
                now[0] -= 1

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(call, range(18)))
    assert most[0] == 2


def test_an_exclusive_call_waits_for_the_others_and_holds_every_slot():
    slots = GpuSlots("cpu", 1.0, threads=3, fixed=3)
    order, release = [], threading.Event()

    def normal(name):
        with slots.call():
            order.append(f"{name} in")
            release.wait(5)
            order.append(f"{name} out")

    def exclusive():
        with slots.call(exclusive=True):
            order.append("x in")
            with slots._cond:
                assert slots._busy == 3
            order.append("x out")

    a, b = threading.Thread(target=normal, args=("a",)), threading.Thread(target=normal, args=("b",))
    a.start(), b.start()
    while len(order) < 2:
        time.sleep(0.005)
    x = threading.Thread(target=exclusive)
    x.start()
    time.sleep(0.05)
    assert "x in" not in order  # two slots are held
    release.set()
    for t in (a, b, x):
        t.join(5)
    assert order.index("x in") > max(order.index("a out"), order.index("b out"))


def test_out_of_memory_is_retried_alone_then_names_the_settings():
    slots = GpuSlots("cpu", 1.0, threads=2, fixed=2)
    calls = []

    def once():
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return "done"

    assert slots.run(once, "lower micro_batch") == "done" and len(calls) == 2

    def never():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(GpuMemoryError, match="lower micro_batch"):
        slots.run(never, "lower micro_batch")
    with pytest.raises(ValueError):  # any other error is the caller's (the stage's per-row fallback)
        slots.run(lambda: (_ for _ in ()).throw(ValueError("bad image")), "unused")
    assert is_out_of_memory(RuntimeError("cuDNN error: out of memory")) and not is_out_of_memory(ValueError("x"))


def test_regions_are_the_same_whatever_the_calls_at_once():
    """pf-tiny (the shipped detector) over batches of mixed sizes, run four at
    once on threads with one detector call at a time, with four, and one
    batch after another: every column the stage writes is bit-identical."""
    rng = np.random.default_rng(3)
    shapes = [(240, 320), (256, 256), (200, 300), (256, 256)]
    batches = [
        _rows([_jpeg(rng.integers(0, 255, (*shapes[(b + i) % 4], 3), dtype=np.uint8)) for i in range(6)])
        for b in range(4)
    ]
    cols = ("num_regions", "region_boxes", "region_labels", "region_scores", "region_feats")

    def run(calls: int, threads: int) -> list[dict]:
        st = RegionsStage(Config(score_threshold=0.05, micro_batch=4, actor_threads=4, detector_calls=calls))
        st.setup()
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda b: run_stage_batch(st, dict(b)), batches))

    ref = run(1, 1)
    assert sum(int(o["num_regions"].sum()) for o in ref) > 0  # boxes were found: the features path ran
    for calls, threads in ((1, 4), (4, 4)):
        for got, want in zip(run(calls, threads), ref):
            for c in cols:
                for g, w in zip(got[c], want[c]):
                    np.testing.assert_array_equal(g, w, err_msg=f"{c} with {calls} call(s) at once")
