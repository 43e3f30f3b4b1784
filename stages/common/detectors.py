"""Object detectors behind one small interface, for :mod:`stages.regions`.

A :class:`Detector` takes decoded images (uint8 ``[3, H, W]`` tensors on its
device) and returns per image a :class:`Regions`: boxes in that image's
pixels (xyxy), label names, scores and, where the detector has a backbone,
one pooled RoI feature per box. Backends:

* torchvision's detection models (:data:`TORCHVISION_MODELS`), with weights
  named by torchvision's weight enums (``DEFAULT``, ``COCO_V1``; fetched by
  torchvision, so a network is needed the first time), a local checkpoint file
  or ``random`` (benchmarks and shape tests);
* ``pf-tiny``: the project's own detector (:mod:`stages.common.pfdet`,
  trained offline by ``scripts/build_detector.py`` and shipped in
  ``pipeline/assets``), a torchvision model too;
* ``mtcnn``: facenet-pytorch's face detector, whose weights ship inside its
  wheel (:mod:`stages.common.faces`).

Region features are what VisualBERT and ViLBERT fed their transformers:
RoIAlign (7 x 7, ``sampling_ratio=2``) on one backbone feature map at each
box, averaged to a ``C``-vector. They are read from the same forward pass
that found the boxes: hooks on the model's ``transform`` and ``backbone``
keep the resized batch and its feature maps (per thread, so an actor may run
several batches at once), and the boxes are mapped from the image's pixels
into the resized batch's. Every model gets the same post-processing here,
whatever its own: a score threshold, class-aware NMS and the top ``K``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from pairforge.stages.common import rcnn_batched

#: the torchvision builders this backend knows (any other name of
#: ``torchvision.models.detection`` works too, untested)
TORCHVISION_MODELS = (
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
)
RANDOM_WEIGHTS = "random"
#: RoIAlign output size and sampling, as torchvision's Faster R-CNN box head uses
ROI_SIZE, ROI_SAMPLING = 7, 2


@dataclass
class Regions:
    """What a detector found in one image, best score first."""

    boxes: np.ndarray  # (K, 4) float32, xyxy in the image's pixels
    labels: np.ndarray  # (K,) str
    scores: np.ndarray  # (K,) float32
    features: np.ndarray | None = None  # (K, D) float32 pooled RoI features
    #: per box: its detector is class-agnostic (``clip_labels: agnostic`` renames it)
    agnostic: np.ndarray | None = None

    @staticmethod
    def empty(feature_dim: int = 0) -> Regions:
        feats = np.zeros((0, feature_dim), np.float32) if feature_dim else None
        return Regions(np.zeros((0, 4), np.float32), np.zeros(0, dtype=str), np.zeros(0, np.float32), feats)


@dataclass(frozen=True)
class Limits:
    """The post-processing every backend gets."""

    max_regions: int = 36
    score_threshold: float = 0.5
    nms_iou: float = 0.5


class Detector:
    """The interface :mod:`stages.regions` calls."""

    categories: tuple[str, ...] = ()
    #: length of :attr:`Regions.features`; 0: this detector has none
    feature_dim: int = 0
    identity: dict = {}

    def detect(self, images: list) -> list[Regions]:
        raise NotImplementedError


def apply_limits(model, limits: Limits) -> None:
    """Set a torchvision model's own filters to ``limits``, so it spends no
    time on boxes :func:`keep_best` drops after it (Faster R-CNN keeps them on
    its ``roi_heads``, RetinaNet, FCOS and SSD on the model)."""
    for holder in (getattr(model, "roi_heads", None), model):
        if holder is not None and hasattr(holder, "score_thresh"):
            holder.score_thresh = limits.score_threshold
            holder.nms_thresh = limits.nms_iou
            holder.detections_per_img = limits.max_regions
            return


def keep_best(boxes, scores, labels, limits: Limits):
    """Indices of the boxes to keep: score >= threshold, class-aware NMS,
    then the best ``max_regions``, best first (ties: the detector's order)."""
    import torch
    from torchvision.ops import batched_nms

    idx = torch.nonzero(scores >= limits.score_threshold).flatten()
    if len(idx):
        kept = batched_nms(boxes[idx].float(), scores[idx].float(), labels[idx], limits.nms_iou)
        idx = idx[kept]
        order = torch.sort(scores[idx].float(), descending=True, stable=True).indices
        idx = idx[order][: limits.max_regions]
    return idx


class TorchvisionDetector(Detector):
    """A torchvision detection model (its own ``transform`` and ``backbone``
    are used as they are; see the module doc for the features)."""

    def __init__(self, model, categories, device: str, limits: Limits, identity: dict,
                 feature_level: str | None = None, half: bool = False, batched: bool | None = None):  # fmt: skip
        self.model, self.device, self.limits, self.identity = model.eval().to(device), device, limits, identity
        apply_limits(model, limits)
        self.categories = tuple(categories)
        self.half = half and device.startswith("cuda")
        #: a Faster R-CNN runs batched (:mod:`stages.common.rcnn_batched`), by default on a GPU,
        #: where per-image syncs are the cost; on the CPU, where the layers are, the model's own
        #: forward is as fast (its dense NMS costs more there at low score thresholds)
        batched = device.startswith("cuda") if batched is None else batched
        self.batched = batched and rcnn_batched.supports(model)
        self._local = threading.local()
        model.transform.register_forward_hook(self._keep_batch)
        model.backbone.register_forward_hook(self._keep_features)
        width = int(getattr(model.backbone, "out_channels", 0))
        if feature_level and width:
            self.feature_level, self.feature_dim = feature_level, width
        else:  # one pass of the backbone on a blank image names its maps and their widths
            feats = self._probe()
            self.feature_level = feature_level or (list(feats.keys()) if isinstance(feats, dict) else ["0"])[0]
            self.feature_dim = width or int(_level(feats, self.feature_level).shape[1])

    def _keep_batch(self, module, args, output):
        self._local.batch = output[0]

    def _keep_features(self, module, args, output):
        self._local.features = output

    def _probe(self):
        import torch

        with torch.inference_mode():
            return self.model.backbone(torch.zeros(1, 3, 64, 64, device=self.device))

    def detect(self, images: list) -> list[Regions]:
        import torch

        if not images:
            return []
        if self.batched and len({tuple(t.shape) for t in images}) == 1:
            return self._detect_batched(torch.stack(list(images)))
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.half):
            out = self.model([t.float().div_(255.0) if t.dtype == torch.uint8 else t for t in images])
        batch, feats = self._local.batch, _level(self._local.features, self.feature_level)
        self._local.sizes = [tuple(t.shape[-2:]) for t in images]
        keep = [keep_best(o["boxes"], o["scores"], o["labels"], self.limits) for o in out]
        boxes = [o["boxes"][k].float() for o, k in zip(out, keep)]
        pooled = roi_features(feats, boxes, batch.tensors.shape[-2:], batch.image_sizes, self._local.sizes)
        result, start = [], 0
        for o, k, b in zip(out, keep, boxes):
            labels = o["labels"][k].cpu().numpy()
            names = np.array([self._name(int(i)) for i in labels], dtype=str)
            f = pooled[start : start + len(k)]
            start += len(k)
            result.append(Regions(b.cpu().numpy(), names, o["scores"][k].float().cpu().numpy(), f))
        return result

    def _detect_batched(self, images) -> list[Regions]:
        """Faster R-CNN through :mod:`stages.common.rcnn_batched`: the same
        decisions as the model's own forward and :func:`keep_best`, with
        no host sync per image, and one transfer to the host."""
        import torch
        from torchvision.models.detection.image_list import ImageList

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.half):
            boxes, scores, labels, mask, padded, hw, feats = rcnn_batched.run(self.model, images, self.limits)
        n, k = mask.shape
        size = tuple(images.shape[-2:])
        self._local.batch = ImageList(padded, [hw] * n)
        self._local.features, self._local.sizes = feats, [size] * n
        level = _level(feats, self.feature_level)
        with torch.inference_mode():
            rois = torch.cat([torch.arange(n, device=boxes.device, dtype=torch.float32).repeat_interleave(k)[:, None],
                              (boxes.float() * _to_resized(hw, size, boxes.device)).reshape(-1, 4)], 1)  # fmt: skip
            pooled = _pool(level, rois, padded.shape[-2:]).view(n, k, -1)
        b, s, lab, m, f = (t.cpu().numpy() for t in (boxes.float(), scores.float(), labels, mask, pooled))
        out = []
        for j in range(n):
            keep = m[j]
            names = np.array([self._name(int(i)) for i in lab[j][keep]], dtype=str)
            out.append(Regions(b[j][keep], names, s[j][keep], f[j][keep]))
        return out

    def pool_last(self, j: int, boxes) -> np.ndarray:
        """RoI features of other ``boxes`` (xyxy pixels) in image ``j`` of
        this thread's last :meth:`detect` call, from the same feature map."""
        if not len(boxes):
            return np.zeros((0, self.feature_dim), np.float32)
        batch, feats = self._local.batch, _level(self._local.features, self.feature_level)
        sizes = self._local.sizes
        return roi_features(feats[j : j + 1], [boxes.float()], batch.tensors.shape[-2:],
                            [batch.image_sizes[j]], [sizes[j]])  # fmt: skip

    def _name(self, label: int) -> str:
        return self.categories[label] if 0 <= label < len(self.categories) else str(label)


def _level(feats, level: str):
    return feats[level] if isinstance(feats, dict) else feats


def roi_features(feats, boxes: list, padded_hw, resized_hw: list, original_hw: list) -> np.ndarray:
    """Pooled RoI features (float32, ``(sum K, C)``) of ``boxes`` (per image,
    xyxy in the original image's pixels) on ``feats`` (``[N, C, h, w]``, the
    backbone's map of the resized, padded batch of size ``padded_hw``)."""
    total = sum(len(b) for b in boxes)
    if total == 0:
        return np.zeros((0, feats.shape[1]), np.float32)
    scaled = [b.float() * _to_resized(r, o, b.device) for b, r, o in zip(boxes, resized_hw, original_hw)]
    return _pool(feats, scaled, padded_hw).cpu().numpy().astype(np.float32)


def _to_resized(resized_hw, original_hw, device):
    """The factors (x, y, x, y) taking boxes from an image's pixels to its
    resized copy's."""
    import torch

    (rh, rw), (oh, ow) = resized_hw, original_hw
    return torch.tensor([rw / ow, rh / oh, rw / ow, rh / oh], device=device, dtype=torch.float32)


def _pool(feats, rois, padded_hw):
    """RoIAlign of ``rois`` (a list of per-image boxes, or ``[R, 5]`` with
    the image index first; resized pixels) on ``feats``, averaged to
    ``[R, C]`` float32."""
    from torchvision.ops import roi_align

    scale = feats.shape[-1] / float(padded_hw[-1])
    pooled = roi_align(feats.float(), rois, ROI_SIZE, spatial_scale=scale, sampling_ratio=ROI_SAMPLING)
    return pooled.mean(dim=(2, 3))


def torchvision_categories(name: str, weights=None) -> list[str]:
    """Label names: those of the weights, else of the builder's first weight
    enum member (COCO's 91 ids, ``__background__`` and ``N/A`` included)."""
    from torchvision.models import get_model_weights

    if weights is not None:
        return list(weights.meta["categories"])
    return list(next(iter(get_model_weights(name))).meta["categories"])


def load_torchvision(name: str, weights: str, device: str, limits: Limits, min_size: int = 0,
                     max_size: int = 0, feature_level: str | None = None, half: bool = False) -> TorchvisionDetector:  # fmt: skip
    """Build torchvision detection model ``name`` with ``weights``: ``random``,
    a weight enum member (``DEFAULT``, ``COCO_V1``) or a checkpoint file (a
    state dict, or a dict with ``model`` and optionally ``categories``)."""
    import torch
    from torchvision.models import get_model, get_model_weights

    from pairforge.stages.common.clip import file_sha256

    sizes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v}
    if sizes and name.startswith("ssd"):
        raise ValueError(f"min_size/max_size: {name} resizes to its own fixed size; leave them 0")
    identity = {"backend": "torchvision", "model": name, "weights": weights, "sha256": None}
    enum = None
    if os.path.isfile(weights):
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
        categories = list((ckpt.get("categories") if isinstance(ckpt, dict) else None) or torchvision_categories(name))
        model = get_model(name, weights=None, weights_backbone=None, num_classes=len(categories), **sizes)
        model.load_state_dict(state)
        identity["sha256"] = file_sha256(weights)
    elif weights == RANDOM_WEIGHTS:
        categories = torchvision_categories(name)
        model = get_model(name, weights=None, weights_backbone=None, num_classes=len(categories), **sizes)
    else:
        members = get_model_weights(name)
        try:
            enum = members[weights] if weights != "DEFAULT" else members.DEFAULT
        except KeyError:
            known = ", ".join(m.name for m in members)
            raise ValueError(
                f"weights: {weights!r} is neither a file, 'random' nor a weight of {name} ({known}, DEFAULT)"
            ) from None
        categories = torchvision_categories(name, enum)
        model = get_model(name, weights=enum, **sizes)
        identity["weights"] = f"{type(enum).__name__}.{enum.name}"
    return TorchvisionDetector(model, categories, device, limits, identity, feature_level, half)


def crop_embeddings(loaded, images: list, boxes: list, device: str, micro_batch: int = 128) -> list[np.ndarray]:
    """The CLIP image embedding (float32, L2-normalised) of each box's crop,
    per image: RoIAlign on the image itself samples every box to the model's
    input size in one batched call (the box squashed to a square, so the
    whole object is seen), then the model's normalisation and image tower."""
    import torch
    from torchvision.ops import roi_align

    from pairforge.stages.common import clip as _clip

    dim = int(loaded.model.visual.output_dim) if hasattr(loaded.model.visual, "output_dim") else 0
    out = [np.zeros((0, dim), np.float32) for _ in images]
    th, tw = _clip.size_hw(loaded.cfg["size"])
    crops, owner = [], []
    for i, (img, b) in enumerate(zip(images, boxes)):
        if img is None or not len(b):
            continue
        t = torch.as_tensor(np.asarray(b, np.float32), device=img.device)
        crops.append(roi_align(img[None].float(), [t], (th, tw), spatial_scale=1.0, sampling_ratio=2, aligned=True))
        owner.extend([i] * len(b))
    if not crops:
        return out
    pixels = torch.cat(crops).clamp_(0, 255).round_().to(torch.uint8)
    bf16 = device.startswith("cuda")
    emb = _clip.encode(loaded.model.encode_image, pixels, device, micro_batch, bf16,
                       lambda x: _clip.normalize(x, loaded.cfg)).cpu().numpy()  # fmt: skip
    owner = np.asarray(owner)
    for i in np.unique(owner):
        out[i] = emb[owner == i]
    return out
