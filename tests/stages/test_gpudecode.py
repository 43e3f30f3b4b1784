"""stages.common.gpudecode without a GPU: the batching, the per-row
fallbacks and the tensor contract, through nvImageCodec's CPU backend
(skipped where nvImageCodec is not installed; the hardware path needs a GPU:
``bench/decode_probe.py``)."""

import io

import numpy as np
import pytest
from PIL import Image

from pairforge.stages.common import clip as _clip
from pairforge.stages.common import gpudecode

nvimgcodec = pytest.importorskip("nvidia.nvimgcodec", reason="nvidia-nvimgcodec-cu13 is not installed")


def encoded(h, w, fmt="JPEG", mode="RGB", seed=0, **kw):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("planar", [False, True])
def test_decodes_like_the_pil_path_and_fails_rows_alone(planar):
    jpeg = encoded(40, 30)
    images = [jpeg, jpeg[: len(jpeg) // 2], encoded(10, 12, "PNG"), b"", b"junk", encoded(20, 22, mode="L"),
              encoded(32, 32, progressive=True), bytearray(encoded(17, 33, seed=1))]  # fmt: skip
    got, errors = gpudecode.NvImgDecoder("cpu", planar=planar).decode(images)
    want, want_errors = _clip.decode_tensors(images, "cpu")
    assert [e is None for e in errors] == [e is None for e in want_errors] == [1, 0, 1, 0, 0, 1, 1, 1]
    assert errors[1].startswith("OSError") and errors[4].startswith("UnidentifiedImageError")  # PIL says why
    for g, w in zip(got, want):
        if w is not None:  # libjpeg-turbo both: the same pixels
            assert g.dtype == w.dtype and g.shape == w.shape and bool((g == w).all())


def test_check_says_there_is_no_hardware_decoding_off_a_gpu():
    info = gpudecode.check("cpu")
    assert info["version"] == nvimgcodec.__version__ and info["hw"] is False and "not a GPU" in info["hw_error"]


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="'FAST': expected KIND.*HW_GPU_ONLY"):
        gpudecode.NvImgDecoder("cuda:0", backends=("FAST",))


def test_backend_shares_reach_nvimgcodec():
    dec = gpudecode.NvImgDecoder("cuda:0", backends=("HW_GPU_ONLY:0.7:adaptive", "HYBRID_CPU_GPU:0.5"))
    got = [(b.backend_kind, round(b.load_hint, 3), b.load_hint_policy) for b in dec.backend_list()]
    nv = nvimgcodec
    assert got == [(nv.BackendKind.HW_GPU_ONLY, 0.7, nv.LoadHintPolicy.ADAPTIVE_MINIMIZE_IDLE_TIME),
                   (nv.BackendKind.HYBRID_CPU_GPU, 0.5, nv.LoadHintPolicy.FIXED)]  # fmt: skip
