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
wants: docs/stages.md (download). The options and their checks:
:mod:`stages.common.download_options`.
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
)
from pairforge.stages.common.address_warning import url_warning
from pairforge.stages.common.download_options import Config
from pairforge.stages.common.download_worker import limits_of, worker_for
from pairforge.stages.common.fetch import Fetched, transient
from pairforge.stages.common.frontier import Frontier
from pairforge.stages.common.phash import ALGORITHMS as HASHES
from pairforge.stages.common.phash import image_hash
from pairforge.stages.common.resize import probe


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
