"""The rows a run records: metrics.jsonl after every round, the progress line, summary.json.

``RunRecorder`` rewrites RUN_DIR/metrics.jsonl atomically after every round, so a reader or
a crash never sees half a row; ``format_progress`` is the round's console line;
``summarize`` builds summary.json (base and final metrics, totals, the resolved config).
"""

from __future__ import annotations

from pathlib import Path

from fedft.config import FedftConfig, config_to_dict
from fedft.eval.held_out import ANSWERS
from fedft.report.plots import plot_curves
from fedft.rundir import CURVES_FILE, METRICS_FILE, SUMMARY_FILE, atomic_write_json, atomic_write_jsonl


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
        "final": {k: v for k, v in final_metrics.items() if k != ANSWERS},
        "rounds": len(rows) - 1,
        "bytes_up_total": sum(r.get("bytes_up", 0) for r in rows),
        "bytes_down_total": sum(r.get("bytes_down", 0) for r in rows),
        "wall_seconds": wall_seconds,
        "config": config_to_dict(cfg),
    }
