"""Compiled CLIP towers against eager ones, by the decisions the clip_score
stage makes with their scores (``bench/clipagree.py``; the GPU figures are in
docs/gpu.md): the counting itself, the layer norms routed through the eager
kernel (:mod:`stages.common.tower_compile`), and the real pf-tiny scorer's
towers compiled by inductor on the CPU under bf16 autocast with the stage's
``compile_numerics: eager``."""

from __future__ import annotations

import numpy as np
import pytest

from bench.clipagree import DEMO_THRESHOLD, LAION_THRESHOLD, TOP_FRACTION, agreement, forward_scores, keep_top


def test_keep_top_ranks_by_score_then_key():
    scores = np.array([0.5, 0.7, 0.5, 0.1, 0.7], np.float32)
    keys = np.array(["e", "d", "c", "b", "a"])
    # best first: 0.7 (a), 0.7 (d), 0.5 (c), 0.5 (e), 0.1 (b); round(0.6 * 5) = 3 kept
    np.testing.assert_array_equal(keep_top(scores, keys, 0.6), [False, True, True, False, True])
    assert not keep_top(scores, keys, 0.0).any() and keep_top(scores, keys, 1.0).all()


def test_agreement_counts_changed_decisions_and_rows_near_each_cut():
    keys = np.array([f"{i}" for i in range(6)])
    eager = np.array([0.10, 0.2795, 0.2810, 0.40, 0.50, np.nan], np.float32)
    other = np.array([0.10, 0.2805, 0.2790, 0.40, 0.50, 0.3], np.float32)  # two rows cross 0.28
    a = agreement(eager, other, keys, LAION_THRESHOLD, 0.4)
    assert a["rows"] == 5  # the failed row (NaN) has no decision
    assert a["max_abs_diff"] == pytest.approx(0.002, abs=1e-6)
    assert (a["threshold_flips"], a["threshold_near"]) == (2, 2)
    assert a["threshold_share"] == pytest.approx(0.4)
    assert a["top_flips"] == 0  # the best 2 of 5 are 0.50 and 0.40 either way
    same = agreement(eager, eager, keys, LAION_THRESHOLD, 0.4)
    assert (same["max_abs_diff"], same["threshold_flips"], same["top_flips"]) == (0.0, 0, 0)


def test_numerics_settings_name_inductors_switches():
    from pairforge.stages.common.tower_compile import settings

    patches, eager_norm, missing = settings("eager")
    assert patches["emulate_precision_casts"] is True and eager_norm
    assert patches.get("max_autotune") is False and patches.get("split_reductions") is False
    # the bias stays inside the matmul: the switch where this torch has it, else no pattern rewrites
    assert patches.get("keep_addmm_fused_for_half_dtypes") is True or patches.get("pattern_matcher") is False
    assert settings("casts")[:2] == ({"emulate_precision_casts": True}, False)
    assert settings("fast")[:2] == ({}, False) and not missing
    with pytest.raises(ValueError, match="compile_numerics.*'exact'"):
        settings("exact")
    from pairforge.stages.clip_score import Config

    assert Config(pretrained="random").compile_numerics == "eager"
    with pytest.raises(ValueError, match="compile_numerics.*'exact'"):  # at the config, before any model loads
        Config(pretrained="random", compile_numerics="exact")


def _pf_tiny_inputs(rows: int):
    import torch

    from bench.clipagree import demo_rows
    from pairforge.demo import SCORER_CHECKPOINT
    from pairforge.stages.common import clip as _clip

    images, captions = demo_rows(None)
    images, captions = images[: rows + 16], captions[: rows + 16]
    torch.manual_seed(0)
    ld = _clip.load("pf-tiny", str(SCORER_CHECKPOINT), "cpu")
    tensors, errors = _clip.decode_cpu(images, "cpu", 1)
    good = [i for i, e in enumerate(errors) if e is None][:rows]
    pixels = _clip.resize_crop([tensors[i] for i in good], ld.cfg)
    return ld, pixels, ld.tokenizer([captions[i] for i in good])


def test_routed_layer_norms_leave_the_eager_towers_bit_identical():
    """The layer norms routed through ``pairforge::eager_layer_norm`` run the
    kernel autocast would run on the inputs it would give it: the towers'
    embeddings and scores are bit-identical to the plain modules' (bf16
    autocast on the CPU, where layer norm keeps bf16 inputs in bf16, and
    the fp32 residual stream of the text tower)."""
    import torch

    from pairforge.stages.common.cuda_towers import tower_forward
    from pairforge.stages.common.tower_compile import route_norms

    ld, pixels, tokens = _pf_tiny_inputs(48)
    fn = tower_forward(ld.model, ld.cfg, "cpu")
    with torch.inference_mode():
        plain = fn(pixels, tokens)
        norms = sum(isinstance(m, torch.nn.LayerNorm) for m in ld.model.modules())
        assert route_norms(ld.model) == norms >= 4 and route_norms(ld.model) == 0  # once each
        routed = fn(pixels, tokens)
    for a, b in zip(plain, routed):
        assert torch.equal(a, b)


def test_compiled_pf_tiny_towers_keep_the_eager_scores_on_the_cpu(tmp_path, monkeypatch):
    """The shipped scorer's towers, eager and ``torch.compile``'d as the
    stage compiles them (``compile_numerics: eager``), over 256 of the demo's
    real pairs (photos, products, mismatched captions), under bf16
    autocast: scores within fp32 noise of eager (plain inductor: ~1.8e-3,
    rounding only: ~1.3e-3), so no decision at LAION's or the demo's
    threshold or the top 30% changes; and the compile is kept in inductor's
    FX graph cache for the node's next actor (a custom decomposition table
    would bypass it)."""
    pytest.importorskip("torch._inductor")
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor's CPU backend needs a C compiler")
    import torch
    from torch._dynamo.utils import counters

    from bench.clipagree import demo_rows
    from pairforge.demo import SCORER_CHECKPOINT

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    images, captions = demo_rows(None)
    images, captions = images[:256], captions[:256]
    keys = np.array([f"{i:04d}" for i in range(len(images))])
    eager, _ = forward_scores(images, captions, "pf-tiny", str(SCORER_CHECKPOINT), "cpu", False)
    counters.clear()
    other, _ = forward_scores(images, captions, "pf-tiny", str(SCORER_CHECKPOINT), "cpu", True, numerics="eager")
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1 and not counters["inductor"]["fxgraph_cache_bypass"]
    assert np.isfinite(eager).sum() >= 250 and np.ptp(eager[np.isfinite(eager)]) > 0.3  # real, spread scores
    for t in (LAION_THRESHOLD, DEMO_THRESHOLD):
        a = agreement(eager, other, keys, t, TOP_FRACTION)
        assert a["max_abs_diff"] < 1e-5, a  # measured: 1.8e-7
        assert a["threshold_flips"] == 0 and a["top_flips"] == 0, a
    torch._dynamo.reset()  # as a fresh actor: compiles again, finds the graph in the cache
    counters.clear()
    again, _ = forward_scores(images[:64], captions[:64], "pf-tiny", str(SCORER_CHECKPOINT), "cpu", True)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])
    np.testing.assert_allclose(again, other[:64], atol=1e-6)


def test_one_process_of_a_node_compiles_at_a_time(tmp_path, monkeypatch):
    """The compile lock is the node's (a file in inductor's cache dir): while
    another process holds it, this one waits (and then loads from inductor's
    cache what that process compiled: inductor's part, not tested here)."""
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from pairforge.stages.common.tower_compile import node_compile_lock

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    code = (
        "import sys\nfrom pairforge.stages.common.tower_compile import node_compile_lock\n"
        "with node_compile_lock():\n    print('held', flush=True)\n    sys.stdin.readline()\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    got = threading.Event()

    def take():
        with node_compile_lock():
            got.set()

    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=take)
        waiter.start()
        assert not got.wait(0.5)  # the other process holds it
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert got.wait(30)  # released: this process takes it
        waiter.join(5)
        assert (tmp_path / "pairforge-compile.lock").exists()
    finally:
        holder.kill() if holder.poll() is None else None
        holder.wait(10)
