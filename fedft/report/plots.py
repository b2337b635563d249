"""The training curves of one run: train / held-out loss and exact match per round (curves.png)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Train / eval loss and exact match (overall and per task) against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_em) = plt.subplots(1, 2, figsize=(11, 4))
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train), marker="o", label="train loss (clients)")
    if evals:
        ax_loss.plot([r["round"] for r in evals], [r["eval_loss"] for r in evals], marker="s",
                     label="held-out loss")
        ax_em.plot([r["round"] for r in evals], [100 * r["eval_exact_match"] for r in evals],
                   marker="s", linewidth=2.5, color="black", label="all tasks")
        tasks = sorted({t for r in evals for t in r.get("eval_exact_match_by_task", {})})
        for task in tasks:
            ax_em.plot([r["round"] for r in evals],
                       [100 * r["eval_exact_match_by_task"].get(task, 0.0) for r in evals],
                       linestyle="--", label=task)
    ax_loss.set(xlabel="round", ylabel="loss per answer token (log)", title="loss", yscale="log")
    ax_em.set(xlabel="round", ylabel="exact match (%)", title="held-out exact match", ylim=(-2, 102))
    for ax in (ax_loss, ax_em):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
