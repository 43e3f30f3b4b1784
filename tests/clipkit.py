"""Helpers for the clip_score stage's tests (tests/test_clip_score*.py):
coloured shapes with captions that name their colour or another one
(``planted``), a pf-tiny checkpoint trained to tell those colours apart
(``trained_ckpt``, module scope: bind it in the test module as
``trained_ckpt = clipkit.trained_ckpt``), the stage on that model on the
CPU, and the in-process runner's calls for a top_fraction run."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pairforge.pipeline.local import map_stage, run_global
from pairforge.stages.base import STATUS_OK, fresh_rows, object_array
from pairforge.stages.clip_score import ClipScoreStage, Config
from pairforge.stages.common import clip as _clip

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")


def draw(colour, shape, rng, size=(64, 64)):
    w, h = size
    im = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    r = int(rng.integers(10, min(w, h) // 2 - 4))
    cx, cy = int(rng.integers(r + 2, w - r - 2)), int(rng.integers(r + 2, h - r - 2))
    d, c = ImageDraw.Draw(im), COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    return im


def encoded(im, fmt="JPEG"):
    buf = io.BytesIO()
    im.save(buf, fmt, quality=95) if fmt == "JPEG" else im.save(buf, fmt)
    return buf.getvalue()


def rows_of(images, captions, keys=None):
    n = len(images)
    return fresh_rows(
        keys or [f"00000{i:04d}" for i in range(n)],
        image=object_array(images),
        image_ext=object_array(["jpg"] * n),
        caption=object_array(captions),
    )


def planted(n_per_colour=8, seed=1, size=(96, 80)):
    """Coloured shapes; even rows carry their own caption, odd rows a
    caption naming another colour."""
    rng = np.random.default_rng(seed)
    cols = list(COLOURS)
    images, captions, match = [], [], []
    for i in range(n_per_colour * len(cols)):
        colour, shape = cols[i % len(cols)], SHAPES[int(rng.integers(3))]
        images.append(encoded(draw(colour, shape, rng, size)))
        said = colour if i % 2 == 0 else cols[(i + 1 + i // 7 % 4) % len(cols)]
        captions.append(f"a {said} {shape}")
        match.append(i % 2 == 0)
    return rows_of(images, captions), np.array(match)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """pf-tiny trained for ~100 InfoNCE steps on coloured shapes captioned
    "a <colour> <shape>" (a few seconds on one core): it tells colours apart.
    Trained on one thread, whatever ran before: the weights, and so the
    scores the top_fraction tests cut, are the same in any test module and
    in any order (the stage's setup leaves torch on ``num_cpus``, 1, threads;
    two threads train other weights)."""
    import open_clip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _clip.register_model_configs()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, _, preprocess = open_clip.create_model_and_transforms("pf-tiny")
    tokenizer = open_clip.get_tokenizer("pf-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    cols, labels = list(COLOURS), torch.arange(len(COLOURS))
    model.train()
    for _ in range(100):
        shapes = [SHAPES[int(s)] for s in rng.integers(0, 3, len(cols))]
        x = torch.stack([preprocess(draw(c, s, rng)) for c, s in zip(cols, shapes)])
        t = tokenizer([f"a {c} {s}" for c, s in zip(cols, shapes)])
        logits = 20 * F.normalize(model.encode_image(x), dim=-1) @ F.normalize(model.encode_text(t), dim=-1).T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("ckpt") / "trained.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def stage(ckpt, **kw):
    kw.setdefault("micro_batch", 16)
    return ClipScoreStage(Config(pretrained=ckpt, model="pf-tiny", device="cpu", **kw))


def ok_rows(out):
    return out["status"] == STATUS_OK


def run_top_fraction(st, rows):
    """The in-process runner's calls: per row, then the fit and its per-shard rule."""
    return run_global(st, map_stage(st, rows))
