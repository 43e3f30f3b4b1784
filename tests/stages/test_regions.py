"""The regions stage on the CPU: the documented columns, shapes and dtypes
with a torchvision detector (random weights), RoI features of the shipped
pf-tiny detector equal to a direct ``torchvision.ops.roi_align``, awkward
images (no boxes, tiny, grey, CMYK, undecodable), a detector failing on one
image, and the shard files: features as arrays aligned with the parquet rows
and as tar members."""

import dataclasses
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pairforge.manifests import layout
from pairforge.manifests.shards import write_shard
from pairforge.stages.base import STATUS_OK, fresh_rows, object_array, run_stage_batch, stage_columns
from pairforge.stages.regions import Config, DetectorSpec, RegionsStage

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
#: images a detector call: a call of fewer is still padded with copies of
#: its last image (``regions._chunks``), at a 32nd of the default's (64)
#: forward passes, which took these tests ~35 s each on 2 CPU cores
MICRO = 2


def _jpeg(arr, mode=None) -> bytes:
    im = Image.fromarray(arr)
    im = im.convert(mode) if mode else im
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _rows(images: list) -> dict:
    n = len(images)
    rows = fresh_rows([f"00000{i:04d}" for i in range(n)], caption=object_array(["a photo"] * n))
    rows["image"] = object_array(images)
    rows["image_ext"] = object_array(["jpg"] * n)
    return rows


@pytest.fixture(scope="module")
def stage():
    torch.manual_seed(0)  # random weights: the same model in every test of this module
    spec = DetectorSpec(MODEL, "random", min_size=256, max_size=512)
    st = RegionsStage(Config(detectors=(spec,), score_threshold=0.0, micro_batch=MICRO))
    st.setup()
    return st


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        _jpeg(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)),
        _jpeg(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)),  # tiny
        _jpeg(rng.integers(0, 255, (100, 120), dtype=np.uint8)),  # grey
        _jpeg(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8), "CMYK"),
        b"not an image",
    ]


def test_columns_shapes_and_dtypes(stage, images):
    out = run_stage_batch(stage, _rows(images))
    declared = {c.name: c for c in stage.outputs()}
    assert set(declared) == {"num_regions", "region_boxes", "region_labels", "region_scores", "region_feats"}
    assert declared["region_feats"].store == "arrays" and declared["region_feats"].shape == (256,)
    assert list(out["status"]) == [STATUS_OK] * 4 + ["failed"] and out["reason"][4] == "decode_error"
    assert out["num_regions"].dtype == np.int32 and list(out["num_regions"]) == [36, 36, 36, 36, 0]
    for i in range(5):
        k = int(out["num_regions"][i])
        boxes, labels, scores, feats = (out[c][i] for c in ("region_boxes", "region_labels", "region_scores", "region_feats"))
        assert boxes.shape == (k, 4) and boxes.dtype == np.float32
        assert labels.shape == (k,) and labels.dtype.kind == "U"
        assert scores.shape == (k,) and scores.dtype == np.float32 and np.all(np.diff(scores) <= 0)
        assert feats.shape == (k, 256) and feats.dtype == np.float16
        if k:  # normalised xyxy
            assert boxes.min() >= 0 and boxes.max() <= 1
            assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])


def test_roi_features_equal_a_direct_roi_align():
    """On the shipped pf-tiny detector, whose trained map has features of
    ~0.1-10: the random-weight torchvision model's are ~1e-8, under float16's
    smallest normal number, so no pooling error could show on them."""
    from skimage import data
    from torchvision.ops import roi_align

    image = _jpeg(np.ascontiguousarray(data.astronaut()[::2, ::2]))
    stage = RegionsStage(Config(detectors=(DetectorSpec("pf-tiny"),), score_threshold=0.0, micro_batch=MICRO))
    out = run_stage_batch(stage, _rows([image]))
    det = stage._detectors[0]
    img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).copy()).permute(2, 0, 1)
    h, w = img.shape[1:]
    with torch.inference_mode():
        batch, _ = det.model.transform([img.float() / 255])
        fmap = det.model.backbone(batch.tensors)[det.feature_level]
    rh, rw = batch.image_sizes[0]
    boxes = torch.from_numpy(out["region_boxes"][0] * np.array([w, h, w, h], np.float32))
    boxes = boxes * torch.tensor([rw / w, rh / h, rw / w, rh / h])
    scale = fmap.shape[-1] / batch.tensors.shape[-1]
    direct = roi_align(fmap, [boxes], 7, spatial_scale=scale, sampling_ratio=2).mean(dim=(2, 3)).numpy()
    got = out["region_feats"][0].astype(np.float32)
    assert out["num_regions"][0] == 36 and np.abs(direct).max() > 1.0  # features a wrong pooling would change
    # boxes went through float32 normalisation and back, features through float16
    assert np.allclose(got, direct, rtol=1e-2, atol=2e-3), np.abs(got - direct).max()


def test_no_boxes_above_the_threshold_is_k_zero(images):
    spec = DetectorSpec(MODEL, "random", min_size=256, max_size=512)
    st = RegionsStage(Config(detectors=(spec,), score_threshold=1.0, micro_batch=MICRO))
    out = run_stage_batch(st, _rows(images[:3]))
    assert list(out["num_regions"]) == [0, 0, 0] and list(out["status"]) == [STATUS_OK] * 3
    assert all(f.shape == (0, 256) for f in out["region_feats"])


class FailsOnSquares(RegionsStage):
    """A detector that raises on square images: one bad row, not a crashed batch."""

    def setup(self):
        super().setup()
        real = self._detectors[0].detect

        def detect(images):
            if any(t.shape[-1] == t.shape[-2] for t in images):
                raise RuntimeError("square images are not supported")
            return real(images)

        self._detectors[0].detect = detect


def test_a_detector_failure_is_a_per_row_status():
    rng = np.random.default_rng(1)
    imgs = [_jpeg(rng.integers(0, 255, s, dtype=np.uint8)) for s in ((64, 96, 3), (80, 80, 3), (70, 50, 3))]
    spec = DetectorSpec(MODEL, "random", min_size=128, max_size=256)
    cfg = Config(detectors=(spec,), score_threshold=0.0, micro_batch=MICRO)
    out = run_stage_batch(FailsOnSquares(cfg), _rows(imgs))
    assert list(out["status"]) == ["ok", "failed", "ok"] and out["reason"][1] == "detect_error"
    k = list(out["num_regions"])  # random weights: K depends on the init, but never on the failing row
    assert "square images" in out["detail"][1] and k[1] == 0 and k[0] > 0 and k[2] > 0
    kept = run_stage_batch(FailsOnSquares(dataclasses.replace(cfg, on_error="keep")), _rows(imgs))
    assert list(kept["status"]) == ["ok"] * 3 and kept["num_regions"][1] == 0 and kept["num_regions"][0] > 0


def test_features_are_arrays_aligned_with_the_parquet_rows_and_tar_members(stage, images, tmp_path):
    import webdataset as wds

    out = run_stage_batch(stage, _rows(images))
    schema = {name: col for name, (_, col) in stage_columns([stage]).items()}
    write_shard(out, tmp_path, 0, schema=schema)
    table = pq.read_table(layout.shard_parquet(tmp_path, 0))
    assert "region_feats" not in table.column_names and table.num_rows == 4
    flat = np.load(layout.array_npy(tmp_path, "region_feats", 0))
    offsets = np.load(layout.array_offsets(tmp_path, "region_feats", 0))
    assert flat.dtype == np.float16 and list(offsets) == [0, 36, 72, 108, 144]
    by_key = dict(zip(out["key"], out["region_feats"]))
    for i, key in enumerate(table.column("key").to_pylist()):
        assert np.array_equal(flat[offsets[i] : offsets[i + 1]], by_key[key])
        labels = table.column("region_labels")[i].as_py()
        assert len(labels) == 36 and all(isinstance(x, str) for x in labels)
    samples = list(wds.WebDataset(str(layout.shard_tar(tmp_path, 0)), shardshuffle=False).decode("rgb8"))
    for s in samples:
        h, w = s["jpg"].shape[:2]
        px = s["region_boxes.npy"] * np.array([w, h, w, h])
        assert px.shape == (36, 4) and px[:, 2].max() <= w and px[:, 3].max() <= h
        assert np.array_equal(s["region_feats.npy"], by_key[s["__key__"]])
        assert s["region_labels.npy"].dtype.kind == "U"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_regions"):
        Config(max_regions=0)
    with pytest.raises(ValueError, match="clip_pretrained"):
        Config(features=("clip",))
    with pytest.raises(ValueError, match="model"):
        DetectorSpec("yolo")
    with pytest.raises(ValueError, match="weights"):
        RegionsStage(Config(detectors=(DetectorSpec(MODEL, "NO_SUCH_WEIGHTS"),))).setup()


@pytest.mark.parametrize("model", [MODEL, "pf-tiny"])
def test_declared_feature_width_is_the_built_models(model):
    from pairforge.stages.common.detectors import Limits
    from pairforge.stages.regions import _load, _roi_dim

    spec = DetectorSpec(model, "random" if model == MODEL else "")
    assert _roi_dim(spec) == _load(spec, "cpu", Limits(), False).feature_dim
