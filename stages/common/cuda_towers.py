"""The GPU path of :mod:`stages.clip_score`: both towers at a fixed
micro-batch on a CUDA stream of their own, replayed from CUDA graphs (or
``torch.compile`` + graphs) where they match the eager towers, fed through
pinned host buffers, and nvJPEG/nvImageCodec/libjpeg decoding in chunks on
a high-priority stream per thread.

It lives apart from :mod:`stages.common.clip` (model loading, identity,
tokenizer, CPU decoding: what every device needs) because all of it is
CUDA-only machinery with its own concurrency rules (streams, events, a lock
around the shared graph inputs).

How a batch runs (:meth:`CudaTowers.score`): it is decoded in chunks of
:data:`DECODE_ROWS` rows on a high-priority stream of the calling thread, and
both towers of each chunk are queued on one tower stream without waiting, so
the next chunk decodes while the GPU runs this one's towers; the host waits
once per batch (the towers' host-device copies go through pinned buffers).
Every forward pass sees exactly ``micro_batch`` rows (see
:mod:`stages.common.clip` for why) and replays a CUDA graph captured from the
eager towers (the same kernels, scores identical to eager; kept only if a
check at set-up agrees within 1e-3). ``compile`` adds ``torch.compile``
with inductor switched to eager's bf16 rounding (``numerics``, see
:mod:`stages.common.tower_compile`; kept within ``compile_tolerance`` of
eager, and what the rest does to the stage's decisions is in docs/gpu.md).
The compile runs under a lock of the node: the first actor pays it, the
others load its kernels from inductor's on-disk cache. Several threads may
score batches at once: one decodes while another's towers run.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from pairforge.stages.common import gpudecode
from pairforge.stages.common.clip import chunks, decode_cpu, decode_tensors, padded, resize_crop, size_hw
from pairforge.stages.common.tower_compile import compiled, node_compile_lock

log = logging.getLogger(__name__)

#: rows decoded per nvJPEG call on a GPU: the towers of one chunk run while the next decodes
DECODE_ROWS = 512

_streams = threading.local()


def thread_stream(device: str):
    """This thread's own CUDA stream on ``device`` for decoding and resizing
    (made once per thread, high priority), so that one thread's wait never
    waits on another's work and the towers never hold a decode up."""
    import torch

    key = str(device)
    per = getattr(_streams, "per_device", None)
    if per is None:
        per = _streams.per_device = {}
    if key not in per:  # high priority: its short kernels go ahead of the towers' queued ones
        per[key] = torch.cuda.Stream(torch.device(device), priority=-1)
    return per[key]


def decode_cuda(images: list, device: str, cfg: dict, decoder: str = "nvjpeg", threads: int = 1, backends=None):
    """nvJPEG (torchvision's batched decode on the SMs, via
    :func:`decode_tensors`; ``nvimgcodec``: the hardware JPEG engines, via
    :func:`stages.common.gpudecode.decode_tensors` with ``threads`` host
    threads and ``backends`` (its default list where None); or ``libjpeg`` on ``threads`` CPU threads, via
    :func:`decode_cpu`) + :func:`resize_crop` on this thread's stream.
    Returns uint8 ``[n, 3, S, S]`` pixels on ``device`` (zeros where an image
    failed) and per-row errors. When it returns, the pixels are ready: the
    thread waited for its own stream only, so the towers of other batches
    keep running meanwhile (the decoder releases the GIL while it waits)."""
    import torch

    th, tw = size_hw(cfg["size"])
    stream = thread_stream(device)
    with torch.cuda.stream(stream):
        if decoder == "nvjpeg":
            tensors, errors = decode_tensors(images, device)
        elif decoder == "nvimgcodec":
            tensors, errors = gpudecode.decode_tensors(images, device, threads, backends or gpudecode.BACKENDS)
        else:
            tensors, errors = decode_cpu(images, device, threads)
        good = [i for i, t in enumerate(tensors) if t is not None]
        if len(good) == len(images) and good:
            pixels = resize_crop(tensors, cfg)
        else:
            pixels = torch.zeros((len(images), 3, th, tw), dtype=torch.uint8, device=device)
            if good:
                pixels[torch.as_tensor(good, device=device)] = resize_crop([tensors[i] for i in good], cfg)
    # nvJPEG writes from a stream of its own into blocks this stream freed: nothing
    # may be pending here when they are handed out again
    stream.synchronize()
    return pixels, errors


class CudaTowers:
    """Both towers over (pixels, tokens) pairs at a fixed ``micro_batch``
    (inputs padded with their last row), one CUDA stream, safe to call from
    several threads: :meth:`enqueue` queues a chunk under a lock and returns
    at once, :meth:`Pending.wait` waits for that chunk alone.

    ``graphs``: each micro-batch replays a CUDA graph captured from the eager
    forward (same kernels, one launch instead of ~700 Python-issued ones).
    ``compile``: ``torch.compile`` the forward first (inductor kernels, then
    captured). A fast path is kept only if its embeddings match the eager
    forward within ``tolerance`` on random inputs (:attr:`check` says what
    was measured); otherwise the towers run eagerly."""

    def __init__(self, model, cfg: dict, device: str, micro_batch: int, context_length: int,
                 graphs: bool = True, compile: bool = False, tolerance: float = 1e-3,
                 compile_tolerance: float = 1e-3, numerics: str = "eager"):  # fmt: skip
        import torch

        self.device, self.mb, self.cfg = torch.device(device), int(micro_batch), cfg
        self.device_name = str(device)
        self.lock = threading.Lock()
        self.stream = torch.cuda.Stream(self.device)
        th, tw = size_hw(cfg["size"])
        self.shape_img, self.shape_tok = (self.mb, 3, th, tw), (self.mb, int(context_length))
        forward = tower_forward(model, cfg, self.device)
        self._eager = forward
        self._fn = forward
        self.mode = "eager"
        self.check: dict = {}
        self._graph = None
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            self._in_img = torch.zeros(self.shape_img, dtype=torch.uint8, device=self.device)
            self._in_tok = torch.zeros(self.shape_tok, dtype=torch.int64, device=self.device)
            self.dim = int(forward(self._in_img, self._in_tok)[0].shape[1])
        if compile:
            t = time.perf_counter()
            with node_compile_lock():  # the node's other actors wait, then load what this one compiled
                self._try("compiled", lambda: compiled(forward, model, numerics), compile_tolerance, graphs)
            self.check["compile_s"] = round(time.perf_counter() - t, 1)
        if graphs and self.mode == "eager":
            self._try("graphs", lambda: forward, tolerance, True)

    def _try(self, name: str, make, tolerance: float, graphs: bool) -> None:
        """Switch to ``make()`` (captured if ``graphs``) if it matches eager."""
        import torch

        try:
            fn = make()
            u8, tok = self._random_inputs()
            with torch.inference_mode(), torch.cuda.stream(self.stream):
                ref = [t.clone() for t in self._eager(u8, tok)]
                if graphs:
                    graph, outs = self._capture(fn)
                    self._in_img.copy_(u8)
                    self._in_tok.copy_(tok)
                    graph.replay()
                else:
                    graph, outs = None, fn(u8, tok)
                diff = max(float((a - b).abs().max()) for a, b in zip(outs, ref))
        except Exception as e:  # a failed capture or compile: stay eager, say why
            log.warning("clip_score: %s towers unavailable (%s: %s); running eagerly", name, type(e).__name__, e)
            self.check[name] = f"failed: {type(e).__name__}: {e}"
            return
        self.check[name] = diff
        if not diff <= tolerance:  # NaN fails too
            log.warning(
                "clip_score: %s towers differ from eager by %.2e > %.0e; running eagerly", name, diff, tolerance
            )
            return
        name = f"{name}+graphs" if graphs and name != "graphs" else name
        self._fn, self._graph, self._outs, self.mode = fn, graph, outs, name

    def _random_inputs(self):
        import torch

        g = torch.Generator(device=self.device).manual_seed(0)
        u8 = torch.randint(0, 256, self.shape_img, dtype=torch.uint8, device=self.device, generator=g)
        tok = torch.randint(1, 49406, self.shape_tok, device=self.device, generator=g)
        tok[:, 0] = 49406  # start of text
        ends = torch.randint(2, self.shape_tok[1], (self.mb,), device=self.device, generator=g)
        pos = torch.arange(self.shape_tok[1], device=self.device)
        tok[pos[None] > ends[:, None]] = 0
        tok[torch.arange(self.mb, device=self.device), ends] = 49407  # end of text: the pooled token
        return u8, tok

    def _capture(self, fn):
        import torch

        with torch.inference_mode():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: cuBLAS handles, autotuning, compilation
                    fn(self._in_img, self._in_tok)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = fn(self._in_img, self._in_tok)
            torch.cuda.synchronize(self.device)
        return graph, outs

    def enqueue(self, pixels, tokens) -> "Pending":
        """Queue both towers over ``pixels`` (uint8 ``[n, 3, S, S]``, on the
        device or host) and ``tokens`` (``[n, ctx]``, host or device).
        Returns at once; :meth:`Pending.wait` gives float16 image and text
        embeddings and float32 scores as numpy arrays."""
        import torch

        n = len(tokens)
        tokens = torch.as_tensor(tokens)
        pixels = torch.as_tensor(pixels)
        if not tokens.is_cuda:
            tokens = tokens.pin_memory()
        if not pixels.is_cuda:
            pixels = pixels.pin_memory()
        with self.lock, torch.inference_mode(), torch.cuda.stream(self.stream):
            tok = tokens.to(self.device, non_blocking=True)
            pix = pixels.to(self.device, non_blocking=True)
            out = [torch.empty((n, self.dim), device=self.device) for _ in range(2)]
            out.append(torch.empty(n, device=self.device))
            for a, b in chunks(n, self.mb):
                k = b - a
                if self._graph is not None:
                    self._in_img[:k].copy_(pix[a:b])
                    self._in_tok[:k].copy_(tok[a:b])
                    if k < self.mb:  # pad with copies of the last row
                        self._in_img[k:].copy_(pix[b - 1 : b].expand(self.mb - k, *pix.shape[1:]))
                        self._in_tok[k:].copy_(tok[b - 1 : b].expand(self.mb - k, tok.shape[1]))
                    self._graph.replay()
                    outs = self._outs
                else:
                    outs = self._fn(padded(pix[a:b], self.mb), padded(tok[a:b], self.mb))
                for o, r in zip(out, outs):  # out of the static outputs before the next replay
                    o[a:b].copy_(r[:k])
            host = []
            for t, dtype in zip(out, (torch.float16, torch.float16, torch.float32)):
                h = torch.empty(t.shape, dtype=dtype, pin_memory=True)
                h.copy_(t.to(dtype), non_blocking=True)
                host.append(h)
            done = torch.cuda.Event(blocking=True)  # a waiting thread sleeps, it does not spin
            done.record(self.stream)
        # keep the inputs alive until the towers have read them
        return Pending(done, host, (pixels, tokens, pix, tok, out))

    def score(self, images: list, pix, pix_errors, tokens, decoder: str = "nvjpeg", threads: int = 1, backends=None):
        """Scores (float32; NaN where the image failed), image and text
        embeddings (float16; zeros where it failed) and per-row decode errors
        of a batch: per chunk of :data:`DECODE_ROWS` rows, decode and resize
        (``decoder`` ``nvjpeg``, ``nvimgcodec`` (with ``backends``) or ``libjpeg`` via :func:`decode_cuda`; or
        ``pix``/``pix_errors``, prefetched uint8 pixels), then queue both
        towers without waiting, so the next chunk decodes while the GPU runs
        this one's towers; wait once at the end. ``tokens()`` gives the
        batch's tokens (called once, after the first chunk is decoded)."""
        n, dim = len(images), self.dim
        if not n:
            return np.zeros(0, np.float32), np.zeros((0, dim), np.float16), np.zeros((0, dim), np.float16), []
        step = max(self.mb, DECODE_ROWS // self.mb * self.mb)
        pending, errors, tok = [], [], None
        for a, b in chunks(n, step):
            if pix is not None:
                p, e = np.ascontiguousarray(pix[a:b]), list(pix_errors[a:b])
            else:
                p, e = decode_cuda(images[a:b], self.device_name, self.cfg, decoder, threads, backends)
            if tok is None:
                tok = tokens()
            pending.append(self.enqueue(p, tok[a:b]))
            errors.extend(e)
        parts = [h.wait() for h in pending]
        img, txt, scores = (np.concatenate([q[j] for q in parts]) for j in range(3))
        failed = np.array([e is not None for e in errors], dtype=bool)
        scores[failed] = np.nan
        img[failed] = 0
        return scores, img, txt, errors


def tower_forward(model, cfg: dict, device):
    """Both towers of ``model`` over (uint8 pixels ``[n, 3, S, S]``, tokens)
    under bf16 autocast on ``device`` (a CPU too: tests and
    ``bench/clipagree.py`` compile it there): L2-normalised float32 image
    and text embeddings and their cosine, the scores the stage keeps."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)

    def forward(u8, tok):
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            img = model.encode_image((u8.float() / 255.0 - mean) / std)
            txt = model.encode_text(tok)
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        return img, txt, (img * txt).sum(-1)

    return forward


class Pending:
    """Embeddings and scores of one :meth:`CudaTowers.enqueue` call."""

    def __init__(self, event, host, keep):
        self._event, self._host, self._keep = event, host, keep

    def wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image embeddings f16, text embeddings f16, scores f32), numpy."""
        self._event.synchronize()  # releases the GIL while it waits
        img, txt, score = (np.array(h.numpy()) for h in self._host)
        self._keep = self._host = None
        return img, txt, score
