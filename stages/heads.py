"""Scores from small heads on the CLIP image embedding: LAION's aesthetic
score and any linear or MLP head one has weights for (a watermark or NSFW
probe trained on CLIP features), each written as a column, each with an
optional threshold.

It reads ``img_emb`` (``clip_score``'s, or ``input``), so it runs after
``clip_score``; each head's input width must be the embedding's (checked
before Ray starts when the file is safetensors, else when a worker loads
it). Head layouts and file formats: :mod:`stages.common.heads`. No head
weights ship with any package: docs/safety.md says where LAION's are and
how to point at them.

Per head, the column ``name`` (float32; NaN for rows the stage never saw)
and, with a ``threshold``, rows ``below`` it (or ``above`` it) dropped with
the reason ``<name>_below_threshold`` (``..._above_threshold``). The heads
run in float32 on the CPU: a 768 -> 1024 -> ... -> 1 head costs about a
microsecond a row, next to which moving the rows to a GPU would cost more.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np

from pairforge.stages.base import Batch, Column, Resources, Stage, batch_len, reject, require
from pairforge.stages.common import heads as _heads
from pairforge.stages.options import options

KINDS = ("laion_aesthetic", "mlp")


@options
class HeadSpec:
    #: the output column
    name: str
    #: a ``.safetensors`` file, or a torch state dict (``.pt``, ``.pth``, ``.bin``; read weights-only)
    path: str
    #: ``laion_aesthetic`` (its layout is checked) or ``mlp`` (any stack of linear layers)
    kind: str = "mlp"
    #: between layers: ``none`` (LAION's aesthetic predictor), ``relu`` or ``gelu``
    activation: str = "none"
    #: after the last layer: ``none``, ``sigmoid`` or ``softmax``
    output: str = "none"
    #: which output of the last layer is the score
    index: int = 0
    #: L2-normalise the embedding first (LAION's heads were trained on normalised embeddings)
    normalize: bool = True
    #: only the keys under this prefix, with it stripped (``model.``)
    prefix: str = ""
    #: drop rows on the wrong side of this score; null: only score
    threshold: float | None = None
    #: ``below``: drop scores below ``threshold``; ``above``: drop scores above it
    drop: str = "below"

    def __post_init__(self):
        require(bool(self.name) and self.name.isidentifier(), "name", self.name, "a column name (letters, digits, _)")
        require(bool(self.path), "path", self.path, "a head weights file")
        require(self.kind in KINDS, "kind", self.kind, f"one of {KINDS}")
        require(self.activation in _heads.ACTIVATIONS, "activation", self.activation, f"one of {_heads.ACTIVATIONS}")
        require(self.output in _heads.OUTPUTS, "output", self.output, f"one of {_heads.OUTPUTS}")
        require(self.index >= 0, "index", self.index, ">= 0")
        require(self.drop in ("below", "above"), "drop", self.drop, "below or above")


@options
class Config:
    #: the heads run on the embedding, each writing its score column (see ``HeadSpec``:
    #: ``name``, ``path``, ``kind``, ``activation``, ``output``, ``index``, ``normalize``, ``prefix``,
    #: ``threshold``, ``drop``)
    heads: tuple[HeadSpec, ...] = ()
    #: the embedding column the heads read
    input: str = "img_emb"
    #: rows per ``process_batch`` call
    batch_size: int = 4096

    def __post_init__(self):
        require(len(self.heads) >= 1, "heads", self.heads, "at least one head")
        names = [h.name for h in self.heads]
        require(len(set(names)) == len(names), "heads", names, "distinct names")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


class HeadsStage(Stage):
    name: ClassVar[str] = "heads"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        self._loaded: list | None = None

    def __getstate__(self):  # ship the config, never the weights
        state = dict(self.__dict__)
        state["_loaded"] = None
        return state

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=self.config.batch_size)

    def inputs(self) -> tuple[str, ...]:
        return (self.config.input,)

    def outputs(self) -> tuple[Column, ...]:
        return tuple(Column(h.name, "scalar", "float32", default=np.float32("nan"), summary=True) for h in self.config.heads)

    def check(self, declared: dict) -> list[str]:
        """Each file exists; a safetensors file's layout and input width are
        read from its header and held against the declared embedding."""
        problems = []
        emb = declared.get(self.config.input)
        dim = int(emb.shape[0]) if emb is not None and emb.kind == "vector" and emb.shape and emb.shape[0] else None
        for i, h in enumerate(self.config.heads):
            where = f"heads[{i}]({h.name}).path"
            if not os.path.isfile(h.path):
                problems.append(f"{where}: no head weights file {h.path!r}")
                continue
            if not h.path.endswith(".safetensors"):
                continue  # a torch file's shapes need torch: checked when a worker loads it
            try:
                widths = _heads.layer_widths(_heads.safetensors_shapes(h.path, h.prefix), h.kind)
            except (ValueError, OSError, KeyError) as e:
                problems.append(f"{where}: {h.path!r}: {e}")
                continue
            if dim is not None and widths[0] != dim:
                problems.append(f"{where}: the head takes {widths[0]} inputs, {self.config.input} has {dim}")
            if h.index >= widths[-1]:
                problems.append(f"heads[{i}]({h.name}).index: the head has {widths[-1]} outputs, got {h.index}")
        return problems

    def setup(self) -> None:
        if self._loaded is None:
            self._loaded = [
                _heads.load(h.path, h.kind, h.prefix, h.activation, h.output, h.index, h.normalize)
                for h in self.config.heads
            ]

    def teardown(self) -> None:
        self._loaded = None

    def process_batch(self, batch: Batch) -> Batch:
        self.setup()
        c = self.config
        n = batch_len(batch)
        out = dict(batch)
        emb = np.asarray(batch[c.input], dtype=np.float32).reshape(n, -1) if n else np.zeros((0, 1), np.float32)
        decided = np.zeros(n, dtype=bool)
        for spec, head in zip(c.heads, self._loaded):
            if emb.shape[1] != head.in_dim:
                raise ValueError(f"heads: {spec.name} takes {head.in_dim} inputs, {c.input} has {emb.shape[1]}")
            scores = head(emb) if n else np.zeros(0, np.float32)
            out[spec.name] = scores
            if spec.threshold is None:
                continue
            t = spec.threshold
            bad = (scores < t) if spec.drop == "below" else (scores > t)
            bad &= ~decided
            reject(out, bad, self.name, f"{spec.name}_{spec.drop}_threshold",
                   [{spec.name: float(scores[i]), "threshold": t, "head": os.path.basename(spec.path)}
                    for i in np.flatnonzero(bad)])  # fmt: skip
            decided |= bad
        return out
