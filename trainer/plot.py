"""The loss and recall curves of a run, as one PNG (matplotlib, Agg). A
recall a run could not measure (too few held-out pairs for that k) is left
out of the plot, as it is out of the report."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(11, 4))
    train = history.get("train", [])
    ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train], color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("contrastive loss (train)")
    ax_loss.grid(alpha=0.3)

    evals = history.get("eval", [])
    steps = [e["step"] for e in evals]
    for direction, style in (("image_to_text", "-"), ("text_to_image", "--")):
        for k, color in (("r@1", "tab:red"), ("r@5", "tab:green")):
            name = direction.replace("_to_", "->").replace("image", "img").replace("text", "txt")
            if all(k in e[direction] for e in evals) and evals:
                ys = [e[direction][k] for e in evals]
                ax_rec.plot(steps, ys, style, color=color, marker="o", ms=3, label=f"{name} {k}")
    if evals:
        for k, color in (("r@1", "tab:red"), ("r@5", "tab:green")):
            if k in evals[-1]["chance"]:
                ax_rec.axhline(evals[-1]["chance"][k], color=color, lw=0.8, ls=":", label=f"chance {k}")
        auc = [e["matching_vs_shuffled"]["auc"] for e in evals]
        if all(a is not None for a in auc):
            ax_rec.plot(steps, auc, color="black", marker=".", label="ROC AUC matching vs shuffled")
    ax_rec.set_ylim(0, 1.02)
    ax_rec.set_xlabel("step")
    ax_rec.set_ylabel("held-out")
    ax_rec.grid(alpha=0.3)
    if ax_rec.get_legend_handles_labels()[0]:
        ax_rec.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
