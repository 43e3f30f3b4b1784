"""Faster R-CNN inference for a whole batch at once, without a host sync per
image, for :class:`stages.common.detectors.TorchvisionDetector`.

torchvision's ``GeneralizedRCNN`` batches the backbone and the heads but runs
everything around them image by image: the resize, the RPN's proposal filter
and the box head's post-processing each loop over the images, and each NMS
returns a tensor whose length the host must read before the next step. On a
GPU, at 64 images a call, that is a few hundred syncs and thousands of tiny
kernels a call, and the detector waits on Python (bench/regions.py measured
430 images/s for MobileNetV3-FPN on an H200 with the GPU "busy" but idle
most of each kernel).

Here the same model runs with the same weights and the same decisions, but
every step is a tensor operation over the batch:

* one resize of the stacked batch (every image of a call has one size, see
  ``stages.regions._chunks``), the same bilinear interpolation and padding
  as ``GeneralizedRCNNTransform``;
* proposals and detections kept as fixed-shape ``[B, N]`` tensors with a
  validity mask, so invalid slots flow through the heads instead of being
  cut out;
* NMS as a dense, batched computation (:func:`nms_keep`) over blocks: one
  per image and FPN level for proposals, one per image and class for
  detections (only blocks holding a candidate). In each, the IoU of every
  ordered pair, then greedy suppression solved as a fixed point (a box is
  kept when no kept box before it suppresses it), which gives exactly
  greedy NMS's result, with ties broken by position;
* one transfer of the results to the host at the end.

The host still reads a few numbers a call: how wide each dense NMS must be
(its fullest block's count of candidates), which class blocks hold one,
and, once per pass of each fixed point, whether it has converged (about 20
in all for MobileNetV3-FPN, against several per image before).
"""

from __future__ import annotations

import math

#: at most this many pair entries (images x boxes x boxes) in one dense NMS
#: step; larger batches are split over the images
NMS_PAIR_BUDGET = 64 * 1024 * 1024


def supports(model) -> bool:
    """Whether ``model`` is a torchvision Faster R-CNN this path can run
    (boxes only: no mask or keypoint heads)."""
    heads = getattr(model, "roi_heads", None)
    return (
        hasattr(model, "rpn")
        and hasattr(model, "transform")
        and heads is not None
        and hasattr(heads, "box_predictor")
        and getattr(heads, "mask_roi_pool", None) is None
        and getattr(heads, "keypoint_roi_pool", None) is None
    )


def preprocess(transform, images):
    """``GeneralizedRCNNTransform`` on a uint8 ``[B, 3, H, W]`` batch of one
    size: scale to ``[0, 1]``, normalise, resize (bilinear, the scale its
    ``min_size``/``max_size`` give), zero-pad to its ``size_divisible``.
    Returns the padded batch and the resized ``(h, w)``."""
    import torch
    import torch.nn.functional as F

    x = images.float().div_(255.0)
    mean = torch.as_tensor(transform.image_mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.as_tensor(transform.image_std, dtype=x.dtype, device=x.device)[None, :, None, None]
    x = (x - mean) / std
    h, w = x.shape[-2:]
    if transform.fixed_size is not None:
        x = F.interpolate(x, size=[transform.fixed_size[1], transform.fixed_size[0]], mode="bilinear",
                          align_corners=False)  # fmt: skip
    else:
        scale = min(float(transform.min_size[-1]) / min(h, w), float(transform.max_size) / max(h, w))
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False)
    rh, rw = x.shape[-2:]
    d = float(transform.size_divisible)
    ph, pw = int(math.ceil(rh / d) * d), int(math.ceil(rw / d) * d)
    return F.pad(x, (0, pw - rw, 0, ph - rh)), (int(rh), int(rw))


def score_order(scores, mask):
    """Per row, the entries of ``mask`` by score, best first (ties: lower
    index first), then the rest: ``[B, M]`` indices."""
    import torch

    neg = torch.finfo(torch.float32).min
    return torch.sort(torch.where(mask, scores.float(), neg), dim=1, descending=True, stable=True).indices


def nms_keep(boxes, scores, valid, iou: float, groups=None):
    """Greedy NMS per row over ``[B, M]`` candidates (per row and group
    when ``groups`` is given): ``[B, M]`` bool, what is kept, in the input's
    order. A candidate is suppressed by a kept one before it in score order
    (ties: lower index first) in the same group whose IoU with it is above
    ``iou``, as torchvision's ``nms`` decides (the same IoU formula, in
    float32)."""
    import torch

    order = score_order(scores, valid)
    kept = torch.zeros_like(valid)
    b = valid.shape[0]
    # candidates are sorted valid first: only the fullest row's count is computed
    m = int(valid.sum(1).max().item()) if valid.numel() else 0
    if m == 0 or b == 0:
        return kept
    step = max(1, NMS_PAIR_BUDGET // max(1, m * m))
    for a in range(0, b, step):
        o = order[a : a + step, :m]
        g = groups[a : a + step].gather(1, o) if groups is not None else None
        boxes_o = boxes[a : a + step].float().gather(1, o[..., None].expand(-1, -1, 4))
        kept[a : a + step].scatter_(1, o, _greedy(boxes_o, g, valid[a : a + step].gather(1, o), iou))
    return kept


def _greedy(boxes, groups, valid, iou: float):
    """Greedy NMS on candidates already in score order (``[b, m]``;
    ``groups`` ``None``: one group a row)."""
    import torch

    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = w * h
    over = inter / (area[:, :, None] + area[:, None, :] - inter) > iou
    del w, h, inter
    m = boxes.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=boxes.device).tril_(-1)  # [i, j]: j before i
    # over[b, i, j]: j may suppress i (j earlier, same group, valid, IoU above)
    over &= earlier[None] & valid[:, None, :]
    if groups is not None:
        over &= groups[:, :, None] == groups[:, None, :]
    over = over.to(torch.float16 if boxes.is_cuda else torch.float32)
    kept = valid.clone()
    # the fixed point: statuses settle in dependency order, each pass fixes at
    # least the first unsettled box, and a few passes suffice in practice
    for _ in range(m + 1):
        hit = torch.bmm(over, kept.to(over.dtype)[..., None])[..., 0] > 0
        new = valid & ~hit
        if torch.equal(new, kept):
            break
        kept = new
    return kept


def _gather(t, idx):
    """``t[b, idx[b, i]]`` for ``t`` of shape ``[B, M, ...]``."""
    extra = t.shape[2:]
    return t.gather(1, idx.view(*idx.shape, *([1] * len(extra))).expand(*idx.shape, *extra))


def _clip_boxes(boxes, hw):
    import torch

    h, w = hw
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _not_small(boxes, min_size: float):
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def proposals(rpn, padded, image_hw, features):
    """The RPN's proposals for every image: ``[B, N, 4]`` boxes in the
    resized image's pixels and a ``[B, N]`` mask, ``N`` its
    ``post_nms_top_n`` (as its ``filter_proposals``: the top
    ``pre_nms_top_n`` objectness per level, clipped, boxes under 1e-3 px
    and scores under ``score_thresh`` dropped, NMS per level)."""
    import torch
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    b = padded.shape[0]
    # anchors in float32 (from autocast's float16 maps they would be rounded to 0.5 px)
    anchors = rpn.anchor_generator(ImageList(padded[:1].float(), [image_hw]), [f[:1].float() for f in feats])[0]
    per_level = [int(o.shape[1] * o.shape[2] * o.shape[3]) for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode_single(deltas.float(), anchors.float().repeat(b, 1)).view(b, -1, 4)
    objectness = objectness.float().view(b, -1)
    picks, starts, widths, offset, first = [], [], [], 0, 0
    for n in per_level:
        k = min(rpn.pre_nms_top_n(), n)
        picks.append(objectness[:, offset : offset + n].topk(k, dim=1).indices + offset)
        starts.append(first)
        widths.append(k)
        offset, first = offset + n, first + k
    top = torch.cat(picks, 1)
    scores = torch.sigmoid(objectness.gather(1, top))
    boxes = _clip_boxes(_gather(boxes, top), image_hw)
    valid = _not_small(boxes, rpn.min_size) & (scores >= rpn.score_thresh)
    # NMS is per level: levels of one width run as blocks of their own, so
    # the dense pairs are per level, not over all levels at once
    kept = torch.zeros_like(valid)
    by_width: dict[int, list[int]] = {}
    for start, width in zip(starts, widths):
        by_width.setdefault(width, []).append(start)
    for width, firsts in by_width.items():
        cols = torch.cat([torch.arange(a, a + width, device=boxes.device) for a in firsts])
        blocks = b * len(firsts)
        k = nms_keep(boxes[:, cols].reshape(blocks, width, 4), scores[:, cols].reshape(blocks, width),
                     valid[:, cols].reshape(blocks, width), rpn.nms_thresh)  # fmt: skip
        kept[:, cols] = k.reshape(b, -1)
    idx, mask = _best_kept(scores, kept, rpn.post_nms_top_n())
    return _take(boxes, idx, mask), mask


def _best_kept(scores, kept, n: int):
    """The ``n`` best-scored kept entries per row (ties: lower index first):
    ``[B, n]`` indices and a mask (false past a row's kept count, and for
    slots beyond ``M``, which index entry 0)."""
    import torch

    b, m = kept.shape
    idx = score_order(scores, kept)[:, :n]  # kept entries sort first
    mask = kept.gather(1, idx)
    if m < n:  # fewer candidates than slots
        idx = torch.cat([idx, idx.new_zeros(b, n - m)], 1)
        mask = torch.cat([mask, mask.new_zeros(b, n - m)], 1)
    return idx, mask


def _take(values, idx, mask):
    """``values`` (``[B, M, ...]``) at ``idx``, zero where ``mask`` is false."""
    out = _gather(values, idx)
    return out * mask.view(*mask.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def detections(heads, features, props, props_mask, image_hw, limits):
    """The box head on every proposal slot, then torchvision's
    ``postprocess_detections`` for the batch: class boxes clipped, the
    background dropped, scores above ``limits.score_threshold``, boxes of
    at least 1e-2 px, class-aware NMS at ``limits.nms_iou``, the best
    ``limits.max_regions``. Returns boxes ``[B, K, 4]`` (resized pixels),
    scores ``[B, K]``, labels ``[B, K]`` and the mask ``[B, K]``."""
    import torch
    import torch.nn.functional as F

    b, n = props_mask.shape
    # masked slots hold an empty box; they are pooled and scored, then dropped
    rois = heads.box_roi_pool(features, list(props.unbind(0)), [image_hw] * b)
    logits, regression = heads.box_predictor(heads.box_head(rois))
    c = logits.shape[-1]
    boxes = heads.box_coder.decode_single(regression.float().reshape(b * n, -1), props.reshape(-1, 4).float())
    boxes = _clip_boxes(boxes.reshape(b, n, c, 4)[:, :, 1:], image_hw).reshape(b, -1, 4)
    scores = F.softmax(logits.float(), -1).reshape(b, n, c)[:, :, 1:].reshape(b, -1)
    labels = torch.arange(1, c, device=scores.device).repeat(b, n, 1).reshape(b, -1)
    valid = props_mask[:, :, None].expand(b, n, c - 1).reshape(b, -1)
    valid = valid & (scores > limits.score_threshold) & _not_small(boxes, 1e-2)
    # class-aware NMS: one block per (image, class) holding that class's box
    # of each proposal; only blocks with a candidate are computed
    blocks = (b * (c - 1), n)
    by_class = [t.view(b, n, c - 1, *t.shape[2:]).transpose(1, 2).reshape(*blocks, *t.shape[2:])
                for t in (boxes, scores, valid)]  # fmt: skip
    active = torch.nonzero(by_class[2].any(1)).flatten()
    kept = torch.zeros(blocks, dtype=torch.bool, device=valid.device)
    if len(active):
        kept[active] = nms_keep(*(t[active] for t in by_class), limits.nms_iou)
    kept = kept.view(b, c - 1, n).transpose(1, 2).reshape(b, -1)
    idx, mask = _best_kept(scores, kept, limits.max_regions)
    return _take(boxes, idx, mask), _take(scores, idx, mask), _take(labels, idx, mask), mask


def run(model, images, limits):
    """The whole model on uint8 ``[B, 3, H, W]`` (one size). Returns boxes
    ``[B, K, 4]`` in the input's pixels, scores, labels, the mask, and what
    RoI features need: the padded batch's size, the resized ``(h, w)`` and
    the backbone's maps."""
    import torch

    padded, hw = preprocess(model.transform, images)
    features = model.backbone(padded)
    props, props_mask = proposals(model.rpn, padded, hw, features)
    boxes, scores, labels, mask = detections(model.roi_heads, features, props, props_mask, hw, limits)
    oh, ow = images.shape[-2:]
    rh = torch.tensor(oh, dtype=torch.float32) / torch.tensor(hw[0], dtype=torch.float32)
    rw = torch.tensor(ow, dtype=torch.float32) / torch.tensor(hw[1], dtype=torch.float32)
    scale = torch.stack([rw, rh, rw, rh]).to(boxes.device)
    return boxes * scale, scores, labels, mask, padded, hw, features
