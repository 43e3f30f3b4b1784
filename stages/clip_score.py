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
  needs the global score distribution (:mod:`stages.common.topfraction`).

Every reject's detail carries the score, the threshold and the model id
(``name``, ``pretrained``, the checkpoint's ``sha256``). Rows whose image
cannot be decoded fail with ``decode_error``.

Images (``image_decode``): ``pil`` is open_clip's own transform; ``nvjpeg``
decodes JPEGs in batched nvJPEG calls on the GPU's SMs and resizes there
(antialiased bicubic, within a few 1e-3 of PIL's pixels); ``nvimgcodec``
decodes on the GPU's hardware JPEG engines (:mod:`stages.common.gpudecode`);
``libjpeg`` decodes on CPU threads and resizes on the device; other formats
go through PIL. ``auto`` is ``nvjpeg`` on a GPU, ``pil`` on the CPU. The
towers run under bf16 autocast on a GPU, in fp32 on the CPU.

On a GPU (:mod:`stages.common.cuda_towers`) a batch is decoded in chunks
while the towers of the previous chunk run, every forward pass replays a
CUDA graph captured at ``micro_batch`` rows (kept only within 1e-3 of the
eager towers), and ``torch.compile`` (``compile``, on by default) compiles
them first (kept within ``compile_tolerance``; compiled once per node, the
other actors load its kernels from inductor's cache). ``compile_numerics:
eager`` (the default) makes inductor round as the eager towers do
(:mod:`stages.common.tower_compile`): on one H100 the compiled towers ran
1.22x the eager towers' rate and changed 2 of 40,960 top-30% decisions on the
bench corpus (0.005%; none at the LAION threshold, none on the demo), under
the 0.1% the project allows (docs/gpu.md). ``compile: false`` is eager.
Under Ray an actor scores ``actor_threads`` batches at once on threads.

``cpu_prefetch: true`` tokenises in plain Ray CPU tasks ahead of the actors
(:meth:`cpu_prepare`), and unless the actors decode on the GPU also decodes
(libjpeg), resizes and crops there; with GPU decoding the object store
carries only the encoded bytes and the tokens to the GPU actors (the
measured plans are in docs/gpu.md and docs/benchmarks.md).

The options and their checks are :mod:`stages.common.clip_options`.

The top-fraction fit (``learn`` ... ``decide_rows``) is
:class:`stages.common.topfraction.TopFraction`: rows rank by (score desc, key
asc), so exactly ``round(top_fraction * N)`` rows are kept whatever the
batching, and no step brings per-row data for the whole dataset together.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from pairforge.stages.base import (
    SCRATCH_PREFIX,
    STATUS_FAILED,
    Batch,
    Column,
    FitResult,
    GlobalStage,
    Learned,
    Resources,
    batch_len,
    object_array,
    reject,
)
from pairforge.stages.common import clip as _clip
from pairforge.stages.common import cuda_towers as _cuda
from pairforge.stages.common import gpudecode as _gpudecode
from pairforge.stages.common.clip_options import Config
from pairforge.stages.common.topfraction import BINS, TopFraction  # noqa: F401 (BINS: tests read it here)

PIXELS, PIXEL_ERRORS, TOKENS = (SCRATCH_PREFIX + c for c in ("clip_pixels", "clip_pixel_errors", "clip_tokens"))

log = logging.getLogger(__name__)


class ClipScoreStage(GlobalStage):
    name: ClassVar[str] = "clip_score"
    runs_on_actors: ClassVar[bool] = True
    fit_columns = ("key", "clip_score")
    sample_rows = 100_000
    Config = Config
    reject_advice: ClassVar[dict[str, str]] = {
        "clip_score_below_threshold": "clip_score's threshold is above most pairs' scores"
    }
    # ``pretrained`` has no default: the job check cannot build it to learn its columns
    declares_columns: ClassVar[tuple[str, ...]] = ("clip_score", "img_emb", "text_emb")
    open_clip_options: ClassVar[tuple[str, str]] = ("model", "pretrained")

    def __init__(self, config: Config):
        super().__init__(config)
        self._loaded: _clip.Loaded | None = None
        self._towers: _cuda.CudaTowers | None = None
        self._top = TopFraction(config.top_fraction)  # the top-fraction fit's steps
        self._emb_dim: int | None = None

    def __getstate__(self):  # ship the config, never the model
        state = dict(self.__dict__)
        state["_loaded"] = state["_towers"] = None
        return state

    def resources(self) -> Resources:
        c = self.config
        return Resources(
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
            batch_size=c.batch_size,
            concurrency=c.concurrency,
            actor_calls=c.actor_threads if self._on_gpu() else 1,
            cpu_prepare=c.cpu_prefetch,
            prepare_memory=self._prepare_memory(),
        )

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
        return _clip.model_identity(self.config.model, self.config.pretrained)  # the hash is cached per process

    # ------------------------------------------------------------ per row

    def setup(self) -> None:
        if self._loaded is None:
            import torch

            c = self.config
            device = _clip.pick_device(c.device)
            if device == "cpu":
                torch.set_num_threads(max(1, int(c.num_cpus)))
            if c.image_decode == "nvimgcodec":
                _gpudecode.require(device)  # before a batch: the error names what is missing
            self._loaded = ld = _clip.load(c.model, c.pretrained, device)
            if device.startswith("cuda") and c.precision == "auto":
                self._towers = _cuda.CudaTowers(ld.model, ld.cfg, device, c.micro_batch, ld.tokenizer.context_length,
                                                graphs=c.cuda_graphs, compile=c.compile,
                                                compile_tolerance=c.compile_tolerance,
                                                numerics=c.compile_numerics)  # fmt: skip
                log.info("clip_score: towers %s (%s)", self._towers.mode, self._towers.check)

    def teardown(self) -> None:
        self._loaded = self._towers = None

    def _on_gpu(self) -> bool:
        """Whether the actors run on a GPU, as the config says (the driver and
        the prepare tasks may have none)."""
        return self.config.num_gpus > 0 or self.config.device.startswith("cuda")

    def _gpu_decode(self) -> bool:
        """Whether the actors decode on the GPU, with nvJPEG or nvImageCodec
        (then prepare only tokenises)."""
        d = self.config.image_decode
        return d in ("nvjpeg", "nvimgcodec") or (d == "auto" and self._on_gpu())

    def _prepare_memory(self) -> int:
        """Bytes of memory a ``cpu_prepare`` task needs: the worker with torch
        imported, plus per row the decoded image, its float copy for the
        resize and the crop when it decodes."""
        # measured (Ray's max USS per task) on 256 px JPEGs at batch 2048: 1.1 GiB
        # tokenising, 5.1 GiB decoding and resizing too
        per_row = 96 << 10 if self._gpu_decode() else 3 << 20
        return (5 << 28) + self.config.batch_size * per_row

    def cpu_prepare(self, batch: Batch) -> Batch:
        """Tokens, and unless the actors decode on the GPU, libjpeg/PIL
        decode, open_clip's resize and centre crop (uint8), per row; the
        actor normalises and runs the towers."""
        captions = [c if isinstance(c, str) else "" for c in batch["caption"]]
        out = dict(batch)
        out[TOKENS] = _clip.tokenizer(self.config.model)(captions).numpy()
        if self._gpu_decode():
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
            self._emb_dim = self._towers.dim
            return self._towers.score(images, pix, errors, tokens, decoder, threads, c.nvimgcodec_backends)

        def transform(x):
            return _clip.normalize(x, ld.cfg)

        if pix is not None:
            good = [i for i, e in enumerate(errors) if e is None]
            pixels = torch.from_numpy(np.ascontiguousarray(pix[good])) if good else None
        elif decoder in ("nvjpeg", "nvimgcodec", "libjpeg"):
            if decoder == "nvjpeg":
                tensors, errors = _clip.decode_tensors(images, ld.device)
            elif decoder == "nvimgcodec":
                tensors, errors = _gpudecode.decode_tensors(images, ld.device, threads, c.nvimgcodec_backends)
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

    def learn(self, sample: Batch) -> Learned:
        """The score window around the estimated cut."""
        return self._top.learn(sample)

    def bucket_rows(self, batch: Batch, learned: Learned) -> Batch:
        return self._top.bucket_rows(batch, learned)

    def reduce_bucket(self, group: Batch, learned: Learned) -> Batch:
        return self._top.reduce_bucket(group)

    def combine(self, reduced: Batch, learned: Learned) -> FitResult:
        """The cut row, as the rule :meth:`decide_rows` applies per shard,
        with the scorer's identity (the checkpoint is hashed once, here, not
        in every decide task)."""
        return self._top.combine(reduced, {"model": self.model_id()})

    def decide_rows(self, rows: Batch, rule: Learned) -> FitResult:
        """Per shard after the fit: drop the alive rows ranked below the cut
        (``clip_score_below_top_fraction``)."""
        return self._top.decide_rows(rows, rule)
