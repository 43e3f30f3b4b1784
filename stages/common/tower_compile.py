"""How :mod:`stages.common.cuda_towers` compiles the CLIP towers so that
they keep the eager towers' numerics, and how the compile is shared by the
actors of a node.

Why numerics switches at all: ``clip_score`` decides keep or drop (a
threshold, a top fraction), so a compiled tower that rounds bf16 in other
places than eager moves rows across the cut. Plain inductor fuses chains of
ops and keeps their intermediates in fp32 (no less accurate, but not what
the eager towers computed). The settings (``compile_numerics``):

* ``eager`` (the stage's default): inductor rounds every fused op's output
  to bf16 as eager does (``emulate_precision_casts``), keeps a linear
  layer's bias inside the cuBLAS call (eager adds it in fp32 before rounding;
  unfused, the product is rounded first: ``keep_addmm_fused_for_half_dtypes``
  where this torch has it, else no post-grad pattern rewrites at all), picks
  no Triton matmul templates (``max_autotune`` off), splits no reductions,
  and runs layer norm with the eager kernel (the fp32 statistics in eager's
  order: the fused norm's other summation order flips the last bf16 bit of
  a few activations per layer);
* ``casts``: only ``emulate_precision_casts`` (what the stage compiled with
  before 2026-12-07);
* ``fast``: inductor's defaults.

Switches this torch lacks are skipped and named in :func:`settings`. The
agreement each setting reaches, by decisions, is measured by
``bench/clipagree.py --settings`` (docs/gpu.md).

The compile runs under a lock of the node (:func:`node_compile_lock`): the
first actor pays it, the others load its kernels from inductor's on-disk
caches (FX graph and autotuning caches in inductor's cache dir, the node's
temp folder unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

NUMERICS = ("eager", "casts", "fast")


def settings(numerics: str) -> tuple[dict, bool, list[str]]:
    """(inductor config patches, whether layer norms run as the eager kernel,
    the switches of ``numerics`` this torch lacks)."""
    import torch._inductor.config as inductor

    if numerics not in NUMERICS:
        raise ValueError(f"compile_numerics: expected one of {NUMERICS}, got {numerics!r}")
    want: dict = {}
    if numerics in ("eager", "casts"):
        want["emulate_precision_casts"] = True
    if numerics == "eager":
        want |= {"max_autotune": False, "max_autotune_gemm": False, "split_reductions": False}
        if hasattr(inductor, "keep_addmm_fused_for_half_dtypes"):
            want["keep_addmm_fused_for_half_dtypes"] = True
        else:  # older torch: the bias is unfused by a post-grad pattern rewrite; no rewrites at all
            want["pattern_matcher"] = False
    patches = {k: v for k, v in want.items() if hasattr(inductor, k)}
    missing = sorted(set(want) - set(patches))
    return patches, numerics == "eager", missing


def compiled(forward, model=None, numerics: str = "eager"):
    """``torch.compile(forward)`` through inductor with the switches of
    ``numerics`` (see the module doc), static shapes. With ``eager``
    numerics the layer norms of ``model`` (which ``forward`` runs) are first
    routed through :func:`route_norms`."""
    import torch

    patches, eager_norm, missing = settings(numerics)
    if missing:
        log.info("clip_score: this torch lacks inductor's %s; compiling without", ", ".join(missing))
    if eager_norm and model is not None:
        route_norms(model)
    return torch.compile(forward, dynamic=False, options=patches or None)


_op = None


def eager_layer_norm_op():
    """``pairforge::eager_layer_norm``: layer norm as autocast runs it in
    eager mode, as an operator inductor cannot see into, so it calls the
    eager kernel instead of fusing its own. ``upcast``: autocast's policy
    for layer norm on this device (CUDA: inputs cast to fp32, fp32 out; the
    CPU: the input's dtype). A registered operator, unlike a custom
    decomposition table, leaves inductor's FX graph cache usable (the key
    names it)."""
    global _op
    if _op is None:
        import torch

        if hasattr(torch.ops.pairforge, "eager_layer_norm"):  # registered by this module under its other name
            _op = torch.ops.pairforge.eager_layer_norm.default
            return _op
        import torch.nn.functional as F

        schema = "(Tensor x, Tensor? weight, Tensor? bias, int[] shape, float eps, bool upcast) -> Tensor"

        def eager_layer_norm(x, weight, bias, shape, eps, upcast):
            with torch.autocast(x.device.type, enabled=False):
                if upcast:
                    x = x.float()
                    weight = None if weight is None else weight.float()
                    bias = None if bias is None else bias.float()
                return F.layer_norm(x, shape, weight, bias, eps)

        def fake(x, weight, bias, shape, eps, upcast):
            return torch.empty_like(x, dtype=torch.float32 if upcast else x.dtype)

        eager_layer_norm = torch.library.custom_op("pairforge::eager_layer_norm", mutates_args=(), schema=schema)(
            eager_layer_norm
        )
        eager_layer_norm.register_fake(fake)
        _op = eager_layer_norm
    return _op


def autocast_upcasts_layer_norm(device_type: str, dtype) -> bool:
    """Whether autocast on ``device_type`` runs layer norm in fp32 (CUDA
    does; the CPU keeps the input's dtype), asked of torch itself."""
    import torch
    import torch.nn.functional as F

    x = torch.zeros((1, 2), dtype=dtype, device=device_type)
    with torch.inference_mode(), torch.autocast(device_type, dtype=dtype):
        return F.layer_norm(x, (2,)).dtype == torch.float32


def route_norms(model, dtype=None) -> int:
    """Point the forward of each layer norm of ``model`` (``torch.nn.LayerNorm``
    and open_clip's ``LayerNorm`` and ``LayerNormFp32``, which cast the result
    back to the input's dtype) at :func:`eager_layer_norm_op` while autocast
    (``dtype``, bf16 by default) is on: the same kernel on the same inputs
    as autocast gives it, so the eager towers' results do not change.
    Outside autocast a norm runs as before. Returns how many were routed."""
    import types

    import torch

    classes: dict = {torch.nn.LayerNorm: False}
    try:
        from open_clip import transformer as oct

        classes |= {getattr(oct, n): True for n in ("LayerNorm", "LayerNormFp32") if hasattr(oct, n)}
    except ImportError:
        pass
    params = list(model.parameters())
    device_type = params[0].device.type if params else "cpu"
    upcast = autocast_upcasts_layer_norm(device_type, dtype or torch.bfloat16)
    op, n = eager_layer_norm_op(), 0
    for m in model.modules():
        cast_back = classes.get(type(m))
        if cast_back is None or getattr(m, "_pf_eager_norm", False):
            continue
        plain = m.forward

        def forward(self, x, _plain=plain, _cast_back=cast_back):
            if not torch.is_autocast_enabled(x.device.type):
                return _plain(x)
            if _cast_back and type(self).__name__ == "LayerNormFp32":
                x32 = op(x.float(), self.weight, self.bias, list(self.normalized_shape), float(self.eps), upcast)
                return x32.to(x.dtype)
            y = op(x, self.weight, self.bias, list(self.normalized_shape), float(self.eps), upcast)
            return y.to(x.dtype) if _cast_back else y

        m.forward = types.MethodType(forward, m)
        m._pf_eager_norm = True
        n += 1
    return n


@contextlib.contextmanager
def node_compile_lock():
    """Held while this process compiles the towers: one process of a node at
    a time. Inductor keeps what it compiled in an on-disk cache of the node
    (the FX graph and autotuning caches under its cache dir, on by
    default), so actors that start together would each pay the full
    compile; with the lock the first compiles and the others, once it is
    done, load its kernels from the cache (seconds). Where the cache dir
    cannot take a lock file, nothing is held."""
    import fcntl

    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        folder = cache_dir()
    except Exception:  # another torch layout: its default place
        import tempfile

        folder = os.path.join(tempfile.gettempdir(), "torchinductor_" + (os.environ.get("USER") or "user"))
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, "pairforge-compile.lock"), "a")  # noqa: SIM115 - held across the yield
    except OSError as e:
        log.warning("clip_score: no compile lock in %s (%s); compiling without it", folder, e)
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
