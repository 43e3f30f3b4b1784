"""trainer.graphstep: the training step replayed as one CUDA graph makes the
eager step's updates (same losses, same weights, the learning rate of each
step), undoes its warm-up, hands batches it was not captured for to the eager
step, and leaves checkpoints that an eager run on the CPU resumes.

The CUDA tests run where there is a GPU (the lent machine); CI has none and
runs the checkpoint test only."""

from dataclasses import replace

import pytest
import torch

from pairforge.trainer.graphstep import GraphedStep, device_lr
from pairforge.trainer.loop import TrainConfig, lr_at, train, train_step
from pairforge.trainer.model import create_model, load_checkpoint, optimizer_for, save_checkpoint
from pairforge.trainer.prep import tokenizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
CFG = TrainConfig(shards=(), out="", model="pf-tiny", lr=3e-3, warmup=3, steps=8, grad_clip=1.0)


def _batches(n: int, bs: int, size: int, device, negatives_at=()) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    tok = tokenizer("pf-tiny")
    out = []
    for i in range(n):
        caps = [f"a photo of thing {int(torch.randint(0, 999, (1,), generator=g))}" for _ in range(bs)]
        neg = tok([f"not thing {j}" for j in range(3)]).to(device) if i in negatives_at else None
        image = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, generator=g).to(device)
        out.append({"image": image, "text": tok(caps).to(device), "neg_text": neg})
    return out


def _model(device):
    torch.manual_seed(0)
    model, spec = create_model("pf-tiny", device=device)
    return model.train(), spec


def _eager_run(batches, device, bf16=False):
    model, spec = _model(device)
    opt = optimizer_for(model, CFG.lr, CFG.weight_decay)
    losses = [float(train_step(model, opt, b, CFG, spec, device, i, bf16)) for i, b in enumerate(batches)]
    return losses, model


def _graph_run(batches, device, bf16=False):
    model, spec = _model(device)
    opt = optimizer_for(model, CFG.lr, CFG.weight_decay)
    step = GraphedStep(model, opt, spec, bf16, CFG.grad_clip)
    losses = []
    for i, b in enumerate(batches):
        loss = step(b, lr_at(CFG, i)) if step.accepts(b) else None
        if loss is None:  # as trainer.loop does
            loss = train_step(model, opt, b, CFG, spec, device, i, bf16)
        losses.append(float(loss))
    return losses, model, step


def _close_weights(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=tol, atol=tol), name


@cuda
def test_graph_replays_make_the_eager_updates():
    """Losses and weights after 8 steps along a warm-up + cosine schedule: a
    graph that kept a fixed rate, or a warm-up left in the weights, differs
    in the first or the later losses."""
    device = torch.device("cuda")
    batches = _batches(8, 16, 64, device)
    eager, m_eager = _eager_run(batches, device)
    graph, m_graph, step = _graph_run(batches, device)
    assert step.replays == 8
    assert graph == pytest.approx(eager, rel=1e-4)
    assert eager[-1] != pytest.approx(eager[0], rel=1e-3)  # the steps did change the model
    _close_weights(m_eager, m_graph, 1e-4)


@cuda
def test_batches_with_hard_negatives_take_the_eager_step_on_the_same_state():
    device = torch.device("cuda")
    batches = _batches(7, 16, 64, device, negatives_at=(0, 3))
    eager, m_eager = _eager_run(batches, device)
    graph, m_graph, step = _graph_run(batches, device)
    assert step.replays == 5
    assert graph == pytest.approx(eager, rel=1e-4)
    _close_weights(m_eager, m_graph, 1e-4)


@cuda
def test_the_training_loop_replays_its_graph_and_keeps_its_curve(tmp_path):
    from bench.trainkit import write_shards
    from tests.trainer.test_trainer import QUICK

    write_shards(tmp_path / "corpus", 640, 160, 64)  # scikit-image's photos: no dataset package needed
    kw = {**QUICK, "device": "cuda", "steps": 12, "eval_every": 12, "hard_negatives": False}
    cfg = TrainConfig(shards=(str(tmp_path / "corpus"),), out=str(tmp_path / "graph"), **kw)
    graphed = train(cfg)
    eager = train(replace(cfg, out=str(tmp_path / "eager"), cuda_graph=False))
    assert graphed["timing"]["cuda_graph_steps"] == 12 and eager["timing"]["cuda_graph_steps"] == 0
    loss = [h["loss"] for h in graphed["history"]["train"]]
    assert loss == pytest.approx([h["loss"] for h in eager["history"]["train"]], rel=2e-2)
    assert loss[-1] < loss[0]


def test_a_checkpoint_of_a_graphed_run_resumes_eagerly_on_the_cpu(tmp_path):
    """The capturable flag and the device learning rates stay out of the
    checkpoint: an eager CPU optimizer loads it and steps."""
    model, spec = _model("cpu")
    opt = optimizer_for(model, CFG.lr, CFG.weight_decay)
    train_step(model, opt, _batches(1, 4, 64, "cpu")[0], CFG, spec, torch.device("cpu"), 0, False)
    device_lr(opt, torch.device("cpu"))
    assert all(torch.is_tensor(g["lr"]) and g["capturable"] for g in opt.param_groups)
    save_checkpoint(tmp_path / "c.pt", model, opt, 1, {})
    saved = load_checkpoint(tmp_path / "c.pt")["optimizer"]
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in saved["param_groups"])
    fresh, _ = _model("cpu")
    fresh.load_state_dict(model.state_dict())
    opt2 = optimizer_for(fresh, CFG.lr, CFG.weight_decay)
    opt2.load_state_dict(saved)
    train_step(fresh, opt2, _batches(2, 4, 64, "cpu")[1], CFG, spec, torch.device("cpu"), 1, False)
    assert all(type(g["lr"]) is float for g in opt2.param_groups)


def test_a_step_that_cannot_be_captured_leaves_the_eager_step_as_it_was():
    """Here the capture fails for want of a GPU (on the GPU, a model with an
    operation a graph cannot hold would): the step says so, nothing moved,
    the optimizer is eager again and the run goes on with the eager curve."""
    if torch.cuda.is_available():
        pytest.skip("the capture would succeed here")
    device = torch.device("cpu")
    batches = _batches(3, 4, 64, device)
    eager, m_eager = _eager_run(batches, device)
    graph, m_graph, step = _graph_run(batches, device)
    assert step.failed and step.replays == 0 and not step.accepts(batches[0])
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in step.optimizer.param_groups)
    assert graph == eager
    _close_weights(m_eager, m_graph, 0.0)
