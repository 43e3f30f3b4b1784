"""``pairforge eval-index``: an evaluation set written as a build the dedup
stages can dedup a pool against (test-set decontamination).

Why a build's layout: the dedup stages already drop rows that an earlier
build holds (``prior_build``), by SHA-256 of the image bytes, by pHash
within ``max_distance`` bits, and (semantic) by embedding. An evaluation
set written the same way (``DIR/shards/00000.parquet`` with ``key``,
``sha256`` and ``phash``; ``DIR/embeddings/img_emb/img_emb_00000.npy`` when
a model is given) is read by the same code, and a job names it in the
stages' ``eval_sets`` option; matched rows become rejects with reason
``eval_contamination``, as DataComp removed test-set copies from its pool.

The hashes and embeddings are made by the stages themselves
(``dedup_phash``'s hash of the image bytes, ``clip_score``'s towers), so an
index and a pool agree on what "the same image" means. It sits here, above
``pipeline``, ``stages`` and ``trainer`` (it reads a labelled set with the
trainer's reader), like the demo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.manifests import layout
from pairforge.pipeline.local import map_stage
from pairforge.stages.base import fresh_rows, object_array
from pairforge.trainer.labelled import read_labelled

INDEX_FILE = "eval_index.json"


def write_eval_index(
    location: str, out: str | Path, clip_model: str | None = None, clip_pretrained: str | None = None,
    algorithm: str = "phash", limit: int = 0, device: str = "cpu",
) -> dict:  # fmt: skip
    """Index the images at ``location`` (an ImageFolder tree, parquet or
    webdataset, labels not needed) into ``out``; with ``clip_pretrained``,
    also their ``img_emb`` by ``clip_score`` with that model."""
    from pairforge.stages.clip_score import ClipScoreStage
    from pairforge.stages.clip_score import Config as ClipConfig
    from pairforge.stages.dedup_phash import Config as PhashConfig
    from pairforge.stages.dedup_phash import PerceptualDedupStage

    data = read_labelled(location, limit=limit, need_labels=False)
    n = len(data)
    rows = fresh_rows(
        [f"{i:08d}" for i in range(n)],
        0,
        image=object_array(data.images),
        caption=object_array(data.captions or [""] * n),
        sha256=object_array([hashlib.sha256(b).hexdigest() for b in data.images]),
    )
    rows = map_stage(PerceptualDedupStage(PhashConfig(algorithm=algorithm)), rows)
    emb = None
    if clip_pretrained:
        stage = ClipScoreStage(ClipConfig(model=clip_model or "pf-tiny", pretrained=clip_pretrained, device=device))
        stage.setup()
        try:
            emb = np.asarray(map_stage(stage, rows)["img_emb"], dtype=np.float16)
        finally:
            stage.teardown()
    ok = np.array([bool(h) for h in rows[algorithm]], dtype=bool)
    out = Path(out)
    shard = layout.shard_parquet(out, 0)
    shard.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "key": [str(k) for k in rows["key"]],
        "source_key": list(data.keys),
        "sha256": [str(s) for s in rows["sha256"]],
        algorithm: [str(h) for h in rows[algorithm]],
    })  # fmt: skip
    tmp = shard.with_name(f".{shard.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(shard)
    if emb is not None:
        npy = layout.embedding_npy(out, "img_emb", 0)
        npy.parent.mkdir(parents=True, exist_ok=True)
        with open(npy.with_name(f".{npy.name}.tmp"), "wb") as f:
            np.save(f, emb)
        npy.with_name(f".{npy.name}.tmp").replace(npy)
    record = {
        "set": str(location),
        "images": n,
        "undecodable": int((~ok).sum()),
        "hash": algorithm,
        "embeddings": {"model": clip_model or "pf-tiny", "pretrained": clip_pretrained} if emb is not None else None,
    }
    layout.atomic_write_bytes(out / INDEX_FILE, json.dumps(record, indent=1).encode())
    return record


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="pairforge eval-index",
        description="Write an evaluation set's SHA-256, pHash and (with --clip-pretrained) image embeddings as a "
        "build the dedup stages read through their eval_sets option: pool rows that match become rejects with "
        "reason eval_contamination (docs/evaluation.md).",
        epilog="examples:\n  pairforge eval-index test/ --out idx/test\n"
        "  pairforge eval-index test/ --out idx/test --clip-pretrained pf-tiny-scorer   # + img_emb for dedup_semantic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("set", help="ImageFolder tree, .parquet file/folder or webdataset shards")
    p.add_argument("--out", required=True, help="the index folder (name it in dedup_*'s eval_sets)")
    p.add_argument("--clip-model", help="clip_score's model in the job (default pf-tiny)")
    p.add_argument("--clip-pretrained", help="clip_score's weights in the job: adds embeddings for dedup_semantic")
    p.add_argument("--limit", type=int, default=0, help="index at most N images")
    p.add_argument("--device", default="cpu", help="where clip_score embeds: cpu (default), auto, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        rec = write_eval_index(
            args.set, args.out, args.clip_model, args.clip_pretrained, limit=args.limit, device=args.device
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"pairforge eval-index: error: {e}", file=sys.stderr)
        return 2
    emb = "with img_emb" if rec["embeddings"] else "no embeddings (dedup_semantic needs --clip-pretrained)"
    print(f"indexed {rec['images']} images of {rec['set']} in {args.out} ({emb}; {rec['undecodable']} undecodable)")
    return 0
