"""trainer.prep: the worker half (decode, square, canvas, tokens per batch)
and the device half (resize, copies) give what open_clip's preprocess and
tokenizer give, whichever side resizes, for any mix of image sizes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pairforge.trainer.prep import NEGATIVE_CAPTION, Prep, device_batches, model_images, tokenizer


def _photo(w: int, h: int, fmt: str = "JPEG") -> bytes:
    import skimage.data

    im = Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _open_clip_way(data: bytes, s: int) -> torch.Tensor:
    """Shorter side to s (PIL bicubic), centre crop s: open_clip's eval preprocess, before normalisation
    (big JPEGs decoded at a reduced scale, as the trainer always did)."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (s, s))
    im = im.convert("RGB")
    scale = s / min(im.size)
    im = im.resize((max(s, round(im.width * scale)), max(s, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return torch.from_numpy(np.asarray(im.crop((left, top, left + s, top + s))).copy()).permute(2, 0, 1)


SIZES = [(256, 256), (256, 340), (300, 200), (64, 64), (600, 600)]


@pytest.mark.parametrize("resize", ["device", "worker"])
def test_images_match_open_clips_preprocess_for_any_mix_of_sizes(resize):
    datas = [_photo(w, h) for w, h in SIZES] + [_photo(500, 520, "PNG")]
    prep = Prep("pf-tiny", 224, resize=resize)
    batch = prep.images(datas)
    got = model_images(batch, 224, "cpu")
    assert got.shape == (len(datas), 3, 224, 224) and got.dtype == torch.uint8
    want = torch.stack([_open_clip_way(d, 224) for d in datas])
    diff = (got.int() - want.int()).abs().float().mean(dim=(1, 2, 3))  # grey levels per image
    # PIL in the worker: the same pixels (to within its box arithmetic); the
    # device: torch's antialiased bicubic on a square starting within half a
    # pixel of the crop's box
    assert diff.max() < (0.2 if resize == "worker" else 1.0), diff
    # one at a time gives the same pixels as a mixed batch
    assert torch.equal(torch.stack([prep.image(d) for d in datas]), got)
    if resize == "device":  # squares as stored (a 600 px JPEG decoded at half scale, the PNG resized here)
        assert batch["side"].tolist() == [256, 256, 200, 64, 300, 224]
    else:
        assert set(batch["side"].tolist()) == {224}


def test_augmented_crops_are_seeded_by_key_and_epoch():
    data = _photo(256, 256)
    prep = Prep("pf-tiny", 224, augment=True, seed=3, resize="device")
    a, b = prep.image(data, "k1", 0), prep.image(data, "k1", 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, prep.image(data, "k1", 1)) or not torch.equal(a, prep.image(data, "k2", 0))
    sides = prep.images([data] * 20, [f"k{i}" for i in range(20)], [0] * 20)["side"]
    assert sides.min() >= round(256 * 0.9**0.5) - 1 and sides.max() <= 256 and len(set(sides.tolist())) > 1


def test_batch_tokenises_captions_and_negatives_like_open_clip():
    tok = tokenizer("pf-tiny")
    parsed = [
        {"key": str(i), "caption": f"a photo of thing {i}", "image_bytes": _photo(80, 80),
         "meta": {NEGATIVE_CAPTION: f"not thing {i}"} if i % 2 else {}}
        for i in range(5)
    ]  # fmt: skip
    b = Prep("pf-tiny", 64).batch(parsed, [0] * 5)
    assert torch.equal(b["text"], tok([p["caption"] for p in parsed]))
    assert b["has_neg"].tolist() == [False, True, False, True, False]
    assert torch.equal(b["neg_text"], tok([p["meta"].get(NEGATIVE_CAPTION, "") for p in parsed]))
    ready = next(device_batches(iter([b]), 64, "cpu"))
    assert ready["image"].shape == (5, 3, 64, 64)
    assert torch.equal(ready["neg_text"], tok(["not thing 1", "not thing 3"]))
    assert next(device_batches(iter([b]), 64, "cpu", hard_negatives=False))["neg_text"] is None


def test_unknown_resize_is_refused():
    with pytest.raises(ValueError, match="resize"):
        Prep("pf-tiny", 64, resize="gpu")
