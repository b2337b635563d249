"""What a run leaves behind: metrics.jsonl (one row per round), summary.json, curve plots.

``RunRecorder`` rewrites metrics.jsonl atomically after every round, so a reader or a
crash never sees half a row. ``plot_curves`` draws losses and exact match per round.
Files only: nothing here trains or evaluates.
"""

from __future__ import annotations

from pathlib import Path

from fedft.config import FedftConfig, config_to_dict
from fedft.checkpoint import atomic_write_json, atomic_write_jsonl, read_jsonl_rows

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
COMPARISON_FILE = "comparison.png"


class RunRecorder:
    """Accumulates per-round rows for one run directory."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def add_round(self, row: dict) -> None:
        """Append a round's row and rewrite metrics.jsonl."""
        self.rows.append(row)
        atomic_write_jsonl(self.out_dir / METRICS_FILE, self.rows)

    def amend_last(self, values: dict) -> None:
        """Add ``values`` to the last round's row and rewrite metrics.jsonl."""
        self.rows[-1].update(values)
        atomic_write_jsonl(self.out_dir / METRICS_FILE, self.rows)

    def write_summary(self, summary: dict) -> Path:
        path = self.out_dir / SUMMARY_FILE
        atomic_write_json(path, summary)
        return path

    def plot(self, title: str) -> Path:
        path = self.out_dir / CURVES_FILE
        plot_curves(self.rows, path, title)
        return path


def load_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return read_jsonl_rows(Path(run_dir) / METRICS_FILE)


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


def format_progress(row: dict, num_rounds: int) -> str:
    """One line a person can follow: round, loss, exact match, bytes, time."""
    parts = [f"round {row['round']:>3}/{num_rounds}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.3f}")
    if row.get("eval_loss") is not None:
        parts.append(f"held-out loss {row['eval_loss']:.3f}")
        parts.append(f"exact match {100 * row['eval_exact_match']:.1f}%")
        by_task = row.get("eval_exact_match_by_task", {})
        parts.append("(" + " ".join(f"{t} {100 * v:.0f}" for t, v in by_task.items()) + ")")
    if row.get("bytes_up"):
        parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB down {row['bytes_down'] / 1e6:.2f} MB")
    if row.get("aggregation_error") is not None:
        parts.append(f"naive-avg error {row['aggregation_error']:.3f}")
    if row.get("svd_discarded_energy") is not None:
        parts.append(f"svd cut {row['svd_discarded_energy']:.3f}")
    if row.get("epsilon_user_rdp") is not None:
        parts.append(f"user epsilon {row['epsilon_user_rdp']:.2f} (clipped {row.get('clipped_fraction') or 0:.0%})")
    if row.get("epsilon_record_max") is not None:
        parts.append(f"record epsilon <= {row['epsilon_record_max']:.2f}")
    if row.get("refusals"):
        parts.append(f"{len(row['refusals'])} declined")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def summarize(cfg: FedftConfig, rows: list[dict], final_metrics: dict, wall_seconds: float) -> dict:
    """summary.json: base and final metrics, totals, and the config that produced them."""
    base = rows[0]
    trained = rows[1:]
    errors = [r["aggregation_error"] for r in trained if r.get("aggregation_error") is not None]
    energy = [r["svd_discarded_energy"] for r in trained if r.get("svd_discarded_energy") is not None]
    return {
        "strategy": cfg.strategy.name,
        "aggregation": cfg.strategy.aggregation,
        "server_optimizer": cfg.strategy.server_optimizer,
        "wire_dtype": cfg.strategy.wire_dtype,
        "mean_aggregation_error": sum(errors) / len(errors) if errors else None,
        "mean_svd_discarded_energy": sum(energy) / len(energy) if energy else None,
        "mean_bytes_up_per_client": (sum(r.get("bytes_up_per_client", 0) for r in trained) / len(trained)
                                     if trained else 0),
        "base": {k: base[k] for k in ("eval_loss", "eval_exact_match", "eval_exact_match_by_task")},
        "final": {k: v for k, v in final_metrics.items()},
        "rounds": len(rows) - 1,
        "bytes_up_total": sum(r.get("bytes_up", 0) for r in rows),
        "bytes_down_total": sum(r.get("bytes_down", 0) for r in rows),
        "wall_seconds": wall_seconds,
        "config": config_to_dict(cfg),
    }


def load_summary(run_dir: Path) -> dict:
    """A run's summary.json."""
    import json

    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a finished fedft run?")
    return json.loads(path.read_text())


def comparison_rows(run_dirs: list[Path]) -> list[dict]:
    """One row per run (and one for the base model of the first): exact match overall, per task."""
    rows = []
    for i, run_dir in enumerate(run_dirs):
        summary = load_summary(run_dir)
        if i == 0:
            rows.append({"run": "base model", **_em(summary["base"])})
        rows.append({"run": f"{_label(summary)} ({Path(run_dir).name})", **_em(summary["final"]),
                     "bytes": summary["bytes_up_total"] + summary["bytes_down_total"],
                     "up_per_client": summary.get("mean_bytes_up_per_client"),
                     "aggregation_error": summary.get("mean_aggregation_error"),
                     "svd_cut": summary.get("mean_svd_discarded_energy"),
                     "seconds": summary["wall_seconds"]})
    return rows


def _label(summary: dict) -> str:
    """'fedavg', or e.g. 'fedavg/svd+fedadam fp16' when a run changed the aggregation."""
    label = summary["strategy"]
    if summary.get("aggregation", "fedavg") != "fedavg":
        label += f"/{summary['aggregation']}"
    if summary.get("server_optimizer", "none") != "none":
        label += f"+{summary['server_optimizer']}"
    ranks = summary.get("config", {}).get("lora", {}).get("client_ranks")
    if ranks:
        label += " ranks " + ",".join(str(r) for r in ranks)
    if summary.get("wire_dtype", "float32") != "float32":
        label += f" {summary['wire_dtype']}"
    return label


def _em(metrics: dict) -> dict:
    return {"exact_match": metrics["eval_exact_match"], "by_task": metrics["eval_exact_match_by_task"]}


def comparison_markdown(rows: list[dict]) -> str:
    """A markdown table of ``comparison_rows``."""
    tasks = sorted({t for r in rows for t in r["by_task"]})
    lines = ["| run | exact match | " + " | ".join(tasks)
             + " | MB sent | KB up per client-round | naive-avg error | SVD cut | seconds |",
             "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: | ---: | ---: |"]

    def fmt(value, pattern: str) -> str:
        return pattern.format(value) if value else "-"

    for r in rows:
        cells = [f"{100 * r['by_task'].get(t, 0):.0f}%" for t in tasks]
        extra = [fmt(r.get("bytes", 0) / 1e6, "{:.0f}"), fmt((r.get("up_per_client") or 0) / 1e3, "{:.0f}"),
                 fmt(r.get("aggregation_error"), "{:.3f}"), fmt(r.get("svd_cut"), "{:.3f}"),
                 fmt(r.get("seconds"), "{:.0f}")]
        lines.append(f"| {r['run']} | **{100 * r['exact_match']:.1f}%** | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def plot_comparison(rows: list[dict], path: Path) -> None:
    """Grouped bars: exact match per task for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in rows for t in r["by_task"]}) + ["all"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(tasks)), 4))
    for i, r in enumerate(rows):
        values = [100 * r["by_task"].get(t, 0) for t in tasks[:-1]] + [100 * r["exact_match"]]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=r["run"])
    ax.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(tasks))], tasks)
    ax.set(ylabel="held-out exact match (%)", ylim=(0, 105), title="exact match by task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
