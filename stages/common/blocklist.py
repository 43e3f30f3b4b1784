"""Opt-out and takedown lists, and the matcher that checks rows against them.

A published dataset must be able to drop what it should not hold: LAION-5B
was withdrawn in 2023 and came back as Re-LAION-5B once the rows matching
hash lists from safety organisations were removed, and creators opt their
work out by URL or by domain. :class:`Blocklists` is what checks a row: the
download stage is to call it on each URL before a fetch and on the fetched
bytes' sha256 and pHash (``docs/takedown.md``), and ``pairforge purge``
(``manifests/purge.py``) removes what the lists name from a finished build.

Entry kinds (``blocklist_read`` reads the files): ``url`` (exact, in normal
form), ``prefix`` (a URL prefix), ``domain`` (the host and its subdomains),
``sha256`` (of the downloaded bytes) and ``phash`` (64 bits, matched within
the list's ``max_distance`` bits).

Why the index looks the way it does: lists are large (opt-out registries
hold hundreds of millions of URLs) and rows are many, so entries are kept in
numpy arrays (8-byte keys, sorted) and one Arrow string array, not in Python
sets of strings (1.7x less memory for URLs, ``bench/blocklist.py``; the
strings themselves are most of it), and a batch of rows is looked
up with one ``searchsorted`` per kind. A key is Python's ``hash`` of the
entry's normal form; a hit is confirmed against the entry itself, so a
collision never removes a row. pHash entries are searched by multi-index
hashing (``common.mih``): a query reads the few entries that agree with it
closely on one band of bits, not a share of the whole list.

Pickling: ``hash`` of a string differs between processes, and a large index
is no thing to ship to every task, so a :class:`Blocklists` pickles as its
configs only (a few hundred bytes) and builds its index once per process on
first use (``load()``, or the first match); a stage calls ``load()`` in its
``setup()``. The list files must therefore be readable where it runs (a
shared file system, or files shipped with the job). Built indexes are kept
per process, keyed by the configs and the files' size and mtime, so several
stage instances in one worker share one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pairforge.stages.base import require
from pairforge.stages.common.blocklist_norm import KINDS, normalize_phash, normalize_sha256, normalize_urls, url_host
from pairforge.stages.common.blocklist_read import ListError, read_list
from pairforge.stages.common.mih import PhashIndex

__all__ = ["KINDS", "REASONS", "Blocklists", "ListConfig", "ListError", "Match"]

#: the reject reason a list gives the rows it matches
REASONS = ("opted_out", "blocklisted")
#: the most pHash bits a list may allow to differ (a band index degenerates beyond)
MAX_PHASH_DISTANCE = 16
_STRING_KINDS = ("url", "prefix", "domain", "sha256")


@dataclass(frozen=True)
class ListConfig:
    """One opt-out or takedown list (a download option, and ``pairforge purge --list``)."""

    #: a text file (one entry a line, ``#`` comments), ``.parquet`` or ``.csv`` (with
    #: ``column``); ``.gz`` text is read too
    path: str
    #: what rows and the purge record call it; default the file's stem
    name: str = ""
    #: how unprefixed entries are read: ``auto`` (detected per entry) or one of ``KINDS``;
    #: a ``kind:`` prefix on a line (``domain:example.com``) always wins
    kind: str = "auto"
    #: the column of a parquet or CSV list (default: its only column)
    column: str | None = None
    #: the reject reason of a matched row: ``opted_out`` or ``blocklisted``
    reason: str = "blocklisted"
    #: pHash entries match hashes that differ in at most this many of the 64 bits
    max_distance: int = 0

    def __post_init__(self):
        require(isinstance(self.path, str) and bool(self.path), "path", self.path, "the path of a list file")
        require(isinstance(self.name, str), "name", self.name, "a string")
        require(self.kind in ("auto", *KINDS), "kind", self.kind, f"auto or one of {KINDS}")
        require(self.column is None or (isinstance(self.column, str) and bool(self.column)), "column", self.column,
                "a column name")  # fmt: skip
        require(self.reason in REASONS, "reason", self.reason, f"one of {REASONS}")
        require(
            isinstance(self.max_distance, int) and 0 <= self.max_distance <= MAX_PHASH_DISTANCE,
            "max_distance", self.max_distance, f"an integer in 0..{MAX_PHASH_DISTANCE}",
        )  # fmt: skip

    @property
    def list_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.path).name
        for ext in (".gz", ".parquet", ".csv", ".txt", ".tsv", ".list"):
            stem = stem.removesuffix(ext)
        return stem


@dataclass(frozen=True)
class Match:
    """Why a row goes: ``reason`` (the list's), and ``detail``: ``list``,
    ``line`` (1-based; a table's row), ``entry`` (its normal form), ``kind``,
    and for pHash entries ``distance`` (bits)."""

    reason: str
    detail: dict = field(hash=False)


def as_config(c) -> ListConfig:
    if isinstance(c, ListConfig):
        return c
    if isinstance(c, (str, os.PathLike)):
        return ListConfig(path=str(c))
    if isinstance(c, dict):
        unknown = sorted(set(c) - set(ListConfig.__dataclass_fields__))
        require(not unknown, "lists", unknown, f"only the keys {sorted(ListConfig.__dataclass_fields__)}")
        return ListConfig(**c)
    raise ValueError(f"lists: expected a path or a mapping with a path, got {c!r}")


# ------------------------------------------------------------ the index


class _StringIndex:
    """Entries of one kind from every list, sorted by (key, list, line): the
    first confirmed hit of a key is the earliest list's first line."""

    def __init__(self, values: list[str], lists: list[int], lines: list[int]):
        import pyarrow as pa

        keys = np.fromiter((hash(v) for v in values), dtype=np.int64, count=len(values))
        order = np.lexsort((np.asarray(lines, dtype=np.int64), np.asarray(lists, dtype=np.int32), keys))
        self.keys = keys[order]
        self.lists = np.asarray(lists, dtype=np.int32)[order]
        self.lines = np.asarray(lines, dtype=np.int64)[order]
        self.values = pa.array(values, pa.large_string()).take(pa.array(order))
        self.lengths = np.unique([len(v) for v in values]).tolist() if values else []

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, candidates: list[str]) -> list[int]:
        """Per candidate: the position of its best entry, or -1."""
        import pyarrow as pa

        n = len(self.keys)
        if not n or not candidates:
            return [-1] * len(candidates)
        q = np.fromiter((hash(c) for c in candidates), dtype=np.int64, count=len(candidates))
        lo = np.searchsorted(self.keys, q, side="left")
        hit = np.flatnonzero(self.keys[np.minimum(lo, n - 1)] == q)
        out = [-1] * len(candidates)
        first = self.values.take(pa.array(lo[hit])).to_pylist()  # the hits' first entries, at once
        for i, pos, entry in zip(hit.tolist(), lo[hit].tolist(), first):
            if entry == candidates[i]:  # confirmed: no row goes on a hash collision
                out[i] = pos
                continue
            pos += 1  # rare: another entry under the same key (a collision) may be the one
            while pos < n and self.keys[pos] == q[i]:
                if self.values[pos].as_py() == candidates[i]:
                    out[i] = pos
                    break
                pos += 1
        return out


@dataclass
class _Index:
    infos: list[dict]
    strings: dict[str, _StringIndex]
    #: per list: the index of its pHash entries, or None
    phash: list[PhashIndex | None]


def _build(configs: tuple[ListConfig, ...]) -> _Index:
    vals: dict[str, list[str]] = {k: [] for k in _STRING_KINDS}
    lists: dict[str, list[int]] = {k: [] for k in _STRING_KINDS}
    lines: dict[str, list[int]] = {k: [] for k in _STRING_KINDS}
    infos, phash = [], []
    for i, cfg in enumerate(configs):
        e = read_list(cfg.path, cfg.kind, cfg.column)
        infos.append(
            {
                "name": cfg.list_name, "path": cfg.path, "sha256": e.sha256, "bytes": e.bytes, "kind": cfg.kind,
                "column": cfg.column, "reason": cfg.reason, "max_distance": cfg.max_distance,
                "entries": e.counts(), "skipped": e.skipped,
            }
        )  # fmt: skip
        for k in _STRING_KINDS:
            vals[k] += e.values[k]
            lines[k] += e.lines[k]
            lists[k] += [i] * len(e.values[k])
        hexes = e.values["phash"]
        hashes = np.array([int(h, 16) for h in hexes], dtype=np.uint64)
        phash.append(PhashIndex(hashes, e.lines["phash"], hexes, cfg.max_distance) if hexes else None)
    strings = {k: _StringIndex(vals[k], lists[k], lines[k]) for k in _STRING_KINDS}
    return _Index(infos, strings, phash)


def _fingerprint(configs: tuple[ListConfig, ...]) -> tuple:
    stats = []
    for c in configs:
        try:
            st = os.stat(c.path)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)  # read_list says what is wrong
    return configs, tuple(stats)


@functools.lru_cache(maxsize=4)
def _cached_build(fingerprint: tuple) -> _Index:
    return _build(fingerprint[0])


# ------------------------------------------------------------ the matcher

_Hit = tuple  # (rank, Match): the smallest rank wins
_Hits = dict  # row -> its best _Hit so far


class Blocklists:
    """Lists checked together (in the order given: the first list that
    matches a row names it). See the module doc for how it pickles."""

    def __init__(self, configs: Sequence[ListConfig | dict | str]):
        self.configs = tuple(as_config(c) for c in configs)
        names = [c.list_name for c in self.configs]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "name", dup[0] if dup else None, "a name per list (two lists are called the same)")
        self._index: _Index | None = None

    def __getstate__(self):
        return {"configs": self.configs}

    def __setstate__(self, state):
        self.configs, self._index = state["configs"], None

    def __repr__(self) -> str:
        return f"Blocklists({[c.list_name for c in self.configs]})"

    def load(self) -> Blocklists:
        """Read the lists and build the index now (else at the first match)."""
        if self._index is None:
            self._index = _cached_build(_fingerprint(self.configs))
        return self

    @property
    def lists(self) -> list[dict]:
        """Per list: name, path, sha256 and bytes of the file, kind, column,
        reason, max_distance, entries per kind, skipped lines."""
        return [dict(i) for i in self.load()._index.infos]

    def _match(self, kind: str, pos: int, rank_extra: int = 0, distance: int | None = None, ph=None) -> _Hit:
        idx = self._index
        if kind == "phash":
            li, ph_index = ph
            line, entry = ph_index.lines[pos], ph_index.hexes[pos]
        else:
            s = idx.strings[kind]
            li, line, entry = int(s.lists[pos]), int(s.lines[pos]), s.values[pos].as_py()
        detail = {"list": idx.infos[li]["name"], "line": int(line), "entry": entry, "kind": kind}
        if distance is not None:
            detail["distance"] = int(distance)
        return (li, KINDS.index(kind), rank_extra, int(line)), Match(idx.infos[li]["reason"], detail)

    @staticmethod
    def _keep(hits: _Hits, row: int, hit: tuple) -> None:
        old = hits.get(row)
        if old is None or hit[0] < old[0]:
            hits[row] = hit

    def _url_hits(self, urls: Sequence, hits: _Hits) -> _Hits:
        self.load()
        s = self._index.strings
        if not (len(s["url"]) or len(s["prefix"]) or len(s["domain"])):
            return hits
        normal = normalize_urls(urls)
        rows = [i for i, n in enumerate(normal) if n is not None]
        cands: dict[str, tuple[list[int], list[str]]] = {}
        if len(s["url"]):
            cands["url"] = (rows, [normal[i] for i in rows])
        if len(s["prefix"]):  # every prefix length a list has, up to the URL's length
            owner, text = cands.setdefault("prefix", ([], []))
            for i in rows:
                n = normal[i]
                for cut in s["prefix"].lengths:
                    if cut > len(n):
                        break
                    owner.append(i), text.append(n[:cut])
        if len(s["domain"]):  # the host and every parent domain (an IP address only as it is)
            owner, text = cands.setdefault("domain", ([], []))
            for i in rows:
                host = url_host(normal[i])
                labels = [host] if ":" in host or host[-1:].isdigit() else host.split(".")
                for j in range(len(labels)):
                    owner.append(i), text.append(".".join(labels[j:]))
        for kind, (owner, text) in cands.items():
            for i, c, pos in zip(owner, text, s[kind].find(text)):
                if pos >= 0:  # the longest prefix or host of a list is its most specific entry
                    self._keep(hits, i, self._match(kind, pos, -len(c)))
        return hits

    def _sha_hits(self, values: Sequence, hits: _Hits) -> _Hits:
        self.load()
        norms = [normalize_sha256(v) for v in values]
        sel = [i for i, v in enumerate(norms) if v is not None]
        for i, pos in zip(sel, self._index.strings["sha256"].find([norms[i] for i in sel])):
            if pos >= 0:
                self._keep(hits, i, self._match("sha256", pos))
        return hits

    def _phash_hits(self, values: Sequence, hits: _Hits) -> _Hits:
        self.load()
        hexes = [normalize_phash(v) for v in values]
        sel = np.array([i for i, v in enumerate(hexes) if v is not None], dtype=np.int64)
        if not len(sel):
            return hits
        q = np.array([int(hexes[i], 16) for i in sel], dtype=np.uint64)
        for li, ph in enumerate(self._index.phash):
            if ph is None:
                continue
            best, dist = ph.nearest(q)
            for j in np.flatnonzero(best >= 0).tolist():
                hit = self._match("phash", int(best[j]), int(dist[j]), int(dist[j]), (li, ph))
                self._keep(hits, int(sel[j]), hit)
        return hits

    @staticmethod
    def _best(hits: _Hits, n: int) -> list[Match | None]:
        out: list[Match | None] = [None] * n
        for row, (_, m) in hits.items():
            out[row] = m
        return out

    # one row at a time
    def match_url(self, url: str) -> Match | None:
        """An exact ``url`` entry, else the longest ``prefix``, else the
        longest ``domain`` (of the first list with any)."""
        return self.match_urls([url])[0]

    def match_sha256(self, hex_digest: str) -> Match | None:
        return self.match_sha256s([hex_digest])[0]

    def match_phash(self, hex_hash: str) -> Match | None:
        """The nearest pHash entry within its list's ``max_distance``."""
        return self.match_phashes([hex_hash])[0]

    # a batch at a time (one index lookup per kind): what stages and the purge call
    def match_urls(self, urls: Sequence) -> list[Match | None]:
        return self._best(self._url_hits(urls, {}), len(urls))

    def match_sha256s(self, values: Sequence) -> list[Match | None]:
        return self._best(self._sha_hits(values, {}), len(values))

    def match_phashes(self, values: Sequence) -> list[Match | None]:
        return self._best(self._phash_hits(values, {}), len(values))

    def match_rows(self, urls: Sequence | None = None, sha256s: Sequence | None = None,
                   phashes: Sequence | None = None) -> list[Match | None]:  # fmt: skip
        """Per row, the best match of its URL, its bytes' sha256 and its pHash
        (any may be ``None``: not checked): the first list wins, then the kind
        in :data:`KINDS` order."""
        cols = [c for c in (urls, sha256s, phashes) if c is not None]
        n = len(cols[0]) if cols else 0
        require(all(len(c) == n for c in cols), "rows", [len(c) for c in cols], "columns of one length")
        hits: _Hits = {}
        for col, fn in ((urls, self._url_hits), (sha256s, self._sha_hits), (phashes, self._phash_hits)):
            if col is not None:
                fn(col, hits)
        return self._best(hits, n)
