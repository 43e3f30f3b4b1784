"""Stages that exercise the stage contract (``stages.base``) the way regions
and confounders will: ragged per-row columns, a global stage that sets
columns on kept rows and writes a side table linking rows by key. Jobs name
them as ``tests.contract_stages:RaggedStage`` (importable on Ray workers,
whose working directory is the repository's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pairforge.stages.base import (
    Batch,
    Column,
    FitResult,
    GlobalStage,
    Learned,
    Resources,
    Stage,
    batch_len,
    object_array,
    reject,
)


def boxes_for(key: str) -> np.ndarray:
    """K x 4 boxes for a key, K = last digit % 3 (so K = 0 occurs)."""
    k = int(str(key)[-1]) % 3
    base = int(str(key)) % 97
    return (np.arange(k * 4, dtype=np.float32).reshape(k, 4) + base) / 100.0


@dataclass(frozen=True)
class RaggedConfig:
    #: rows whose key ends with this digit are rejected (so rejects hold ragged columns too)
    reject_digit: str = "7"
    batch_size: int = 5
    #: record the worker's parent pid (the raylet, one per node) in ``worker_parent``
    record_worker: bool = False


class RaggedStage(Stage):
    name: ClassVar[str] = "ragged_test"
    Config = RaggedConfig

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=self.config.batch_size)

    def outputs(self) -> tuple[Column, ...]:
        return (
            Column("boxes", "ragged", "float32", (4,)),
            Column("labels", "ragged", "int64", ()),
            Column("n_boxes", "scalar", "int64", default=-1),
            Column("worker_parent", "scalar", "int64", default=-1),
        )

    def process_batch(self, batch: Batch) -> Batch:
        out = dict(batch)
        boxes = [boxes_for(k) for k in batch["key"]]
        out["boxes"] = object_array(boxes)
        out["labels"] = object_array([np.arange(len(b), dtype=np.int64) + 1 for b in boxes])
        out["n_boxes"] = np.array([len(b) for b in boxes], dtype=np.int64)
        if self.config.record_worker:  # the raylet is the worker's parent: one per node
            out["worker_parent"] = np.full(batch_len(batch), os.getppid(), dtype=np.int64)
        unlucky = np.array([str(k).endswith(self.config.reject_digit) for k in batch["key"]], dtype=bool)
        reject(out, unlucky, self.name, "unlucky_key", {"digit": self.config.reject_digit})
        return out


@dataclass(frozen=True)
class LinkConfig:
    #: every ``drop_every``-th alive key (in key order) is dropped
    drop_every: int = 5
    buckets: int = 3


class LinkStage(GlobalStage):
    """Drops every n-th alive row, links each kept row to the next kept one
    (a side table), and sets ``partner`` and ``rank`` on kept rows."""

    name: ClassVar[str] = "link_test"
    fit_columns = ("key", "n_boxes")
    Config = LinkConfig

    def outputs(self) -> tuple[Column, ...]:
        return (Column("partner", "string"), Column("rank", "scalar", "int64", default=-1))

    def side_tables(self) -> dict[str, tuple[str, ...]]:
        return {"links": ("anchor_key", "partner_key")}

    def process_batch(self, batch: Batch) -> Batch:
        return dict(batch)

    def bucket_rows(self, rows: Batch, learned: Learned) -> Batch:
        keys = np.asarray(rows["key"]).astype(str)
        return {
            "bucket": np.array([int(k) % self.config.buckets for k in keys], dtype=np.int64),
            "key": object_array(list(keys)),
            "n_boxes": np.asarray(rows["n_boxes"], dtype=np.int64),
        }

    def reduce_bucket(self, rows: Batch, learned: Learned) -> Batch:
        return {"key": rows["key"], "n_boxes": rows["n_boxes"]}

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        if not batch_len(reduced):
            return FitResult()
        order = np.argsort(np.asarray(reduced["key"]).astype(str), kind="stable")
        keys = [str(reduced["key"][i]) for i in order]
        boxes = [int(reduced["n_boxes"][i]) for i in order]
        drop = [i for i in range(len(keys)) if i % self.config.drop_every == self.config.drop_every - 1]
        kept = [i for i in range(len(keys)) if i not in set(drop)]
        partner = {keys[a]: keys[kept[(j + 1) % len(kept)]] for j, a in enumerate(kept)}
        dec_keys = [keys[i] for i in drop] + [keys[i] for i in kept]
        decisions = {
            "key": object_array(dec_keys),
            "reason": object_array(["link_test_drop"] * len(drop) + [""] * len(kept)),
            "detail": object_array([f'{{"every": {self.config.drop_every}}}'] * len(drop) + [""] * len(kept)),
            "partner": object_array([""] * len(drop) + [partner[keys[i]] for i in kept]),
            "rank": np.array([-1] * len(drop) + list(range(len(kept))), dtype=np.int64),
        }
        table = {
            "anchor_key": object_array([keys[i] for i in kept]),
            "partner_key": object_array([partner[keys[i]] for i in kept]),
            "anchor_boxes": np.array([boxes[i] for i in kept], dtype=np.int64),
        }
        return FitResult(decisions, {"links": table})


@dataclass(frozen=True)
class RejectKeysConfig:
    keys: tuple[str, ...] = ()


class RejectKeysStage(Stage):
    """Rejects the rows whose key is listed (a stand-in for a later filter)."""

    name: ClassVar[str] = "reject_keys"
    Config = RejectKeysConfig

    def process_batch(self, batch: Batch) -> Batch:
        out = dict(batch)
        hit = np.isin(np.asarray(batch["key"]).astype(str), list(self.config.keys))
        reject(out, hit, self.name, "listed", {})
        return out


@dataclass(frozen=True)
class BrokenConfig:
    #: the row whose key ends with this raises instead of being rejected
    digit: str = "3"


class BrokenStage(Stage):
    """A stage with a bug: it raises on one row (the runner must name it)."""

    name: ClassVar[str] = "broken_test"
    Config = BrokenConfig

    def process_batch(self, batch: Batch) -> Batch:
        if any(str(k).endswith(self.config.digit) for k in batch["key"]):
            raise ZeroDivisionError("a bug")
        return dict(batch)
