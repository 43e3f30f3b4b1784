"""Image checks before and around img2dataset's ``Resizer``.

``Resizer`` decodes the whole image before its own size checks, so a small
file declaring a huge canvas (a decompression bomb) would be decoded in
full. :func:`probe` reads only the header with PIL first; :class:`Resize`
then runs the real ``Resizer`` and turns its error strings into reasons.
"""

from __future__ import annotations

import io
import math
import os
import threading
from dataclasses import dataclass

from PIL import Image

from stages.common.fetch import error_text

#: img2dataset's Resizer error strings -> our reasons
_RESIZER_ERRORS = {
    "image too small": "image_too_small",
    "image area too large": "image_area_too_large",
    "aspect ratio too large": "aspect_ratio_too_large",
    "Image decoding error": "decode_error",
}
EXTENSIONS = {"jpg": "jpg", "png": "png", "webp": "webp"}


@dataclass(frozen=True)
class Probe:
    """The header of an image, or why it is refused (``reason`` non-empty)."""

    width: int = -1
    height: int = -1
    format: str = ""
    reason: str = ""
    detail: dict | None = None


def probe(data: bytes, max_pixels: int) -> Probe:
    """Size and format from the header only; no pixel data is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format or ""
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
    return Probe(width, height, fmt)


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


@dataclass(frozen=True)
class Resized:
    image: bytes | None
    width: int = -1
    height: int = -1
    original_width: int = -1
    original_height: int = -1
    reason: str = ""
    detail: dict | None = None


class Resize:
    """One img2dataset ``Resizer`` per worker.

    Calls are serialised: ``Resizer`` silences OpenCV by swapping the
    process's stdout/stderr file descriptors around each image, which two
    threads doing at once would leave swapped for good. One resize at a time
    per worker is also what img2dataset does (downloads in threads, resizes
    in the shard's process)."""

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
    ):
        Resizer = img2dataset_resizer_class()
        self.ext = EXTENSIONS[encode_format]
        self._lock = threading.Lock()
        self._resizer = Resizer(
            image_size=image_size,
            resize_mode=resize_mode,
            resize_only_if_bigger=resize_only_if_bigger,
            upscale_interpolation=upscale_interpolation,
            downscale_interpolation=downscale_interpolation,
            encode_quality=encode_quality,
            encode_format=encode_format,
            skip_reencode=skip_reencode,
            min_image_size=min_image_size,
            max_image_area=math.inf if max_image_area is None else max_image_area,
            max_aspect_ratio=math.inf if max_aspect_ratio is None else max_aspect_ratio,
        )

    def __call__(self, data: bytes) -> Resized:
        with self._lock:
            img, width, height, ow, oh, err = self._resizer(io.BytesIO(data))
        if err is not None:
            reason = _RESIZER_ERRORS.get(err, "decode_error")
            return Resized(None, reason=reason, detail={"error": err})
        return Resized(img, width, height, ow, oh)
