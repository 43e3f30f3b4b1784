"""MTCNN face detection (facenet-pytorch) behind :class:`~stages.common.detectors.Detector`.

Why MTCNN: its three small nets (P-, R- and O-Net, ~2 MB) ship inside the
facenet-pytorch wheel, so a run that wants face regions needs no download
and no GPU, and the weights' checksum names exactly what ran.

What this wrapper adds to ``facenet_pytorch.MTCNN``:

* it takes the detectors' input (uint8 ``[3, H, W]`` tensors, CPU or CUDA;
  ``[1, H, W]`` and ``[H, W]`` grey images are repeated to three channels)
  and gives :class:`Regions` (label ``face``, MTCNN's probability as the
  score, no features), boxes clipped to the image, then the same
  :func:`keep_best` post-processing as every backend;
* it never raises on an image MTCNN has nothing to say about: an image whose
  short side is below ``min_face_size`` (MTCNN builds no pyramid level for it
  and fails on an empty ``torch.cat``) or one with no face (MTCNN returns
  ``None``) gives empty :class:`Regions`;
* equal-size images go to MTCNN together (it batches only images of one
  size; a run with ``resize_mode`` border/center has one size throughout),
  at most :data:`MAX_BATCH` at a time, others one size group at a time.

Speed on the CPU (256 x 256 images, torch's 2 threads on this project's
shared 2-core machine while it was idle, median of 3): about 37 images/s
in batches of 32 and 22 one at a time on a mix of six scikit-image photos
(one with a face); about 20 and 15 when every image is the astronaut's
portrait, where more of P-Net's candidate windows go on to R- and O-Net.
The cost follows the content, and other work on the cores cuts it several-fold.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np

from pairforge.stages.common.detectors import Detector, Limits, Regions, keep_best

LABEL = "face"
#: facenet-pytorch's defaults for P-, R- and O-Net
THRESHOLDS = (0.6, 0.7, 0.7)
#: images of one size per MTCNN call (bounds the pyramid's memory)
MAX_BATCH = 32
WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


class FaceDetector(Detector):
    """facenet-pytorch's MTCNN with ``keep_all=True`` (see the module doc)."""

    categories = (LABEL,)
    feature_dim = 0

    def __init__(self, mtcnn, limits: Limits, identity: dict):
        self.mtcnn, self.limits, self.identity = mtcnn, limits, identity
        self.min_face_size = int(mtcnn.min_face_size)

    def detect(self, images: list) -> list[Regions]:
        import torch

        rgb = [_rgb(torch.as_tensor(t)) for t in images]
        out: list[Regions | None] = [None] * len(rgb)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(rgb):
            h, w = t.shape[-2:]
            if min(h, w) < self.min_face_size:  # no pyramid level: nothing MTCNN can find
                out[i] = Regions.empty()
            else:
                by_size.setdefault((h, w), []).append(i)
        for (h, w), idx in by_size.items():
            for start in range(0, len(idx), MAX_BATCH):
                chunk = idx[start : start + MAX_BATCH]
                # MTCNN reads a 4-D tensor as N x H x W x C
                batch = torch.stack([rgb[i] for i in chunk]).permute(0, 2, 3, 1)
                boxes, probs = self.mtcnn.detect(batch)
                for i, b, p in zip(chunk, boxes, probs):
                    out[i] = self._regions(b, p, h, w)
        return out

    def _regions(self, boxes, probs, h: int, w: int) -> Regions:
        import torch

        if boxes is None:  # MTCNN's "no face"
            return Regions.empty()
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        s = torch.as_tensor(np.asarray(probs, dtype=np.float32).reshape(-1))
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        inside = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        b, s = b[inside], s[inside]
        keep = keep_best(b, s, torch.zeros(len(s), dtype=torch.int64), self.limits)
        return Regions(b[keep].numpy(), np.array([LABEL] * len(keep), dtype=str), s[keep].numpy())


def _rgb(t):
    """``t`` as a uint8-valued ``[3, H, W]`` tensor (grey repeated)."""
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3]


def weights_dir() -> Path:
    import facenet_pytorch

    return Path(facenet_pytorch.__file__).parent / "data"


def weights_sha256() -> str:
    """sha256 of the three weight files concatenated (P-, R-, O-Net order)."""
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        h.update((weights_dir() / name).read_bytes())
    return h.hexdigest()


def load_faces(device: str, limits: Limits, min_face_size: int = 20, thresholds=THRESHOLDS) -> FaceDetector:
    """MTCNN on ``device`` with the weights from the wheel; ``min_face_size``
    in pixels of the image as given, ``thresholds`` for P-, R- and O-Net."""
    from facenet_pytorch import MTCNN

    if min_face_size < 1:
        raise ValueError(f"min_face_size: expected >= 1, got {min_face_size!r}")
    if len(thresholds) != 3 or not all(0.0 <= float(x) <= 1.0 for x in thresholds):
        raise ValueError(f"thresholds: expected three values in [0, 1], got {thresholds!r}")
    mtcnn = MTCNN(
        keep_all=True,
        select_largest=False,  # MTCNN's own order is then by probability, as keep_best's ties expect
        min_face_size=int(min_face_size),
        thresholds=[float(x) for x in thresholds],
        device=device,
    )
    identity = {
        "backend": "mtcnn",
        "package": "facenet-pytorch",
        "version": metadata.version("facenet-pytorch"),
        "sha256": weights_sha256(),
    }
    return FaceDetector(mtcnn.eval(), limits, identity)
