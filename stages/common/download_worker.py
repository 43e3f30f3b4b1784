"""What one download worker process keeps between batches: the HTTP pool,
the robots.txt client and its policies, the thread pool, the resizer, and a
host gate for when the run gives none (a stage used on its own).

Why per process and per config: stateless stages run as Ray tasks and a
worker process runs many of them; its pools and its parsed robots.txt files
must outlive a task, or every input shard would open new connections and
read every origin's robots.txt again.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

from pairforge.stages.common.blocklist import Blocklists
from pairforge.stages.common.fetch import SafeFetcher, default_user_agent
from pairforge.stages.common.hostgate import HostGate, Limits
from pairforge.stages.common.resize import Resize
from pairforge.stages.common.robots_cache import SharedRobots


class _Worker:
    """What one worker process keeps between batches: the HTTP pool, the
    thread pool and the resizer."""

    def __init__(self, cfg):
        self.fetcher = SafeFetcher(
            allow_networks=cfg.allow_networks,
            timeout=cfg.timeout,
            deadline=cfg.deadline,
            max_redirects=cfg.max_redirects,
            max_bytes=cfg.max_bytes,
            user_agent=cfg.user_agent or default_user_agent(cfg.contact),
            user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=cfg.disallowed_header_directives,
            tdm_reservation=cfg.tdm_reservation,
            pool_size=cfg.thread_count,
        )
        self.resize = Resize(
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=cfg.resize_only_if_bigger,
            upscale_interpolation=cfg.upscale_interpolation,
            downscale_interpolation=cfg.downscale_interpolation,
            encode_format=cfg.encode_format,
            encode_quality=cfg.encode_quality,
            skip_reencode=cfg.skip_reencode,
            min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_image_area,
            max_aspect_ratio=cfg.max_aspect_ratio,
            reduced_decode=cfg.reduced_decode,
        )
        self.threads = ThreadPoolExecutor(cfg.thread_count, thread_name_prefix="pairforge-download")
        # without a run's gate (a stage used on its own): one for this process
        self.gate = HostGate(limits_of(cfg))
        # robots.txt comes through a client of its own: no header opt-outs
        # (sites send X-Robots-Tag: noindex on robots.txt), the same addresses
        robots = SafeFetcher(
            allow_networks=cfg.allow_networks,
            timeout=cfg.timeout,
            deadline=cfg.deadline,
            max_redirects=5,
            user_agent=self.fetcher.agent,
            user_agent_token=self.fetcher.token,
            disallowed_header_directives=(),
            tdm_reservation=False,
            pool_size=4,
        )
        self.robots_get = functools.partial(robots.fetch, truncate=True)
        self.robots: dict = {}  # store -> SharedRobots: policies kept per process
        # opt-out and takedown lists, read once per process
        self.lists = Blocklists(cfg.lists).load() if cfg.lists else None
        self.list_phash = bool(self.lists) and any(i["entries"].get("phash") for i in self.lists.lists)

    def robots_for(self, cfg, store, retry_pass: bool) -> SharedRobots | None:
        if not cfg.robots_txt:
            return None
        key = (str(getattr(store, "root", "")), retry_pass)
        if key not in self.robots:
            self.robots[key] = SharedRobots(
                self.robots_get,
                store,
                token=self.fetcher.token,
                ai_tokens=cfg.robots_ai_tokens,
                max_crawl_delay=cfg.max_crawl_delay,
                refetch_failed=retry_pass,
            )
        return self.robots[key]


def limits_of(cfg) -> Limits:
    return Limits(
        connections=cfg.per_host_connections,
        interval=cfg.per_host_interval,
        max_pause=cfg.max_pause,
        backoff=cfg.backoff,
        failures_down=cfg.host_failures,
        lease_seconds=cfg.deadline + 60.0,
    )


# one per distinct config, for the life of the process
_WORKERS: dict = {}
_WORKERS_LOCK = threading.Lock()


def worker_for(cfg) -> _Worker:
    with _WORKERS_LOCK:
        if cfg not in _WORKERS:
            _WORKERS[cfg] = _Worker(cfg)
        return _WORKERS[cfg]
