"""What the Ray Train (DDP) path relies on, in two real CPU processes joined
by torch.distributed (gloo), no Ray and no GPU: the loss over the global batch
and its gradients equal one process's, and the stream splits shards by rank."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pairforge.trainer.corpus import CorpusConfig, build_corpus
from pairforge.trainer.data import Prep, StreamConfig, TrainStream, find_shards
from pairforge.trainer.model import clip_loss

WORLD = 2


def _rank(rank: int, port: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        d = torch.load(f"{work}/features.pt")
        n = d["img"].shape[0] // WORLD
        img = d["img"][rank * n : (rank + 1) * n].clone().requires_grad_()
        txt = d["txt"][rank * n : (rank + 1) * n].clone().requires_grad_()
        loss = clip_loss(img, txt, d["scale"])
        loss.backward()
        stream = TrainStream(find_shards([d["corpus"]]), Prep("pf-tiny", 64), StreamConfig(eval_fraction=0.2))
        keys = []
        for parsed, epoch in stream._raw(0, 1):
            if epoch:
                break
            keys.append(parsed["key"])
        torch.save({"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "keys": keys}, f"{work}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    corpus = work / "corpus"
    build_corpus(corpus, CorpusConfig(fashion=80, scenes_one=20, scenes_count=10, scene_pairs=10,
                                      photo_variants=1, samples_per_shard=30))  # fmt: skip
    torch.manual_seed(0)
    features = {
        "img": F.normalize(torch.randn(12, 16), dim=-1),
        "txt": F.normalize(torch.randn(12, 16), dim=-1),
        "scale": torch.tensor(12.0),
        "corpus": str(corpus),
    }
    torch.save(features, work / "features.pt")
    mp.start_processes(_rank, args=(_free_port(), str(work)), nprocs=WORLD, start_method="spawn")
    return features, [torch.load(work / f"rank{r}.pt") for r in range(WORLD)]


def test_global_batch_loss_and_gradients_match_one_process(ranks):
    features, results = ranks
    img = features["img"].clone().requires_grad_()
    txt = features["txt"].clone().requires_grad_()
    loss = clip_loss(img, txt, features["scale"])
    loss.backward()
    assert torch.allclose(torch.stack([r["loss"] for r in results]).mean(), loss.detach(), atol=1e-6)
    # each rank's gradient holds every rank's loss (the gather passes gradients back); DDP then averages
    assert torch.allclose(torch.cat([r["img"] for r in results]) / WORLD, img.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["txt"] for r in results]) / WORLD, txt.grad, atol=1e-6)


def test_each_rank_streams_its_own_shards(ranks):
    _, results = ranks
    a, b = (set(r["keys"]) for r in results)
    assert a and b and not a & b
    assert {k[:5] for k in a}.isdisjoint({k[:5] for k in b})  # keys start with their shard id
