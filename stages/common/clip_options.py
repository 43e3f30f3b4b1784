"""The clip_score stage's options and their checks: the scorer (model,
weights, device), how the actors are laid out on the GPUs (CPUs, GPUs,
pool, threads, batches), how images are decoded and the towers run
(decoder, CUDA graphs, ``torch.compile`` and its numerics) and the two
filters. Apart from the stage (:mod:`stages.clip_score`) because they are
its whole user-facing surface and the stage's code is the scoring path;
``stages.clip_score.Config`` is this class.
"""

from __future__ import annotations

from pairforge.stages.common import clip as _clip
from pairforge.stages.common import gpudecode as _gpudecode
from pairforge.stages.common import tower_compile as _compile
from pairforge.stages.options import options


@options
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
    #: CPUs each actor asks Ray for
    num_cpus: float = 1.0
    #: actors in the pool (min, max)
    concurrency: tuple[int, int] = (1, 1)
    #: rows per ``process_batch`` call (one actor call)
    batch_size: int = 512
    #: rows per forward pass (fixed, so a row's score does not depend on its batch)
    micro_batch: int = 128
    #: ``auto``, ``pil``, ``nvjpeg``, ``nvimgcodec`` or ``libjpeg`` (see the module doc)
    image_decode: str = "auto"
    #: nvImageCodec's backends, tried in order, each ``KIND``, ``KIND:SHARE``
    #: (that share of a batch, the rest to the next) or ``KIND:SHARE:adaptive``
    #: (a starting share nvImageCodec moves to keep both busy); see
    #: :func:`stages.common.gpudecode.parse_backends`
    nvimgcodec_backends: tuple[str, ...] = _gpudecode.BACKENDS
    #: threads for PIL/libjpeg decoding and nvImageCodec's host work; 0: ``num_cpus``
    decode_threads: int = 0
    #: tokenise in CPU tasks ahead of the actors and, unless the actors decode
    #: on the GPU, decode (libjpeg), resize and crop there too; in process:
    #: the same functions, before ``process_batch``
    cpu_prefetch: bool = False
    #: on a GPU, replay the towers from CUDA graphs captured at ``micro_batch``
    #: (kept only where they match the eager towers within 1e-3; the same kernels)
    cuda_graphs: bool = True
    #: on a GPU, ``torch.compile`` the towers first (~30 s more start-up for the
    #: first actor of a node, its kernels cached for the others; kept only where
    #: they match the eager towers within ``compile_tolerance``, else eager);
    #: ``false``: eager towers (CUDA graphs still)
    compile: bool = True
    #: how the compiled towers round: ``eager`` (bf16 where eager rounds, linear
    #: biases inside the matmul, layer norms as the eager kernel), ``casts``
    #: (only the rounding) or ``fast`` (inductor's defaults); see
    #: :mod:`stages.common.tower_compile` and docs/gpu.md
    compile_numerics: str = "eager"
    #: the largest |score difference| from the eager towers (on random inputs at
    #: set-up) with which compiled towers are kept, else the stage runs eagerly: a
    #: guard against a broken compile (bf16 rounding: ViT-B-32 1.6e-3 to 2.1e-3;
    #: what it does to decisions: docs/gpu.md)
    compile_tolerance: float = 5e-3
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
        _gpudecode.parse_backends(self.nvimgcodec_backends)  # raises, naming the bad entry
        if self.compile_numerics not in _compile.NUMERICS:
            raise ValueError(f"compile_numerics: expected one of {_compile.NUMERICS}, got {self.compile_numerics!r}")
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
            ("compile_tolerance", self.compile_tolerance >= 0, ">= 0"),
        ):
            if not ok:
                raise ValueError(f"{name}: expected {want}, got {getattr(self, name)!r}")
