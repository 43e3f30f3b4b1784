"""The safety stage's two engines run the same ONNX files: ONNX Runtime, and
the files converted to torch by onnx2torch (stages/common/nets.py,
stages/common/torchonnx.py). On the CPU both give the same NSFW scores and
text areas on scikit-image's photos (within :data:`FP32_TOL`); on a GPU
(skipped without one) fp32, fp16 and bf16 stay within the tolerances that
docs/safety.md states (estimates: this test has not yet run on a GPU)."""

from __future__ import annotations

import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pairforge.pipeline.datasets import skimage_photos
from pairforge.stages.base import fresh_rows, object_array, run_stage_batch
from pairforge.stages.common import nets as _nets
from pairforge.stages.common import nsfw as _nsfw
from pairforge.stages.common import onnx as _onnx
from pairforge.stages.common import textdet as _text
from pairforge.stages.common import torchonnx
from pairforge.stages.safety import Config, SafetyStage

#: torch fp32 against ONNX Runtime on the CPU: the same graph, other kernels (seen: 4e-7)
FP32_TOL = 1e-4
#: a GPU's half precision against fp32 (NSFW score; text area share). NOT yet measured (no device
#: machine started for issue 24's session, 2026-12-07): estimates from the formats' steps near a
#: score of 0.5 (fp16 4.9e-4, bf16 3.9e-3) with room for the convolutions' error; the test prints
#: the differences it sees, and docs/safety.md says to set these from them
HALF_TOL = {"fp16": (5e-3, 5e-3), "bf16": (3e-2, 2e-2)}

torch = pytest.importorskip("torch")
pytest.importorskip("onnx2torch")


@pytest.fixture(scope="module")
def images():
    return [img for _, _, img in skimage_photos()]


def model(mod) -> str:
    return _onnx.resolve("", mod.PACKAGE, mod.MODEL_FILE)


def nets(mod, device="cpu", precision="fp32"):
    return _nets.open_net(model(mod), "onnxruntime", "cpu", 1), _nets.open_net(
        model(mod), "torch", device, 1, precision
    )


def jpegs(images, side=256) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rows_of(data: list[bytes]):
    rows = fresh_rows([f"00000{i:04d}" for i in range(len(data))], caption=object_array(["x"] * len(data)))
    rows["image"] = object_array(data)
    rows["image_ext"] = object_array(["jpg"] * len(data))
    return rows


def test_the_ppocr_weights_are_constants_lifted_into_initializers():
    import onnx

    graph = onnx.load(model(_text))
    before = sum(n.op_type == "Constant" for n in graph.graph.node)
    assert before > 100 and not graph.graph.initializer  # why onnx2torch alone fails on this file
    assert torchonnx.lift_constants(graph) == before
    assert not any(n.op_type == "Constant" for n in graph.graph.node) and len(graph.graph.initializer) == before
    onnx.checker.check_model(graph)


def test_torch_gives_onnxruntimes_nsfw_scores_on_the_cpu(images):
    ort, tch = nets(_nsfw)
    assert tch.metadata["names"] == ort.metadata["names"]  # the classes come from the file either way
    a, ca = _nsfw.NsfwDetector(ort, micro_batch=4).scores(images)
    b, cb = _nsfw.NsfwDetector(tch, micro_batch=4).scores(images)
    print(f"\nnsfw torch vs onnxruntime (cpu): max |diff| {np.abs(a - b).max():.2e}")
    assert np.abs(a - b).max() < FP32_TOL and a.max() > 0.5  # the colour wheel's false positive is in there
    assert [x for x, s in zip(ca, a) if s > 0.01] == [x for x, s in zip(cb, a) if s > 0.01]


def test_torch_gives_onnxruntimes_text_areas_on_the_cpu(images):
    ort, tch = nets(_text)
    a = _text.TextDetector(ort, 256, 4).detect(images)
    b = _text.TextDetector(tch, 256, 4).detect(images)
    diff = max(abs(x[1] - y[1]) for x, y in zip(a, b))
    print(f"\ntext area torch vs onnxruntime (cpu): max |diff| {diff:.2e}")
    assert diff < FP32_TOL and max(x[1] for x in a) > 0.3  # the scanned page is mostly text
    assert [len(x[0]) for x in a] == [len(y[0]) for y in b]


def test_threads_give_the_same_scores(images):
    _, tch = nets(_nsfw)
    alone, _ = _nsfw.NsfwDetector(tch, micro_batch=4).scores(images)
    with ThreadPoolExecutor(2) as pool:
        threaded, _ = _nsfw.NsfwDetector(tch, micro_batch=4, pool=pool).scores(images)
        text = _text.TextDetector(nets(_text)[1], 256, 4, pool=pool).detect(images[:6])
    assert np.array_equal(alone, threaded)
    assert [t[1] for t in text] == [t[1] for t in _text.TextDetector(nets(_text)[1], 256, 4).detect(images[:6])]


def test_the_stage_on_the_torch_engine(images):
    data = jpegs(images[:6])
    ort = run_stage_batch(SafetyStage(Config(engine="onnxruntime", device="cpu", micro_batch=4)), rows_of(data))
    st = SafetyStage(Config(engine="torch", device="cpu", micro_batch=4, nsfw_threshold=0.0))
    tch = run_stage_batch(st, rows_of(data))
    assert np.abs(ort["punsafe"] - tch["punsafe"]).max() < FP32_TOL
    assert np.abs(ort["text_area"] - tch["text_area"]).max() < FP32_TOL
    detail = json.loads(tch["detail"][0])  # threshold 0: every row is dropped, its detail names the engine
    assert detail["model"]["engine"] == "torch cpu fp32" and len(detail["model"]["sha256"]) == 64


def test_engine_choice_on_a_cpu_worker():
    assert _nets.choose("auto", "cpu") == ("onnxruntime", "cpu")
    assert _nets.choose("torch", "cpu") == ("torch", "cpu")
    assert _nets.choose("onnxruntime", "cpu") == ("onnxruntime", "cpu")


def test_options_name_the_key():
    with pytest.raises(ValueError, match="^engine: "):
        Config(engine="tensorrt")
    with pytest.raises(ValueError, match="^precision: "):
        Config(engine="onnxruntime", precision="fp16")
    with pytest.raises(ValueError, match="^precision: "):
        Config(device="cpu", precision="bf16")


def test_a_missing_engine_package_is_one_line_naming_the_key(monkeypatch):
    assert SafetyStage(Config(engine="torch")).check({}) == []
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # import onnx2torch now fails: as if not installed
    (line,) = SafetyStage(Config(engine="torch")).check({})
    assert line.startswith("engine: ") and "onnx2torch==1.5.15" in line
    assert SafetyStage(Config(engine="auto")).check({}) == []  # onnxruntime is there
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    (line,) = SafetyStage(Config(engine="auto")).check({})
    assert line.startswith("engine: neither onnxruntime")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_gpu_in_half_precision_stays_within_tolerance(images, precision):
    """Against torch fp32 on the CPU (ONNX Runtime's scores within FP32_TOL,
    tested above; the device machine has no onnxruntime)."""
    path, text_path = model(_nsfw), model(_text)
    cpu, gpu = (_nets.open_net(path, "torch", d, 1, p) for d, p in (("cpu", "fp32"), ("cuda", precision)))
    a, _ = _nsfw.NsfwDetector(cpu, micro_batch=8).scores(images)
    b, _ = _nsfw.NsfwDetector(gpu, micro_batch=8).scores(images)
    cpu, gpu = (_nets.open_net(text_path, "torch", d, 1, p) for d, p in (("cpu", "fp32"), ("cuda", precision)))
    ta = _text.TextDetector(cpu, 256, 8).detect(images)
    tb = _text.TextDetector(gpu, 256, 8).detect(images)
    nsfw_diff, text_diff = np.abs(a - b).max(), max(abs(x[1] - y[1]) for x, y in zip(ta, tb))
    print(
        f"\n{precision} on {torch.cuda.get_device_name()}: nsfw max |diff| {nsfw_diff:.2e}, text area {text_diff:.2e}"
    )
    tol = HALF_TOL.get(precision, (FP32_TOL, FP32_TOL))
    assert nsfw_diff < tol[0] and text_diff < tol[1]
