"""JPEG decoding with nvImageCodec on the GPU's hardware JPEG engines, for
``image_decode: nvimgcodec`` in :mod:`stages.clip_score`.

Why: the ``nvjpeg`` path (``torchvision.io.decode_jpeg`` on cuda) runs
nvJPEG's CUDA/hybrid backend on the SMs. On an H200 its decode and resize
cost ~31 us of GPU time per 256 px row beside the towers' 77 us, so the GPU
limits clip_score (9,234 pairs/s through Ray Data against 12,944 for the
towers alone, issue 12). Hopper has hardware JPEG engines (NVJPG) that
decode baseline JPEGs without using the SMs. torchvision cannot select them;
nvImageCodec can (backend ``HW_GPU_ONLY``). Measured on one H200
(``bench/decode_probe.py``, ``bench/clip_score.py``, 2026-12-02): the
engines decode 11,898 of these JPEGs a second against nvJPEG's 20,167, and
through Ray Data the stage scored 10,812 pairs/s with them against 13,446
with nvJPEG, so ``auto`` stays nvJPEG and this path is opt-in.

How: a batch is decoded in one ``Decoder.decode`` call, with the backends
tried in order hardware, CUDA (GPU Huffman), hybrid (CPU Huffman), so a JPEG
the engines refuse (they decode baseline JPEGs only) still decodes on the
GPU. ``nvimgcodec_backends`` can instead give a backend a share of each
batch (:func:`parse_backends`), so that the engines and the hybrid decoder
work on one batch side by side. The call is given the calling thread's current torch stream
(``cuda_stream``): nvImageCodec allocates the output there (stream-ordered)
and orders the decode before whatever that stream runs next. The pixels
reach torch with no host copy (DLPack, else ``__cuda_array_interface__``)
and the HWC images are viewed as CHW. Rows that nvImageCodec does not
decode (non-JPEGs, or a None in its result) go through PIL
(:func:`stages.common.clip.pil_tensor`), so the contract matches
:func:`stages.common.clip.decode_tensors`: ``[3, H, W]`` uint8 tensors on
the device, or None and an error message. EXIF orientation is not applied,
because the other decoders here don't apply it either.

Threads: nvImageCodec's documentation says only that "not all nvImageCodec
types are thread safe" and does not name Decoder as one that is, and a
Decoder keeps per-call state (nvJPEG states, its executor). So each thread
gets its own Decoder (``threading.local``). The decode call releases the
GIL.

``device="cpu"`` uses nvImageCodec's CPU backend (libjpeg-turbo) so that the
batching and fallbacks can be tested without a GPU; the stage never uses it.
"""

from __future__ import annotations

import importlib
import io
import logging
import threading

import numpy as np

from pairforge.stages.common.clip import is_jpeg, pil_tensor

log = logging.getLogger(__name__)

PACKAGE = "nvidia-nvimgcodec-cu13"
#: nvImageCodec backend kinds, tried in this order for each image
BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU")
#: nvImageCodec's BackendKind names (checked without importing it)
KINDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY")

_lock = threading.Lock()
_decoders: dict[tuple, "NvImgDecoder"] = {}


def parse_backends(specs) -> tuple[tuple[str, float, bool], ...]:
    """``KIND``, ``KIND:SHARE`` or ``KIND:SHARE:adaptive`` per backend, in the
    order they are tried, as (kind, load hint, adaptive). SHARE is the
    fraction of a batch nvImageCodec gives that backend (its ``load_hint``;
    the rest falls to the next), fixed, or with ``adaptive`` a starting point
    that nvImageCodec moves to keep both backends busy
    (``ADAPTIVE_MINIMIZE_IDLE_TIME``). Why: the hardware engines alone decode
    fewer of the bench's JPEGs a second than the compiled towers score on an
    H200 (~12,000 against ~15,000), so a share of each batch has to go to a
    decoder beside them. Raises ValueError naming the bad entry."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out = []
    for spec in specs:
        kind, *rest = str(spec).strip().split(":")
        adaptive = rest[1:] == ["adaptive"]
        try:
            share = float(rest[0]) if rest else 1.0
        except ValueError:
            share = float("nan")  # fails the range check below
        if kind not in KINDS or len(rest) > 1 + adaptive or not 0.0 < share <= 1.0:
            raise ValueError(f"nvimgcodec_backends: {spec!r}: expected KIND, KIND:SHARE or KIND:SHARE:adaptive "
                             f"with KIND one of {list(KINDS)} and 0 < SHARE <= 1")  # fmt: skip
        out.append((kind, share, adaptive))
    if not out:
        raise ValueError("nvimgcodec_backends: expected at least one backend")
    return tuple(out)


def load():
    """Import ``nvidia.nvimgcodec``. If it cannot be imported, raise an
    ImportError that names the package to install."""
    try:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
    except (ImportError, OSError) as e:
        raise ImportError(
            f"image_decode: nvimgcodec needs the {PACKAGE} package, plus nvidia-nvjpeg (libnvjpeg.so.13) for its "
            f"GPU decoders: pip install 'pairforge[nvimgcodec]' (or {PACKAGE} nvidia-nvjpeg); or use image_decode: nvjpeg "
            f"({type(e).__name__}: {e})"
        ) from e
    return nvimgcodec


class NvImgDecoder:
    """Batched nvImageCodec decoding to uint8 ``[3, H, W]`` torch tensors on
    ``device``. ``backends``: nvImageCodec ``BackendKind`` names, in order, each
    optionally with its share of a batch (:func:`parse_backends`).
    ``options``: nvImageCodec's decoder options string (for example
    ``":fancy_upsampling=1"``). ``cpu_threads``: the host threads of each
    Decoder's executor (parsing, Huffman for the hybrid backend). ``planar``:
    ask for planar RGB (CHW) output instead of interleaved RGB (HWC) that is
    then viewed as CHW. :attr:`via` records how pixels reached torch."""

    def __init__(self, device: str = "cuda", backends=BACKENDS, options: str = "", cpu_threads: int = 2,
                 planar: bool = False):  # fmt: skip
        import torch

        nv = self.nv = load()
        dev = torch.device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
            self.device_id = dev.index
        elif dev.type == "cpu":  # for tests without a GPU: the CPU backend, host buffers
            self.device_id, backends = nv.NVIMGCODEC_DEVICE_CPU_ONLY, ("CPU_ONLY",)
        else:
            raise ValueError(f"nvimgcodec: device {device!r} is neither cuda nor cpu")
        parsed = parse_backends(backends)
        if not all(hasattr(nv.BackendKind, b) for b, _, _ in parsed):
            raise ValueError(f"nvimgcodec: backends {list(backends)}: expected names of "
                             f"{list(nv.BackendKind.__members__)}")  # fmt: skip
        self.device, self.backends, self.options = dev, parsed, options
        self.cpu_threads, self.planar = max(1, int(cpu_threads)), planar
        fmt = nv.SampleFormat.P_RGB if planar else nv.SampleFormat.I_RGB
        self.params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB, sample_format=fmt)
        self.via: str | None = None
        self._local = threading.local()

    def decoder(self):
        """This thread's own nvImageCodec Decoder (made on first use)."""
        d = getattr(self._local, "decoder", None)
        if d is None:
            d = self._local.decoder = self.nv.Decoder(device_id=self.device_id, max_num_cpu_threads=self.cpu_threads,
                                                      backends=self.backend_list(), options=self.options)  # fmt: skip
        return d

    def backend_list(self) -> list:
        """The nvImageCodec Backends a Decoder is made with, shares included."""
        nv = self.nv
        policy = nv.LoadHintPolicy
        return [nv.Backend(getattr(nv.BackendKind, kind), load_hint=share,
                           load_hint_policy=policy.ADAPTIVE_MINIMIZE_IDLE_TIME if adaptive else policy.FIXED)
                for kind, share, adaptive in self.backends]  # fmt: skip

    def decode(self, images: list) -> tuple[list, list[str | None]]:
        """Per image a uint8 ``[3, H, W]`` tensor on the device or None, and
        an error message or None. JPEGs are decoded by nvImageCodec in one
        call; everything else, and any JPEG it failed on, by PIL."""
        out: list = [None] * len(images)
        errors: list[str | None] = [None] * len(images)
        idx, streams = [], []
        for i, b in enumerate(images):
            if isinstance(b, (bytes, bytearray)) and is_jpeg(b):
                try:
                    streams.append(self.nv.CodeStream(bytes(b)))
                    idx.append(i)
                except Exception:  # a header nvImageCodec cannot parse: PIL says what is wrong
                    pass
        if streams:
            for i, img in zip(idx, self.decode_streams(streams)):
                out[i] = self.tensor(img)
        for i in range(len(images)):
            if out[i] is None:
                t, errors[i] = pil_tensor(images[i])
                out[i] = t.to(self.device) if t is not None else None
        return out, errors

    def decode_streams(self, streams: list, reuse: list | None = None) -> list:
        """nvImageCodec Images (or None where one failed), one per code
        stream, decoded in one call onto the current torch stream. ``reuse``:
        Images of an earlier call, as many as ``streams``, whose buffers
        nvImageCodec may decode into instead of allocating (only safe once
        no tensor made from them is still in use)."""
        import torch

        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        kw = {"images": reuse} if reuse is not None and len(reuse) == len(streams) and all(reuse) else {}
        try:
            res = list(self.decoder().decode(streams, params=self.params, cuda_stream=stream, **kw))
        except Exception as e:  # the whole call failed: one by one below
            log.warning("nvimgcodec: batched decode of %d images failed (%s: %s)", len(streams), type(e).__name__, e)
            res = []
        if len(res) != len(streams):  # nvImageCodec < 0.6 left failures out of the list
            res = []
            for s in streams:
                try:
                    res.append(self.decoder().decode(s, params=self.params, cuda_stream=stream))
                except Exception:  # a per-row failure: PIL will say why
                    res.append(None)
        return res

    def tensor(self, img):
        """A decoded nvImageCodec Image as a uint8 ``[3, H, W]`` torch tensor
        on the device, sharing its memory; None if it is not 3-channel uint8."""
        import torch

        if img is None:
            return None
        try:
            if img.buffer_kind == self.nv.ImageBufferKind.STRIDED_HOST:  # CPU backend
                t = torch.from_numpy(np.array(img)).to(self.device)
                self.via = self.via or "host copy"
            else:
                t = self._from_device(img)
        except Exception as e:  # an Image torch cannot take: PIL decodes the row instead
            log.warning("nvimgcodec: could not hand an image to torch (%s: %s)", type(e).__name__, e)
            return None
        if t.dtype != torch.uint8 or t.dim() != 3:
            return None
        if not self.planar:
            t = t.permute(2, 0, 1)
        return t if t.shape[0] == 3 else None

    def _from_device(self, img):
        import torch

        if self.via != "cuda_array_interface":
            try:  # torch passes its current stream to __dlpack__
                t = torch.from_dlpack(img)
                self.via = "dlpack"
                return t
            except Exception as e:
                if self.via == "dlpack":  # it worked before: this image is the problem
                    raise
                log.info("nvimgcodec: DLPack refused (%s: %s); using __cuda_array_interface__", type(e).__name__, e)
        t = torch.as_tensor(img, device=self.device)
        self.via = "cuda_array_interface"
        return t


def decode_tensors(images: list, device: str, threads: int = 2, backends=BACKENDS) -> tuple[list, list[str | None]]:
    """:func:`stages.common.clip.decode_tensors` with nvImageCodec: ``[3, H,
    W]`` uint8 tensors on ``device`` (None where a row failed) and errors,
    by the process's decoder for (device, threads, backends), made once."""
    key = (str(device), threads, tuple(backends))
    with _lock:
        dec = _decoders.get(key)
        if dec is None:
            dec = _decoders[key] = NvImgDecoder(device, backends=backends, cpu_threads=threads)
    return dec.decode(images)


def check(device: str = "cuda", size: int = 256) -> dict:
    """What nvImageCodec can do here: its version, and whether the hardware
    backend decodes a baseline JPEG (``hw``; ``hw_error`` says why not).
    Raises ImportError (naming the package) if nvImageCodec is missing."""
    import torch
    from PIL import Image

    nv = load()
    info: dict = {"version": getattr(nv, "__version__", "?"), "cuda": getattr(nv, "__cuda_version__", "?")}
    if torch.device(device).type != "cuda":
        return {**info, "hw": False, "hw_error": f"{device} is not a GPU"}
    buf = io.BytesIO()
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8)
    Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], -1)).save(buf, "JPEG", quality=90)
    try:
        dec = NvImgDecoder(device, backends=("HW_GPU_ONLY",))
        img = dec.decode_streams([nv.CodeStream(buf.getvalue())])[0]
        info["hw"] = img is not None and dec.tensor(img) is not None
        if not info["hw"]:
            info["hw_error"] = "the hardware backend decoded nothing (no NVJPG engine visible, or unsupported here)"
    except Exception as e:  # any failure means no hardware decoding here
        info["hw"], info["hw_error"] = False, f"{type(e).__name__}: {e}"
    return info


def require(device: str) -> dict:
    """:func:`check` for a stage's set-up: raise where ``image_decode:
    nvimgcodec`` cannot work (no GPU, no package); log whether the hardware
    engines decode (if not, nvImageCodec's CUDA decoders run on the SMs)."""
    if not str(device).startswith("cuda"):
        raise RuntimeError(f"image_decode: nvimgcodec needs a GPU; this worker's device is {device!r} "
                           "(use image_decode: pil or libjpeg on the CPU)")  # fmt: skip
    info = check(device)
    if info["hw"]:
        log.info("nvimgcodec %s decodes on the hardware JPEG engines", info["version"])
    else:
        log.warning("nvimgcodec %s: no hardware JPEG decoding here (%s); its CUDA decoders run on the SMs",
                    info["version"], info["hw_error"])  # fmt: skip
    return info
