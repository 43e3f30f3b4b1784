"""The training step captured once as a CUDA graph and replayed.

Why: an eager step of a CLIP model is a few thousand small kernels, each
launched by the training process's one Python thread, and that thread is
also the one the data path shares the process with (the DataLoader's
pin-memory thread, the copies and the device-side resize of
:func:`trainer.prep.device_batches`). While the thread is the bottleneck,
every microsecond the data path takes from it is a microsecond the GPU
waits. Replaying a graph is one launch: the GPU runs the whole step
(forward, backward, gradient clipping, the fused AdamW update, the
temperature clamp) from device memory, and the host is free to prepare the
next batch. Measured on one H200 (ViT-B-32, batch 256, bf16; docs/benchmarks.md,
*Training*): the eager step on ready tensors lost 12% with only the loader
running beside it; graphed, the data path runs at 0.970 of the graphed
step's own rate (0.83-0.91 eager), and that rate is 8% above the eager one.

What it needs, and what falls back to the eager step:

* the optimizer is made *capturable* with its learning rate a device tensor
  (refilled every step, outside the graph), so the update reads both the
  step count and the rate on the device;
* a batch of the captured shapes without hard-negative captions (their
  count varies by batch) replays; any other batch runs the eager step on the
  same parameters and optimizer state;
* one process (DDP's reducer hooks are not captured here).

Capture runs a few warm-up steps first (CUDA libraries set up their
workspaces then) and puts the parameters and the optimizer state back as
they were afterwards, in place, so the run's curve is the eager one's.
"""

from __future__ import annotations

import logging

import torch

from pairforge.trainer.model import normalize_images, update

WARMUP_STEPS = 3
log = logging.getLogger(__name__)


def device_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make ``optimizer`` capturable, its learning rates device tensors."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def host_lr(optimizer: torch.optim.Optimizer) -> None:
    """Undo :func:`device_lr`: learning rates as floats, not capturable."""
    for group in optimizer.param_groups:
        group["capturable"] = False
        group["lr"] = float(group["lr"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate for the next step: refill a device tensor in place
    (a captured graph reads it), or set the float."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class GraphedStep:
    """``step(batch, lr)`` replays the captured step on ``batch`` (copied into
    the graph's inputs) and returns its loss (a device tensor the next
    replay overwrites: read or add it before then)."""

    def __init__(self, model, optimizer, spec, bf16: bool, grad_clip: float):
        self.model, self.optimizer, self.bf16, self.grad_clip = model, optimizer, bf16, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.spec = spec
        device = self.params[0].device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None
        self.replays = 0
        #: why the capture failed (then every step is eager)
        self.failed: str | None = None
        device_lr(optimizer, device)

    def accepts(self, batch: dict) -> bool:
        if self.failed or batch.get("neg_text") is not None:
            return False
        if self.graph is None:
            return True
        return all(batch[k].shape == v.shape and batch[k].dtype == v.dtype for k, v in self.inputs.items())

    def _body(self) -> torch.Tensor:
        images = normalize_images(self.inputs["image"], self.spec)
        return update(self.model, self.optimizer, images, self.inputs["text"], None, self.bf16, self.grad_clip,
                      autocast_cache=False)  # fmt: skip

    def _snapshot(self) -> tuple[list, dict]:
        params = [p.detach().clone() for p in self.params]
        state = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                 for p in self.params if p in self.optimizer.state}  # fmt: skip
        return params, state

    def _restore(self, snapshot: tuple[list, dict]) -> None:
        """The parameters and the optimizer state as they were, in place (a
        graph reads them where they are); state made since starts afresh."""
        params, state = snapshot
        with torch.no_grad():
            for p, s in zip(self.params, params):
                p.copy_(s)
            for p in self.params:
                before = state.get(id(p), {})
                for k, v in self.optimizer.state[p].items():
                    if not torch.is_tensor(v):
                        continue
                    if k in before:
                        v.copy_(before[k])
                    else:
                        v.zero_()

    def _capture(self, batch: dict) -> None:
        self.inputs = {k: batch[k].clone() for k in ("image", "text")}
        snapshot = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._body()
        finally:
            torch.cuda.current_stream().wait_stream(side)
            self._restore(snapshot)  # undo the warm-up
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self._body()
        self.graph = graph

    def __call__(self, batch: dict, lr: float) -> torch.Tensor | None:
        """The loss of the step at learning rate ``lr``, or ``None`` when the
        step could not be captured (an operation of the model that a graph
        cannot hold, say): the caller runs the eager step then, and every
        step after it."""
        set_lr(self.optimizer, lr)
        if self.graph is None:
            try:
                self._capture(batch)
            except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager step, which still works
                self.optimizer.zero_grad(set_to_none=True)
                host_lr(self.optimizer)  # the eager step as it was before
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("the training step could not be captured as a CUDA graph (%s): eager steps", self.failed)
                return None
        for k, v in self.inputs.items():
            v.copy_(batch[k], non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.loss
