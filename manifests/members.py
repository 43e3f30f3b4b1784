"""Tar member names: what they are made of, whatever the stages set.

Why on its own: a shard's members are ``{key}.{ext}``, ``{key}.txt``,
``{key}.json`` and ``{key}.{column}.npy``, and ``tarfile.extractall`` (or
any tool that unpacks a shard) writes each one as a path. The key is
pairforge's, but ``image_ext`` may come from a URL list (a job without
``download`` passes the list's own ``image``/``image_ext`` through) or a
stage of one's own: an ``image_ext`` of ``x/../../../../escape`` became a
member written outside the folder it was unpacked in. So the shard writer
(``manifests.shards``) rejects a sample whose names leave these alphabets
(``stage: shard``, ``invalid_member_name``), and the reader rejects an
input row with such an ``image_ext`` (``pipeline.inputlimits``).
"""

from __future__ import annotations

import json
import re

import numpy as np

from pairforge.stages.base import IMAGE_COLUMN, STATUS_FAILED, STATUS_OK, Batch

MEMBER_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
MEMBER_EXT = re.compile(r"[A-Za-z0-9]{1,16}")
#: a ragged column written into the tar (declared by a stage: another name is that stage's bug)
MEMBER_COLUMN = re.compile(r"[A-Za-z0-9_]{1,64}")


def unsafe_names_rejected(rows: Batch) -> Batch:
    """Samples whose tar member names would not be :data:`MEMBER_KEY` ``.``
    :data:`MEMBER_EXT` become rejects of this stage (a URL list's own
    ``image_ext`` in a job without ``download``, a stage's bug)."""
    ok = np.flatnonzero(rows["status"] == STATUS_OK)
    exts = rows["image_ext"] if "image_ext" in rows else None
    images = rows.get(IMAGE_COLUMN)
    bad = [
        i
        for i in ok
        if not MEMBER_KEY.fullmatch(str(rows["key"][i]))
        or (
            exts is not None and images is not None and images[i] is not None and not MEMBER_EXT.fullmatch(str(exts[i]))
        )
    ]
    if not bad:
        return rows
    rows = dict(rows)
    for c in ("status", "stage", "reason", "detail"):
        rows[c] = np.asarray(rows[c], dtype=object).copy()
    for i in bad:
        facts = {"key": str(rows["key"][i]), **({"image_ext": str(exts[i])} if exts is not None else {})}
        rows["status"][i], rows["stage"][i], rows["reason"][i] = STATUS_FAILED, "shard", "invalid_member_name"
        rows["detail"][i] = json.dumps(facts, sort_keys=True)
    return rows
