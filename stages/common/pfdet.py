"""``pf-tiny-detector``: the project's own small object detector, the offline
stand-in for torchvision's pretrained detection weights.

torchvision's detectors get their weights from a weight enum
(``FCOS_ResNet50_FPN_Weights.DEFAULT``) that downloads them; nothing here may
download, and a COCO ResNet-50 detector is 130 MB. Like
``pipeline/assets/pf-tiny-scorer.pt`` stands in for CLIP, this module builds a
few-MB torchvision FCOS (a tiny residual CNN, torchvision's ``BackboneWithFPN``
and ``FCOSHead``) that ``scripts/build_detector.py`` trains on composites with
exact boxes (:mod:`trainer.detection_data`) and ships as
``pipeline/assets/pf-tiny-detector.pt``. It is an ordinary torchvision
detection model, so code written for the pretrained ones works on it unchanged:

* ``model.eval(); model([chw_float_0_1, ...])`` -> ``[{"boxes", "labels", "scores"}]``
* ``model.transform`` is a ``GeneralizedRCNNTransform`` (resize to the
  training resolution, normalise, batch) and ``model.backbone(x)`` returns an
  ``OrderedDict`` of FPN maps (``"0"``, ``"1"``, ``"2"`` at strides 8, 16, 32,
  ``"pool"`` at 64) with ``model.backbone.out_channels`` channels, which is
  what ``torchvision.ops.MultiScaleRoIAlign`` takes for region features;
* ``categories`` index the labels, ``"__background__"`` first, as in the
  weight enums' ``meta["categories"]``.

The file holds a float16 state dict, the config and the categories in one
``torch.save`` dict that ``torch.load(weights_only=True)`` reads; :func:`load`
returns the model in float32.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

#: file format tag (in the saved dict)
FORMAT = "pf-tiny-detector/1"
#: everything :func:`build` reads; a saved file carries its own copy
DEFAULT_CONFIG = {
    "widths": [32, 48, 96, 160, 224],  # stem (stride 2), then strides 4, 8, 16, 32
    "blocks": [0, 1, 1, 2, 1],  # residual blocks after each stride's first conv
    "fpn_channels": 96,
    "head_convs": 4,
    "num_classes": 14,  # with the background
    "min_size": 256,  # GeneralizedRCNNTransform: the training resolution
    "max_size": 512,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "score_thresh": 0.05,
    "nms_thresh": 0.6,
    "detections_per_img": 100,
    "topk_candidates": 1000,
}


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv(c, c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        nn.init.zeros_(self.body[-1].weight)  # each block starts as the identity: trains from scratch

    def forward(self, x):
        return torch.relu(x + self.body(x))


def _body(widths: list[int], blocks: list[int]) -> nn.Sequential:
    """The CNN: ``stem`` at stride 2, then ``layer1``..``layer4`` at strides 4..32."""
    stages, cin = [], 3
    for w, n in zip(widths, blocks):
        stages.append(nn.Sequential(_conv(cin, w, 2), *[_Residual(w) for _ in range(n)]))
        cin = w
    names = ["stem"] + [f"layer{i}" for i in range(1, len(stages))]
    return nn.Sequential(OrderedDict(zip(names, stages)))


def build(config: dict | None = None) -> nn.Module:
    """A freshly initialised pf-tiny-detector (``config`` overrides :data:`DEFAULT_CONFIG`)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    widths = list(cfg["widths"])
    if len(widths) != 5 or len(cfg["blocks"]) != 5:
        raise ValueError("widths and blocks name 5 stages (strides 2 to 32): the anchors assume strides 8 to 64")
    body = _body(widths, list(cfg["blocks"]))
    # strides 8, 16, 32 feed the FPN; torchvision adds a max-pooled level at 64
    levels = list(body.named_children())[-3:]
    return_layers = OrderedDict((name, str(i)) for i, (name, _) in enumerate(levels))
    backbone = BackboneWithFPN(body, return_layers, widths[-3:], cfg["fpn_channels"])
    # FCOS assumes the anchor size equals the stride (centre sampling, level ranges)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4)
    head = FCOSHead(cfg["fpn_channels"], 1, cfg["num_classes"], num_convs=cfg["head_convs"])
    return FCOS(
        backbone, cfg["num_classes"], min_size=cfg["min_size"], max_size=cfg["max_size"],
        image_mean=list(cfg["image_mean"]), image_std=list(cfg["image_std"]), anchor_generator=anchors, head=head,
        score_thresh=cfg["score_thresh"], nms_thresh=cfg["nms_thresh"],
        detections_per_img=cfg["detections_per_img"], topk_candidates=cfg["topk_candidates"],
    )  # fmt: skip


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(model: nn.Module, config: dict, categories: list[str], path: str | Path, extra: dict | None = None) -> Path:
    """Write the float16 weights, the config and the categories to ``path``
    (atomically); ``extra`` (plain values) rides along under ``"extra"``."""
    cfg = {**DEFAULT_CONFIG, **config}
    if len(categories) != cfg["num_classes"]:
        raise ValueError(f"{len(categories)} categories for num_classes={cfg['num_classes']}")
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    blob = {"format": FORMAT, "config": cfg, "categories": list(categories), "state_dict": state}
    torch.save({**blob, "extra": extra or {}}, tmp)
    tmp.replace(path)
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, list[str], dict]:
    """``(model in eval mode, float32 on device, categories, config)`` from a :func:`save` file."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={blob.get('format')!r})")
    model = build(blob["config"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    return model.to(device).eval(), list(blob["categories"]), dict(blob["config"])
