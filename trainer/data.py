"""Stream a run's shards with webdataset, and hold out an evaluation split.

The stream is a pure function of ``(shards, seed, step)``: every epoch shuffles
the shard list with the same seed on every rank, splits it by node (rank) and
by DataLoader worker, shuffles samples in a buffer seeded per epoch, rank and
worker, and decodes. A run resumed at step ``k`` skips exactly the samples the
first ``k`` batches used, *before* decoding them, so it sees the same batches
an uninterrupted run would have seen.

Which samples are held out for evaluation is decided by a hash of the sample's
*group*: its own key, or for a confounder the key it is a confounder of, so
both halves of a Winoground-style pair land on the same side. A run with a
confounders side table (``OUT/confounders``) adds each sample's group and hard
negative from it (:mod:`trainer.confounders`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pairforge.trainer.confounders import CONFOUNDER_GROUP, confounder_metadata  # noqa: F401 (re-exported)
from pairforge.trainer.confounders import annotate as _annotate
from pairforge.trainer.prep import NEGATIVE_CAPTION, Prep, model_images, tokenizer  # noqa: F401 (re-exported)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: metadata field naming the key of the sample this one is a confounder of
CONFOUNDER_OF = "confounder_of"


# ------------------------------------------------------------------ shard lists


def find_shards(inputs: Sequence[str | Path]) -> list[str]:
    """Tar paths from run folders (``OUT``), shard folders, tar files or
    brace patterns (``shards/{00000..00009}.tar``), sorted and deduplicated."""
    found: list[str] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if "{" in text:
            found.extend(wds.shardlists.expand_urls(text))
        elif path.is_dir():
            folder = path / "shards" if (path / "shards").is_dir() else path
            found.extend(str(p) for p in sorted(folder.glob("*.tar")))
        elif path.suffix == ".tar" and path.exists():
            found.append(text)
        else:
            raise FileNotFoundError(f"{text}: not a run folder, a shard folder, a .tar or a brace pattern")
    shards = sorted(set(found))
    if not shards:
        raise FileNotFoundError(f"no .tar shards under {', '.join(map(str, inputs))}")
    return shards


def shard_samples(shards, handler=wds.warn_and_continue) -> Iterator[dict]:
    """webdataset's ``tarfile_samples`` over ``{"url": path}`` dicts, but
    each shard opened as a file, nothing else: webdataset's own opener
    (``gopen``) runs a name that starts with ``pipe:`` as a shell command
    and fetches ``http:``/``s3:`` names, and a shard folder's file names
    are data (docs/security.md)."""

    def opened(items):
        for item in items:
            try:
                stream = open(os.fspath(Path(item["url"])), "rb")  # noqa: SIM115 - webdataset closes it
            except OSError as e:
                e.args = (*e.args, item["url"])
                if handler(e):
                    continue
                raise
            yield {**item, "stream": stream}

    files = wds.tariterators.tar_file_expander(opened(shards), handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def shard_sizes(shards: Sequence[str]) -> dict[str, int]:
    """Samples per shard from the ``sizes.json`` beside each shard (the file
    open_clip's reader relies on); a shard it does not list is counted by
    scanning its tar."""
    cache: dict[Path, dict] = {}
    sizes = {}
    for s in shards:
        folder = Path(s).parent
        if folder not in cache:
            f = folder / "sizes.json"
            cache[folder] = json.loads(f.read_text()) if f.exists() else {}
        n = cache[folder].get(Path(s).name)
        sizes[s] = int(n) if n is not None else _count_samples(s)
    return sizes


def _count_samples(tar: str) -> int:
    import tarfile

    with tarfile.open(tar) as t:
        return sum(1 for m in t.getmembers() if m.name.rsplit(".", 1)[-1] == "txt")


# ------------------------------------------------------------------- the split


def sample_group(key: str, meta: dict) -> str:
    return str(meta.get(CONFOUNDER_GROUP) or meta.get(CONFOUNDER_OF) or key)


def is_held_out(group: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha1(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _confounders(shards: Sequence[str]) -> dict[str, dict]:
    return confounder_metadata(shards)


def annotate(parsed: dict, table: dict[str, dict]) -> dict:
    return _annotate(parsed, table) if table else parsed


def _parse(sample: dict) -> dict:
    """Decode the cheap members (caption, metadata) and find the image."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    return {
        "key": sample["__key__"],
        "caption": sample.get("txt", b"").decode("utf-8"),
        "meta": meta,
        "image_bytes": sample[ext] if ext else None,
    }


# ----------------------------------------------------------------- the stream


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 128
    shuffle_buffer: int = 2000
    shuffle_initial: int = 500
    eval_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 2


@dataclass
class TrainStream(IterableDataset):
    """An endless stream of training batches (every sample not held out)."""

    shards: list[str]
    prep: Prep
    cfg: StreamConfig
    start_batch: int = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        real, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting with
        # worker 0, and batch b of a run came from the stream of worker
        # b % workers. So a run resumed at start_batch lets its worker w play
        # the stream of worker (w + start_batch) % workers, minus the batches
        # that stream made among the first start_batch.
        worker = (real + self.start_batch) % workers
        skip = len(range(worker, self.start_batch, workers)) * self.cfg.batch_size
        samples = itertools.islice(self._raw(worker, workers), skip, None)
        batch: list[dict] = []
        epochs: list[int] = []
        for parsed, epoch in samples:  # decoded a batch at a time, in the worker (see trainer.prep)
            batch.append(parsed)
            epochs.append(epoch)
            if len(batch) == self.cfg.batch_size:
                yield self.prep.batch(batch, epochs)
                batch, epochs = [], []

    def _raw(self, worker: int, workers: int) -> Iterator[tuple[dict, int]]:
        """(parsed sample, epoch) forever for one worker's stream, image bytes not yet decoded."""
        rank = wds.utils.pytorch_worker_info()[0]
        for epoch in itertools.count():
            order = list(self.shards)
            random.Random(f"{self.cfg.seed}:shards:{epoch}").shuffle(order)  # same order on every rank
            urls = itertools.islice(wds.split_by_node({"url": u} for u in order), worker, None, workers)
            table = _confounders(self.shards)
            parsed = (annotate(_parse(s), table) for s in shard_samples(urls))
            kept = (
                p for p in parsed
                if p["image_bytes"] is not None
                and not is_held_out(sample_group(p["key"], p["meta"]), self.cfg.eval_fraction, self.cfg.seed)
            )  # fmt: skip
            rng = random.Random(f"{self.cfg.seed}:samples:{epoch}:{rank}:{worker}")
            n = 0
            for p in wds.shuffle(self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng=rng)(kept):
                n += 1
                yield p, epoch
            if n == 0:
                raise RuntimeError(
                    f"rank {rank} worker {worker} got no training samples: fewer shards ({len(self.shards)}) "
                    "than ranks x loader workers, or every sample is held out"
                )


def loader_workers(n_shards: int, wanted: int, world_size: int = 1) -> int:
    """DataLoader workers to use: each worker of each rank needs a shard."""
    per_rank = n_shards // max(1, world_size)
    if per_rank < 1:
        raise ValueError(f"{n_shards} shard(s) for {world_size} ranks: every rank needs at least one shard")
    return min(wanted, per_rank)


#: niceness of the DataLoader workers: they yield the cores to the training
#: process, whose Python thread launches the kernels that keep the GPU busy
WORKER_NICENESS = 10


def _worker_init(_worker_id: int) -> None:
    if WORKER_NICENESS:
        os.nice(WORKER_NICENESS)


def train_loader(
    shards: list[str],
    prep: Prep,
    cfg: StreamConfig,
    start_batch: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    workers = loader_workers(len(shards), cfg.num_workers, world_size)
    return DataLoader(
        TrainStream(shards, prep, cfg, start_batch),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init if workers else None,
    )


# ------------------------------------------------------------------ eval split


class NoHeldOut(ValueError):
    """The split holds out no sample (a run of a few samples): nothing to evaluate on."""


@dataclass
class EvalSet:
    keys: list[str]
    captions: list[str]
    images: torch.Tensor  # uint8 [n, 3, S, S]
    texts: torch.Tensor  # tokens [n, L]
    metas: list[dict]

    def __len__(self) -> int:
        return len(self.keys)


def load_eval_set(shards: list[str], prep: Prep, cfg: StreamConfig, limit: int = 1000) -> EvalSet:
    """The held-out samples, in key order, from the first shards (in sorted
    order) until ``limit`` are found. Partners of confounder pairs are read
    together (they share a group, so the split keeps them together)."""
    found: list[dict] = []
    table = _confounders(shards)
    for shard in shards:
        for s in shard_samples([{"url": shard}]):
            p = annotate(_parse(s), table)
            if p["image_bytes"] is not None and is_held_out(
                sample_group(p["key"], p["meta"]), cfg.eval_fraction, cfg.seed
            ):
                found.append(p)
        if len(found) >= limit:
            break
    found.sort(key=lambda p: p["key"])
    found = found[:limit]
    plain = replace(prep, augment=False)  # held-out images are never augmented
    chunks = [[p["image_bytes"] for p in found[i : i + 256]] for i in range(0, len(found), 256)]
    if not found:
        raise NoHeldOut(f"no held-out samples (eval fraction {cfg.eval_fraction}) in {len(shards)} shard(s)")
    return EvalSet(
        keys=[p["key"] for p in found],
        captions=[p["caption"] for p in found],
        images=torch.cat([model_images(plain.images(c), plain.image_size, "cpu") for c in chunks]),
        texts=prep.tokens([p["caption"] for p in found]),
        metas=[p["meta"] for p in found],
    )
