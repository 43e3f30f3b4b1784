"""Safety signals of every image, from real detectors that ship in wheels:
what LAION-5B published beside its pairs (``punsafe``) and what DataComp
did before release (faces blurred, text measured). docs/safety.md has the
recipes; each signal's definition is in its helper module.

Per row, on **one decode** of the stored image shared by every signal:

* ``punsafe`` (``nsfw``, on by default): NudeNet's score of exposed body
  parts, 0..1 (:mod:`stages.common.nsfw`); rows above ``nsfw_threshold``
  are dropped with reason ``nsfw``;
* ``text_area`` (``text``, on by default): the share of the image inside
  PP-OCRv4's text boxes (:mod:`stages.common.textdet`); rows above
  ``text_threshold`` (off by default) are dropped with ``too_much_text``;
  ``text_boxes: true`` keeps the boxes (ragged ``K x 4 x 2``, normalised);
* ``num_faces`` and ``face_boxes`` (``blur_faces``, off by default): MTCNN's
  faces (``K x 4`` xyxy, normalised like ``region_boxes``), blurred in the
  image bytes the shard's tar receives (:mod:`stages.common.blur`); the
  row's ``sha256`` stays the original download's. Stages after this one
  (``clip_score``, ``regions``) see the blurred image.

The ONNX models run on ONNX Runtime (its CUDA provider with onnxruntime-gpu)
or converted to torch (``engine``, :mod:`stages.common.nets`): on a GPU
worker without onnxruntime-gpu, ``engine: auto`` runs them in torch;
on the CPU with ``num_cpus`` threads. MTCNN runs on torch's device. A missing model file or package is
one line before Ray starts (:meth:`SafetyStage.check`). An image that cannot
be decoded fails the row with ``decode_error``.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from pairforge.stages.base import (
    STATUS_FAILED,
    Batch,
    Column,
    Resources,
    Stage,
    batch_len,
    object_array,
    reject,
    require,
)
from pairforge.stages.common import blur as _blur
from pairforge.stages.common import nets as _nets
from pairforge.stages.common import nsfw as _nsfw
from pairforge.stages.common import onnx as _onnx
from pairforge.stages.common import textdet as _text
from pairforge.stages.options import options

log = logging.getLogger(__name__)


@options
class Config:
    #: score every image with NudeNet (``punsafe``)
    nsfw: bool = True
    #: drop rows with ``punsafe`` above this (reason ``nsfw``); null: only score
    nsfw_threshold: float | None = 0.5
    #: the detector classes whose score is the NSFW score (``stages/common/nsfw.py``)
    nsfw_classes: tuple[str, ...] = _nsfw.UNSAFE
    #: the detector's input side in pixels (NudeNet's own: 320)
    nsfw_size: int = 320
    #: an ONNX file of the same kind; "": the nudenet wheel's ``320n.onnx``
    nsfw_model: str = ""
    #: measure the share of the image covered by text (``text_area``)
    text: bool = True
    #: drop rows with ``text_area`` above this (reason ``too_much_text``); null: only measure
    text_threshold: float | None = None
    #: also keep the text boxes (``text_boxes``: K x 4 corners, normalised)
    text_boxes: bool = False
    #: the text detector's input: the image's longer side scaled to this (a multiple of 32)
    text_size: int = 256
    #: an ONNX DBNet file; "": the rapidocr-onnxruntime wheel's PP-OCRv4 detector
    text_model: str = ""
    #: blur MTCNN's faces in the stored image (DataComp's release rule); keeps ``face_boxes``
    blur_faces: bool = False
    #: MTCNN's smallest face, in pixels of the stored image
    face_min_size: int = 20
    #: the face box grown by this share on every side before blurring
    blur_margin: float = _blur.MARGIN
    #: the blur's sigma as a share of the face's longer side
    blur_strength: float = _blur.STRENGTH
    #: JPEG/WebP quality of a blurred image encoded again
    blur_quality: int = 95
    #: ``auto`` (a GPU when the worker has one), ``cpu``, ``cuda``, ``cuda:N``
    device: str = "auto"
    #: what runs the ONNX models: ``onnxruntime``, ``torch`` (the files converted by onnx2torch),
    #: ``auto`` (onnxruntime-gpu's CUDA provider, else torch on a GPU, else onnxruntime on the CPU)
    engine: str = "auto"
    #: the torch engine's arithmetic on a GPU: ``fp16``, ``bf16``, ``fp32``; ``auto``: fp32 (docs/safety.md says why)
    precision: str = "auto"
    #: GPUs each actor asks Ray for; 0.5 puts two actors on one GPU
    num_gpus: float = 0.0
    #: CPUs per actor, and the ONNX Runtime / torch threads it uses (and, above 1, the threads
    #: that decode and letterbox images for a GPU)
    num_cpus: float = 1.0
    #: actors in the pool (min, max)
    concurrency: tuple[int, int] = (1, 1)
    #: rows per ``process_batch`` call (one actor call)
    batch_size: int = 256
    #: images per model call (fixed: a row's score does not depend on its batch)
    micro_batch: int = 16

    def __post_init__(self):
        require(self.nsfw or self.text or self.blur_faces, "nsfw/text/blur_faces", (self.nsfw, self.text, self.blur_faces),
                "at least one signal on")  # fmt: skip
        for name in ("nsfw_threshold", "text_threshold"):
            v = getattr(self, name)
            require(v is None or 0.0 <= v <= 1.0, name, v, "a score in [0, 1] (or null: no drop)")
        bad = [c for c in self.nsfw_classes if c not in _nsfw.LABELS] if not self.nsfw_model else []
        require(not bad and len(self.nsfw_classes) > 0, "nsfw_classes", self.nsfw_classes,
                f"a non-empty subset of {_nsfw.LABELS}")  # fmt: skip
        require(self.nsfw_size >= 32 and self.nsfw_size % 32 == 0, "nsfw_size", self.nsfw_size, "a multiple of 32")
        require(self.text_size >= 32 and self.text_size % 32 == 0, "text_size", self.text_size, "a multiple of 32")
        require(self.face_min_size >= 1, "face_min_size", self.face_min_size, ">= 1")
        require(0.0 <= self.blur_margin <= 2.0, "blur_margin", self.blur_margin, "a share in [0, 2]")
        require(0.0 < self.blur_strength <= 2.0, "blur_strength", self.blur_strength, "a share in (0, 2]")
        require(1 <= self.blur_quality <= 100, "blur_quality", self.blur_quality, "1..100")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device", self.device,
                "auto, cpu, cuda or cuda:N")  # fmt: skip
        require(self.engine in _nets.ENGINES, "engine", self.engine, f"one of {_nets.ENGINES}")
        require(self.precision in _nets.PRECISIONS, "precision", self.precision, f"one of {_nets.PRECISIONS}")
        require(self.engine != "onnxruntime" or self.precision in ("auto", "fp32"), "precision", self.precision,
                "auto or fp32 with engine: onnxruntime (half precision is the torch engine's)")  # fmt: skip
        require(self.device != "cpu" or self.precision in ("auto", "fp32"), "precision", self.precision,
                "auto or fp32 with device: cpu")  # fmt: skip
        for name in ("batch_size", "micro_batch"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.num_gpus >= 0 and self.num_cpus > 0, "num_gpus/num_cpus", (self.num_gpus, self.num_cpus),
                "gpus >= 0, cpus > 0")  # fmt: skip
        require(1 <= self.concurrency[0] <= self.concurrency[1], "concurrency", self.concurrency,
                "[min, max] with 1 <= min <= max")  # fmt: skip


class SafetyStage(Stage):
    name: ClassVar[str] = "safety"
    runs_on_actors: ClassVar[bool] = True
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        self._models: dict | None = None

    def __getstate__(self):  # ship the config, never the sessions
        state = dict(self.__dict__)
        state["_models"] = None
        return state

    def resources(self) -> Resources:
        c = self.config
        return Resources(num_cpus=c.num_cpus, num_gpus=c.num_gpus, batch_size=c.batch_size, concurrency=c.concurrency)

    def inputs(self) -> tuple[str, ...]:
        return ("image",)

    def outputs(self) -> tuple[Column, ...]:
        c = self.config
        cols = []
        if c.nsfw:
            cols.append(Column("punsafe", "scalar", "float32", default=np.float32("nan"), summary=True))
        if c.text:
            cols.append(Column("text_area", "scalar", "float32", default=np.float32("nan"), summary=True))
            if c.text_boxes:
                cols.append(Column("text_boxes", "ragged", "float32", (4, 2)))
        if c.blur_faces:
            cols.append(Column("num_faces", "scalar", "int32", default=-1, summary=True))
            cols.append(Column("face_boxes", "ragged", "float32", (4,)))
        return tuple(cols)

    def check(self, declared: dict) -> list[str]:
        c = self.config
        wanted = []
        if c.nsfw:
            wanted.append(("nsfw_model", c.nsfw_model, _nsfw.PACKAGE, _nsfw.MODEL_FILE, _nsfw.PIP))
        if c.text:
            wanted.append(("text_model", c.text_model, _text.PACKAGE, _text.MODEL_FILE, _text.PIP))
        problems = [p for w in wanted if (p := _onnx.model_problem(*w))]
        if wanted and (p := _nets.engine_problem("engine", c.engine)):
            problems.append(p)
        if c.blur_faces and _onnx.package_dir("facenet_pytorch") is None:
            problems.append("blur_faces: the package 'facenet-pytorch' (MTCNN) is not installed")
        return problems

    # ------------------------------------------------------------ per row

    def setup(self) -> None:
        if self._models is not None:
            return
        from pairforge.stages.common import clip as _clip

        c = self.config
        device = _clip.pick_device(c.device)
        threads = max(1, int(c.num_cpus))
        engine, net_device = _nets.choose(c.engine, device, c.device)
        models: dict = {"identity": {}}
        # decode, letterbox and DB post-processing in threads (cv2 and PIL let go of the GIL), so
        # that a GPU is fed by more than one core; on the CPU the engines' own threads use the cores
        pool = ThreadPoolExecutor(threads, thread_name_prefix="safety") if threads > 1 and net_device != "cpu" else None
        models["pool"] = pool
        for key, on, option, module in (("nsfw", c.nsfw, c.nsfw_model, _nsfw), ("text", c.text, c.text_model, _text)):
            if not on:
                continue
            path = _onnx.resolve(option, module.PACKAGE, module.MODEL_FILE)
            net = _nets.open_net(path, engine, net_device, threads, c.precision)
            if key == "nsfw":
                models[key] = _nsfw.NsfwDetector(net, tuple(c.nsfw_classes), c.nsfw_size, c.micro_batch, pool)
            else:
                models[key] = _text.TextDetector(net, c.text_size, c.micro_batch, pool=pool)
            models["identity"][key] = {"model": path.rsplit("/", 1)[-1], "sha256": _clip.file_sha256(path),
                                       "engine": f"{net.engine} {net_device} {net.precision}"}  # fmt: skip
        if c.blur_faces:
            import torch

            from pairforge.stages.common.detectors import Limits
            from pairforge.stages.common.faces import load_faces

            if device == "cpu":
                torch.set_num_threads(threads)
            models["faces"] = load_faces(device, Limits(max_regions=100, score_threshold=0.0), c.face_min_size)
        self._models = models

    def teardown(self) -> None:
        if self._models and self._models.get("pool") is not None:
            self._models["pool"].shutdown(wait=False)
        self._models = None

    def process_batch(self, batch: Batch) -> Batch:
        self.setup()
        c, m = self.config, self._models
        n = batch_len(batch)
        out = dict(batch)
        decoded, errors = decode(batch["image"], m["pool"])
        good = [i for i in range(n) if decoded[i] is not None]
        images = [decoded[i] for i in good]
        drop_nsfw = drop_text = np.zeros(n, dtype=bool)
        if c.nsfw:
            scores, classes = m["nsfw"].scores(images)
            punsafe = np.full(n, np.nan, dtype=np.float32)
            punsafe[good] = scores
            out["punsafe"] = punsafe
            if c.nsfw_threshold is not None:
                drop_nsfw = np.nan_to_num(punsafe, nan=-1.0) > c.nsfw_threshold
            top = dict(zip(good, classes))
        if c.text:
            found = dict(zip(good, m["text"].detect(images)))
            area = np.full(n, np.nan, dtype=np.float32)
            for i, (_, share) in found.items():
                area[i] = share
            out["text_area"] = area
            if c.text_boxes:
                empty = np.zeros((0, 4, 2), np.float32)
                out["text_boxes"] = object_array([found[i][0] if i in found else empty for i in range(n)])
            if c.text_threshold is not None:
                drop_text = np.nan_to_num(area, nan=-1.0) > c.text_threshold
        if c.blur_faces:
            self._blur(out, batch, decoded, good)
        ids = m["identity"]
        failed = np.array([e is not None for e in errors], dtype=bool)
        reject(out, failed, self.name, "decode_error", [{"error": errors[i]} for i in np.flatnonzero(failed)],
               status=STATUS_FAILED)  # fmt: skip
        if drop_nsfw.any():
            reject(out, drop_nsfw, self.name, "nsfw",
                   [{"punsafe": float(out["punsafe"][i]), "class": top[i], "threshold": c.nsfw_threshold,
                     "model": ids["nsfw"]} for i in np.flatnonzero(drop_nsfw)])  # fmt: skip
        drop_text = drop_text & ~drop_nsfw
        if drop_text.any():
            reject(out, drop_text, self.name, "too_much_text",
                   [{"text_area": round(float(out["text_area"][i]), 6), "threshold": c.text_threshold,
                     "model": ids["text"]} for i in np.flatnonzero(drop_text)])  # fmt: skip
        return out

    def _blur(self, out: Batch, batch: Batch, decoded: list, good: list[int]) -> None:
        """Faces found, boxes kept, and the image bytes of rows with a face
        replaced by the blurred image in its own format."""
        import torch

        c = self.config
        n = batch_len(batch)
        found = self._models["faces"].detect([torch.from_numpy(decoded[i]).permute(2, 0, 1) for i in good])
        counts = np.zeros(n, dtype=np.int32)
        boxes = [np.zeros((0, 4), np.float32)] * n
        images = batch["image"].copy()
        exts = batch.get("image_ext")
        for i, r in zip(good, found):
            h, w = decoded[i].shape[:2]
            counts[i] = len(r.boxes)
            boxes[i] = np.clip(np.asarray(r.boxes, np.float32).reshape(-1, 4) / np.array([w, h, w, h], np.float32), 0, 1)
            if len(r.boxes):
                ext = str(exts[i]) if exts is not None and exts[i] else "jpg"
                blurred = _blur.blur_faces(decoded[i], r.boxes, c.blur_margin, c.blur_strength)
                images[i] = _blur.encode(blurred, ext, c.blur_quality)
        out["num_faces"] = counts
        out["face_boxes"] = object_array(boxes)
        out["image"] = images


def decode(images, pool=None) -> tuple[list, list[str | None]]:
    """Each image as ``H x W x 3`` uint8 RGB (grey, palette, CMYK and alpha
    images converted, alpha dropped), or ``None`` and what was wrong;
    in ``pool``'s threads when one is given."""
    results = list((pool.map if pool is not None else map)(_decode_one, images))
    return [r[0] for r in results], [r[1] for r in results]


def _decode_one(data) -> tuple[np.ndarray | None, str | None]:
    from PIL import Image

    try:
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError("no image bytes")
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB")), None
    except Exception as e:  # noqa: BLE001 - any undecodable input is a per-row failure
        return None, f"{type(e).__name__}: {e}"
