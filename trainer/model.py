"""The model side of training: open_clip models, the CLIP loss, checkpoints.

A checkpoint is one ``torch.save`` file holding only tensors and plain
values, so ``open_clip.create_model_and_transforms(name, pretrained=PATH)``
loads it with ``weights_only=True``: it finds ``state_dict`` and ignores the
rest (the optimizer, the step, the configs and the metric history, which a
resumed run reads back).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pairforge.stages.common.assets import resolve as resolve_asset

#: open_clip configs that ship with the repo (``pf-tiny``)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "stages" / "model_configs"
#: CLIP clamps its learnable temperature so logits are at most 100x cosines
MAX_LOGIT_SCALE = float(torch.log(torch.tensor(100.0)))


def register_configs() -> None:
    import open_clip

    if CONFIG_DIR.is_dir() and "pf-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class ImageSpec:
    """What the data path must produce for this model."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def create_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """An open_clip model (random init, a checkpoint path, or an open_clip
    pretrained tag) and the image spec its preprocess uses."""
    import logging

    import open_clip

    register_configs()
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every random init
    try:
        model = open_clip.create_model(name, pretrained=resolve_asset(pretrained), device=device)
    finally:
        logging.getLogger().setLevel(quiet)
    pcfg = model.visual.preprocess_cfg
    size = pcfg["size"]
    spec = ImageSpec(
        size=int(size[0] if isinstance(size, (tuple, list)) else size), mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"])
    )
    return model, spec


@functools.lru_cache(maxsize=16)
def _image_stats(spec: ImageSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's mean and std in 0-255 units on ``device``: made once, not
    copied from the host at every step (a copy a CUDA graph cannot hold)."""
    mean = torch.tensor(spec.mean, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
    return mean, std


def normalize_images(images: torch.Tensor, spec: ImageSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` on the device -> the model's normalised input."""
    mean, std = _image_stats(spec, images.device, dtype)
    return (images.to(dtype) - mean) / std


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# --------------------------------------------------------------------- the loss


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (gradients flow back to each rank's own rows) and the
    offset of this rank's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x)), dist.get_rank() * x.shape[0]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    negative_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: image i must pick text i among
    every rank's texts (and this rank's hard-negative captions, which only
    ever act as wrong texts, as in NegCLIP), and text i must pick image i."""
    all_text, offset = _gather(text_features)
    all_image, _ = _gather(image_features)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    logits_image = logit_scale * image_features @ all_text.T
    if negative_features is not None and negative_features.shape[0]:
        logits_image = torch.cat([logits_image, logit_scale * image_features @ negative_features.T], dim=1)
    logits_text = logit_scale * text_features @ all_image.T
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


def forward_loss(model, images: torch.Tensor, texts: torch.Tensor, neg_texts: torch.Tensor | None = None):
    """One forward pass (captions and hard negatives encoded together, so DDP
    sees a single call) and the loss."""
    n = texts.shape[0]
    all_texts = texts if neg_texts is None or not len(neg_texts) else torch.cat([texts, neg_texts])
    image_f, text_f, scale = model(images, all_texts)[:3]
    return clip_loss(image_f, text_f[:n], scale, text_f[n:] if text_f.shape[0] > n else None)


def optimizer_for(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with CLIP's betas; no weight decay on gains, biases, embeddings'
    norms and the temperature (every parameter with fewer than 2 dims)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=bool(decay) and decay[0].is_cuda,  # one kernel for the whole update on GPUs
    )


def clamp_temperature(model: torch.nn.Module) -> None:
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def update(model, optimizer, images, texts, negs, bf16: bool, grad_clip: float, autocast_cache: bool = True):
    """One optimisation step on normalised images: the loss (bf16 autocast
    where asked), backward, gradient clipping, the optimizer, the temperature
    clamp; returns the loss, detached, on the device. The eager step and the
    captured one (``trainer.graphstep``, without autocast's cache) are both this."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=autocast_cache):
        loss = forward_loss(model, images, texts, negs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    clamp_temperature(model)
    return loss.detach()


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str | Path, model, optimizer, step: int, extra: dict) -> Path:
    """Atomically write a checkpoint open_clip can load and a run can resume."""
    import open_clip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "state_dict": unwrap(model).state_dict(),
        "optimizer": _portable(optimizer.state_dict()) if optimizer is not None else None,
        "step": int(step),
        "model_config": open_clip.get_model_config(extra.get("model_name", "")) if extra.get("model_name") else None,
        **extra,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _portable(opt_state: dict) -> dict:
    """An optimizer state as an eager run on any device takes it: learning
    rates as floats, not capturable (``trainer.graphstep`` makes them device
    tensors and capturable again when it captures a step)."""
    groups = [{**g, "lr": float(g["lr"]), "capturable": False} for g in opt_state["param_groups"]]
    return {**opt_state, "param_groups": groups}


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def export_scorer(checkpoint: str | Path, out: str | Path, extra: dict | None = None) -> Path:
    """A small inference-only copy of a checkpoint: float16 weights, the model
    name and config, no optimizer. open_clip loads it the same way."""
    state = load_checkpoint(checkpoint)
    small = {
        "state_dict": {k: (v.half() if v.is_floating_point() else v) for k, v in state["state_dict"].items()},
        "model_name": state.get("model_name"),
        "model_config": state.get("model_config"),
        "step": state.get("step"),
        **(extra or {}),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(small, tmp)
    os.replace(tmp, out)
    return out
