"""Object regions per image: a detector's boxes, labels, scores and one
feature vector per box, the "region features" VisualBERT, ViLBERT, UNITER
and LXMERT were trained on (there from Anderson et al.'s bottom-up attention
Faster R-CNN: up to 36 boxes an image, a pooled backbone feature per box).

Per row the stage adds (``manifests/FORMAT.md``):

* ``num_regions`` (int32) and the ragged ``region_boxes`` (K x 4 float32,
  xyxy normalised to the stored image's width and height, so they fit the
  image at any size), ``region_labels`` (K str) and ``region_scores``
  (K float32), best score first;
* ``region_feats`` (K x D float16, ``"roi" in features``): RoIAlign on the
  first detector's backbone map at every box, averaged (see
  :mod:`stages.common.detectors`); boxes of the other detectors (faces) are
  pooled on the same map, so every region has a feature of one kind;
* ``region_clip`` (K x E float16, ``"clip" in features``): the run's CLIP
  image embedding of each box's crop.

Features are written per shard as arrays aligned with the parquet rows
(``arrays/<col>/``) and per sample as ``{key}.<col>.npy`` tar members, which
webdataset's default decoders read.

Detectors (``detectors``, merged in order; :mod:`stages.common.detectors`):
torchvision's models (weight enums, a checkpoint file or ``random``), the
project's offline ``pf-tiny`` detector and facenet-pytorch's ``mtcnn``.
``clip_labels`` names boxes with CLIP against a vocabulary (COCO's 80 names
by default, or a file with one name a line): ``agnostic`` for the boxes of
detectors marked ``class_agnostic``, ``all`` for every box.

Each image is decoded once (nvJPEG on a GPU, libjpeg/PIL on the CPU; grey
and CMYK images become RGB) for the detectors and the crops. On a GPU a
Faster R-CNN runs batched (:mod:`stages.common.rcnn_batched`: no host sync
per image, the same regions as the model's own forward). An image no
detector can take fails alone with ``detect_error`` (or keeps K = 0 with
``on_error: keep``); an undecodable one fails with ``decode_error``.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
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
)
from pairforge.stages.common import clip as _clip
from pairforge.stages.common import detectors as _det
from pairforge.stages.common.assets import resolve as resolve_asset
from pairforge.stages.common.gpu_slots import GpuMemoryError, GpuSlots
from pairforge.stages.common.regions_options import Config, DetectorSpec

log = logging.getLogger(__name__)
#: labels are fixed-width strings (longer names are cut): Ray Data's tensor
#: columns need one scalar type for every row's array, and numpy's ``str``
#: would take the width of each row's longest label
LABEL_DTYPE = "<U64"
#: the shipped pf-tiny detector (``scripts/build_detector.py``)
PF_TINY = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "pf-tiny-detector.pt"


#: the width of each builder's finest backbone map; the FPN models' is 256
_ROI_DIMS = {"ssdlite320_mobilenet_v3_large": 672}


@functools.lru_cache(maxsize=8)
def _roi_dim(spec: DetectorSpec) -> int:
    """The RoI feature length of ``spec``'s detector: known for the shipped
    detector (its JSON) and torchvision's builders, without importing torch
    (``pipeline.checks`` asks before a run starts); else built on the CPU."""
    if spec.model == "mtcnn":
        return 0
    if spec.model == "pf-tiny" and resolve_asset(spec.weights) in ("", str(PF_TINY)) and not spec.feature_level:
        meta = PF_TINY.with_suffix(".json")
        if meta.is_file():
            return int(json.loads(meta.read_text())["config"]["fpn_channels"])
    if spec.model != "pf-tiny" and not spec.feature_level:
        return _ROI_DIMS.get(spec.model, 256)
    if spec.model != "pf-tiny":
        spec = DetectorSpec(spec.model, _det.RANDOM_WEIGHTS, spec.min_size, spec.max_size, spec.feature_level)
    return _load(spec, "cpu", _det.Limits(), False).feature_dim


def _load(spec: DetectorSpec, device: str, limits: _det.Limits, half: bool) -> _det.Detector:
    level = spec.feature_level or None
    if spec.model == "mtcnn":
        from pairforge.stages.common.faces import load_faces

        return load_faces(device, limits)
    if spec.model == "pf-tiny":
        from pairforge.stages.common import pfdet

        path = resolve_asset(spec.weights) or str(PF_TINY)
        model, categories, _ = pfdet.load(path, device)
        identity = {"backend": "pf-tiny", "weights": path, "sha256": _clip.file_sha256(path)}
        return _det.TorchvisionDetector(model, categories, device, limits, identity, level, half)
    return _det.load_torchvision(spec.model, resolve_asset(spec.weights) or _det.RANDOM_WEIGHTS, device, limits,
                                 spec.min_size, spec.max_size, level, half)  # fmt: skip


def vocabulary(source: str) -> list[str]:
    """COCO's 80 object names, or the names in file ``source`` (one a line)."""
    if source == "coco80":
        names = _det.torchvision_categories("fasterrcnn_resnet50_fpn_v2")
        return [n for n in names if n not in ("__background__", "N/A")]
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"vocabulary: expected 'coco80' or a file of names, got {source!r}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class RegionsStage(Stage):
    name: ClassVar[str] = "regions"
    runs_on_actors: ClassVar[bool] = True
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        self._detectors: list | None = None
        self._clip = None
        self._vocab: tuple[list[str], object] | None = None
        self._slots: GpuSlots | None = None
        self._device = "cpu"

    def __getstate__(self):  # ship the config, never the models
        state = dict(self.__dict__)
        state["_detectors"] = state["_clip"] = state["_vocab"] = state["_slots"] = None
        return state

    def resources(self) -> Resources:
        c = self.config
        on_gpu = c.num_gpus > 0 or c.device.startswith("cuda")
        return Resources(num_cpus=c.num_cpus, num_gpus=c.num_gpus, batch_size=c.batch_size, concurrency=c.concurrency,
                         actor_calls=c.actor_threads if on_gpu else 1)  # fmt: skip

    def inputs(self) -> tuple[str, ...]:
        return ("image",)

    def outputs(self) -> tuple[Column, ...]:
        c = self.config
        cols = [
            Column("num_regions", "scalar", "int32", default=0),
            Column("region_boxes", "ragged", "float32", (4,)),
            Column("region_labels", "ragged", LABEL_DTYPE, ()),
            Column("region_scores", "ragged", "float32", ()),
        ]
        if "roi" in c.features:
            cols.append(Column("region_feats", "ragged", "float16", (_roi_dim(c.detectors[0]),), store="arrays"))
        if "clip" in c.features:
            cols.append(
                Column("region_clip", "ragged", "float16", (_clip.embed_dim(c.clip_model) or 0,), store="arrays")
            )
        return tuple(cols)

    def setup(self) -> None:
        if self._detectors is not None:
            return
        import torch

        c = self.config
        self._device = _clip.pick_device(c.device)
        if self._device == "cpu":
            torch.set_num_threads(max(1, int(c.num_cpus)))
        limits = _det.Limits(c.max_regions, c.score_threshold, c.nms_iou)
        gpu = self._device.startswith("cuda")  # detectors under fp16 autocast (torchvision's recipe), CLIP bf16
        self._detectors = [_load(s, self._device, limits, gpu) for s in c.detectors]
        share = c.num_gpus if 0 < c.num_gpus < 1 else 1.0
        self._slots = GpuSlots(self._device, share, c.actor_threads, c.detector_calls)
        if "clip" in c.features or c.clip_labels != "off":
            self._clip = _clip.load(c.clip_model, c.clip_pretrained, self._device)
        if c.clip_labels != "off":
            names = vocabulary(c.vocabulary)
            ld = self._clip
            prompts = ld.tokenizer([f"a photo of a {n}." for n in names])
            text = _clip.encode(ld.model.encode_text, prompts, self._device, 256, gpu)
            self._vocab = (names, text)

    def teardown(self) -> None:
        self._detectors = self._clip = self._vocab = None

    def process_batch(self, batch: Batch) -> Batch:
        self.setup()
        c = self.config
        n = batch_len(batch)
        images = [b if isinstance(b, (bytes, bytearray)) else b"" for b in batch["image"]]
        on_gpu = self._device.startswith("cuda")
        if on_gpu:
            tensors, errors = _clip.decode_tensors(images, self._device)
        else:
            tensors, errors = _clip.decode_cpu(images, "cpu", max(1, int(c.num_cpus)))
        found: list = [None] * n
        failed: dict[int, str] = {}
        for idx in _chunks(tensors, c.micro_batch):
            padded = idx + [idx[-1]] * (c.micro_batch - len(idx))
            for i, r in zip(idx, self._detect([tensors[i] for i in padded], failed, padded)):
                found[i] = r
        out = dict(batch)
        dim = self._detectors[0].feature_dim if "roi" in c.features else 0
        empty = _det.Regions.empty(dim)
        rows = [found[i] if found[i] is not None else empty for i in range(n)]
        hw = [tuple(tensors[i].shape[-2:]) if tensors[i] is not None else (1, 1) for i in range(n)]
        out["num_regions"] = np.array([len(r.scores) for r in rows], dtype=np.int32)
        out["region_boxes"] = object_array([_normalised(r.boxes, h, w) for r, (h, w) in zip(rows, hw)])
        out["region_labels"] = object_array([r.labels.astype(LABEL_DTYPE) for r in rows])
        out["region_scores"] = object_array([r.scores.astype(np.float32) for r in rows])
        if "roi" in c.features:
            out["region_feats"] = object_array([_f16(r.features, dim) for r in rows])
        if self._clip is not None:
            self._clip_regions(out, tensors, rows)
        decode = np.array([e is not None for e in errors], dtype=bool)
        ids = self._ids()
        reject(out, decode, self.name, "decode_error",
               [{"error": errors[i], "detectors": ids} for i in np.flatnonzero(decode)], status=STATUS_FAILED)  # fmt: skip
        if failed and c.on_error == "reject":
            mask = np.zeros(n, dtype=bool)
            mask[list(failed)] = True
            reject(out, mask, self.name, "detect_error",
                   [{"error": failed[i], "detectors": ids} for i in np.flatnonzero(mask)], status=STATUS_FAILED)  # fmt: skip
        return out

    def _ids(self) -> list[dict]:
        """The detectors as loaded (backend, weights, sha256), for rejects."""
        return [d.identity for d in self._detectors]

    def _detect(self, images: list, failed: dict, idx: list) -> list:
        """Every detector on ``images``, merged, in a GPU slot of this
        process (:class:`GpuSlots`: out of memory is retried once alone, then
        a :class:`GpuMemoryError` naming the settings, no image's fault); an
        image that makes a detector raise otherwise is retried alone, and
        recorded in ``failed``."""
        c = self.config
        advice = (f"regions: a detector call of micro_batch={c.micro_batch} images does not fit in this process's "
                  f"GPU memory even alone (num_gpus={c.num_gpus}): lower micro_batch, or give the actor more of the GPU")  # fmt: skip
        try:
            return self._slots.run(lambda: self._merge(images), advice)
        except GpuMemoryError:
            raise
        except Exception:  # noqa: BLE001 - find the images that fail alone
            out = []
            for i, t in zip(idx, images):
                try:
                    with self._slots.call():
                        out.append(self._merge([t])[0])
                except Exception as e:  # noqa: BLE001 - a per-row failure
                    failed[i] = f"{type(e).__name__}: {e}"
                    out.append(None)
            return out

    def _merge(self, images: list) -> list:
        import torch

        per = [d.detect(images) for d in self._detectors]
        first = self._detectors[0]
        roi = "roi" in self.config.features
        merged = []
        for j in range(len(images)):
            parts = [p[j] for p in per]
            for p, spec in zip(parts, self.config.detectors):
                p.agnostic = np.full(len(p.scores), spec.class_agnostic)
            if roi:  # the other detectors' boxes are pooled on the first one's map
                for p in parts[1:]:
                    p.features = first.pool_last(j, torch.as_tensor(p.boxes, device=self._device))
            merged.append(_best(parts, self.config.max_regions))
        return merged

    def _clip_regions(self, out: Batch, tensors: list, rows: list) -> None:
        """CLIP embeddings of each box's crop and, with ``clip_labels``, the
        vocabulary's best name for the boxes it renames."""
        c = self.config
        embs = _det.crop_embeddings(self._clip, tensors, [r.boxes for r in rows], self._device)
        if self._vocab is not None:
            names, text = self._vocab
            text = text.float().cpu().numpy()
            for i, (r, e) in enumerate(zip(rows, embs)):
                rename = np.ones(len(e), bool) if c.clip_labels == "all" else np.asarray(r.agnostic, bool)
                if len(e) and rename.any():
                    labels = r.labels.astype(object)
                    best = (e @ text.T).argmax(1)
                    labels[rename] = [names[k] for k in best[rename]]
                    out["region_labels"][i] = labels.astype(LABEL_DTYPE)
        if "clip" in c.features:
            out["region_clip"] = object_array([e.astype(np.float16) for e in embs])


def _chunks(tensors: list, size: int) -> list[list[int]]:
    """Indices of the decoded images in detector calls: images of one size
    together (a batch pads its images to the largest, which would change a
    smaller one's features), in runs of ``size`` that the caller pads to
    ``size`` with copies of the last (a kernel may sum in another order for
    another batch size). So an image's regions depend on it alone, not on
    the rows that shared its batch: the in-process and Ray runners, and a
    resumed run, give the same bytes."""
    by_size: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_size.setdefault(tuple(t.shape[-2:]), []).append(i)
    return [idx[a : a + size] for idx in by_size.values() for a in range(0, len(idx), size)]


def _best(parts: list, k: int) -> _det.Regions:
    """The regions of several detectors, best score first (ties: detector
    order), at most ``k``."""
    if len(parts) == 1:
        return parts[0]
    cat = np.concatenate
    scores = cat([p.scores for p in parts])
    order = np.argsort(-scores, kind="stable")[:k]
    feats = [p.features for p in parts]
    return _det.Regions(
        cat([p.boxes for p in parts])[order],
        cat([p.labels.astype(str) for p in parts])[order],
        scores[order],
        cat(feats)[order] if all(f is not None for f in feats) else None,
        cat([p.agnostic for p in parts])[order],
    )


def _normalised(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    b = np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([w, h, w, h], np.float32)
    return np.clip(b, 0.0, 1.0)


def _f16(features, dim: int) -> np.ndarray:
    if features is None:
        return np.zeros((0, dim), np.float16)
    return np.asarray(features, np.float16).reshape(-1, dim)
