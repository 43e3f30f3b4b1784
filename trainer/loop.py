"""The training loop: one short function from shards to a checkpoint and a report.

It runs the same in one CPU process, in one GPU process, and in each worker of
a Ray Train (DDP) job; :mod:`trainer.distributed` only sets up the process
group and calls :func:`train`. Only rank 0 evaluates and writes files.
Progress goes to stderr (``[train] ...``); the report is a file.

A run too small for the held-out split (a few samples) still trains: it
reports no recall rather than a figure that means nothing, and says so
(:func:`trainer.evaluate.verdict`). A run with no sample to train on stops
before the model is built, with :class:`NothingToTrain`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pairforge.trainer.data import (
    NoHeldOut,
    Prep,
    StreamConfig,
    find_shards,
    load_eval_set,
    shard_sizes,
    train_loader,
)
from pairforge.trainer.evaluate import evaluate, verdict
from pairforge.trainer.graphstep import GraphedStep, set_lr
from pairforge.trainer.model import (
    create_model,
    load_checkpoint,
    normalize_images,
    optimizer_for,
    save_checkpoint,
    unwrap,
    update,
)
from pairforge.trainer.prep import device_batches

CHECKPOINT = "checkpoint.pt"
REPORT = "report.json"
CURVES = "curves.png"


@dataclass(frozen=True)
class TrainConfig:
    shards: tuple[str, ...]
    out: str
    model: str = "pf-tiny"
    #: initial weights to fine-tune: a checkpoint path or an open_clip pretrained tag
    pretrained: str | None = None
    #: a checkpoint of this run to continue from (same config, same curve)
    resume: str | None = None
    steps: int = 200
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    #: use a sample's ``confounder_caption`` as an extra wrong text for its image
    hard_negatives: bool = True
    augment: bool = False
    eval_fraction: float = 0.1
    eval_limit: int = 1000
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 0
    shuffle_buffer: int = 2000
    workers: int = 2
    seed: int = 0
    #: ``auto``: the CUDA device when there is one, else the CPU
    device: str = "auto"
    #: ``auto``: bf16 autocast on CUDA, fp32 elsewhere; or ``bf16`` / ``fp32``
    precision: str = "auto"
    #: where images are resized to the model's size (``trainer.prep``): ``auto`` is the
    #: training step on CUDA, the loader workers (PIL) on the CPU; or ``device`` / ``worker``
    resize: str = "auto"
    #: replay the training step as one CUDA graph (``trainer.graphstep``) on a single GPU
    cuda_graph: bool = True

    def stream(self) -> StreamConfig:
        return StreamConfig(
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_initial=min(self.shuffle_buffer, max(self.batch_size, self.shuffle_buffer // 4)),
            eval_fraction=self.eval_fraction,
            seed=self.seed,
            num_workers=self.workers,
        )


class NothingToTrain(ValueError):
    """The shards hold no sample to train on (an empty run, or every sample held out)."""


def _say(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def count_samples(cfg: TrainConfig) -> tuple[list[str], dict[str, int]]:
    """The shards and their samples; :class:`NothingToTrain` when they hold none."""
    shards = find_shards(cfg.shards)
    sizes = shard_sizes(shards)
    if not sum(sizes.values()):
        raise NothingToTrain(
            f"no samples in {len(shards)} shard(s) under {', '.join(cfg.shards)}: nothing to train on "
            "(pairforge manifest show OUT says where the rows went)"
        )
    return shards, sizes


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr``, then a cosine down to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_step(
    model, optimizer, batch: dict, cfg: TrainConfig, spec, device: torch.device, step: int, bf16: bool
) -> torch.Tensor:
    """One optimisation step on a batch from :func:`trainer.prep.device_batches`
    (on the device already); returns the loss (detached, on the device:
    reading it would wait for the GPU)."""
    set_lr(optimizer, lr_at(cfg, step))
    images = normalize_images(batch["image"], spec)
    return update(model, optimizer, images, batch["text"], batch["neg_text"], bf16, cfg.grad_clip)


def train(cfg: TrainConfig, device: torch.device | None = None, until: int | None = None) -> dict:
    """Train for ``cfg.steps`` steps (or stop after step ``until``, as an
    interrupted run would, checkpoint included) and return the report."""
    rank, world = _rank_world()
    shards, sizes = count_samples(cfg)  # before the model: an empty run stops here
    device = device or _device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    seed_everything(cfg.seed)
    out = Path(cfg.out)

    model, spec = create_model(cfg.model, cfg.pretrained, device)
    optimizer = optimizer_for(model, cfg.lr, cfg.weight_decay)
    history: dict[str, list] = {"train": [], "eval": []}
    start = 0
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), state["history"]
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    resize = cfg.resize if cfg.resize != "auto" else ("device" if device.type == "cuda" else "worker")
    prep = Prep(cfg.model, spec.size, cfg.augment, cfg.seed, resize)
    evalset = None
    if rank == 0:
        try:
            evalset = load_eval_set(shards, prep, cfg.stream(), cfg.eval_limit)
        except NoHeldOut:
            _say(f"no held-out samples among {sum(sizes.values())} (eval fraction {cfg.eval_fraction}): no evaluation")
        held = len(evalset) if evalset is not None else 0
        if held >= sum(sizes.values()):
            raise NothingToTrain(
                f"all {held} samples are held out for evaluation (eval fraction {cfg.eval_fraction}): nothing to "
                "train on; lower --eval-fraction or train on more samples"
            )
    loader = train_loader(shards, prep, cfg.stream(), start, world, pin_memory=device.type == "cuda")
    end = min(cfg.steps, until if until is not None else cfg.steps)

    def checkpoint(step: int) -> None:
        extra = {"model_name": cfg.model, "train_config": asdict(cfg), "history": history}
        save_checkpoint(out / CHECKPOINT, model, optimizer, step, extra)

    def log_eval(step: int) -> dict:
        metrics = evaluate(model, evalset, spec, prep, device)
        history["eval"].append({"step": step, **metrics})
        auc = metrics["matching_vs_shuffled"]["auc"]
        _say(f"step {step}: eval {verdict(metrics)}" + (f"; auc {auc:.3f}" if auc is not None else ""))
        return metrics

    graphed = None
    if cfg.cuda_graph and device.type == "cuda" and world == 1:
        graphed = GraphedStep(model, optimizer, spec, bf16, cfg.grad_clip)
    model.train()
    t_start = time.perf_counter()
    data_s = 0.0
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    batches = device_batches(iter(loader), spec.size, device, cfg.hard_negatives)
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - t0
        loss = graphed(batch, lr_at(cfg, step)) if graphed is not None and graphed.accepts(batch) else None
        if loss is None:
            loss = train_step(model, optimizer, batch, cfg, spec, device, step, bf16)
        loss_sum += loss
        loss_n += 1

        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            history["train"].append({
                "step": done,
                "loss": float(loss_sum) / loss_n,
                "lr": lr_at(cfg, step),
                "logit_scale": float(unwrap(model).logit_scale.detach().exp()),
                "samples": done * cfg.batch_size * world,
            })  # fmt: skip
            loss_sum.zero_()
            loss_n = 0
            if rank == 0:
                h = history["train"][-1]
                msg = f"loss {h['loss']:.4f} lr {h['lr']:.2e} T^-1 {h['logit_scale']:.1f}"
                _say(f"step {done}/{cfg.steps} {msg}")
        if rank == 0 and evalset is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            log_eval(done)
        if rank == 0 and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoint(done)
    wall = time.perf_counter() - t_start

    if rank != 0:
        return {}
    if end > start or not (out / CHECKPOINT).exists():
        checkpoint(end)
    ran = end - start
    report = {
        "config": asdict(cfg),
        "model": {
            "name": cfg.model,
            "parameters": sum(p.numel() for p in unwrap(model).parameters()),
            "image_size": spec.size,
        },
        "device": {
            "type": device.type,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "world_size": world,
            "precision": "bf16" if bf16 else "fp32",
        },
        "data": {
            "shards": len(shards),
            "samples_in_shards": sum(sizes.values()),
            "held_out_fraction": cfg.eval_fraction,
            "eval_samples": len(evalset) if evalset is not None else 0,
            "samples_seen": end * cfg.batch_size * world,
            "epochs": end * cfg.batch_size * world / max(1, sum(sizes.values()) * (1 - cfg.eval_fraction)),
        },
        "steps": {"done": end, "planned": cfg.steps, "resumed_from": start},
        "timing": {
            "wall_s": wall,
            "samples_per_s": ran * cfg.batch_size * world / wall if ran else 0.0,
            "data_wait_fraction": data_s / wall if ran else 0.0,
            "cuda_graph_steps": graphed.replays if graphed is not None else 0,
            "cuda_graph_error": graphed.failed if graphed is not None else None,
        },
        "metrics": history["eval"][-1] if history["eval"] else None,
        "verdict": verdict(history["eval"][-1] if history["eval"] else None, cfg.eval_fraction),
        "history": history,
    }
    (out / REPORT).write_text(json.dumps(report, indent=1))
    from pairforge.trainer.plot import plot_curves

    plot_curves(history, out / CURVES, title=f"{cfg.model} on {len(shards)} shard(s)")
    return report


def resume_config(cfg: TrainConfig) -> TrainConfig:
    """The config to continue ``cfg``'s run from its last checkpoint: the one
    saved in that checkpoint, so the schedule and the data order match."""
    state = load_checkpoint(Path(cfg.out) / CHECKPOINT)
    saved = dict(state["train_config"])
    saved["shards"] = tuple(saved["shards"])
    return replace(TrainConfig(**saved), resume=str(Path(cfg.out) / CHECKPOINT), out=cfg.out)
