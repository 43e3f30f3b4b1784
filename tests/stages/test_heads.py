"""Heads on the CLIP image embedding (stages/heads.py): random weights of
LAION's aesthetic-predictor layout, saved the way torch and safetensors
save them, give the scores a direct torch computation gives; any linear
stack loads; wrong layouts and widths are refused with the key named,
before a run where the file's header tells."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pairforge.stages.base import STATUS_OK, Column, StageError, fresh_rows, object_array, run_stage_batch
from pairforge.stages.common import heads as _heads
from pairforge.stages.heads import Config, HeadSpec, HeadsStage

N = 64


def laion_aesthetic(dim: int = 768) -> nn.Module:
    """The layout of improved-aesthetic-predictor's ``MLP`` (its ReLUs are commented out)."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            )  # fmt: skip

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    return MLP().eval()


def embeddings(dim: int, seed: int = 1) -> np.ndarray:
    e = np.random.default_rng(seed).standard_normal((N, dim)).astype(np.float32)
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)  # as clip_score stores img_emb


def rows_with(emb: np.ndarray):
    rows = fresh_rows([f"00000{i:04d}" for i in range(len(emb))], caption=object_array(["x"] * len(emb)))
    rows["img_emb"] = emb
    return rows


def direct(model: nn.Module, emb: np.ndarray, normalize: bool = True) -> np.ndarray:
    x = torch.from_numpy(emb.astype(np.float32))
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_laion_aesthetic_layout_scores_as_torch_does(tmp_path, fmt):
    model = laion_aesthetic()
    sd = model.state_dict()
    assert list(sd) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    path = tmp_path / f"sac+logos+ava1-l14-linearMSE.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    st = HeadsStage(Config(heads=(HeadSpec("aesthetic", str(path), kind="laion_aesthetic"),)))
    assert st.check({"img_emb": Column("img_emb", "vector", "float16", (768,), store="embeddings")}) == []
    emb = embeddings(768)
    out = run_stage_batch(st, rows_with(emb))
    want = direct(model, emb)[:, 0]
    assert out["aesthetic"].dtype == np.float32
    np.testing.assert_allclose(out["aesthetic"], want, rtol=1e-5, atol=1e-5)
    assert np.std(want) > 0  # not a constant: the comparison can fail


def test_any_mlp_with_activation_and_softmax(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 3)).eval()
    path = tmp_path / "probe.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    spec = HeadSpec("watermark", str(path), activation="gelu", output="softmax", index=2, prefix="model.", normalize=False)
    emb = embeddings(512, seed=3).astype(np.float32) * 4
    out = run_stage_batch(HeadsStage(Config(heads=(spec,))), rows_with(emb))
    want = torch.softmax(torch.from_numpy(direct(model, emb, normalize=False)), dim=1)[:, 2].numpy()
    np.testing.assert_allclose(out["watermark"], want, rtol=1e-5, atol=1e-6)


def test_a_single_linear_head_and_thresholds(tmp_path):
    """LAION's first aesthetic model is one ``Linear(512, 1)`` (keys ``weight``, ``bias``)."""
    torch.manual_seed(4)
    lin = nn.Linear(512, 1).eval()
    path = tmp_path / "sa_0_4_vit_b_32_linear.pth"
    torch.save(lin.state_dict(), path)
    emb = embeddings(512, seed=5)
    want = direct(lin, emb)[:, 0]
    cut = float(np.median(want))
    heads = (HeadSpec("aesthetic_v1", str(path), threshold=cut),
             HeadSpec("flipped", str(path), threshold=float(np.quantile(want, 0.9)), drop="above"))  # fmt: skip
    out = run_stage_batch(HeadsStage(Config(heads=heads)), rows_with(emb))
    np.testing.assert_allclose(out["aesthetic_v1"], want, rtol=1e-5, atol=1e-6)
    low = want < cut
    assert set(out["reason"][low]) == {"aesthetic_v1_below_threshold"}
    high = ~low & (want > np.quantile(want, 0.9))
    assert set(out["reason"][high]) == {"flipped_above_threshold"} and high.sum() > 0
    assert np.array_equal(out["status"] == STATUS_OK, ~low & ~high)
    d = json.loads(out["detail"][np.flatnonzero(low)[0]])
    assert d["threshold"] == cut and d["head"] == path.name


def test_wrong_layouts_are_refused_with_the_keys_named(tmp_path):
    from safetensors.torch import save_file

    ln = nn.Sequential(nn.Linear(512, 64), nn.LayerNorm(64), nn.Linear(64, 1))
    save_file(ln.state_dict(), str(tmp_path / "ln.safetensors"))
    with pytest.raises(ValueError, match=r"1\.weight"):
        _heads.load(str(tmp_path / "ln.safetensors"))
    small = nn.Sequential(nn.Linear(512, 1024), nn.Dropout(), nn.Linear(1024, 1))
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="not LAION's aesthetic predictor"):
        _heads.load(str(tmp_path / "small.safetensors"), kind="laion_aesthetic")
    save_file(laion_aesthetic().state_dict(), str(tmp_path / "aes.safetensors"))
    vit_b = {"img_emb": Column("img_emb", "vector", "float16", (512,), store="embeddings")}
    cfg = Config(heads=(HeadSpec("aesthetic", str(tmp_path / "aes.safetensors"), kind="laion_aesthetic"),
                        HeadSpec("gone", str(tmp_path / "nowhere.pth"))))  # fmt: skip
    lines = HeadsStage(cfg).check(vit_b)
    assert lines == [
        "heads[0](aesthetic).path: the head takes 768 inputs, img_emb has 512",
        f"heads[1](gone).path: no head weights file {str(tmp_path / 'nowhere.pth')!r}",
    ]
    with pytest.raises(StageError, match="takes 768 inputs, img_emb has 512"):
        run_stage_batch(HeadsStage(Config(heads=cfg.heads[:1])), rows_with(embeddings(512)))


def test_torch_files_are_read_as_data_only(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1, 4), "bias": torch.zeros(1), "x": Sneaky()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        _heads.read_tensors(str(path))
