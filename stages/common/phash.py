"""64-bit perceptual hashes (pHash, dHash) from encoded bytes or from pixels.

``dedup_phash`` hashes each stored image; the download stage can hash the
pixels it has just resized, which saves decoding every image a second time
(``dedup_phash``'s ``hash_column`` then reads that column). Both routes give
imagehash's hashes, in imagehash's 16-hex-digit string form:

* from bytes, a JPEG is decoded at a reduced DCT scale (``DRAFT_SIZE``: the
  hash reads a 32x32 or 9x8 thumbnail anyway), then imagehash runs on it;
* from pixels, their luma is box-averaged (``cv2.INTER_AREA``) by the factor
  that reduced decode would use, then handed to imagehash; measured on the
  planted set plus 300 photos, this is 2x cheaper than hashing the full
  pixels and as close to the stored file's hash.

The pixel route differs from hashing the stored file only by the stored
file's JPEG quantisation: ``tests/test_resize.py`` measures the distance to
``imagehash.phash`` of the stored image and checks that ``dedup_phash`` makes
the same decisions on the planted set either way.
"""

from __future__ import annotations

import io

import numpy as np

#: decode (or average) to no smaller than this before hashing
DRAFT_SIZE = 128
ALGORITHMS = ("phash", "dhash")


def _hash_fn(algorithm: str):
    import imagehash

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    return imagehash.phash if algorithm == "phash" else imagehash.dhash


def image_hash(data: bytes, algorithm: str = "phash") -> str:
    """The hash of encoded image bytes as 16 hex digits."""
    from PIL import Image

    fn = _hash_fn(algorithm)
    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", (DRAFT_SIZE, DRAFT_SIZE))
        return str(fn(im))


def pixels_hash(pixels: np.ndarray, algorithm: str = "phash") -> str:
    """The hash of decoded pixels (OpenCV layout: BGR, BGRA or 2-D grey)."""
    import cv2
    from PIL import Image

    fn = _hash_fn(algorithm)
    a = pixels
    if a.ndim == 3:  # luma by ITU-R 601, as a JPEG's Y channel and PIL's convert("L")
        a = cv2.cvtColor(a, cv2.COLOR_BGRA2GRAY if a.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    h, w = a.shape
    k = 1  # the factor PIL's draft() would pick: halve while both sides stay >= DRAFT_SIZE
    while w // (2 * k) >= DRAFT_SIZE and h // (2 * k) >= DRAFT_SIZE:
        k *= 2
    if k > 1:
        a = cv2.resize(a, (-(-w // k), -(-h // k)), interpolation=cv2.INTER_AREA)
    return str(fn(Image.fromarray(np.ascontiguousarray(a), "L")))
