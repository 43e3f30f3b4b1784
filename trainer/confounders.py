"""A run's confounder side table (``OUT/confounders``, written by the
``confounders`` stage) as per-sample metadata for training and evaluation.

Per anchor key it gives:

* :data:`NEGATIVE_CAPTION`: a caption that does not describe the image, used
  as a hard negative (NegCLIP): the ``word_order`` rewrite when there is one,
  else the ``swap_text`` caption (the nearest other caption).
* :data:`WORD_ORDER_CAPTION`: the rewrite alone (the text half of Winoground).
* :data:`WORD_ORDER_PARTNER`: the sample whose caption is that rewrite: with
  it, the two make a Winoground group (two images, two captions, one
  multiset of words).
* :data:`CONFOUNDER_GROUP`: the group that decides the held-out split, so
  both halves of a pair land on the same side (the stage's ``split`` column
  is the same rule with the default fraction and seed).

Metadata a sample already has (corpora written with ``confounder_of`` /
``confounder_caption``) is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pairforge.trainer.prep import NEGATIVE_CAPTION

#: metadata field naming the group a sample is held out with (``trainer.data``'s split)
CONFOUNDER_GROUP = "confounder_group"
TABLE = "confounders"
WORD_ORDER_CAPTION = "word_order_caption"
WORD_ORDER_PARTNER = "word_order_partner"
#: which kinds give the hard-negative caption, in order of preference
NEGATIVE_KINDS = ("word_order", "swap_text")
COLUMNS = ("anchor_key", "kind", "partner_key", "caption", "group_key")


def table_dirs(shards: Sequence[str]) -> list[Path]:
    """The confounder folders of the runs the shards belong to (``OUT/shards/*.tar`` -> ``OUT/confounders``)."""
    dirs = {Path(s).resolve().parent.parent / TABLE for s in shards}
    return sorted(d for d in dirs if d.is_dir())


def read_table(folder: Path) -> pa.Table:
    """Every file of one table (a file whose partner keys are all null is typed null: promote)."""
    parts = [pq.read_table(p, columns=list(COLUMNS)) for p in sorted(folder.glob("*.parquet"))]
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in COLUMNS})
    return pa.concat_tables(parts, promote_options="default")


@lru_cache(maxsize=4)
def _metadata(dirs: tuple[Path, ...]) -> dict[str, dict]:
    meta: dict[str, dict] = {}
    negatives: dict[str, dict[str, str]] = {}
    for folder in dirs:
        for r in read_table(folder).to_pylist():
            a = r["anchor_key"]
            m = meta.setdefault(a, {})
            if r["group_key"] and r["group_key"] != a:
                m[CONFOUNDER_GROUP] = r["group_key"]
            if r["kind"] == "word_order" and r["caption"]:
                m[WORD_ORDER_CAPTION] = r["caption"]
                if r["partner_key"]:
                    m[WORD_ORDER_PARTNER] = r["partner_key"]
            if r["kind"] in NEGATIVE_KINDS and r["caption"]:
                negatives.setdefault(a, {})[r["kind"]] = r["caption"]
    for a, by_kind in negatives.items():
        meta[a][NEGATIVE_CAPTION] = next(by_kind[k] for k in NEGATIVE_KINDS if k in by_kind)
    return meta


def confounder_metadata(shards: Sequence[str]) -> dict[str, dict]:
    """Key -> metadata fields from the side tables beside ``shards`` (empty without them)."""
    return _metadata(tuple(table_dirs(shards)))


def annotate(parsed: dict, table: dict[str, dict]) -> dict:
    """``parsed`` (see ``trainer.data._parse``) with its key's fields added where absent."""
    extra = table.get(parsed["key"])
    if extra:
        parsed["meta"] = {**extra, **{k: v for k, v in parsed["meta"].items() if v not in (None, "")}}
    return parsed
