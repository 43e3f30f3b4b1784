"""Download, check, resize and re-encode the images of a URL list.

Per batch, the rows wait in per-host queues and start as the run's host
gate grants leases (:mod:`stages.common.frontier`: per-host connections and
spacing across the cluster, ``Retry-After`` and back-off pauses, robots.txt
read once per origin, opt-out and takedown lists checked before any
request; docs/crawling.md). ``thread_count`` threads each take a granted URL
from fetch to encoded output: the fetch (:mod:`stages.common.fetch`: address checks on every
connection and redirect, byte cap, opt-outs), the sha256 of the original
bytes, the header (pixel cap and size checks before any decoding), then one
decode, resize and re-encode with img2dataset's semantics
(:mod:`stages.common.resize`; a JPEG far larger than its target is decoded
at a reduced DCT scale) and, with ``perceptual_hash``, the pHash of the
stored output (:mod:`stages.common.phash`), so ``dedup_phash`` need not go
over the images again. OpenCV releases the GIL for its heavy parts, so the
threads resize in parallel while others wait on the network.

Every row ends ``ok`` with an image, or ``failed`` with one reason:
``invalid_url``, ``blocked_address``, ``timeout``, ``connection_error``,
``truncated`` (the transfer ended before its ``Content-Length``),
``http_<status>``, ``too_many_redirects``, ``too_many_bytes``,
``opted_out`` (``X-Robots-Tag``, ``tdm-reservation``, an AI crawler's
robots.txt group, or a list whose reason it is), ``robots_disallowed``,
``blocklisted`` (a takedown list), ``host_unavailable`` (its host was down),
``decode_error`` (not an image, or a truncated file), ``too_many_pixels``,
``image_too_small``, ``image_area_too_large``, ``aspect_ratio_too_large``,
``internal_error``. Transient failures get the run's deferred retry.
The row's ``detail`` holds the url, the HTTP status, the error and the
sizes behind the decision.

Why 32 threads a task by default, and how many a job on the internet
wants: docs/stages.md (download).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from pairforge.stages.base import (
    STATUS_FAILED,
    Batch,
    Column,
    Resources,
    Stage,
    batch_len,
    object_array,
    reject,
    require,
)
from pairforge.stages.common.address_warning import url_warning
from pairforge.stages.common.blocklist import Blocklists
from pairforge.stages.common.download_worker import limits_of, worker_for
from pairforge.stages.common.fetch import AddressPolicy, Fetched, transient
from pairforge.stages.common.frontier import Frontier
from pairforge.stages.common.phash import ALGORITHMS as HASHES
from pairforge.stages.common.phash import image_hash
from pairforge.stages.common.resize import probe
from pairforge.stages.common.robots import AI_TOKENS, check_token
from pairforge.stages.options import options

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")
INTERPOLATIONS = ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4")


@options
class Config:
    # what img2dataset users expect, with its defaults
    #: side of the stored image in pixels (how it is reached: ``resize_mode``)
    image_size: int = 256
    #: ``no`` (keep the size), ``keep_ratio`` (shorter side to ``image_size``),
    #: ``keep_ratio_largest`` (longer side), ``center_crop`` (square crop) or
    #: ``border`` (fit, then pad to a square): img2dataset's modes
    resize_mode: str = "border"
    #: never upscale: images smaller than the target keep their size
    resize_only_if_bigger: bool = False
    #: OpenCV interpolation when enlarging (``lanczos``, ``cubic``, ``area``, ...)
    upscale_interpolation: str = "lanczos"
    #: OpenCV interpolation when shrinking
    downscale_interpolation: str = "area"
    #: format of the stored image: ``jpg``, ``png`` or ``webp``
    encode_format: str = "jpg"
    #: jpg/webp quality 0-100; png compression 0-9
    encode_quality: int = 95
    #: keep the original bytes when no resize is needed and the format already matches
    skip_reencode: bool = False
    #: decode a JPEG at 1/2, 1/4 or 1/8 scale (in the DCT domain) when that
    #: still leaves >= 2x the output size; ``false`` gives img2dataset's bytes
    reduced_decode: bool = True
    #: ``phash`` or ``dhash``: hash the stored output into the column of that
    #: name, the one ``dedup_phash`` declares (set by the job when a
    #: ``dedup_phash`` stage follows, which then reads it)
    perceptual_hash: str | None = None
    #: fail images whose shorter side is below this (``image_too_small``); 0: no check
    min_image_size: int = 0
    #: fail images of more pixels than this (``image_area_too_large``); null: no limit
    max_image_area: float | None = None
    #: fail images whose longer / shorter side is above this (``aspect_ratio_too_large``); null: no limit
    max_aspect_ratio: float | None = None
    #: seconds to connect and between bytes (img2dataset's meaning)
    timeout: float = 10.0
    #: wall seconds for one attempt, redirects included (slow-drip servers)
    deadline: float = 60.0
    #: extra tries after a transient failure (timeout, broken connection,
    #: 5xx, 429), each after ``backoff * 2**(try-1)`` seconds with jitter,
    #: without holding a thread
    retries: int = 0
    # who we are (docs/crawling.md: why not a browser string)
    #: the whole User-Agent header; default ``pairforge/<version> (+<contact>)``
    user_agent: str | None = None
    #: where site owners reach the people running the crawl (a URL or an
    #: e-mail address), put in the default User-Agent
    contact: str | None = None
    #: the product token robots.txt groups and ``X-Robots-Tag`` directives
    #: are matched with; default: ``user_agent``'s first product name
    #: (``pairforge``)
    user_agent_token: str | None = None
    #: ``X-Robots-Tag`` directives that opt an image out; ``[]`` ignores them
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    #: W3C TDMRep: a ``tdm-reservation: 1`` header opts the image out
    tdm_reservation: bool = True
    #: opt-out and takedown lists (docs/takedown.md): paths, or mappings with
    #: ``path``, ``name``, ``kind``, ``column``, ``reason`` (``opted_out`` or
    #: ``blocklisted``), ``max_distance``; a URL on one ends with the list's
    #: reason unfetched, an image whose sha256 or pHash is on one after its fetch
    lists: tuple = ()
    #: obey robots.txt (RFC 9309), read once per origin for the run
    #: (Scrapy's ROBOTSTXT_OBEY); ``false`` is recorded in the manifest
    robots_txt: bool = True
    #: crawlers whose robots.txt group, when the file has none for us, also
    #: binds us: a URL it disallows ends ``opted_out`` (AI-training opt-outs);
    #: ``[]`` turns that off
    robots_ai_tokens: tuple[str, ...] = AI_TOKENS
    #: the longest robots.txt ``Crawl-delay`` honoured, in seconds
    max_crawl_delay: float = 10.0
    # per-host politeness, for the whole run across the cluster (Scrapy's
    # CONCURRENT_REQUESTS_PER_DOMAIN and DOWNLOAD_DELAY)
    #: requests in flight to one host from every task together (null: no bound)
    per_host_connections: int | None = 8
    #: seconds between two request starts to one host
    per_host_interval: float = 0.0
    #: the longest pause a ``Retry-After`` or a back-off imposes on a host
    max_pause: float = 300.0
    #: seconds of the first back-off (a row's retry; a host after 2 failures in a row)
    backoff: float = 1.0
    #: consecutive transient failures after which a host is down until its
    #: back-off ends: its waiting rows end ``host_unavailable`` at once
    host_failures: int = 5
    #: rows that failed for a transient reason get one more try at the end of
    #: the per-row pass, after their host's pause (the manifest counts them)
    deferred_retry: bool = True
    # safety against untrusted URL lists
    #: redirects followed per URL (every hop is checked against the address policy)
    max_redirects: int = 5
    #: largest body read per image; more fails the row with ``too_many_bytes``
    max_bytes: int = 20_000_000
    #: refused from the header, before any decoding
    max_pixels: int = 80_000_000
    #: CIDRs allowed although not global (e.g. ``["127.0.0.1/32"]`` for a
    #: local test server); loopback, private, link-local, multicast, reserved
    #: and metadata addresses are refused otherwise
    allow_networks: tuple[str, ...] = ()
    # throughput
    #: URLs fetched and resized at once per task (see the module doc)
    thread_count: int = 32
    #: rows per ``process_batch`` call
    batch_size: int = 256
    #: CPUs each download task asks Ray for; below 1 runs more tasks per core
    #: (they spend much of their time waiting on the network)
    num_cpus: float = 1.0

    def __post_init__(self):
        require(self.num_cpus > 0, "num_cpus", self.num_cpus, "> 0")
        require(
            self.perceptual_hash in (None, *HASHES), "perceptual_hash", self.perceptual_hash, "phash, dhash or null"
        )
        require(self.resize_mode in RESIZE_MODES, "resize_mode", self.resize_mode, f"one of {', '.join(RESIZE_MODES)}")
        require(
            self.encode_format in ENCODE_FORMATS,
            "encode_format",
            self.encode_format,
            f"one of {', '.join(ENCODE_FORMATS)}",
        )
        for name in ("upscale_interpolation", "downscale_interpolation"):
            v = getattr(self, name)
            require(v.lower() in INTERPOLATIONS, name, v, f"one of {', '.join(INTERPOLATIONS)}")
        top = 9 if self.encode_format == "png" else 100
        require(
            0 <= self.encode_quality <= top, "encode_quality", self.encode_quality, f"0-{top} for {self.encode_format}"
        )
        for name in ("image_size", "thread_count", "batch_size", "max_bytes", "max_pixels"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("timeout", "deadline"):
            require(getattr(self, name) > 0, name, getattr(self, name), "> 0 seconds")
        for name in ("retries", "max_redirects", "min_image_size", "per_host_interval", "backoff"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        require(
            self.per_host_connections is None or self.per_host_connections >= 1,
            "per_host_connections",
            self.per_host_connections,
            ">= 1 (or null: no bound)",
        )
        require(self.max_pause > 0, "max_pause", self.max_pause, "> 0 seconds")
        require(self.host_failures >= 1, "host_failures", self.host_failures, ">= 1")
        require(self.max_crawl_delay >= 0, "max_crawl_delay", self.max_crawl_delay, ">= 0 seconds")
        for t in self.robots_ai_tokens:
            check_token(t, "robots_ai_tokens")
        for name in ("user_agent", "contact", "user_agent_token"):
            v = getattr(self, name)
            require(v is None or (v.strip() and v.isprintable()), name, v, "printable text or null")
        for name in ("max_image_area", "max_aspect_ratio"):
            v = getattr(self, name)
            require(v is None or v > 0, name, v, "> 0 (or null: no limit)")
        try:
            AddressPolicy(self.allow_networks)
        except ValueError as e:
            raise ValueError(f"allow_networks: {e}") from None
        try:  # as hashable configs: the worker pools are kept per config
            object.__setattr__(self, "lists", Blocklists(self.lists).configs)
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith("lists") else f"lists: {e}") from None


@dataclass
class _Row:
    """One row's outcome, filled by a download thread then the resizer."""

    reason: str = ""
    detail: dict | None = None
    image: bytes | None = None
    width: int = -1
    height: int = -1
    original_width: int = -1
    original_height: int = -1
    sha256: str = ""
    http_status: int = 0
    phash: str = ""


class DownloadStage(Stage):
    name = "download"
    Config = Config
    reject_advice = {
        "blocked_address": "the URLs point at loopback or private addresses, which download refuses; for a server "
        "of your own, allow its network: download's allow_networks: ['127.0.0.0/8']",
        "connection_error": "the hosts refused or dropped the connections: are they up, and reachable from the workers?",
        "timeout": "the hosts did not answer in time: raise download's timeout, or check the workers' network",
        "invalid_url": "the url column does not hold http(s) URLs: check input.url_col",
        "decode_error": "the URLs answer with something that is not an image (an HTML page?)",
        "image_too_small": "the images are smaller than download's min_image_size",
    }

    def __init__(self, config: Config):
        super().__init__(config)
        self._worker = None  # stages.common.download_worker._Worker, per process

    def __getstate__(self) -> dict:
        # the worker's pools stay in the process that made them
        return {**self.__dict__, "_worker": None}

    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus, batch_size=self.config.batch_size)

    def setup(self) -> None:
        self._worker = worker_for(self.config)

    def outputs(self) -> tuple[Column, ...]:
        ints = ("width", "height", "original_width", "original_height")
        return (
            Column("image", "bytes"),
            Column("image_ext", "string"),
            *(Column(c, "scalar", "int64", default=-1) for c in ints),
            Column("sha256", "string"),
            Column("http_status", "scalar", "int64", default=0),
            *((Column(self.hash_column, "string"),) if self.config.perceptual_hash else ()),
        )

    @classmethod
    def give_decoded(cls, config: Config, value: str) -> Config | None:
        """A perceptual hash a later stage wants (``dedup_phash``): taken by
        the threads that encode each stored image, right after encoding it,
        so the stored images are not decoded again for it; unless this job
        has download compute another one already."""
        if value not in HASHES or config.perceptual_hash not in (None, value):
            return None
        return dataclasses.replace(config, perceptual_hash=value)

    @property
    def hash_column(self) -> str:
        # dedup_phash's own column (``phash``/``dhash``): one column per hash in the shards, not
        # two equal ones (an ``image_phash`` from here beside dedup_phash's ``phash``)
        return str(self.config.perceptual_hash)

    def check(self, declared: dict) -> list[str]:
        """Each list file must be there before the run starts (the workers
        read them; a takedown list applied in part is worse than none)."""
        return [
            f"lists[{i}].path: no such file {c.path!r}"
            for i, c in enumerate(self.config.lists)
            if "://" not in c.path and not os.path.isfile(c.path)
        ]

    def input_warnings(self, rows: Batch, where: str) -> list[str]:
        """URLs of literal addresses (and ``localhost``) that ``allow_networks``
        leaves out (:mod:`stages.common.address_warning`)."""
        if "url" not in rows:
            return []
        line = url_warning(list(rows["url"]), self.config.allow_networks, where)
        return [line] if line else []

    def services(self) -> dict:
        return {"host_gate": limits_of(self.config), "work_store": "robots"}

    #: the run's deferred retry pass (rows of a down host wait for its probe)
    retry_pass = False

    def retry_later(self, reason: str) -> bool:
        return self.config.deferred_retry and (transient(reason) or reason == "host_unavailable")

    def for_retry(self) -> Stage:
        again = DeferredDownloadStage(self.config)
        again.__dict__.update({k: v for k, v in self.__dict__.items() if k == "attached"})
        return again

    def process_batch(self, batch: Batch) -> Batch:
        """Every row of ``batch`` through the frontier: rows queued per host
        and started under the run's gate leases."""
        retry_pass = self.retry_pass
        if self._worker is None:
            self.setup()
        w = self._worker
        n = batch_len(batch)
        urls = batch["url"] if "url" in batch else np.full(n, None, dtype=object)
        services = getattr(self, "attached", {})
        frontier = Frontier(
            gate=services.get("host_gate") or w.gate,
            robots=w.robots_for(self.config, services.get("work_store"), retry_pass),
            pool=w.threads,
            threads=self.config.thread_count,
            fetch=w.fetcher.fetch,
            refuse=w.fetcher.refused_host,
            finish=self._finish,
            fail=self._fail,
            retries=self.config.retries,
            backoff=self.config.backoff,
            fail_down_fast=not retry_pass,
            count_rows=not retry_pass,
        )
        decided = None
        if w.lists is not None:  # a URL on a list is never fetched
            decided = [
                None if m is None else self._fail(u, m.reason, {"url": u, **m.detail})
                for u, m in zip(urls, w.lists.match_urls(list(urls)))
            ]
        return self._write(batch, frontier.run(list(urls), decided))

    # ------------------------------------------------------------ per row

    def _finish(self, url, got: Fetched, attempts: int) -> _Row:
        """In a download thread, after the fetch: hash, check the header,
        resize, encode."""
        row = _Row(reason=got.reason, detail=got.detail, http_status=got.http_status)
        if got.reason:
            if attempts > 1:
                row.detail = {**got.detail, "attempts": attempts}
            return row
        data = got.body
        row.sha256 = hashlib.sha256(data).hexdigest()
        listed = self._worker.lists.match_sha256(row.sha256) if self._worker.lists is not None else None
        if listed is not None:
            return self._fail(url, listed.reason, {"url": _text(url), "sha256": row.sha256, **listed.detail})
        head = probe(data, self.config.max_pixels)
        row.original_width, row.original_height = head.width, head.height
        if head.reason:
            row.reason = head.reason
            row.detail = {"url": got.url, "http_status": got.http_status, "bytes": len(data), **(head.detail or {})}
            return row
        out = self._worker.resize(data, head)
        if out.reason:
            row.reason = out.reason
            row.detail = {
                "url": _text(url),
                "http_status": row.http_status,
                "original_width": row.original_width,
                "original_height": row.original_height,
                **(out.detail or {}),
            }
            return row
        row.image = out.image
        row.width, row.height = out.width, out.height
        row.original_width, row.original_height = out.original_width, out.original_height
        if self.config.perceptual_hash:
            row.phash = image_hash(out.image, self.config.perceptual_hash)
        if self._worker.list_phash:  # pHash entries are of stored images, as dedup_phash hashes them
            ph = row.phash if self.config.perceptual_hash == "phash" else image_hash(out.image, "phash")
            listed = self._worker.lists.match_phash(ph)
            if listed is not None:
                return self._fail(url, listed.reason, {"url": _text(url), "phash": ph, **listed.detail})
        return row

    @staticmethod
    def _fail(url, reason: str, detail: dict) -> _Row:
        """A row that ends without a fetch (robots.txt, a list, a down host, a broken thread)."""
        return _Row(reason=reason, detail={**detail, "url": _text(url)} if "url" not in detail else detail)

    # ------------------------------------------------------------ columns

    def _write(self, batch: Batch, rows: list[_Row]) -> Batch:
        ext = self._worker.resize.ext
        batch["image"] = object_array([r.image for r in rows])
        batch["image_ext"] = object_array([ext if r.image is not None else "" for r in rows])
        for col in ("width", "height", "original_width", "original_height", "http_status"):
            batch[col] = np.array([getattr(r, col) for r in rows], dtype=np.int64)
        batch["sha256"] = object_array([r.sha256 for r in rows])
        if self.config.perceptual_hash:
            batch[self.hash_column] = object_array([r.phash for r in rows])
        failed = np.array([bool(r.reason) for r in rows], dtype=bool)
        bad = [r for r in rows if r.reason]
        reject(batch, failed, self.name, [r.reason for r in bad], [r.detail or {} for r in bad], status=STATUS_FAILED)
        return batch


class DeferredDownloadStage(DownloadStage):
    """The download stage in the run's deferred retry pass: rows of a host
    that is down wait for its probe instead of ending at once, and its rows
    are not counted again in the per-host figures. A class of its own, so a
    worker's set-up copy of each is kept apart."""

    retry_pass = True


def _text(url) -> str:
    return url if isinstance(url, str) else repr(url)
