"""Compiled CLIP towers against eager ones, by the decisions the clip_score
stage makes with their scores (``bench/clipagree.py``; the GPU figures are in
docs/gpu.md): the counting itself, and the real pf-tiny scorer's
towers compiled by inductor on the CPU under the GPU's bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest

from bench.clipagree import DEMO_THRESHOLD, LAION_THRESHOLD, TOP_FRACTION, agreement, forward_scores, keep_top

#: the most decisions compiled towers may change for the stage to compile by default (issue 31)
MAX_SHARE = 0.001


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


def test_compiled_pf_tiny_towers_keep_the_demo_decisions_on_the_cpu():
    """The shipped scorer's towers, eager and ``torch.compile``'d as the
    stage compiles them, over 256 of the demo's real pairs (photos,
    products, mismatched captions), under bf16 autocast: the scores differ
    (rounding), the decisions at LAION's and the demo's thresholds and at the
    top 30% change for at most 0.1% of the rows (here: none)."""
    pytest.importorskip("torch._inductor")
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor's CPU backend needs a C compiler")
    from bench.clipagree import demo_rows
    from pairforge.demo import SCORER_CHECKPOINT

    images, captions = demo_rows(None)
    images, captions = images[:256], captions[:256]
    keys = np.array([f"{i:04d}" for i in range(len(images))])
    eager, _ = forward_scores(images, captions, "pf-tiny", str(SCORER_CHECKPOINT), "cpu", False)
    other, _ = forward_scores(images, captions, "pf-tiny", str(SCORER_CHECKPOINT), "cpu", True)
    assert np.isfinite(eager).sum() >= 250 and np.ptp(eager[np.isfinite(eager)]) > 0.3  # real, spread scores
    for t in (LAION_THRESHOLD, DEMO_THRESHOLD):
        a = agreement(eager, other, keys, t, TOP_FRACTION)
        assert 0 < a["max_abs_diff"] < 5e-3, a  # compiled, not the same kernels; bf16-sized differences
        assert a["threshold_share"] <= MAX_SHARE and a["top_share"] <= MAX_SHARE, a


def test_one_process_of_a_node_compiles_at_a_time(tmp_path, monkeypatch):
    """The compile lock is the node's (a file in inductor's cache dir): while
    another process holds it, this one waits (and then loads from inductor's
    cache what that process compiled: inductor's part, not tested here)."""
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from pairforge.stages.common.cuda_towers import node_compile_lock

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    code = (
        "import sys\nfrom pairforge.stages.common.cuda_towers import node_compile_lock\n"
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
