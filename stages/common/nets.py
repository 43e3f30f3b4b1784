"""One ONNX image network, run by ONNX Runtime or by torch, behind one call.

Why: the ``safety`` stage's detectors (NudeNet's YOLOv8n, PP-OCRv4's DBNet)
ship as ONNX files. ONNX Runtime runs them on the CPU, and on a GPU only with
``onnxruntime-gpu`` (hundreds of MB of CUDA libraries that a torch install
already has). The torch engine converts the same file into a torch module
(:mod:`stages.common.torchonnx`) and runs it on torch's device, in fp32,
fp16 or bf16. Everything around the network stays shared, so both engines
compute the same score: the detector letterboxes each image to ``uint8``
(``N x H x W x 3``, the network's channel order) on the CPU, the net applies
the model's :class:`Normalise` (numpy or torch, the same float32 arithmetic)
and returns the raw output as float32 numpy, and the detector's own function
turns that into scores. Only ``uint8`` crosses to the GPU (a quarter of the
float32 bytes), and a detector that needs a few output channels asks for
just those (``channels``), so less comes back.

Which engine (``engine: auto``), decided on the worker (:func:`choose`):
ONNX Runtime's CUDA provider where the worker has a GPU and onnxruntime-gpu;
else torch on the GPU where onnx2torch is installed; else ONNX Runtime on the
CPU; torch on the CPU only when onnxruntime is missing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from pairforge.stages.common import onnx as _onnx

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "torch")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: what the torch engine needs beside torch, and how to get it
TORCH_PIP = "onnx==1.23.2 onnx2torch==1.5.15"


@dataclass(frozen=True)
class Normalise:
    """The network's input from ``uint8`` pixels: ``x * scale + shift`` in
    float32, channels first."""

    scale: float
    shift: float = 0.0

    def numpy(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) * np.float32(self.scale)
        return x + np.float32(self.shift) if self.shift else x

    def torch(self, batch):
        x = batch.permute(0, 3, 1, 2).float() * self.scale  # a Python float: applied in the tensor's float32
        return (x + self.shift if self.shift else x).contiguous()


def fixed_batch(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` (``[n, ...]``, ``n <= size``) padded to ``size`` rows with copies
    of its last: every call of a net gets the same batch shape, so an
    image's result does not depend on how many neighbours it had (the
    caller keeps the first ``n`` rows of the output)."""
    if len(x) >= size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


class OrtNet:
    """An ONNX Runtime session."""

    engine = "onnxruntime"

    def __init__(self, path: str, device: str, threads: int):
        self.session = _onnx.session(path, device, threads)
        self.device, self.precision = device, "fp32"
        self._input = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, batch: np.ndarray, norm: Normalise, channels: np.ndarray | None = None) -> np.ndarray:
        (out,) = self.session.run(None, {self._input: norm.numpy(batch)})
        return out if channels is None else out[:, channels]


class TorchNet:
    """The ONNX file converted to a torch module, on ``device``, run in
    ``precision`` (fp16/bf16 through autocast: convolutions in half
    precision, reductions and the output in float32)."""

    engine = "torch"

    def __init__(self, path: str, device: str, threads: int, precision: str = "fp32"):
        import torch

        from pairforge.stages.common import torchonnx

        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(threads)))
            if precision not in ("auto", "fp32"):
                log.warning("safety: precision %s is for a GPU; on the CPU the torch engine runs fp32", precision)
            precision = "fp32"
        # auto is fp32 until fp16's scores have been measured against fp32 on a GPU (docs/safety.md:
        # bench/safety.py --gpu prints the difference; it has not run yet)
        self.precision = "fp32" if precision == "auto" else precision
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        module, self.metadata = torchonnx.load(path)
        self.module = module.to(self.device).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed micro-batch shapes: the fastest algorithm once per shape
            if self.precision == "fp32":
                torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 (torch's default convolutions are TF32)

    def __call__(self, batch: np.ndarray, norm: Normalise, channels: np.ndarray | None = None) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        half = torch.autocast(self.device.type, self._dtype) if self._dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), half:
            out = self.module(norm.torch(x))
        if isinstance(out, (list, tuple)):
            out = out[0]
        if channels is not None:
            out = out[:, torch.as_tensor(channels, device=out.device)]
        return out.float().cpu().numpy()


def choose(engine: str, device: str, configured: str = "auto") -> tuple[str, str]:
    """The ``(engine, device)`` a worker runs: ``device`` already resolved
    (``cpu``, ``cuda``, ``cuda:N``) from the ``configured`` one; ``engine``
    as configured (module doc). A GPU that ONNX Runtime cannot use, with
    ``device: auto``, leaves ONNX Runtime on the CPU, with a warning."""
    gpu = device.startswith("cuda")
    ort_gpu = gpu and _onnx.CUDA in _ort_providers()
    if engine == "torch":
        return engine, device
    if engine == "onnxruntime" or not gpu:
        if gpu and not ort_gpu and configured == "auto":
            log.warning(
                "safety: a GPU but no onnxruntime CUDA provider (onnxruntime-gpu): the ONNX models run on the CPU"
            )
            return "onnxruntime", "cpu"
        if engine == "auto" and _onnx.package_dir("onnxruntime") is None and torch_ready():
            return "torch", device
        return "onnxruntime", device
    if ort_gpu:
        return "onnxruntime", device
    if torch_ready():
        return "torch", device
    if configured != "auto":
        return "onnxruntime", device  # device: cuda asked for: onnxruntime's error names the package
    log.warning(
        "safety: a GPU but neither onnxruntime-gpu nor onnx2torch (%s): the ONNX models run on the CPU", TORCH_PIP
    )
    return "onnxruntime", "cpu"


def open_net(path: str, engine: str, device: str, threads: int, precision: str = "auto"):
    """A net for ``path`` on the engine and device :func:`choose` picked."""
    if engine == "torch":
        return TorchNet(path, device, threads, precision)
    return OrtNet(path, device, threads)


def torch_ready() -> bool:
    """Whether the torch engine's packages are installed (none imported)."""
    return all(_onnx.package_dir(p) is not None for p in ("torch", "onnx", "onnx2torch"))


def engine_problem(field: str, engine: str) -> str | None:
    """Why ``engine`` cannot run here, as one line naming ``field``, or ``None``."""
    ort = _onnx.package_dir("onnxruntime") is not None
    if engine == "torch" and not torch_ready():
        return f"{field}: engine torch converts the ONNX models with onnx2torch, not installed: pip install {TORCH_PIP}"
    if engine == "onnxruntime" and not ort:
        return f"{field}: the package 'onnxruntime' is not installed (pip install onnxruntime==1.32.0)"
    if engine == "auto" and not ort and not torch_ready():
        return f"{field}: neither onnxruntime (pip install onnxruntime==1.32.0) nor the torch engine ({TORCH_PIP}) is installed"
    return None


def _ort_providers() -> list[str]:
    if _onnx.package_dir("onnxruntime") is None:
        return []
    import onnxruntime as ort

    return list(ort.get_available_providers())
