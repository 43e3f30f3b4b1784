"""The download stage's options and their checks: what an img2dataset user
sets (size, resize mode, format), who the crawler says it is and how polite it
is (User-Agent, robots.txt, per-host bounds, back-off), the safety caps
against untrusted URL lists, and throughput. Apart from the stage
(:mod:`stages.download`) because they are the crawler's whole user-facing
surface (160 lines of documented options) and the stage's code is the fetch
loop; :mod:`stages.common.download_worker` builds its pools from them.
``stages.download.Config`` is this class.
"""

from __future__ import annotations

from pairforge.stages.base import require
from pairforge.stages.common.blocklist import Blocklists
from pairforge.stages.common.fetch import AddressPolicy
from pairforge.stages.common.phash import ALGORITHMS as HASHES
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
