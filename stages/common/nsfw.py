"""The NSFW score of an image: NudeNet's detector of exposed body parts.

The model is ``320n.onnx`` from the nudenet wheel (3.4.2): a YOLOv8n that
Ultralytics exported (its metadata says so, and that the weights are under
AGPL-3.0, while the nudenet package is MIT), 18 classes of body parts, each
``*_EXPOSED`` or ``*_COVERED``, plus faces. Its output per image is
``[4 + 18, anchors]``: a box and 18 sigmoid class scores per anchor.

**The score** (the ``punsafe`` column, named after LAION-5B's): the highest
score any anchor gives any class in :data:`UNSAFE` (exposed genitals,
breasts, buttocks, anus), a number in 0..1; 0 when no anchor scores one.
The maximum over anchors is also the maximum over the boxes NudeNet's own
post-processing would return (non-maximum suppression keeps the best box
of every cluster), without running it. Exposed bellies, armpits, feet and
male chests are left out by default: swimwear, sport and beach photos have
them. ``classes`` takes any subset of :data:`LABELS`.

**The input** is NudeNet's: the image padded to a square at its bottom and
right with black, resized to ``size`` x ``size`` (bilinear, as OpenCV's
``blobFromImage`` does), RGB scaled to 0..1. One difference, on purpose:
nudenet 3.4.2's own ``detect(path)`` reads the file as BGR, converts it with
``COLOR_RGBA2BGR`` (which on a 3-channel image swaps the channels) and then
swaps again in ``blobFromImage``, so the network sees BGR. The network was
trained on RGB (Ultralytics' convention), and on scikit-image's astronaut it
is surer of the face's class fed RGB (FACE_FEMALE 0.81 against FACE_MALE
0.17) than fed BGR (0.72 against 0.49, what ``NudeDetector.detect`` returns),
so the stage feeds RGB. ``tests/stages/test_safety_nsfw.py`` holds both facts.

**The engines** (:mod:`stages.common.nets`): ONNX Runtime runs the file as
it is; the torch engine runs it converted by onnx2torch, on the CPU or a GPU
(fp32; fp16 or bf16 on a GPU if asked). Both get the same letterboxed ``uint8`` images and their
raw output goes through the same :func:`score_rows`.

Images go to the network in chunks of ``micro_batch``, the last padded with
copies of its last image, so an image's score does not depend on the rows
it shared a batch with.
"""

from __future__ import annotations

import ast

import numpy as np

from pairforge.stages.common.nets import Normalise, fixed_batch

#: nudenet 3.4.2's classes, in the model's output order (its metadata ``names``)
LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)  # fmt: skip
#: the classes whose score is the NSFW score by default (see the module doc)
UNSAFE = (
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
)  # fmt: skip
PACKAGE, MODEL_FILE, PIP = "nudenet", "320n.onnx", "nudenet==3.4.2 onnxruntime==1.32.0"


#: blobFromImage's scale: pixels to 0..1
NORM = Normalise(1.0 / 255.0)


def letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    """An ``H x W x 3`` uint8 RGB image padded square with black at its
    bottom and right and resized to ``size`` x ``size`` (bilinear): uint8."""
    import cv2

    h, w = rgb.shape[:2]
    side = max(h, w)
    square = cv2.copyMakeBorder(rgb, 0, side - h, 0, side - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)


def prepare(rgb: np.ndarray, size: int) -> np.ndarray:
    """The network's ``[3, size, size]`` float32 input of one image, as the
    ONNX Runtime engine computes it (the torch engine: the same arithmetic)."""
    return NORM.numpy(letterbox(rgb, size)[None])[0]


def score_rows(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """**The score rule**, from the raw output's rows of the chosen classes
    (``[images, classes, anchors]``): per image the best score of any anchor
    in any of them, and the index of the class that gave it."""
    per_class = pred.max(axis=2)  # [images, classes]: best anchor per class
    best = per_class.argmax(axis=1)
    return per_class[np.arange(len(per_class)), best].astype(np.float32), best


class NsfwDetector:
    """Scores images with the NudeNet model, on any engine's net
    (:mod:`stages.common.nets`). ``pool``: an executor whose ``map``
    letterboxes images in threads (default: in this thread)."""

    def __init__(self, net, classes: tuple[str, ...] = UNSAFE, size: int = 320, micro_batch: int = 16, pool=None):
        self.net, self.size, self.micro_batch, self.pool = net, int(size), int(micro_batch), pool
        self.labels = model_labels(net.metadata)
        unknown = [c for c in classes if c not in self.labels]
        if unknown:
            raise ValueError(f"nsfw_classes: {unknown} are not classes of this model ({', '.join(self.labels)})")
        self.classes = tuple(classes)
        self._rows = np.array([4 + self.labels.index(c) for c in classes], dtype=np.int64)

    def scores(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Per image (``H x W x 3`` uint8 RGB): the NSFW score (float32) and
        the class that gave it (``""`` when the score is 0)."""
        n = len(images)
        out = np.zeros(n, dtype=np.float32)
        top = [""] * n
        if not n or not len(self._rows):
            return out, top
        boxed = (self.pool.map if self.pool is not None else map)(lambda im: letterbox(im, self.size), images)
        for a in range(0, n, self.micro_batch):
            b = min(a + self.micro_batch, n)
            x = np.stack([next(boxed) for _ in range(a, b)])  # the pool letterboxes the next chunk meanwhile
            x = fixed_batch(x, self.micro_batch)
            score, best = score_rows(self.net(x, NORM, self._rows)[: b - a])
            out[a:b] = score
            for j, k in enumerate(best):
                top[a + j] = self.classes[k] if out[a + j] > 0 else ""
        return out, top


def model_labels(metadata: dict) -> tuple[str, ...]:
    """The class names an Ultralytics export stores in its metadata
    (``{0: 'NAME', ...}``, read as a literal, never run), or :data:`LABELS`."""
    names = metadata.get("names")
    if not names:
        return LABELS
    try:
        table = ast.literal_eval(names)
    except (ValueError, SyntaxError):
        return LABELS
    if not isinstance(table, dict):
        return LABELS
    return tuple(str(table[i]) for i in sorted(table))
