"""Decode an image once, resize and re-encode it the way img2dataset does.

Why not call img2dataset's ``Resizer``: it decodes the whole image before
its size checks (a small file declaring a huge canvas is decoded in full),
it always decodes at full size (a 4000 px photo bound for 256 px costs 60x
the pixels it needs), it routes every resize through albumentations, and it
swaps the process's stdout/stderr file descriptors around each image, so
only one thread of a process may use it at a time. Here:

* :func:`probe` reads the header only (size, format, mode) with PIL, and the
  size checks (pixel cap, ``min_image_size``, ``max_image_area``,
  ``max_aspect_ratio``) run on it before any pixel is decoded;
* a JPEG much larger than its target is decoded at 1/2, 1/4 or 1/8 scale in
  the DCT domain (libjpeg's scaled IDCT, through OpenCV's ``IMREAD_REDUCED_*``)
  and only then resized with the configured filter ("reduce, then resize");
  the reduced image stays at least ``REDUCE_MARGIN`` times the target, so the
  final filter still averages several source pixels per output pixel;
* everything else follows img2dataset's ``Resizer`` step for step: OpenCV
  decode (``IMREAD_UNCHANGED``, so EXIF orientation is ignored as there),
  alpha matted onto white, albumentations' size rounding (``round``), its
  padding split (top/left get the smaller half) and crop offsets (floor),
  the same interpolations and ``cv2.imencode`` settings;
* no global state is touched, so download threads resize in parallel
  (OpenCV releases the GIL while it decodes, resizes and encodes).

Without a reduced decode the output bytes are identical to img2dataset's
(``tests/stages/test_resize.py`` checks this on real photos); with one, the pixels
are within ``tests/stages/test_resize.py``'s PSNR bound of img2dataset's and the
sizes identical. Images outside the fast path (16-bit, CMYK, palette PNG
with transparency, anything OpenCV decodes to an unusual layout) go through
img2dataset's own ``Resizer`` unchanged, serialised by a lock.
"""

from __future__ import annotations

import io
import math
import os
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pairforge.stages.common.fetch import error_text

#: img2dataset's Resizer error strings -> our reasons
_RESIZER_ERRORS = {
    "image too small": "image_too_small",
    "image area too large": "image_area_too_large",
    "aspect ratio too large": "aspect_ratio_too_large",
    "Image decoding error": "decode_error",
}
EXTENSIONS = {"jpg": "jpg", "png": "png", "webp": "webp"}
#: a reduced JPEG decode stays at least this many times the output size
REDUCE_MARGIN = 2.0
#: PIL header modes on the fast path -> the channels OpenCV's full decode gives
#: (0: a 2-D grey array); any other layout goes to img2dataset's Resizer
_FAST_MODES = {"L": 0, "RGB": 3, "RGBA": 4, "YCbCr": 3}


@dataclass(frozen=True)
class Probe:
    """The header of an image, or why it is refused (``reason`` non-empty)."""

    width: int = -1
    height: int = -1
    format: str = ""
    reason: str = ""
    detail: dict | None = None
    mode: str = ""


def probe(data: bytes, max_pixels: int) -> Probe:
    """Size, format and mode from the header only; no pixel data is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt, mode = im.format or "", im.mode
            if mode == "P" and "transparency" in im.info:
                mode = "PA"  # decoded with alpha by OpenCV: not the fast path
    except Image.DecompressionBombError as e:
        # PIL refuses above twice its own limit before we see the size
        return Probe(reason="too_many_pixels", detail={"error": str(e), "max_pixels": max_pixels})
    except Image.UnidentifiedImageError:
        return Probe(reason="decode_error", detail={"error": "not an image format PIL recognises", "bytes": len(data)})
    except Exception as e:  # noqa: BLE001 - any header PIL cannot read is not an image we can use
        return Probe(reason="decode_error", detail={"error": error_text(e, 300), "bytes": len(data)})
    if width * height > max_pixels:
        return Probe(
            width,
            height,
            fmt,
            "too_many_pixels",
            {"original_width": width, "original_height": height, "pixels": width * height, "max_pixels": max_pixels},
        )
    return Probe(width, height, fmt, mode=mode)


@dataclass(frozen=True)
class Resized:
    image: bytes | None
    width: int = -1
    height: int = -1
    original_width: int = -1
    original_height: int = -1
    reason: str = ""
    detail: dict | None = None
    #: 1, 2, 4 or 8: the DCT-domain reduction the decode used
    reduced: int = 1


class Resize:
    """img2dataset's resize semantics, one decode per image, thread-safe."""

    def __init__(
        self,
        *,
        image_size: int,
        resize_mode: str,
        resize_only_if_bigger: bool,
        upscale_interpolation: str,
        downscale_interpolation: str,
        encode_format: str,
        encode_quality: int,
        skip_reencode: bool,
        min_image_size: int,
        max_image_area: float | None,
        max_aspect_ratio: float | None,
        reduced_decode: bool = True,
    ):
        import cv2

        cv2.setNumThreads(1)  # one image per thread; threads are the parallelism
        self._cv2 = cv2
        inter = {
            "nearest": cv2.INTER_NEAREST,
            "linear": cv2.INTER_LINEAR,
            "bilinear": cv2.INTER_LINEAR,
            "cubic": cv2.INTER_CUBIC,
            "bicubic": cv2.INTER_CUBIC,
            "area": cv2.INTER_AREA,
            "lanczos": cv2.INTER_LANCZOS4,
            "lanczos4": cv2.INTER_LANCZOS4,
        }
        self.size = image_size
        self.mode = resize_mode
        self.only_if_bigger = resize_only_if_bigger
        self.up, self.down = inter[upscale_interpolation.lower()], inter[downscale_interpolation.lower()]
        self.ext = EXTENSIONS[encode_format]
        flag = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION, "webp": cv2.IMWRITE_WEBP_QUALITY}
        self.params = [int(flag[encode_format]), int(encode_quality)]
        self.header_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[encode_format]
        self.skip_reencode = skip_reencode
        self.min_size = min_image_size
        self.max_area = math.inf if max_image_area is None else max_image_area
        self.max_ratio = math.inf if max_aspect_ratio is None else max_aspect_ratio
        self.reduced_decode = reduced_decode
        self._reference_args = dict(
            image_size=image_size,
            resize_mode=resize_mode,
            resize_only_if_bigger=resize_only_if_bigger,
            upscale_interpolation=upscale_interpolation,
            downscale_interpolation=downscale_interpolation,
            encode_quality=encode_quality,
            encode_format=encode_format,
            skip_reencode=skip_reencode,
            min_image_size=min_image_size,
            max_image_area=self.max_area,
            max_aspect_ratio=self.max_ratio,
        )
        self._reference = None
        self._reference_lock = threading.Lock()

    # ------------------------------------------------------------ public

    def __call__(self, data: bytes, head: Probe | None = None) -> Resized:
        try:
            return self._fast(data, head or probe(data, max_pixels=2**62))
        except Exception:  # noqa: BLE001 - whatever the fast path trips on, img2dataset decides
            return self.reference(data)

    def _fast(self, data: bytes, head: Probe) -> Resized:
        if head.reason:
            return Resized(None, reason=head.reason, detail=head.detail)
        if head.mode not in _FAST_MODES:
            return self.reference(data)
        w, h = head.width, head.height
        refused = self._check(w, h)
        if refused:
            return Resized(None, reason=_RESIZER_ERRORS[refused], detail={"error": refused})
        plan = self._plan(w, h)
        k = self._reduction(head, plan) if self.reduced_decode else 1
        img = self._decode(data, head, k)
        if img is None:
            return Resized(None, reason="decode_error", detail={"error": "Image decoding error"})
        channels = 0 if img.ndim == 2 else img.shape[2]
        want = _FAST_MODES[head.mode] if k == 1 else (0 if head.mode == "L" else 3)
        if img.dtype != np.uint8 or img.shape[:2] != (-(-h // k), -(-w // k)) or channels != want:
            return self.reference(data)  # not the layout the header promised: let img2dataset decide
        encode = not (self.skip_reencode and head.format == self.header_format)
        if img.ndim == 3 and img.shape[2] == 4:
            img, encode = _matte_on_white(img), True
        if plan is not None:
            img, encode = self._apply(img, plan), True
        oh, ow = img.shape[:2]
        out = self._cv2.imencode(f".{self.ext}", img, self.params)[1].tobytes() if encode else bytes(data)
        return Resized(out, ow, oh, w, h, reduced=k)

    def reference(self, data: bytes) -> Resized:
        """img2dataset's own ``Resizer`` on ``data`` (one at a time: it swaps
        the process's stdout/stderr descriptors around each image)."""
        with self._reference_lock:
            if self._reference is None:
                self._reference = img2dataset_resizer_class()(**self._reference_args)
            img, width, height, ow, oh, err = self._reference(io.BytesIO(data))
        if err is not None:
            return Resized(None, reason=_RESIZER_ERRORS.get(err, "decode_error"), detail={"error": err})
        return Resized(img, width, height, ow, oh)

    # ------------------------------------------------------------ steps

    def _check(self, w: int, h: int) -> str:
        if min(w, h) < self.min_size:
            return "image too small"
        if w * h > self.max_area:
            return "image area too large"
        if max(w, h) / max(1, min(w, h)) > self.max_ratio:
            return "aspect ratio too large"
        return ""

    def _plan(self, w: int, h: int) -> tuple[int, int, int] | None:
        """(new width, new height, interpolation) of the resize, or None."""
        if self.mode == "no":
            return None
        side = min(w, h) if self.mode in ("keep_ratio", "center_crop") else max(w, h)
        downscale = side > self.size
        if self.only_if_bigger and not downscale:
            return None
        s = self.size / side
        return max(1, round(w * s)), max(1, round(h * s)), self.down if downscale else self.up

    def _reduction(self, head: Probe, plan) -> int:
        if plan is None or head.format != "JPEG" or head.mode not in ("L", "RGB", "YCbCr"):
            return 1
        nw, nh, _ = plan
        for k in (8, 4, 2):
            if -(-head.width // k) >= REDUCE_MARGIN * nw and -(-head.height // k) >= REDUCE_MARGIN * nh:
                return k
        return 1

    def _decode(self, data: bytes, head: Probe, k: int) -> np.ndarray | None:
        cv2 = self._cv2
        buf = np.frombuffer(data, np.uint8)
        if k == 1:
            return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        grey = head.mode == "L"
        flag = {
            (2, False): cv2.IMREAD_REDUCED_COLOR_2,
            (4, False): cv2.IMREAD_REDUCED_COLOR_4,
            (8, False): cv2.IMREAD_REDUCED_COLOR_8,
            (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
            (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
        }[k, grey]
        return cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)

    def _apply(self, img: np.ndarray, plan) -> np.ndarray:
        cv2 = self._cv2
        nw, nh, inter = plan
        if img.shape[:2] != (nh, nw):
            img = cv2.resize(img, (nw, nh), interpolation=inter)
        s = self.size
        if self.mode == "center_crop":
            y, x = (nh - s) // 2, (nw - s) // 2
            img = img[y : y + s, x : x + s]
        elif self.mode == "border" and (nh < s or nw < s):
            top, left = max(0, s - nh) // 2, max(0, s - nw) // 2
            bottom, right = max(0, s - nh) - top, max(0, s - nw) - left
            img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        return img


def _matte_on_white(img: np.ndarray) -> np.ndarray:
    """img2dataset's alpha matting: colour * alpha + white * (1 - alpha)."""
    alpha = img[:, :, 3:4]
    out = alpha / 255 * img[..., :3] + 255 - alpha
    return np.rint(out.clip(0, 255)).astype(np.uint8)


def img2dataset_resizer_class():
    """img2dataset's own ``Resizer``, from its module file. ``import
    img2dataset.resizer`` first runs the package's ``__init__``, which imports
    the whole downloader (wandb, webdataset, fsspec, ...): 2-5 s in every
    fresh Ray worker, for one class that needs only cv2 and albumentations."""
    import importlib.util
    import sys

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    loaded = sys.modules.get("img2dataset.resizer") or sys.modules.get(_RESIZER_MODULE)
    if loaded is None:
        package = importlib.util.find_spec("img2dataset")
        if package is None or not package.submodule_search_locations:
            raise ImportError("img2dataset is not installed")
        path = os.path.join(list(package.submodule_search_locations)[0], "resizer.py")
        spec = importlib.util.spec_from_file_location(_RESIZER_MODULE, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        sys.modules[_RESIZER_MODULE] = loaded
    return loaded.Resizer


_RESIZER_MODULE = "_pairforge_img2dataset_resizer"
