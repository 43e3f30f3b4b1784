"""Samples to model inputs, split between the loader workers and the device.

The model's image input is open_clip's eval preprocess: resize the shorter
side to ``S`` (antialiased bicubic) and centre-crop ``S``, which keeps the
centre square of the image. Resizing was the largest part of a loader
worker's CPU time per sample (a PIL bicubic resize cost more than the JPEG
decode), so the work is split:

* a worker (:meth:`Prep.batch`) decodes each image (JPEGs at a reduced DCT
  scale when they are at least twice ``S``), picks its square (the centre
  square, or with ``augment`` the centre square of a seeded random crop) and
  copies it, uint8 and height-width-channel as decoded, into one canvas per
  batch; captions are tokenised once per batch, not once per sample;
* the training step (:func:`model_images`) resizes the squares to ``S`` on
  the device, one antialiased bicubic call per square size (one call for a
  dataset of equal-sized images), and rounds to uint8 as PIL does.

The loader then moves uint8 (never float32) through collation, pinned memory
and the host-to-device copy; on CUDA, :func:`device_batches` issues that copy
and the resize on a stream of their own so they overlap the previous step. A square more than twice ``S`` (a large PNG,
say) is resized in the worker with PIL, so a canvas is at most ``2S`` a side.
``resize="worker"`` resizes every square in the worker (PIL), for comparison
and for a device that is the bottleneck itself.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

#: metadata field holding a caption that does *not* describe the image
NEGATIVE_CAPTION = "confounder_caption"
RESIZE_WHERE = ("device", "worker")


@dataclass(frozen=True)
class Prep:
    """Parsed samples (see ``trainer.data._parse``) to batches of tensors."""

    model_name: str
    image_size: int
    augment: bool = False
    seed: int = 0
    #: where squares are resized to ``image_size``: ``worker`` (PIL, here) or ``device`` (the
    #: training step; what ``pairforge train`` chooses on CUDA)
    resize: str = "worker"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_WHERE:
            raise ValueError(f"resize: {self.resize!r} is not one of {', '.join(RESIZE_WHERE)}")

    def square(self, data: bytes, key: str = "", epoch: int = 0) -> np.ndarray:
        """The image's square to resize to ``S``, uint8 ``[side, side, 3]``
        (``side == S`` when it was resized here, with PIL, exactly as
        resizing the shorter side and centre-cropping does; the square the
        device resizes starts within half a pixel of that crop's box)."""
        s = self.image_size
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            im.draft("RGB", (s, s))  # decode big JPEGs at a reduced scale
        if im.mode != "RGB":
            im = im.convert("RGB")
        if self.augment:  # a seeded random crop of 90-100% of the area: the same for the same (seed, epoch, key)
            rng = random.Random(f"{self.seed}:{epoch}:{key}")
            frac = rng.uniform(0.9, 1.0) ** 0.5
            w, h = max(1, round(im.width * frac)), max(1, round(im.height * frac))
            x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
            im = im.crop((x, y, x + w, y + h))
        # "shorter side to s, centre crop s" keeps this box of the image
        w, h = im.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        fx, fy = w / nw, h / nh
        box = ((nw - s) // 2 * fx, (nh - s) // 2 * fy, ((nw - s) // 2 + s) * fx, ((nh - s) // 2 + s) * fy)
        side = min(w, h)
        if self.resize == "worker" or side > 2 * s:
            return np.asarray(im.resize((s, s), Image.BICUBIC, box=box))
        # the device resizes a whole square: the box's, its corner rounded to a pixel
        left, top = min(round(box[0]), w - side), min(round(box[1]), h - side)
        return np.asarray(im)[top : top + side, left : left + side]

    def images(self, datas: Sequence[bytes], keys: Sequence[str] = (), epochs: Sequence[int] = ()) -> dict:
        """``image``: a uint8 ``[n, T, T, 3]`` canvas holding each square at
        its top-left corner (``T`` the largest side), ``side``: int32 ``[n]``."""
        squares = [self.square(d, keys[i] if keys else "", epochs[i] if epochs else 0) for i, d in enumerate(datas)]
        return canvas(squares)

    def image(self, data: bytes, key: str = "", epoch: int = 0) -> torch.Tensor:
        """One model input image, uint8 ``[3, S, S]``, resized (on the CPU)
        where this Prep says, as a training batch would be."""
        return model_images(self.images([data], [key], [epoch]), self.image_size, "cpu")[0]

    def tokens(self, captions: list[str]) -> torch.Tensor:
        return tokenizer(self.model_name)(captions)

    def batch(self, parsed: Sequence[dict], epochs: Sequence[int]) -> dict[str, torch.Tensor]:
        """One training batch: the image canvas and sides, caption tokens, and
        hard-negative tokens where a sample has a negative caption (the empty
        caption's tokens elsewhere), ``has_neg`` saying which."""
        out = self.images([p["image_bytes"] for p in parsed], [p["key"] for p in parsed], epochs)
        negs = [p["meta"].get(NEGATIVE_CAPTION) or "" for p in parsed]
        texts = self.tokens([p["caption"] for p in parsed] + [""])
        neg_text = texts[-1:].repeat(len(parsed), 1)
        with_neg = [i for i, n in enumerate(negs) if n]
        if with_neg:
            neg_text[with_neg] = self.tokens([negs[i] for i in with_neg])
        out.update(text=texts[:-1], neg_text=neg_text, has_neg=torch.tensor([bool(n) for n in negs]))
        return out


def canvas(squares: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """Squares (uint8 ``[side, side, 3]``) into one uint8 ``[n, T, T, 3]``
    tensor, each at its top-left corner, and their sides."""
    sides = [sq.shape[0] for sq in squares]
    t = max(sides)
    shape = (len(squares), t, t, 3)
    if get_worker_info() is not None:  # straight into shared memory, as default_collate does: no copy on the way out
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    if min(sides) < t:
        out.zero_()  # the padding is never read; zeros keep it tidy
    view = out.numpy()
    for i, sq in enumerate(squares):
        view[i, : sq.shape[0], : sq.shape[1]] = sq
    return {"image": out, "side": torch.tensor(sides, dtype=torch.int32)}


def model_images(batch: dict, size: int, device: str | torch.device) -> torch.Tensor:
    """uint8 ``[n, 3, S, S]`` on ``device`` from a batch's canvas and sides:
    each square resized to ``S`` (antialiased bicubic, rounded to uint8, as
    PIL does), squares of one size in one call. Reads ``side`` on the host,
    so it never waits for the device."""
    held = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2)
    sides = batch["side"].tolist()
    n = held.shape[0]
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=held.device)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(sides):
        groups.setdefault(s, []).append(i)
    for side, idx in groups.items():
        x = held[:, :, :side, :side]
        if len(idx) < n:
            x = x[torch.tensor(idx, device=held.device)]
        if side != size:
            x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp_(0, 255).round_().to(torch.uint8)
        if len(idx) < n:
            out[torch.tensor(idx, device=held.device)] = x
        else:
            out.copy_(x)
    return out


_TOKENIZERS: dict[str, object] = {}


def tokenizer(model_name: str):
    """open_clip's tokenizer for ``model_name``, built once per process."""
    if model_name not in _TOKENIZERS:
        import open_clip

        from pairforge.trainer.model import register_configs

        register_configs()
        _TOKENIZERS[model_name] = open_clip.get_tokenizer(model_name)
    return _TOKENIZERS[model_name]


# ------------------------------------------------------------- onto the device


def to_device(batch: dict, size: int, device: torch.device, hard_negatives: bool = True) -> dict:
    """A loader batch as the training step takes it, on ``device``: ``image``
    uint8 ``[n, 3, S, S]``, ``text`` tokens, ``neg_text`` the tokens of the
    samples' hard negatives (``None`` when there are none or they are off)."""
    negs = None
    if hard_negatives and bool(batch["has_neg"].any()):  # a host tensor: no wait for the device
        negs = batch["neg_text"][batch["has_neg"]].to(device, non_blocking=True)
    text = batch["text"].to(device, non_blocking=True)
    return {"image": model_images(batch, size, device), "text": text, "neg_text": negs}


def device_batches(batches: Iterator[dict], size: int, device, hard_negatives: bool = True) -> Iterator[dict]:
    """:func:`to_device` over a loader's batches. On CUDA the copies and the
    resize go on a stream of their own, so they overlap the previous step's
    kernels (the host runs ahead of the GPU) instead of queueing behind them
    on the training stream, which waits only for its own batch."""
    device = torch.device(device)
    if device.type != "cuda":
        for b in batches:
            yield to_device(b, size, device, hard_negatives)
        return
    side = torch.cuda.Stream(device)
    for b in batches:
        main = torch.cuda.current_stream(device)
        with torch.cuda.stream(side):
            out = to_device(b, size, device, hard_negatives)
        main.wait_stream(side)
        for t in out.values():
            if t is not None:
                t.record_stream(main)  # allocated on the side stream (its own pool), used on the main one
        yield out
