"""Face blurring (DataComp's release rule) with facenet-pytorch's real MTCNN:
faces it finds in scikit-image's astronaut and in a face pasted onto another
photo are blurred, and it finds none in the bytes written; the row keeps
the original's sha256 and the boxes. End to end: a local-runner job
downloads from a loopback server and the shard's tar holds the blurred
image while the parquet holds the original's sha256."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from pairforge.manifests import layout
from pairforge.manifests.manifest import verify
from pairforge.pipeline.config import load_job
from pairforge.pipeline.httpserver import LocalHTTPServer, Route
from pairforge.pipeline.job import run_job
from pairforge.stages.base import STATUS_OK, fresh_rows, object_array, run_stage_batch
from pairforge.stages.common import blur
from pairforge.stages.common.detectors import Limits
from pairforge.stages.common.faces import load_faces
from pairforge.stages.safety import Config, SafetyStage


@pytest.fixture(scope="module")
def mtcnn():
    return load_faces("cpu", Limits())


def faces_in(mtcnn, data_or_array) -> np.ndarray:
    arr = data_or_array
    if isinstance(arr, (bytes, bytearray)):
        arr = np.array(Image.open(io.BytesIO(arr)).convert("RGB"))
    (r,) = mtcnn.detect([torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)])
    return r.boxes


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def astronaut(side: int = 256) -> np.ndarray:
    return np.array(Image.fromarray(data.astronaut()).resize((side, side), Image.BICUBIC))


def pasted_face() -> np.ndarray:
    """The astronaut's face, 56 x 60 px, pasted onto the coffee photo."""
    base = np.array(Image.fromarray(data.coffee()).resize((320, 256), Image.BICUBIC))
    face = np.array(Image.fromarray(data.astronaut()[70:190, 170:280]).resize((56, 60), Image.BICUBIC))
    base[150:210, 200:256] = face
    return base


def test_blurred_faces_are_not_found_again(mtcnn):
    for name, img in (("astronaut", astronaut()), ("astronaut 512", data.astronaut()), ("pasted", pasted_face())):
        before = faces_in(mtcnn, img)
        assert len(before) == 1, name
        out = blur.blur_faces(img, before)
        assert len(faces_in(mtcnn, blur.encode(out, "jpg", 95))) == 0, name
        x0, y0, x1, y1 = before[0].astype(int)
        assert np.abs(out[y0:y1, x0:x1].astype(int) - img[y0:y1, x0:x1]).mean() > 8, name  # the face changed
        far = img.copy()
        far[max(0, y0 - 80) : y1 + 80, max(0, x0 - 80) : x1 + 80] = 0  # away from the face: untouched
        assert np.array_equal(np.where(far > 0, out, 0), far), name


def test_the_stage_blurs_the_stored_bytes_and_keeps_the_boxes(mtcnn):
    originals = [jpeg(astronaut()), jpeg(pasted_face()), jpeg(np.array(Image.fromarray(data.chelsea())))]
    rows = fresh_rows([f"00000{i:04d}" for i in range(3)], caption=object_array(["x"] * 3))
    rows["image"] = object_array(list(originals))
    rows["image_ext"] = object_array(["jpg"] * 3)
    rows["sha256"] = object_array([hashlib.sha256(b).hexdigest() for b in originals])
    out = run_stage_batch(SafetyStage(Config(nsfw=False, text=False, blur_faces=True)), rows)
    assert list(out["status"]) == [STATUS_OK] * 3 and list(out["num_faces"]) == [1, 1, 0]
    assert [b.shape for b in out["face_boxes"]] == [(1, 4), (1, 4), (0, 4)]
    assert np.all((out["face_boxes"][0] >= 0) & (out["face_boxes"][0] <= 1))
    assert list(out["sha256"]) == list(rows["sha256"])  # the original download's, still
    assert out["image"][2] is originals[2]  # no face: the very same bytes
    for i in (0, 1):
        assert out["image"][i] != originals[i] and out["image"][i][:3] == b"\xff\xd8\xff"
        assert len(faces_in(mtcnn, out["image"][i])) == 0


def test_blurring_is_off_by_default():
    assert Config().blur_faces is False
    assert "face_boxes" not in {c.name for c in SafetyStage(Config()).outputs()}


def test_a_job_stores_blurred_images_with_the_originals_sha256(tmp_path, mtcnn):
    photos = {"/astronaut.jpg": jpeg(astronaut()), "/pasted.jpg": jpeg(pasted_face()),
              "/cat.jpg": jpeg(np.array(Image.fromarray(data.chelsea()).resize((256, 200))))}  # fmt: skip
    with LocalHTTPServer({p: Route(b, "image/jpeg") for p, b in photos.items()}) as server:
        urls = [server.url(p) for p in photos]
        pq.write_table(pa.table({"url": urls, "caption": ["a portrait photo of a woman"] * 3}), tmp_path / "urls.parquet")
        job = load_job(
            {
                "input": {"paths": ["urls.parquet"]},
                "output": {"dir": "out", "samples_per_shard": 10},
                "runner": "local",
                "stages": [
                    {"name": "download", "image_size": 256, "resize_mode": "keep_ratio", "encode_quality": 95,
                     "allow_networks": ["127.0.0.0/8"]},  # fmt: skip
                    {"name": "safety", "blur_faces": True, "text_boxes": True},
                    "shard",
                ],
            },
            base_dir=tmp_path,
        )
        man = run_job(job)
    out = tmp_path / "out"
    assert man["counts"]["ok"] == 3 and verify(out) == []
    table = pq.read_table(layout.shard_parquet(out, 0)).to_pylist()
    by_url = {r["url"]: r for r in table}
    with tarfile.open(layout.shard_tar(out, 0)) as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for path, original in photos.items():
        row = next(r for u, r in by_url.items() if u.endswith(path))
        assert row["sha256"] == hashlib.sha256(original).hexdigest()
        image = stored[f"{row['key']}.jpg"]
        assert len(faces_in(mtcnn, image)) == 0
        assert row["num_faces"] == (0 if path == "/cat.jpg" else 1) and len(row["face_boxes"]) == row["num_faces"]
        assert 0 <= row["punsafe"] < 0.5 and row["text_area"] == pytest.approx(0, abs=0.01)
        assert json.loads(stored[f"{row['key']}.json"].decode())["num_faces"] == row["num_faces"]
    schema = {c["name"]: c for c in man["schema"]}
    assert schema["face_boxes"]["kind"] == "ragged" and schema["punsafe"]["kind"] == "scalar"
