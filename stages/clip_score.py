"""Score every image-caption pair with an open_clip model and keep the
aligned ones.

Per row the stage adds ``clip_score`` (cosine similarity of the normalised
image and text embeddings, float32) and the embeddings ``img_emb`` and
``text_emb`` (float16, the shard writer stores them per shard in
clip-retrieval's layout). Two filters, usable together:

* ``threshold``: drop rows with ``clip_score < threshold`` right in
  ``process_batch`` (LAION-5B used 0.28 with OpenAI ViT-B/32 for English,
  0.26 with multilingual CLIP for the rest).
* ``top_fraction``: keep the best ``top_fraction`` of the rows still alive,
  over the whole dataset (DataComp's "CLIP score top 30%" baseline). This
  needs the global score distribution, see *The top-fraction fit* below.

Every reject's detail carries the score, the threshold and the model id
(``name``, ``pretrained``, the checkpoint's ``sha256``). Rows whose image
cannot be decoded fail with ``decode_error``.

Images: ``image_decode: pil`` is open_clip's own transform on PIL images
(decoded on ``decode_threads`` threads); ``nvjpeg`` decodes JPEGs in batched
``torchvision.io.decode_jpeg`` calls on the GPU (its hardware JPEG decoder
for baseline JPEGs) and resizes there (antialiased bicubic: within a few 1e-3
of PIL's pixels); other formats go through PIL. ``libjpeg`` decodes on
``decode_threads`` CPU threads (the same pixels as ``nvjpeg`` gives on a CPU)
and resizes on the device. ``auto`` is ``nvjpeg`` on a GPU, ``pil`` on the
CPU. On a GPU the towers run under bf16 autocast; on the CPU in plain fp32.

On a GPU (``stages.common.clip.CudaTowers``) a batch is decoded in chunks of
:data:`DECODE_ROWS` rows on a high-priority stream of the calling thread, and
both towers of each chunk are queued on one tower stream without waiting, so
the next chunk decodes while the GPU runs this one's towers; the host waits
once per batch (the towers' host-device copies go through pinned buffers). Every forward
pass sees exactly ``micro_batch`` rows and replays a CUDA graph captured from
the eager towers (``cuda_graphs``: the same kernels, scores identical to
eager; kept only if a check at set-up agrees within 1e-3). ``compile: true``
adds ``torch.compile`` (faster towers, ~25 s more start-up per actor; kept
only within 1e-3 of eager, which ViT-B-32 in bf16 missed, 2.3e-3). Under Ray
an actor scores ``actor_threads`` batches at once on threads: one decodes
while another's towers run.

``cpu_prefetch: true`` tokenises in plain Ray CPU tasks ahead of the actors
(:meth:`cpu_prepare`), and unless the actors decode with nvJPEG also decodes
(libjpeg), resizes and crops there. With nvJPEG the object store carries
only the encoded bytes and the tokens to the GPU actors. Measured on one
H200 with 16 cores, ViT-B-32 bf16, 256 px JPEGs (``bench/clip_score.py``,
median of 3): 2 actors x 2 threads per GPU with nvJPEG and prefetched tokens
9,400 pairs/s, 1 actor 8,600 (towers on ready tensors: 12,800 eager); CPU
decoding in the prefetch tasks instead, 4,800 (CPU-bound).

The top-fraction fit
--------------------
Rows are ranked by (score desc, key asc): ties are broken by key, so exactly
``k = round(top_fraction * N)`` rows are kept and the result does not depend
on how rows were batched. The fit never brings per-row data for the whole
dataset into one place:

1. ``learn(sample)`` finds a score window that holds the cut with a wide
   margin (from a hash sample's quantiles).
2. ``bucket_rows`` emits a histogram (8192 bins over [-1, 1]) of its shard,
   plus ``(key, score)`` for the rows inside the window only.
3. ``reduce_bucket`` sums the histogram bins; window rows pass through.
4. ``combine`` finds the bin holding the k-th row from the histogram and the
   exact cut row among the window rows of that bin. It keeps the cut on the
   stage and returns no key-named decisions.
5. ``decide_rows(rows)`` runs per shard after the fit: a row is kept iff it
   ranks at or above the cut (a rule per shard replaces a 70M-entry
   decision list at 100M rows and DataComp's 30%).

If the sample misled ``learn`` (the cut fell outside the window), combine
cuts at the bin's lower edge instead (keeping at most one bin's rows too
many) and says so in the detail (``"exact": false``) and the log.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from stages.base import (
    SCRATCH_PREFIX,
    STATUS_FAILED,
    Batch,
    Column,
    FitResult,
    GlobalStage,
    Resources,
    batch_len,
    object_array,
    reject,
)
from stages.common import clip as _clip

PIXELS, PIXEL_ERRORS, TOKENS = (SCRATCH_PREFIX + c for c in ("clip_pixels", "clip_pixel_errors", "clip_tokens"))

log = logging.getLogger(__name__)

#: rows decoded per nvJPEG call on a GPU: the towers of one chunk run while the next decodes
DECODE_ROWS = 512
#: histogram bins over [-1, 1] for the top-fraction fit
BINS = 8192
#: prepare's window: this many standard deviations of a sample quantile,
#: plus this share of the sample's rows, either side of the estimated cut
WINDOW_SIGMAS = 6.0
WINDOW_SHARE = 0.01


@dataclass(frozen=True)
class Config:
    #: a local checkpoint file, an open_clip tag (``laion2b_s34b_b79k``; needs
    #: a network on the workers) or ``random`` (random weights: benchmarks only)
    pretrained: str
    #: any open_clip architecture, or ``pf-tiny`` (``stages/model_configs``)
    model: str = "ViT-B-32"
    #: ``auto`` (a GPU when the worker has one), ``cpu``, ``cuda``, ``cuda:N``
    device: str = "auto"
    #: GPUs each actor asks Ray for; 0.5 puts two actors on one GPU
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    #: actors in the pool (min, max)
    concurrency: tuple[int, int] = (1, 1)
    batch_size: int = 512
    #: rows per forward pass (fixed, so a row's score does not depend on its batch)
    micro_batch: int = 128
    #: ``auto``, ``pil``, ``nvjpeg`` or ``libjpeg`` (see the module doc)
    image_decode: str = "auto"
    #: threads for PIL decoding; 0: ``num_cpus``
    decode_threads: int = 0
    #: tokenise in CPU tasks ahead of the actors and, unless the actors decode
    #: with nvJPEG, decode (libjpeg), resize and crop there too; in process:
    #: the same functions, before ``process_batch``
    cpu_prefetch: bool = False
    #: on a GPU, replay the towers from CUDA graphs captured at ``micro_batch``
    #: (kept only where they match the eager towers within 1e-3; the same kernels)
    cuda_graphs: bool = True
    #: on a GPU, ``torch.compile`` the towers first (~25 s more start-up per
    #: actor; kept only where they match the eager towers within 1e-3)
    compile: bool = False
    #: batches one GPU actor scores at once, on threads: one decodes while
    #: another's towers run
    actor_threads: int = 2
    #: drop rows with ``clip_score`` below this
    threshold: float | None = None
    #: keep this share of the alive rows, ranked by score over the whole dataset
    top_fraction: float | None = None
    #: ``auto``: bf16 autocast on a GPU, fp32 on the CPU; ``fp32``: always fp32
    precision: str = "auto"

    def __post_init__(self):
        if self.image_decode not in _clip.DECODERS:
            raise ValueError(f"image_decode: expected one of {_clip.DECODERS}, got {self.image_decode!r}")
        if self.precision not in ("auto", "fp32"):
            raise ValueError(f"precision: expected 'auto' or 'fp32', got {self.precision!r}")
        if self.top_fraction is not None and not 0.0 <= self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction: expected a share in [0, 1], got {self.top_fraction}")
        for name, ok, want in (
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("micro_batch", self.micro_batch >= 1, ">= 1"),
            ("num_gpus", self.num_gpus >= 0, ">= 0"),
            ("num_cpus", self.num_cpus > 0, "> 0"),
            ("actor_threads", self.actor_threads >= 1, ">= 1"),
            ("concurrency", 1 <= self.concurrency[0] <= self.concurrency[1], "[min, max] with 1 <= min <= max"),
            ("threshold", self.threshold is None or -1.0 <= self.threshold <= 1.0, "a cosine in [-1, 1]"),
        ):
            if not ok:
                raise ValueError(f"{name}: expected {want}, got {getattr(self, name)!r}")


class ClipScoreStage(GlobalStage):
    name: ClassVar[str] = "clip_score"
    runs_on_actors: ClassVar[bool] = True
    fit_columns: ClassVar[tuple[str, ...]] = ("key", "clip_score")
    sample_rows: ClassVar[int] = 100_000
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        self._loaded: _clip.Loaded | None = None
        self._towers: _clip.CudaTowers | None = None
        self._identity: dict | None = None
        self._window: tuple[int, int] | None = None  # histogram bins [lo, hi] learn chose
        self._cut: dict | None = None  # what combine found; decide_rows applies it
        self._emb_dim: int | None = None

    def __getstate__(self):  # ship config and fit state, never the model
        state = dict(self.__dict__)
        state["_loaded"] = state["_towers"] = None
        return state

    def resources(self) -> Resources:
        c = self.config
        return Resources(num_cpus=c.num_cpus, num_gpus=c.num_gpus, batch_size=c.batch_size, concurrency=c.concurrency)

    def needs_fit(self) -> bool:
        """Only the top-fraction filter needs the global pass."""
        return self.config.top_fraction is not None

    def inputs(self) -> tuple[str, ...]:
        return ("image", "caption")

    def outputs(self) -> tuple[Column, ...]:
        dim = self._dim()
        return (
            Column("clip_score", "scalar", "float32", default=np.float32("nan")),
            Column("img_emb", "vector", "float16", (dim,), store="embeddings"),
            Column("text_emb", "vector", "float16", (dim,), store="embeddings"),
        )

    def _dim(self) -> int:
        if self._emb_dim is None:
            self._emb_dim = _clip.embed_dim(self.config.model)
        return self._emb_dim or 0

    def model_id(self) -> dict:
        """Name, pretrained and checkpoint sha256 of the scorer."""
        if self._loaded is not None:
            return self._loaded.identity
        if self._identity is None:
            self._identity = _clip.model_identity(self.config.model, self.config.pretrained)
        return self._identity

    # ------------------------------------------------------------ per row

    def setup(self) -> None:
        if self._loaded is None:
            import torch

            c = self.config
            device = _clip.pick_device(c.device)
            if device == "cpu":
                torch.set_num_threads(max(1, int(c.num_cpus)))
            self._loaded = ld = _clip.load(c.model, c.pretrained, device)
            if device.startswith("cuda") and c.precision == "auto":
                self._towers = _clip.CudaTowers(ld.model, ld.cfg, device, c.micro_batch, ld.tokenizer.context_length,
                                                graphs=c.cuda_graphs, compile=c.compile)  # fmt: skip
                log.info("clip_score: towers %s (%s)", self._towers.mode, self._towers.check)

    def teardown(self) -> None:
        self._loaded = self._towers = None

    def _on_gpu(self) -> bool:
        """Whether the actors run on a GPU, as the config says (the driver and
        the prepare tasks may have none)."""
        return self.config.num_gpus > 0 or self.config.device.startswith("cuda")

    def _nvjpeg(self) -> bool:
        """Whether the actors decode with nvJPEG (then prepare only tokenises)."""
        d = self.config.image_decode
        return d == "nvjpeg" or (d == "auto" and self._on_gpu())

    def has_cpu_prepare(self) -> bool:
        return self.config.cpu_prefetch

    def actor_calls(self) -> int:
        """Batches an actor works on at once, on threads (read by the Ray plan)."""
        return self.config.actor_threads if self._on_gpu() else 1

    def cpu_prepare_memory(self) -> int:
        """Bytes of memory a ``cpu_prepare`` task needs (read by the Ray plan):
        the worker with torch imported, plus per row the decoded image, its
        float copy for the resize and the crop when it decodes."""
        # measured (Ray's max USS per task) on 256 px JPEGs at batch 2048: 1.1 GiB
        # tokenising, 5.1 GiB decoding and resizing too
        per_row = 96 << 10 if self._nvjpeg() else 3 << 20
        return (5 << 28) + self.config.batch_size * per_row

    def cpu_prepare(self, batch: Batch) -> Batch:
        """Tokens, and unless the actors decode with nvJPEG, libjpeg/PIL
        decode, open_clip's resize and centre crop (uint8), per row; the
        actor normalises and runs the towers."""
        captions = [c if isinstance(c, str) else "" for c in batch["caption"]]
        out = dict(batch)
        out[TOKENS] = _clip.tokenizer(self.config.model)(captions).numpy()
        if self._nvjpeg():
            return out
        n = batch_len(batch)
        cfg = _clip.pixel_cfg(self.config.model)
        th, tw = _clip.size_hw(cfg["size"])
        images = [b if isinstance(b, (bytes, bytearray)) else b"" for b in batch["image"]]
        tensors, errors = _clip.decode_cpu(images, "cpu", threads=1)
        pixels = np.zeros((n, 3, th, tw), dtype=np.uint8)
        good = [i for i, t in enumerate(tensors) if t is not None]
        if good:
            pixels[good] = _clip.resize_crop([tensors[i] for i in good], cfg).numpy()
        # "" for no error: a column of only None would not survive Ray's Arrow blocks as None
        out[PIXELS], out[PIXEL_ERRORS] = pixels, object_array([e or "" for e in errors])
        return out

    def process_batch(self, batch: Batch) -> Batch:
        self.setup()
        out = dict(batch)
        prefetched = None
        if TOKENS in batch:
            errors = [str(e) or None for e in batch[PIXEL_ERRORS]] if PIXELS in batch else None
            prefetched = (batch.get(PIXELS), errors, batch[TOKENS])
        scores, img, txt, errors = self.score(list(batch["image"]), list(batch["caption"]), prefetched)
        out["clip_score"] = scores
        out["img_emb"] = img
        out["text_emb"] = txt
        failed = np.array([e is not None for e in errors], dtype=bool)
        model = self.model_id()
        reject(
            out,
            failed,
            self.name,
            "decode_error",
            [{"error": errors[i], "model": model} for i in np.flatnonzero(failed)],
            status=STATUS_FAILED,
        )
        t = self.config.threshold
        if t is not None:
            low = ~failed & (scores < t)
            details = [{"clip_score": scores[i], "threshold": t, "model": model} for i in np.flatnonzero(low)]
            reject(out, low, self.name, "clip_score_below_threshold", details)
        return out

    def score(self, images: list, captions: list, prefetched=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Scores (float32; NaN where the image failed), image and text
        embeddings (float16; zeros where it failed) and per-row decode errors.
        ``prefetched``: (uint8 pixels or None, their decode errors or None,
        tokens) from :meth:`cpu_prepare`."""
        import torch

        ld = self._loaded
        assert ld is not None, "setup() first"
        c = self.config
        on_gpu = ld.device.startswith("cuda")
        bf16 = on_gpu and c.precision == "auto"
        decoder = c.image_decode if c.image_decode != "auto" else ("nvjpeg" if on_gpu else "pil")
        n = len(images)
        images = [b if isinstance(b, (bytes, bytearray)) else b"" for b in images]
        threads = c.decode_threads or max(1, int(c.num_cpus))
        pix, errors, tok = prefetched if prefetched is not None else (None, None, None)
        if pix is not None:
            # prefetch read the model's config without its weights; a pretrained tag can change it
            have = _clip.pixel_cfg(self.config.model)
            if _clip.size_hw(have["size"]) != _clip.size_hw(ld.cfg["size"]) or any(
                have[k] != ld.cfg.get(k) for k in ("interpolation", "resize_mode")
            ):
                raise RuntimeError(f"clip_score: prefetched pixels follow {have}, the loaded model wants {ld.cfg}")
        if tok is not None:
            tokens_job = None
        else:
            # tokenising is pure Python: on a thread of its own it overlaps the
            # image work (decoders and kernel launches release the GIL)
            tokens_job = _clip.thread_pool(1).submit(
                ld.tokenizer, [cap if isinstance(cap, str) else "" for cap in captions]
            )

        def tokens():
            return torch.from_numpy(np.asarray(tok)) if tokens_job is None else tokens_job.result()

        if self._towers is not None and (pix is not None or decoder != "pil"):
            return self._score_cuda(images, pix, errors, tokens, decoder, threads)

        def transform(x):
            return _clip.normalize(x, ld.cfg)

        if pix is not None:
            good = [i for i, e in enumerate(errors) if e is None]
            pixels = torch.from_numpy(np.ascontiguousarray(pix[good])) if good else None
        elif decoder in ("nvjpeg", "libjpeg"):
            if decoder == "nvjpeg":
                tensors, errors = _clip.decode_tensors(images, ld.device)
            else:
                tensors, errors = _clip.decode_cpu(images, ld.device, threads)
            good = [i for i, t in enumerate(tensors) if t is not None]
            pixels = _clip.resize_crop([tensors[i] for i in good], ld.cfg) if good else None
        else:
            tensors, errors = _clip.decode_pil(images, ld.preprocess, threads)
            good = [i for i, t in enumerate(tensors) if t is not None]
            pixels = torch.stack([tensors[i] for i in good]) if good else None
            transform = None
        # the image tower is queued first: on a GPU it runs while the text is tokenised
        img = _clip.encode(ld.model.encode_image, pixels, ld.device, c.micro_batch, bf16, transform) if good else None
        txt = _clip.encode(ld.model.encode_text, tokens(), ld.device, c.micro_batch, bf16)
        return self._collect(n, good, img, txt, errors)

    def _score_cuda(self, images: list, pix, pix_errors, tokens, decoder: str, threads: int):
        """:meth:`score` on a GPU: per chunk of :data:`DECODE_ROWS` rows, decode
        and resize (nvJPEG or libjpeg; or the prefetched pixels), then queue
        both towers without waiting, so the next chunk decodes while the GPU
        runs this one's towers; wait once at the end."""
        ld, towers = self._loaded, self._towers
        n = len(images)
        self._emb_dim = dim = towers.dim
        if not n:
            return np.zeros(0, np.float32), np.zeros((0, dim), np.float16), np.zeros((0, dim), np.float16), []
        step = max(towers.mb, DECODE_ROWS // towers.mb * towers.mb)
        pending, errors, tok = [], [], None
        for a, b in _clip.chunks(n, step):
            if pix is not None:
                p, e = np.ascontiguousarray(pix[a:b]), list(pix_errors[a:b])
            else:
                p, e = _clip.decode_cuda(images[a:b], ld.device, ld.cfg, decoder, threads)
            if tok is None:
                tok = tokens()
            pending.append(towers.enqueue(p, tok[a:b]))
            errors.extend(e)
        parts = [h.wait() for h in pending]
        img, txt, scores = (np.concatenate([q[j] for q in parts]) for j in range(3))
        failed = np.array([e is not None for e in errors], dtype=bool)
        scores[failed] = np.nan
        img[failed] = 0
        return scores, img, txt, errors

    def _collect(self, n: int, good: list, img, txt, errors: list):
        import torch

        dim = self._emb_dim = int(txt.shape[1])
        scores = np.full(n, np.nan, dtype=np.float32)
        img_emb = np.zeros((n, dim), dtype=np.float16)
        if good:
            gi = torch.as_tensor(good, device=txt.device)
            s = (img * txt[gi]).sum(-1)
            scores[good] = s.cpu().numpy()
            img_emb[good] = img.to(torch.float16).cpu().numpy()
        return scores, img_emb, txt.to(torch.float16).cpu().numpy(), errors

    # ---------------------------------------------------------- global fit

    def learn(self, sample: Batch) -> None:
        """Choose the score window around the estimated cut (see module doc)."""
        self._cut = None
        f = self.config.top_fraction
        s = np.sort(np.asarray(sample.get("clip_score", []), dtype=np.float32))[::-1]
        if f is None or not len(s):
            self._window = None
            return
        m = len(s)
        margin = WINDOW_SIGMAS * math.sqrt(f * (1 - f) * m) + WINDOW_SHARE * m + 1
        hi_rank, lo_rank = int(max(0, f * m - margin)), int(min(m - 1, f * m + margin))
        self._window = (int(_bins(s[lo_rank : lo_rank + 1])[0]), int(_bins(s[hi_rank : hi_rank + 1])[0]))

    def bucket_rows(self, batch: Batch) -> Batch:
        if self.config.top_fraction is None:
            return {}
        s = np.asarray(batch["clip_score"], dtype=np.float32)
        b = _bins(s)
        hist_bins, counts = np.unique(b, return_counts=True)
        lo, hi = self._window if self._window is not None else (BINS, -1)
        inside = np.flatnonzero((b >= lo) & (b <= hi))
        nh, nw = len(hist_bins), len(inside)
        return {
            "bucket": np.concatenate([hist_bins, BINS + b[inside]]).astype(np.int64),
            "count": np.concatenate([counts, np.ones(nw, dtype=np.int64)]).astype(np.int64),
            "score": np.concatenate([np.full(nh, np.nan, dtype=np.float32), s[inside]]),
            "key": object_array([""] * nh + [str(k) for k in batch["key"][inside]]),
        }

    def reduce_bucket(self, group: Batch) -> Batch:
        g = int(np.asarray(group["bucket"])[0])
        if g >= BINS:  # window rows pass through, in a fixed order
            order = np.argsort(np.asarray(group["key"]).astype(str), kind="stable")
            return {c: np.asarray(v)[order] for c, v in group.items()}
        return {
            "bucket": np.array([g], dtype=np.int64),
            "count": np.array([int(np.sum(group["count"]))], dtype=np.int64),
            "score": np.array([np.nan], dtype=np.float32),
            "key": object_array([""]),
        }

    def combine(self, reduced: Batch) -> FitResult:
        """Find the cut row; decisions are made per shard by :meth:`decide_rows`."""
        f = self.config.top_fraction
        self._cut = None
        if f is None or not reduced or not batch_len(reduced):
            return FitResult()
        groups = np.asarray(reduced["bucket"], dtype=np.int64)
        counts = np.asarray(reduced["count"], dtype=np.int64)
        is_hist = groups < BINS
        hist = np.zeros(BINS, dtype=np.int64)
        np.add.at(hist, groups[is_hist], counts[is_hist])
        total = int(hist.sum())
        k = int(math.floor(f * total + 0.5))
        cut = {"top_fraction": f, "rows": total, "keep": k, "exact": True}
        if k >= total:
            cut.update(score=-math.inf, key=None)
        elif k == 0:
            cut.update(score=math.inf, key="")
        else:
            above = np.cumsum(hist[::-1])[::-1]  # above[b]: rows in bins >= b
            c = int(np.flatnonzero(above >= k).max())  # the bin holding the k-th best row
            need = k - (int(above[c + 1]) if c + 1 < BINS else 0)
            w = np.flatnonzero(groups == BINS + c)
            if len(w) == int(hist[c]):
                keys = np.asarray(reduced["key"])[w].astype(str)
                sc = np.asarray(reduced["score"], dtype=np.float32)[w]
                order = np.lexsort((keys, -sc))
                cut.update(score=float(sc[order[need - 1]]), key=str(keys[order[need - 1]]))
            else:
                edge = float(np.float32(-1.0 + 2.0 * c / BINS))
                log.warning("clip_score: top_fraction cut outside the sampled window; cutting at %.5f", edge)
                cut.update(score=edge, key=None, exact=False)
        self._cut = cut
        self.model_id()  # hash the checkpoint once, here, not in every decide task
        return FitResult()

    def decide_rows(self, rows: Batch) -> FitResult:
        """Per shard after the fit: drop the alive rows ranked below the cut
        (``clip_score_below_top_fraction``)."""
        cut = self._cut
        if cut is None or not batch_len(rows):
            return FitResult()
        s = np.asarray(rows["clip_score"], dtype=np.float32)
        keys = np.asarray(rows["key"]).astype(str)
        cs = np.float32(cut["score"])
        if cut["key"] is None:  # keep everything at or above the cut score
            keep = s >= cs
        else:
            keep = (s > cs) | ((s == cs) & (keys <= cut["key"]))
        drop = np.flatnonzero(~keep)
        model = self.model_id()
        detail = {"threshold": float(cs), "top_fraction": cut["top_fraction"], "exact": cut["exact"], "model": model}
        details = [json.dumps({**detail, "clip_score": float(s[i])}, sort_keys=True) for i in drop]
        return FitResult(
            {
                "key": object_array([str(keys[i]) for i in drop]),
                "reason": object_array(["clip_score_below_top_fraction"] * len(drop)),
                "detail": object_array(details),
            }
        )


def _bins(scores: np.ndarray) -> np.ndarray:
    b = np.floor((np.nan_to_num(scores, nan=-1.0).astype(np.float64) + 1.0) * (BINS / 2.0))
    return np.clip(b, 0, BINS - 1).astype(np.int64)
