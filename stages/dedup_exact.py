"""Exact dedup: identical image bytes, identical normalised URL, identical
(image, caption) pair, across the whole dataset.

Each enabled kind gives every row a 128-bit digest (``sha256``: the download
stage's hash of the fetched bytes; ``url``: of :func:`normalize_url`;
``pair``: of sha256 + caption). ``candidates`` emits one row per (row, kind)
with ``group = "<kind>:<digest>"``; ``reduce_group`` keeps groups of two or
more rows; ``resolve`` merges groups that share a row (a row can be a URL
duplicate of one row and a byte duplicate of another) into clusters and keeps
one survivor per cluster by the keep policy.

Reasons, most specific first: ``duplicate_pair`` (same bytes and caption as
the survivor), ``duplicate_sha256`` (same bytes), ``duplicate_url``; a row
that reaches the survivor only through other rows gets the reason of its own
strongest link, and its detail says so. With ``prior_build`` set, rows whose
digest is already in that build are dropped as ``duplicate_prior_build``
before the fit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import numpy as np

from stages import _dedup as dd
from stages.base import Batch, GlobalStage, Resources, batch_len, object_array, reject

#: priority order of reasons: the first kind a dropped row shares with its survivor names it
KINDS = ("pair", "sha256", "url")
_COLUMNS = {"sha256": ("sha256",), "url": ("url",), "pair": ("sha256", "caption")}
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Config:
    #: which identities make two rows duplicates: any of ``sha256``, ``url``, ``pair``
    kinds: tuple[str, ...] = ("sha256", "url", "pair")
    #: which row of a cluster survives: ``largest`` or ``first`` (see ``_dedup.KEEP_POLICIES``)
    keep: str = "largest"
    #: an earlier output folder: rows whose digest is already there are dropped
    prior_build: str | None = None


class ExactDedupStage(GlobalStage):
    name: ClassVar[str] = "dedup_exact"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        unknown = [k for k in config.kinds if k not in KINDS]
        if unknown or not config.kinds:
            raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {config.kinds!r}")
        dd.check_keep(config.keep)
        self.kinds = tuple(k for k in KINDS if k in config.kinds)
        self.fit_columns = dd.fit_columns_for(config.keep, *(c for k in self.kinds for c in _COLUMNS[k]))
        self._prior: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def resources(self) -> Resources:
        return Resources(num_cpus=1, batch_size=4096)

    def output_defaults(self) -> dict[str, Any]:
        return {dd.DUPLICATE_OF: ""}

    def setup(self) -> None:
        if self.config.prior_build and self._prior is None:
            cols = tuple(dict.fromkeys(["key", *(c for k in self.kinds for c in _COLUMNS[k])]))
            prior = dd.read_prior_build(self.config.prior_build, cols)
            self._prior = {}
            for kind in self.kinds:
                digests = digest_column(prior, kind)
                have = np.array([d is not None for d in digests], dtype=bool)
                vals = np.array([d for d in digests if d is not None], dtype="S16")
                keys = dd.str_keys(prior["key"][have])
                order = np.lexsort((keys, vals))  # equal digests: the smallest key first
                self._prior[kind] = (vals[order], keys[order])

    # ------------------------------------------------------------ per row

    def process_batch(self, batch: Batch) -> Batch:
        out = dict(batch)
        out[dd.DUPLICATE_OF] = object_array([""] * batch_len(batch))
        if self.config.prior_build:
            self.setup()
            self._drop_prior(out)
        return out

    def _drop_prior(self, out: Batch) -> None:
        n = batch_len(out)
        found = np.zeros(n, dtype=bool)
        kinds = np.full(n, "", dtype=object)
        prior_keys = np.full(n, "", dtype=object)
        for kind in self.kinds:  # priority order: the first kind found names the row
            vals, keys = self._prior[kind]
            digests = digest_column(out, kind)
            have = np.array([d is not None for d in digests], dtype=bool) & ~found
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
        details = [{"kind": kinds[i], "build": self.config.prior_build} for i in idx]
        reject(out, found, self.name, "duplicate_prior_build", details)
        for i in idx:
            out[dd.DUPLICATE_OF][i] = str(prior_keys[i])

    # ---------------------------------------------------------- global fit

    def candidates(self, batch: Batch) -> Batch:
        area = dd.row_area(batch, self.config.keep)
        groups, rows, kinds = [], [], []
        for kind in self.kinds:
            for i, d in enumerate(digest_column(batch, kind)):
                if d is not None:
                    groups.append(f"{kind}:{d.hex()}")
                    rows.append(i)
                    kinds.append(kind)
        rows = np.asarray(rows, dtype=np.int64)
        return {
            "group": object_array(groups),
            "key": object_array([str(k) for k in batch["key"][rows]]),
            "area": area[rows],
            "kind": object_array(kinds),
        }

    def reduce_group(self, group: Batch) -> Batch:
        keys, first = np.unique(dd.str_keys(group["key"]), return_index=True)
        if len(keys) < 2:
            first = first[:0]
        return {
            "group": object_array([str(g) for g in np.asarray(group["group"])[first]]),
            "key": object_array([str(k) for k in keys[: len(first)]]),
            "area": np.asarray(group["area"], dtype=np.int64)[first],
            "kind": object_array([str(k) for k in np.asarray(group["kind"])[first]]),
        }

    def resolve(self, reduced: Batch) -> Batch:
        if not reduced or not batch_len(reduced):
            return dd.no_decisions()
        groups = dd.str_keys(reduced["group"])
        keys = dd.str_keys(reduced["key"])
        area = np.asarray(reduced["area"], dtype=np.int64)
        gid = np.unique(groups, return_inverse=True)[1]
        # star edges: every member to its group's first member (smallest key)
        order = np.lexsort((keys, gid))
        starts = order[np.r_[True, gid[order][1:] != gid[order][:-1]]]
        head = np.empty(gid.max() + 1, dtype=np.int64)
        head[gid[starts]] = starts
        h = head[gid]
        c = dd.cluster_pairs(keys[h], keys, area[h], area)
        node = c["b"]  # the node of each reduced row
        surv = c["survivor"][node]
        # does the row's group also hold its survivor?
        width = np.int64(len(c["key"]))
        member = np.sort(gid * width + node)
        probe = gid * width + surv
        pos = np.minimum(np.searchsorted(member, probe), len(member) - 1)
        with_surv = member[pos] == probe
        bits = np.array([1 << KINDS.index(str(k)) for k in reduced["kind"]], dtype=np.int64)
        shared = np.zeros(len(c["key"]), dtype=np.int64)
        linked = np.zeros(len(c["key"]), dtype=np.int64)
        np.bitwise_or.at(shared, node[with_surv], bits[with_surv])
        np.bitwise_or.at(linked, node, bits)
        drop = np.flatnonzero(c["dropped"])
        reasons, details = [], []
        for i in drop:
            direct = _kinds_of(shared[i])
            detail = {"match": direct, "cluster_size": int(c["size"][i]), "distance": 0}
            if not direct:
                detail["linked_by"] = _kinds_of(linked[i])
            reasons.append("duplicate_" + (direct or detail["linked_by"])[0])
            details.append(detail)
        return dd.decisions(c["key"][drop], reasons, details, c["key"][c["survivor"][drop]])


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
    path = quote(unquote(p.path), safe="/:@!$&'()*+,;=~") or "/"
    query = sorted((k, v) for k, v in parse_qsl(p.query, keep_blank_values=True) if not k.lower().startswith("utm_"))
    return f"{scheme}://{netloc}{path}" + (f"?{urlencode(query)}" if query else "")
