"""Small heads on a CLIP image embedding: LAION's aesthetic predictor and any
stack of linear layers, read from a safetensors or torch file.

**LAION's aesthetic predictor** (christophschuhmann/improved-aesthetic-predictor,
``sac+logos+ava1-l14-linearMSE.pth``, the model of LAION-5B's aesthetic
subsets) is, as its ``simple_inference.py`` builds it, an ``nn.Sequential``
under the attribute ``layers``: ``Linear(768, 1024)``, ``Dropout(0.2)``,
``Linear(1024, 128)``, ``Dropout(0.2)``, ``Linear(128, 64)``,
``Dropout(0.1)``, ``Linear(64, 16)``, ``Linear(16, 1)``, with the ReLUs
between them commented out. So its state dict holds ``layers.0``,
``layers.2``, ``layers.4``, ``layers.6`` and ``layers.7`` (``.weight`` and
``.bias``; dropout has no parameters), no activation runs between the
layers (``activation: none``; the script loads its ``reluMSE`` file into the
same class, so that file has the same keys, and nothing in a state dict says
whether ReLUs ran in training: ``activation: relu`` if they did), and its
input is the ViT-L/14 image embedding L2-normalised (``normalized(...)`` in
that script).
:data:`LAION_AESTHETIC` is that layout; :func:`load` refuses a file that
does not have it when ``kind`` is ``laion_aesthetic``.

**Any linear or MLP head** (``kind: mlp``): every 2-D ``*weight`` with its
``*bias`` is a linear layer, in the natural order of their keys
(``layers.2`` before ``layers.10``); each layer's input must be the last
one's output, the first one's the embedding's width. A file holding
anything else (a LayerNorm's weight, a buffer) is refused with the keys
named: this module runs linear stacks only. LAION's first aesthetic model
(``sa_0_4_vit_b_32_linear.pth``, one ``Linear(512, 1)``: keys ``weight`` and
``bias``) is such a head.

Files are read as data only: safetensors, or ``torch.load(weights_only=True)``
(no pickled code runs). A Lightning checkpoint's ``state_dict`` is looked
into, and ``prefix`` strips a key prefix. The heads run in float32 numpy.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: LAION's aesthetic predictor: key stem -> (out, in) with ``in`` of the first layer free (768 for ViT-L/14)
LAION_AESTHETIC = (("layers.0", 1024), ("layers.2", 128), ("layers.4", 64), ("layers.6", 16), ("layers.7", 1))
ACTIVATIONS = ("none", "relu", "gelu")
OUTPUTS = ("none", "sigmoid", "softmax")


@dataclass
class Head:
    """A loaded head: its layers as ``(weight [out, in], bias [out])``."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    activation: str = "none"
    output: str = "none"
    index: int = 0
    normalize: bool = True

    @property
    def in_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        """Scores (float32, one per row) of ``emb`` ``[n, in_dim]``."""
        x = np.asarray(emb, dtype=np.float32).reshape(-1, self.in_dim)
        if self.normalize:
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norm == 0, 1.0, norm)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < last:
                x = _activate(x, self.activation)
        if self.output == "sigmoid":
            x = 1.0 / (1.0 + np.exp(-x))
        elif self.output == "softmax":
            x = np.exp(x - x.max(axis=1, keepdims=True))
            x = x / x.sum(axis=1, keepdims=True)
        return np.ascontiguousarray(x[:, self.index], dtype=np.float32)


def _activate(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "gelu":  # the exact (erf) GELU, torch's default
        import torch

        return torch.nn.functional.gelu(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return x


def read_tensors(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    """The file's tensors as float32 arrays, ``prefix`` stripped (keys without
    it are left out when a prefix is given)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        raw = dict(load_file(str(p)))
    else:
        import torch

        obj = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
        raw = {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    if prefix:
        raw = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def safetensors_shapes(path: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's JSON header, without loading
    the tensors (or importing anything): for the check before a run."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 << 20:
            raise ValueError(f"{path}: a safetensors header of {size} bytes")
        header = json.loads(f.read(size))
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)} if prefix else shapes


def linear_stems(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The key stems of the linear layers (``layers.0`` for ``layers.0.weight``),
    in natural order; a key that is not such a layer's is an error naming it."""
    stems, other = [], []
    for key, shape in shapes.items():
        stem, _, leaf = key.rpartition(".") if "." in key else ("", "", key)
        if leaf == "weight" and len(shape) == 2:
            stems.append(stem)
        elif not (leaf == "bias" and len(shape) == 1):
            other.append(key)
    if other:
        raise ValueError(f"not a stack of linear layers: {sorted(other)[:5]} are not a Linear's weight or bias")
    if not stems:
        raise ValueError("no linear layer (no 2-D '*weight' tensor)")
    return sorted(stems, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def layer_widths(shapes: dict[str, tuple[int, ...]], kind: str) -> list[int]:
    """``[in, hidden..., out]`` of the head with these tensor shapes, after
    checking the layout (``kind``: ``mlp`` or ``laion_aesthetic``)."""
    stems = linear_stems(shapes)

    def key(stem: str, leaf: str) -> str:
        return f"{stem}.{leaf}" if stem else leaf

    widths = [shapes[key(stems[0], "weight")][1]]
    for stem in stems:
        out, inp = shapes[key(stem, "weight")]
        bias = shapes.get(key(stem, "bias"))
        if bias is not None and bias != (out,):
            raise ValueError(f"{key(stem, 'bias')}: shape {list(bias)}, expected [{out}]")
        if inp != widths[-1]:
            raise ValueError(f"{key(stem, 'weight')}: takes {inp} inputs, the layer before gives {widths[-1]}")
        widths.append(out)
    if kind == "laion_aesthetic":
        want = [s for s, _ in LAION_AESTHETIC]
        got = [(s, shapes[key(s, "weight")][0]) for s in stems]
        if got != list(LAION_AESTHETIC) or any(key(s, "bias") not in shapes for s in want):
            raise ValueError(
                f"not LAION's aesthetic predictor: its Linear layers are {[f'{s} (out {o})' for s, o in got]}, "
                f"expected {[f'{s} (out {o})' for s, o in LAION_AESTHETIC]}, each with a bias"
            )
    return [int(w) for w in widths]


def load(path: str, kind: str = "mlp", prefix: str = "", activation: str = "none", output: str = "none",
         index: int = 0, normalize: bool = True) -> Head:  # fmt: skip
    """A head from ``path`` (see the module doc)."""
    tensors = read_tensors(path, prefix)
    widths = layer_widths({k: v.shape for k, v in tensors.items()}, kind)
    if not 0 <= index < widths[-1]:
        raise ValueError(f"index: the head has {widths[-1]} outputs, got {index}")
    layers = []
    for stem in linear_stems({k: v.shape for k, v in tensors.items()}):
        w = tensors[f"{stem}.weight" if stem else "weight"]
        b = tensors.get(f"{stem}.bias" if stem else "bias")
        layers.append((w, b if b is not None else np.zeros(w.shape[0], np.float32)))
    return Head(layers, activation, output, index, normalize)
