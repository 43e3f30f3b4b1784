"""The regions stage's options: the detectors (``DetectorSpec``, merged in
order), how many boxes and which features, CLIP naming, and the actor plan.
Apart from the stage (:mod:`stages.regions`), which loads the detectors and
runs them; ``stages.regions.Config`` and ``DetectorSpec`` are these classes.
"""

from __future__ import annotations

from typing import ClassVar

from pairforge.stages.base import require
from pairforge.stages.common import detectors as _det
from pairforge.stages.options import options

BACKENDS = ("pf-tiny", "mtcnn")
FEATURES = ("roi", "clip")


@options
class DetectorSpec:
    #: a job may name a detector by its model alone: ``detectors: [mtcnn]``
    SHORTHAND: ClassVar[str] = "model"

    #: ``pf-tiny``, ``mtcnn`` or a torchvision builder (``fasterrcnn_mobilenet_v3_large_fpn``)
    model: str = "pf-tiny"
    #: torchvision: ``random``, a weight enum member (``DEFAULT``, ``COCO_V1``) or a
    #: checkpoint file; pf-tiny: a checkpoint file ("" or ``pf-tiny-detector``: the shipped one); mtcnn: unused
    weights: str = ""
    #: torchvision's resize of the shorter side (0: the model's own)
    min_size: int = 0
    #: torchvision's resize of the longer side (0: the model's own)
    max_size: int = 0
    #: the backbone map RoI features are pooled from ("": the finest)
    feature_level: str = ""
    #: its labels mean nothing (an RPN, a face finder): ``clip_labels: agnostic`` renames them
    class_agnostic: bool = False

    def __post_init__(self):
        known = (*BACKENDS, *_det.TORCHVISION_MODELS)
        require(self.model in BACKENDS or self.model.startswith(("fasterrcnn", "retinanet", "fcos", "ssd")),
                "model", self.model, f"one of {known}")  # fmt: skip
        require(self.min_size >= 0 and self.max_size >= 0, "min_size/max_size", (self.min_size, self.max_size), ">= 0")


@options
class Config:
    #: the detectors run on every image, their boxes merged (see ``DetectorSpec``:
    #: ``model``, ``weights``, ``min_size``, ``max_size``, ``feature_level``, ``class_agnostic``)
    detectors: tuple[DetectorSpec, ...] = (DetectorSpec(),)
    #: at most this many boxes an image, over all detectors (bottom-up attention: 36)
    max_regions: int = 36
    #: boxes scoring below this are not kept
    score_threshold: float = 0.5
    #: IoU of class-aware NMS
    nms_iou: float = 0.5
    #: ``roi`` (pooled backbone features), ``clip`` (CLIP crop embeddings), both or none;
    #: null (default): ``roi`` when the first detector has a backbone map to pool from
    #: (every one but ``mtcnn``), else none
    features: tuple[str, ...] | None = None
    #: ``off``, ``agnostic`` or ``all`` (see the module doc)
    clip_labels: str = "off"
    #: the run's CLIP model, for ``clip`` features and labels (as ``clip_score`` takes them)
    clip_model: str = "ViT-B-32"
    #: its checkpoint: a file, an open_clip tag or ``random`` ("": no CLIP)
    clip_pretrained: str = ""
    #: ``coco80`` or a text file with one name a line
    vocabulary: str = "coco80"
    #: ``auto`` (a GPU when the worker has one), ``cpu``, ``cuda``, ``cuda:N``
    device: str = "auto"
    #: GPUs each actor asks Ray for; 0.5 puts two actors on one GPU
    num_gpus: float = 0.0
    #: CPUs each actor asks Ray for
    num_cpus: float = 1.0
    #: actors in the pool (min, max)
    concurrency: tuple[int, int] = (1, 1)
    #: rows per ``process_batch`` call (one actor call)
    batch_size: int = 256
    #: images per detector call
    micro_batch: int = 64
    #: batches one GPU actor works on at once, on threads
    actor_threads: int = 2
    #: detector calls one process runs on its GPU at once (0: as many as fit in its
    #: share of the GPU's memory, measured on the first call; ``stages/common/gpu_slots.py``)
    detector_calls: int = 0
    #: ``reject`` a row whose image no detector can take (``detect_error``), or ``keep`` it with K = 0
    on_error: str = "reject"

    def __post_init__(self):
        require(len(self.detectors) >= 1, "detectors", self.detectors, "at least one detector")
        if self.features is None:  # what fits the first detector (see the field's comment)
            object.__setattr__(self, "features", ("roi",) if self.detectors[0].model != "mtcnn" else ())
        require(self.max_regions >= 1, "max_regions", self.max_regions, ">= 1")
        require(0.0 <= self.score_threshold <= 1.0, "score_threshold", self.score_threshold, "a score in [0, 1]")
        require(0.0 < self.nms_iou <= 1.0, "nms_iou", self.nms_iou, "an IoU in (0, 1]")
        require(all(f in FEATURES for f in self.features), "features", self.features, f"a subset of {FEATURES}")
        require(self.clip_labels in ("off", "agnostic", "all"), "clip_labels", self.clip_labels, "off, agnostic or all")
        needs_clip = "clip" in self.features or self.clip_labels != "off"
        require(not needs_clip or bool(self.clip_pretrained), "clip_pretrained", self.clip_pretrained,
                "a CLIP checkpoint (file, open_clip tag or 'random') for clip features or labels")  # fmt: skip
        require("roi" not in self.features or self.detectors[0].model != "mtcnn", "features", list(self.features),
                "no 'roi' when the first detector is mtcnn (it has no backbone map to pool from): leave features "
                "out, or put a detector with one first (detectors: [pf-tiny, mtcnn])")  # fmt: skip
        require(self.on_error in ("reject", "keep"), "on_error", self.on_error, "reject or keep")
        for name in ("batch_size", "micro_batch", "actor_threads"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.detector_calls >= 0, "detector_calls", self.detector_calls, ">= 0 (0: as many as fit)")
        require(
            self.num_gpus >= 0 and self.num_cpus > 0,
            "num_gpus/num_cpus",
            (self.num_gpus, self.num_cpus),
            "gpus >= 0, cpus > 0",
        )
