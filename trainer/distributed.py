"""Multi-GPU and multi-node training through Ray Train (TorchTrainer, DDP).

Each Ray Train worker runs the very same :func:`trainer.loop.train`; Ray sets
up the process group (NCCL on GPUs), so the loop sees ``torch.distributed``
initialised: it wraps the model in DDP, gathers features across ranks for the
global-batch loss, and webdataset splits the shards by rank. ``batch_size``
stays per worker. Rank 0 evaluates and writes the checkpoint, report and
curves to ``cfg.out``, which must therefore be a path that rank 0's node can
write and the driver can read (shared storage on a multi-node cluster).

Only used when the cluster has GPUs; on a CPU-only machine ``pairforge
train`` runs one process (DDP on CPU would only split an already small batch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from pairforge.trainer.loop import REPORT, TrainConfig


def _worker(config: dict) -> None:
    """``train_loop_per_worker``: rebuild the config and run the loop."""
    import ray.train
    import ray.train.torch

    from pairforge.trainer.loop import train

    cfg = TrainConfig(**{**config, "shards": tuple(config["shards"])})
    report = train(cfg, device=ray.train.torch.get_device())
    metrics = report.get("metrics") or {}
    ray.train.report({
        "steps": cfg.steps,
        "i2t_r1": (metrics.get("image_to_text") or {}).get("r@1", -1.0),
        "t2i_r1": (metrics.get("text_to_image") or {}).get("r@1", -1.0),
    })  # fmt: skip


def cluster_gpus(address: str | None = None) -> int:
    import ray

    if not ray.is_initialized():
        from pairforge.pipeline.raystart import apply_loopback_env

        apply_loopback_env()  # a local Ray (no address) must not probe cloud metadata
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    return int(ray.cluster_resources().get("GPU", 0))


def train_with_ray(cfg: TrainConfig, num_workers: int | None = None, address: str | None = None) -> dict:
    """Run ``cfg`` as a TorchTrainer job, one worker per GPU (all the
    cluster's GPUs unless ``num_workers``). Refuses a cluster without GPUs:
    call :func:`trainer.loop.train` there."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpus = cluster_gpus(address)
    if gpus < 1:
        raise RuntimeError("the Ray cluster has no GPUs: train in one process instead (drop --ray)")
    workers = num_workers or gpus
    out = Path(cfg.out).resolve()
    # data loader workers per rank: share the node's CPUs, at least one each
    cfg = replace(
        cfg,
        out=str(out),
        device="cuda",
        shards=tuple(str(Path(s).resolve()) if "://" not in s else s for s in cfg.shards),
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=True, resources_per_worker={"CPU": max(1, cfg.workers)}
        ),
        run_config=RunConfig(name=f"pairforge-train-{out.name}", storage_path=str(out / "ray")),
    )
    trainer.fit()
    return json.loads((out / REPORT).read_text())
