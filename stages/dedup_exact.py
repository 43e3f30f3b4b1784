"""Exact dedup: identical image bytes, identical normalised URL, identical
(image, caption) pair, across the whole dataset.

Each enabled kind gives every row a 128-bit digest (``sha256``: the download
stage's hash of the fetched bytes; ``url``: of :func:`normalize_url`;
``pair``: of sha256 + caption). ``bucket_rows`` emits one row per (row, kind)
with the digest and ``bucket`` = (kind, digest bucket), so a fixed number of
buckets (``buckets`` per kind) carries the shuffle; ``reduce_bucket`` sorts its
rows by digest and keeps those whose digest another row shares; ``combine``
merges digests that share a row (a row can be a URL duplicate of one row and
a byte duplicate of another) into clusters and keeps one survivor per
cluster by the keep policy.

Reasons, most specific first: ``duplicate_pair`` (same bytes and caption as
the survivor), ``duplicate_sha256`` (same bytes), ``duplicate_url``; a row
that reaches the survivor only through other rows gets the reason of its own
strongest link, and its detail says so. With ``prior_build`` set, rows whose
digest is already in that build are dropped as ``duplicate_prior_build``
before the fit. With ``eval_sets`` (indexes written by ``pairforge
eval-index``), rows whose image bytes are those of an evaluation image are
dropped first, as ``eval_contamination`` (DataComp's decontamination).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import ClassVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import numpy as np

from pairforge.stages.base import (
    Batch,
    Column,
    FitResult,
    GlobalStage,
    Learned,
    Resources,
    batch_len,
    concat,
    object_array,
    ok_mask,
    reject,
)
from pairforge.stages.common import dedup as dd
from pairforge.stages.options import options

#: priority order of reasons: the first kind a dropped row shares with its survivor names it
KINDS = ("pair", "sha256", "url")
_COLUMNS = {"sha256": ("sha256",), "url": ("url",), "pair": ("sha256", "caption")}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PATH_SAFE = "/:@!$&'()*+,;=~"
#: a path that quoting would leave as it is (no escapes, only safe characters)
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_.\-/:@!$&'()*+,;=~]*")


@options
class Config:
    #: which identities make two rows duplicates: any of ``sha256``, ``url``, ``pair``
    kinds: tuple[str, ...] = ("sha256", "url", "pair")
    #: which row of a cluster survives: ``largest``, ``first`` or ``clip_score`` (see ``common.dedup.KEEP_POLICIES``)
    keep: str = "largest"
    #: an earlier output folder: rows whose digest is already there are dropped
    prior_build: str | None = None
    #: evaluation-set indexes (``pairforge eval-index``): rows with the bytes of one of
    #: their images are dropped as ``eval_contamination``
    eval_sets: tuple[str, ...] = ()
    #: dedup the run's rows among themselves (the global fit); ``false``: drop only what
    #: ``prior_build`` or ``eval_sets`` hold (decontamination alone, for a baseline recipe)
    within_run: bool = True
    #: shuffle buckets per kind (rows meet by digest inside a bucket)
    buckets: int = 256


class ExactDedupStage(GlobalStage):
    name: ClassVar[str] = "dedup_exact"
    Config = Config
    #: each member to its group's digest (its high 64 bits): a star per (kind, digest)
    #: group; two groups sharing ``hi`` only share a component, and ``combine``
    #: decides by the whole digest
    link_columns = ("hi", "key")

    def __init__(self, config: Config):
        super().__init__(config)
        unknown = [k for k in config.kinds if k not in KINDS]
        if unknown or not config.kinds:
            raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {config.kinds!r}")
        dd.check_keep(config.keep)
        if config.buckets < 1:
            raise ValueError(f"buckets: expected >= 1, got {config.buckets!r}")
        self.kinds = tuple(k for k in KINDS if k in config.kinds)
        self.fit_columns = dd.fit_columns_for(config.keep, *(c for k in self.kinds for c in _COLUMNS[k]))
        self._prior: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._eval: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4096)

    def needs_fit(self) -> bool:
        return self.config.within_run

    def outputs(self) -> tuple[Column, ...]:
        return (Column(dd.DUPLICATE_OF, "string", nullable=True),)

    def check(self, declared: dict) -> list[str]:
        """``prior_build`` is a local earlier run's output folder."""
        return dd.check_prior_build(self.config.prior_build)

    def setup(self) -> None:
        if self.config.prior_build and self._prior is None:
            cols = tuple(dict.fromkeys(["key", *(c for k in self.kinds for c in _COLUMNS[k])]))
            self._prior = _digest_index(dd.read_prior_build(self.config.prior_build, cols), self.kinds)
        if self.config.eval_sets and self._eval is None:  # an evaluation image has bytes, not a URL or caption
            self._eval = _digest_index(dd.read_eval_sets(self.config.eval_sets, ("key", "sha256")), ("sha256",))

    # ------------------------------------------------------------ per row

    def process_batch(self, batch: Batch) -> Batch:
        out = dict(batch)
        out[dd.DUPLICATE_OF] = object_array([""] * batch_len(batch))
        if self.config.eval_sets or self.config.prior_build:
            self.setup()
        if self.config.eval_sets:
            sets = ",".join(self.config.eval_sets)
            self._drop_known(out, self._eval, dd.EVAL_CONTAMINATION, {"sets": sets})
        if self.config.prior_build:
            self._drop_known(out, self._prior, "duplicate_prior_build", {"build": self.config.prior_build})
        return out

    def _drop_known(self, out: Batch, index: dict, reason: str, where: dict) -> None:
        """Reject the rows (still ok) whose digest is in ``index``."""
        n = batch_len(out)
        found = np.zeros(n, dtype=bool)
        kinds = np.full(n, "", dtype=object)
        prior_keys = np.full(n, "", dtype=object)
        alive = ok_mask(out) if "status" in out else np.ones(n, dtype=bool)  # a row the eval sets took stays theirs
        for kind, (vals, keys) in index.items():  # priority order: the first kind found names the row
            digests = digest_column(out, kind)
            have = np.array([d is not None for d in digests], dtype=bool) & ~found & alive
            if not len(vals) or not have.any():
                continue
            idx = np.flatnonzero(have)
            q = np.array([digests[i] for i in idx], dtype="S16")
            pos = np.minimum(np.searchsorted(vals, q), len(vals) - 1)
            hit = vals[pos] == q
            found[idx[hit]] = True
            kinds[idx[hit]] = kind
            prior_keys[idx[hit]] = keys[pos[hit]]
        idx = np.flatnonzero(found)
        details = [{"kind": kinds[i], **where} for i in idx]
        reject(out, found, self.name, reason, details)
        for i in idx:
            out[dd.DUPLICATE_OF][i] = str(prior_keys[i])

    # ---------------------------------------------------------- global fit

    def bucket_rows(self, batch: Batch, learned: Learned) -> Batch:
        prio = dd.row_priority(batch, self.config.keep)
        keys = dd.str_keys(batch["key"])
        parts = []
        for kind in self.kinds:
            digests = digest_column(batch, kind)
            rows = np.array([i for i, d in enumerate(digests) if d is not None], dtype=np.int64)
            hi, lo = _split(b"".join(digests[i] for i in rows))
            ki = KINDS.index(kind)
            parts.append(
                {
                    "bucket": ki * self.config.buckets + (hi % np.uint64(self.config.buckets)).astype(np.int64),
                    "kind": np.full(len(rows), ki, dtype=np.int64),
                    "hi": hi,
                    "lo": lo,
                    "key": keys[rows],
                    "priority": prio[rows],
                }
            )
        return concat(parts) if any(len(p["key"]) for p in parts) else parts[0]

    def reduce_bucket(self, group: Batch, learned: Learned) -> Batch:
        """The rows whose digest another row shares (a group is whole in one
        bucket). ``hi`` -> ``key`` are the stage's links: a star per group
        (``link_columns``), with no column beyond what ``combine`` reads."""
        kind = np.asarray(group["kind"], dtype=np.int64)
        hi, lo = np.asarray(group["hi"], dtype=np.uint64), np.asarray(group["lo"], dtype=np.uint64)
        order = np.lexsort((lo, hi, kind))
        kind, hi, lo = kind[order], hi[order], lo[order]
        run = _runs(kind, hi, lo)
        size = np.bincount(run)
        shared = size[run] > 1
        keep = order[shared]  # rows whose digest is shared
        return {
            "kind": np.asarray(group["kind"], dtype=np.int64)[keep],
            "hi": np.asarray(group["hi"], dtype=np.uint64)[keep],
            "lo": np.asarray(group["lo"], dtype=np.uint64)[keep],
            "key": np.asarray(group["key"])[keep],  # as the key column is (its bytes in the reduced files)
            "priority": np.asarray(group["priority"], dtype=np.float64)[keep],
        }

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        if not reduced or not batch_len(reduced):
            return dd.no_decisions()
        kind = np.asarray(reduced["kind"], dtype=np.int64)
        hi, lo = np.asarray(reduced["hi"], dtype=np.uint64), np.asarray(reduced["lo"], dtype=np.uint64)
        keys = dd.str_keys(reduced["key"])
        prio = np.asarray(reduced["priority"], dtype=np.float64)
        # one id per (kind, digest); star edges: every member to the group's first
        order = np.lexsort((keys, lo, hi, kind))
        run = _runs(kind[order], hi[order], lo[order])
        gid = np.empty(len(order), dtype=np.int64)
        gid[order] = run
        first = order[np.r_[True, run[1:] != run[:-1]]]
        h = first[gid]
        c = dd.cluster_pairs(keys[h], keys, prio[h], prio)
        node = c["b"]  # the node of each reduced row
        surv = c["survivor"][node]
        # does the row's group also hold its survivor?
        width = np.int64(len(c["key"]))
        member = np.sort(gid * width + node)
        probe = gid * width + surv
        pos = np.minimum(np.searchsorted(member, probe), len(member) - 1)
        with_surv = member[pos] == probe
        bits = np.left_shift(1, kind).astype(np.int64)
        shared = np.zeros(len(c["key"]), dtype=np.int64)
        linked = np.zeros(len(c["key"]), dtype=np.int64)
        np.bitwise_or.at(shared, node[with_surv], bits[with_surv])
        np.bitwise_or.at(linked, node, bits)
        drop = np.flatnonzero(c["dropped"])
        memo: dict[tuple[int, int, int], tuple[str, str]] = {}  # few distinct combinations
        reasons, details = [], []
        for combo in zip(shared[drop].tolist(), linked[drop].tolist(), c["size"][drop].tolist()):
            if combo not in memo:
                memo[combo] = _reason_detail(*combo)
            reasons.append(memo[combo][0])
            details.append(memo[combo][1])
        return dd.decisions(c["key"][drop], reasons, details, c["key"][c["survivor"][drop]])


def _digest_index(rows: Batch, kinds: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kind, the sorted digests of ``rows`` and their keys (equal digests: the smallest key first)."""
    index = {}
    for kind in kinds:
        digests = digest_column(rows, kind)
        have = np.array([d is not None for d in digests], dtype=bool)
        vals = np.array([d for d in digests if d is not None], dtype="S16")
        keys = dd.str_keys(rows["key"][have])
        order = np.lexsort((keys, vals))
        index[kind] = (vals[order], keys[order])
    return index


def _split(digests: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated 16-byte digests as two uint64 columns (high, low)."""
    both = np.frombuffer(digests, dtype=">u8").astype(np.uint64).reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


def _runs(kind: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Run ids of equal (kind, hi, lo) in arrays sorted by them."""
    if not len(kind):
        return np.zeros(0, dtype=np.int64)
    new = np.r_[True, (kind[1:] != kind[:-1]) | (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])]
    return np.cumsum(new) - 1


def _reason_detail(shared: int, linked: int, size: int) -> tuple[str, str]:
    direct = _kinds_of(shared)
    detail = {"match": direct, "cluster_size": size, "distance": 0}
    if not direct:
        detail["linked_by"] = _kinds_of(linked)
    return "duplicate_" + (direct or detail["linked_by"])[0], json.dumps(detail, sort_keys=True)


def _kinds_of(mask: int) -> list[str]:
    return [k for j, k in enumerate(KINDS) if mask >> j & 1]


def digest_column(batch: Batch, kind: str) -> list[bytes | None]:
    """The 16-byte identity of each row for ``kind``; ``None`` where the row
    has no such identity (no hash, empty URL, missing caption)."""
    n = batch_len(batch)
    if kind == "sha256":
        return [_sha_prefix(s) for s in batch["sha256"]]
    if kind == "url":
        return [_blake(normalize_url(u)) if isinstance(u, str) and u.strip() else None for u in batch["url"]]
    out: list[bytes | None] = []
    for i in range(n):
        s, cap = batch["sha256"][i], batch["caption"][i]
        ok = _sha_prefix(s) is not None and isinstance(cap, str)
        out.append(_blake(f"{str(s).lower()}\n{cap.strip()}") if ok else None)
    return out


def _sha_prefix(s) -> bytes | None:
    if not isinstance(s, str) or len(s) < 32:
        return None
    try:
        return bytes.fromhex(s[:32])
    except ValueError:
        return None


def _blake(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def normalize_url(url: str) -> str:
    """The form two URLs of the same resource share: surrounding blanks,
    fragment, default port, ``utm_*`` tracking parameters and the http/https
    difference removed; scheme and host lower-cased; percent-encoding made
    canonical; query parameters sorted; an empty path becomes ``/``.
    A URL that cannot be parsed is returned stripped."""
    u = url.strip()
    try:
        p = urlsplit(u)
        port = p.port
    except ValueError:
        return u
    scheme = p.scheme.lower()
    host = (p.hostname or "").rstrip(".")
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    if scheme in _DEFAULT_PORTS:
        scheme = "http(s)"
    path = p.path if _PLAIN_PATH.fullmatch(p.path) else quote(unquote(p.path), safe=_PATH_SAFE)
    path = path or "/"
    query = (
        sorted((k, v) for k, v in parse_qsl(p.query, keep_blank_values=True) if not k.lower().startswith("utm_"))
        if p.query
        else ()
    )
    return f"{scheme}://{netloc}{path}" + (f"?{urlencode(query)}" if query else "")
