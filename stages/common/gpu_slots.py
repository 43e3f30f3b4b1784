"""How many model calls of one process run on its GPU at once.

An actor runs ``actor_threads`` batches on threads so that one batch's
decoding and host work overlap another's GPU work, and Ray may put several
actors on one GPU (``num_gpus: 0.5``). For a light detector that is free;
for a heavy one it is not: a Faster R-CNN R50-FPN v2 call of 128 images at
800 px peaks at 28 GiB of activations, so two threads hold ~56 GiB, and two
actors x two threads would ask ~113 GiB of an 80 GiB H100. Before this
module a call that ran out of memory fell back to one image at a time (the
stage's per-row fallback), which kept the GPU busy doing several times the
work per image: the Ray path measured 47 images/s against 232 in process
on one H100, with another process's cache on the card
(``bench/results/regions-r50-h100-20261207-before.log``; docs/gpu.md says
what was measured and what was inferred).

:class:`GpuSlots` bounds the calls in flight in a process instead: the
first call runs alone and its peak memory is measured; from then on as many
run at once as fit in the process's share of the GPU (``num_gpus`` of the
card's memory, less what the process already holds, with a margin for the
caching allocator's fragmentation), at least one and at most the threads.
A call that still runs out of memory (another process took more than its
share) is retried once alone, after the allocator's cache is given back to
the device; only then is it an error (:class:`GpuMemoryError`), which names
the settings to change. Which calls share the GPU changes no result: every
call is the same fixed-size micro-batch either way
(``stages.regions._chunks``; tests/stages/test_gpu_slots.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading

log = logging.getLogger(__name__)

#: the share of the process's GPU memory calls may plan to use (the rest: the
#: caching allocator's fragmentation, cuDNN workspaces, decoding)
FILL = 0.8


class GpuSlots:
    """``with slots.call(): ...`` around each model call. ``fixed``: this many
    calls at once (0: measured on a GPU as the module doc says; on the CPU
    every thread runs)."""

    def __init__(self, device: str, share: float, threads: int, fixed: int = 0):
        self.device, self.share, self.threads = device, min(max(share, 0.0), 1.0) or 1.0, max(1, threads)
        self.gpu = device.startswith("cuda")
        self.slots: int | None = fixed or (None if self.gpu else self.threads)
        self.peak: int | None = None  # bytes one call took, once measured
        self._busy = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def call(self, exclusive: bool = False):
        """Hold a slot for one call (``exclusive``: every slot)."""
        with self._cond:
            limit = self.slots or 1
            need = limit if exclusive else 1
            self._cond.wait_for(lambda: self._busy + need <= max(self.slots or 1, need))
            self._busy += need
            measure = self.slots is None
        try:
            if measure:
                with self._measured():
                    yield
            else:
                yield
        finally:
            with self._cond:
                self._busy -= need
                self._cond.notify_all()

    @contextlib.contextmanager
    def _measured(self):
        import torch

        dev = torch.device(self.device)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield
        torch.cuda.synchronize(dev)
        self.peak = max(1, torch.cuda.max_memory_allocated(dev) - base)
        total = torch.cuda.get_device_properties(dev).total_memory
        budget = self.share * total * FILL - base
        with self._cond:
            self.slots = int(min(self.threads, max(1, budget // self.peak)))
        log.info("a model call peaks at %.1f GiB; %d at once in this process (%.0f%% of %.0f GiB, %.1f GiB held)",
                 self.peak / 2**30, self.slots, self.share * 100, total / 2**30, base / 2**30)  # fmt: skip

    def run(self, fn, advice: str):
        """``fn()`` in a slot; out of memory: once more alone, after the
        cache is given back, then :class:`GpuMemoryError` (``advice``)."""
        try:
            with self.call():
                return fn()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        if self.gpu:
            import torch

            torch.cuda.empty_cache()
        log.warning("a model call ran out of GPU memory; retrying it alone")
        try:
            with self.call(exclusive=True):
                return fn()
        except Exception as e:
            if is_out_of_memory(e):
                raise GpuMemoryError(advice) from e
            raise


class GpuMemoryError(RuntimeError):
    """A model call that does not fit in its process's GPU memory even alone:
    a setting to change, not a row to reject."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a device running out of memory (torch's own type,
    or a RuntimeError of a library that says so)."""
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # no torch: only the message can tell
        pass
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
