"""Do compiled CLIP towers make the clip_score stage's decisions the eager
towers make?

    python bench/clipagree.py --device cuda                 # the bench corpus and the demo's rows, one GPU (~2 min)
    python bench/clipagree.py --device cpu --n 512 --sets demo   # the towers' forward on the CPU (bf16 autocast)
    python bench/clipagree.py --device cuda --settings eager,casts,fast   # each compile_numerics setting

``torch.compile``'s towers score within a few 1e-3 of the eager ones in
bf16 (fused kernels round in other places), too much for a bit-for-bit
check, but the stage only decides keep or drop: below ``threshold``
(LAION-5B: 0.28 with ViT-B/32) or outside the best ``top_fraction``
(DataComp: 30%). What matters is the share of rows whose decision changes;
a row can only change when its score lies within the difference of the cut.

Sets (``--sets``): ``bench`` is ``bench/clip_score.py``'s corpus (256 px
JPEGs, 5-15 word captions) scored by ViT-B-32 with random weights (seed 0);
``demo`` is the demo job's rows (scikit-image photos, Fashion-MNIST
products and their planted variants, ``pairforge/demo.py``) scored by the
shipped ``pf-tiny-scorer`` (real weights; the demo keeps scores >= 0.6).
On a GPU the scores come from the stage itself (nvJPEG, CUDA graphs: eager
towers, or compiled + graphs) over the same rows; on the CPU from the
towers' forward (:func:`stages.common.cuda_towers.tower_forward`, bf16
autocast) eager and compiled, since the stage runs fp32 there.
``--settings`` names the stage's ``compile_numerics`` settings to compare
with eager (``eager``: inductor rounds as eager does; ``casts``; ``fast``:
inductor's defaults; :mod:`stages.common.tower_compile`); on a GPU each
line also gives the compiled towers' rate on ready tensors against the
eager towers' (CUDA graphs) in the same process, the speed the setting
keeps. ``--demo-rows FILE`` reads the demo's rows from a parquet file (``--save-demo
FILE`` writes one), for machines without the demo's datasets.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

LAION_THRESHOLD = 0.28
DEMO_THRESHOLD = 0.6
TOP_FRACTION = 0.3


def keep_top(scores: np.ndarray, keys: np.ndarray, fraction: float) -> np.ndarray:
    """The rows the stage's ``top_fraction`` keeps: ranked by score, best
    first, ties by key, the first ``round(fraction * N)``
    (:class:`stages.common.topfraction.TopFraction`'s rule)."""
    order = np.lexsort((keys, -scores.astype(np.float64)))
    keep = np.zeros(len(scores), bool)
    keep[order[: int(round(fraction * len(scores)))]] = True
    return keep


def agreement(eager, other, keys, threshold: float, fraction: float) -> dict:
    """How ``other``'s decisions differ from ``eager``'s over the same rows:
    at ``threshold`` (a row is kept when its score is >= it) and at the top
    ``fraction``; with the largest score difference and, per cut, the rows
    whose eager score lies within that difference of it (the only ones that
    can change)."""
    eager, other = np.asarray(eager, np.float32), np.asarray(other, np.float32)
    keys = np.asarray(keys)
    ok = np.isfinite(eager) & np.isfinite(other)
    eager, other, keys = eager[ok], other[ok], keys[ok]
    n = len(eager)
    diff = float(np.abs(eager - other).max()) if n else 0.0
    at_t = int(((eager >= threshold) != (other >= threshold)).sum())
    top_e, top_o = keep_top(eager, keys, fraction), keep_top(other, keys, fraction)
    cut = float(np.sort(eager)[::-1][max(0, int(round(fraction * n)) - 1)]) if n else float("nan")
    return {
        "rows": n,
        "max_abs_diff": diff,
        "threshold": threshold,
        "threshold_flips": at_t,
        "threshold_share": at_t / max(n, 1),
        "threshold_near": int((np.abs(eager - threshold) <= diff).sum()),
        "kept_at_threshold": float((eager >= threshold).mean()) if n else float("nan"),
        "top_fraction": fraction,
        "top_cut": cut,
        "top_flips": int((top_e != top_o).sum()),
        "top_share": int((top_e != top_o).sum()) / max(n, 1),
        "top_near": int((np.abs(eager - cut) <= diff).sum()),
    }


def describe(name: str, a: dict) -> str:
    return (f"{name}: {a['rows']} rows, max |score diff| {a['max_abs_diff']:.2e}; "
            f"threshold {a['threshold']:.2f} (eager keeps {a['kept_at_threshold']:.1%}): "
            f"{a['threshold_flips']} decisions differ ({a['threshold_share']:.3%}), {a['threshold_near']} rows within "
            f"the difference of it; top {a['top_fraction']:.0%} (cut {a['top_cut']:.4f}): {a['top_flips']} differ "
            f"({a['top_share']:.3%}), {a['top_near']} rows within the difference")  # fmt: skip


# ------------------------------------------------------------------ rows


def bench_rows(n: int, unique: int):
    from bench.clipbench import corpus

    return corpus(n, unique)


def demo_rows(path: str | None):
    """(images, captions) of the demo job's rows that hold a decodable image."""
    import pyarrow.parquet as pq

    if path:
        t = pq.read_table(path)
        return [bytes(b) for b in t.column("image").to_pylist()], t.column("caption").to_pylist()
    from PIL import Image

    from pairforge.demo import build_corpus

    routes, rows = build_corpus(0)
    images, captions = [], []
    for r in rows:
        route = routes.get(r["path"])
        body = getattr(route, "body", None)
        if not isinstance(body, (bytes, bytearray)) or not body:
            continue
        try:
            Image.open(io.BytesIO(body)).verify()
        except Exception:  # a planted broken image: no score to compare
            continue
        images.append(bytes(body))
        captions.append(r["caption"])
    return images, captions


def save_demo(path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, captions = demo_rows(None)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": captions}), path)
    print(f"wrote {len(images)} demo rows to {path}")


# ------------------------------------------------------------------ scores


def stage_scores(images, captions, model: str, pretrained: str, device: str, compile: bool, batch: int = 2048,
                 numerics: str = "eager"):  # fmt: skip
    """The clip_score stage's scores over the rows on a GPU, eager towers
    (CUDA graphs of them) or compiled with ``numerics`` (kept whatever their
    difference), and the towers' rate on ready tensors."""
    import torch

    from bench.clipbench import rows_batch
    from pairforge.stages.base import run_stage_batch
    from pairforge.stages.clip_score import ClipScoreStage

    torch.manual_seed(0)  # the same random weights for both
    cfg = {"compile": compile} | ({"compile_tolerance": float("inf"), "compile_numerics": numerics} if compile else {})
    st = ClipScoreStage(pretrained=pretrained, model=model, device=device, batch_size=batch, micro_batch=256,
                        image_decode="nvjpeg", **cfg)  # fmt: skip
    t = time.perf_counter()
    st.setup()
    mode = st._towers.mode if st._towers is not None else "eager"
    out = []
    for a in range(0, len(images), batch):
        rows = rows_batch(images[a : a + batch], captions[a : a + batch], a)
        out.append(run_stage_batch(st, rows)["clip_score"])
    rate = tower_rate(st._towers, st._loaded.tokenizer, captions) if st._towers is not None else float("nan")
    print(f"   {model} ({pretrained}) towers {mode}, check {st._towers.check if st._towers else {}}, "
          f"{time.perf_counter() - t:.1f}s, towers on ready tensors {rate:.0f} pairs/s", flush=True)  # fmt: skip
    st.teardown()
    return np.concatenate(out).astype(np.float32), rate


def tower_rate(towers, tokenizer, captions, batch: int = 2048, steps: int = 10, passes: int = 3) -> float:
    """Pairs/s of ``towers`` on ready device tensors (random pixels, real
    tokens; two batches in flight, as an actor's two threads): the median of
    ``passes`` timed passes of ``steps`` batches after a warm-up."""
    import torch

    g = torch.Generator(device=towers.device).manual_seed(0)
    pix = [torch.randint(0, 256, (batch, *towers.shape_img[1:]), dtype=torch.uint8, device=towers.device,
                         generator=g) for _ in range(2)]  # fmt: skip
    tok = [tokenizer(captions[i * batch : (i + 1) * batch]).to(towers.device) for i in range(2)]
    rates = []
    for r in range(passes + 1):
        t, pending = time.perf_counter(), []
        for k in range(steps):
            pending.append(towers.enqueue(pix[k % 2], tok[k % 2]))
            if len(pending) > 2:
                pending.pop(0).wait()
        for q in pending:
            q.wait()
        if r:  # the first pass warms up
            rates.append(steps * batch / (time.perf_counter() - t))
    return float(np.median(rates))


def forward_scores(images, captions, model: str, pretrained: str, device: str, compile: bool, micro_batch: int = 64,
                   numerics: str = "eager"):  # fmt: skip
    """The towers' forward (bf16 autocast) over the rows, on any device:
    eager, or ``torch.compile``'d as the stage compiles it with
    ``numerics``."""
    import torch

    from pairforge.stages.common import clip as _clip
    from pairforge.stages.common.cuda_towers import tower_forward
    from pairforge.stages.common.tower_compile import compiled

    torch.manual_seed(0)
    ld = _clip.load(model, pretrained, device)
    fn = tower_forward(ld.model, ld.cfg, device)
    fn = compiled(fn, ld.model, numerics) if compile else fn
    tensors, errors = _clip.decode_cpu(images, device, 1)
    good = [i for i, e in enumerate(errors) if e is None]
    pixels = _clip.resize_crop([tensors[i] for i in good], ld.cfg)
    tokens = ld.tokenizer([captions[i] for i in good]).to(device)
    scores = np.full(len(images), np.nan, np.float32)
    out = []
    with torch.inference_mode():
        for a in range(0, len(good), micro_batch):
            b = min(a + micro_batch, len(good))
            s = fn(_clip.padded(pixels[a:b], micro_batch), _clip.padded(tokens[a:b], micro_batch))[2][: b - a]
            out.append(s.float().cpu().numpy())
    scores[good] = np.concatenate(out)
    return scores, float("nan")


def measure(images, captions, model: str, pretrained: str, device: str, thresholds, settings) -> list[tuple]:
    """(setting, agreement at each threshold, compiled rate / eager rate) per
    ``compile_numerics`` setting, against one eager scoring of the rows."""
    score = stage_scores if device.startswith("cuda") else forward_scores
    eager, eager_rate = score(images, captions, model, pretrained, device, False)
    keys = np.array([f"{i:09d}" for i in range(len(images))])
    out = []
    for setting in settings:
        other, rate = score(images, captions, model, pretrained, device, True, numerics=setting)
        out.append((setting, [agreement(eager, other, keys, t, TOP_FRACTION) for t in thresholds], rate / eager_rate))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sets", default="bench,demo")
    p.add_argument("--n", type=int, default=None, help="bench rows (default 40960 on a GPU, 512 on the CPU)")
    p.add_argument("--unique", type=int, default=1024)
    p.add_argument("--settings", default="eager", help="compile_numerics settings to compare (comma list)")
    p.add_argument("--demo-rows", default=None, help="the demo's rows as parquet (image, caption)")
    p.add_argument("--save-demo", default=None, help="write the demo's rows here and stop")
    args = p.parse_args(argv)
    if args.save_demo:
        save_demo(args.save_demo)
        return
    gpu = args.device.startswith("cuda")
    n = args.n or (40960 if gpu else 512)
    if gpu:
        import torch

        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    for name in args.sets.split(","):
        if name == "bench":
            images, captions = bench_rows(n, args.unique)
            model, pretrained, cuts = "ViT-B-32", "random", (LAION_THRESHOLD,)
        elif name == "demo":
            images, captions = demo_rows(args.demo_rows)
            model, pretrained, cuts = "pf-tiny", "", (LAION_THRESHOLD, DEMO_THRESHOLD)
        else:
            raise SystemExit(f"--sets: unknown set {name!r} (bench, demo)")
        if not pretrained:
            from pairforge.demo import SCORER_CHECKPOINT

            pretrained = str(SCORER_CHECKPOINT)
        for setting, found, speed in measure(images, captions, model, pretrained, args.device, cuts,
                                             args.settings.split(",")):  # fmt: skip
            for a in found:
                print(describe(f"{name} ({model}, {args.device}, compile_numerics {setting})", a)
                      + (f"; compiled towers {speed:.2f}x eager's rate" if speed == speed else ""), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
